//! What the kernel relay needs to know of, and change on, a network device:
//! its offload features, read and switched through the `SIOCETHTOOL` ioctl
//! (what `ethtool -k` / `ethtool -K` do; on loopback it switches UDP
//! segmentation offload off while it runs, see [`UdpSegmentationOff`]),
//! and whether it is loopback, or a card on a bus, in this thread's
//! network namespace.
//!
//! Written by hand: the one crate that does this (`ethtool`, over netlink)
//! brings an async netlink stack for what is a handful of ioctls here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// The feature `UDP_SEGMENT` (UDP GSO) needs of a device to pass a
/// multi-datagram buffer through whole.
const TX_UDP_SEGMENTATION: &str = "tx-udp-segmentation";

/// `struct ifreq` with `ifr_data`, as `SIOCETHTOOL` takes it.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// An interface's feature set, by name and bit, as the kernel lists them.
struct Device {
    socket: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
    /// Feature names, in the order of their bits.
    features: Vec<String>,
}

/// `interface` as `struct ifreq` names it.
fn ifreq_name(interface: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    let c = CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, s) in name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(name)
}

/// A socket to address interface ioctls to, in this thread's network
/// namespace (unlike `/sys/class/net`, which shows the namespace sysfs was
/// mounted in).
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() has no preconditions; the descriptor it returns
    // is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Device {
    fn open(interface: &str) -> io::Result<Device> {
        let mut device = Device {
            socket: control_socket()?,
            name: ifreq_name(interface)?,
            features: Vec::new(),
        };
        device.features = device.feature_names()?;
        Ok(device)
    }

    /// `SIOCETHTOOL` with `buf` (whose first word is the command).
    fn ethtool(&self, buf: &mut [u64]) -> io::Result<()> {
        let mut ifr = IfreqData {
            name: self.name,
            data: buf.as_mut_ptr().cast(),
            _pad: [0; 16],
        };
        // SAFETY: `ifr` names the interface and points at `buf`, which is
        // as large as the command in it says the kernel may write.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn feature_names(&self) -> io::Result<Vec<String>> {
        // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), data[].
        let mut info = [0u64; 3];
        set_u32(&mut info, 0, ETHTOOL_GSSET_INFO);
        info[1] = 1u64 << ETH_SS_FEATURES;
        self.ethtool(&mut info)?;
        if info[1] & (1 << ETH_SS_FEATURES) == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the device lists no features",
            ));
        }
        let count = get_u32(&info, 4) as usize;
        if count > 4096 {
            return Err(io::Error::other("implausible feature count"));
        }
        // struct ethtool_gstrings: cmd, string_set, len, data[len * 32].
        let words = (12 + count * ETH_GSTRING_LEN).div_ceil(8);
        let mut strings = vec![0u64; words];
        set_u32(&mut strings, 0, ETHTOOL_GSTRINGS);
        set_u32(&mut strings, 1, ETH_SS_FEATURES);
        set_u32(&mut strings, 2, count as u32);
        self.ethtool(&mut strings)?;
        let bytes = as_bytes(&strings);
        Ok(bytes[12..12 + count * ETH_GSTRING_LEN]
            .chunks(ETH_GSTRING_LEN)
            .map(|s| {
                let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
                String::from_utf8_lossy(&s[..end]).into_owned()
            })
            .collect())
    }

    fn blocks(&self) -> usize {
        self.features.len().div_ceil(32)
    }

    /// Whether feature `bit` is on now.
    fn active(&self, bit: usize) -> io::Result<bool> {
        // struct ethtool_gfeatures: cmd, size, then per block of 32
        // features: available, requested, active, never_changed.
        let blocks = self.blocks();
        let mut buf = vec![0u64; (8 + blocks * 16).div_ceil(8)];
        set_u32(&mut buf, 0, ETHTOOL_GFEATURES);
        set_u32(&mut buf, 1, blocks as u32);
        self.ethtool(&mut buf)?;
        let active = get_u32(&buf, 2 + (bit / 32) * 4 + 2);
        Ok(active & (1 << (bit % 32)) != 0)
    }

    /// Asks for feature `bit` on or off.
    fn request(&self, bit: usize, on: bool) -> io::Result<()> {
        // struct ethtool_sfeatures: cmd, size, then per block: valid,
        // requested.
        let blocks = self.blocks();
        let mut buf = vec![0u64; (8 + blocks * 8).div_ceil(8)];
        set_u32(&mut buf, 0, ETHTOOL_SFEATURES);
        set_u32(&mut buf, 1, blocks as u32);
        let mask = 1u32 << (bit % 32);
        set_u32(&mut buf, 2 + (bit / 32) * 2, mask);
        set_u32(&mut buf, 2 + (bit / 32) * 2 + 1, if on { mask } else { 0 });
        self.ethtool(&mut buf)
    }
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: any initialised u64 slice is a valid byte slice of 8 times
    // its length, with a lower alignment.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
}

/// The `i`th u32 of `buf`, in native order (ioctl structs are native).
fn get_u32(buf: &[u64], i: usize) -> u32 {
    let b = &as_bytes(buf)[i * 4..i * 4 + 4];
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn set_u32(buf: &mut [u64], i: usize, v: u32) {
    // SAFETY: as in `as_bytes`, mutably; the index is bounds-checked below.
    let bytes: &mut [u8] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 8) };
    bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
}

/// UDP segmentation offload switched off on a loopback device for as long
/// as this lives, and back on after.
///
/// Why: a program sending with `UDP_SEGMENT` hands loopback one buffer of
/// several datagrams, which loopback passes on whole when it offers this
/// feature; generic XDP then shows the kernel relay the buffer as a single
/// datagram, which it would relay whole, as one message the client cannot
/// use. Without the feature the kernel cuts the buffer into its datagrams
/// as it sends it (in software, as the receiving socket would otherwise
/// have done), so the program sees each one.
pub struct UdpSegmentationOff {
    device: Device,
    bit: usize,
    interface: String,
}

impl UdpSegmentationOff {
    /// Switches it off on `interface`; `None` when it was off already (or
    /// the device has no such feature).
    pub fn switch_off(interface: &str) -> io::Result<Option<UdpSegmentationOff>> {
        let device = Device::open(interface)?;
        let Some(bit) = device
            .features
            .iter()
            .position(|f| f == TX_UDP_SEGMENTATION)
        else {
            return Ok(None);
        };
        if !device.active(bit)? {
            return Ok(None);
        }
        device.request(bit, false)?;
        if device.active(bit)? {
            return Err(io::Error::other(
                "the device kept UDP segmentation offload on",
            ));
        }
        Ok(Some(UdpSegmentationOff {
            device,
            bit,
            interface: interface.to_owned(),
        }))
    }
}

impl Drop for UdpSegmentationOff {
    fn drop(&mut self) {
        if let Err(e) = self.device.request(self.bit, true) {
            tracing::warn!(interface = %self.interface, error = %e, "could not switch UDP segmentation offload back on");
        }
    }
}

/// `struct ifreq` with `ifr_flags`, as `SIOCGIFFLAGS` fills it.
#[repr(C)]
struct IfreqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether `interface` is a loopback device (false if there is none).
pub fn is_loopback(interface: &str) -> bool {
    let (Ok(name), Ok(socket)) = (ifreq_name(interface), control_socket()) else {
        return false;
    };
    let mut ifr = IfreqFlags {
        name,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: `ifr` is a whole `struct ifreq` naming the interface.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    rc == 0 && i32::from(ifr.flags) & libc::IFF_LOOPBACK != 0
}

/// `struct ifreq` with `ifr_hwaddr`, as `SIOCGIFHWADDR` fills it.
#[repr(C)]
struct IfreqHwaddr {
    name: [libc::c_char; libc::IFNAMSIZ],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

/// `interface`'s index and link-layer address in this thread's network
/// namespace, as `/sys/class/net/IF/{ifindex,address}` write them; `None`
/// if it has none here.
fn identity(interface: &str) -> Option<(u32, String)> {
    let name = ifreq_name(interface).ok()?;
    let socket = control_socket().ok()?;
    let mut ifr = IfreqHwaddr {
        name,
        family: 0,
        data: [0; 14],
        _pad: [0; 8],
    };
    // SAFETY: `ifr` is a whole `struct ifreq` naming the interface.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return None;
    }
    // SAFETY: `name` is NUL-terminated (ifreq_name).
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let mac = ifr.data[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    (index != 0).then_some((index, mac))
}

/// Whether `interface` is a device on a bus (a network card, virtio-net
/// included), not a virtual one (loopback, veth, bridge, tunnel), by
/// whether sysfs gives it a `device`. Sysfs shows the network namespace it
/// was mounted in, which need not be this thread's (a bare `unshare -n`
/// keeps the machine's): it is believed only when it shows this very
/// device, the same index and link-layer address. Otherwise: false.
pub fn is_on_a_bus(interface: &str) -> bool {
    let sys = std::path::Path::new("/sys/class/net").join(interface);
    let read = |file: &str| std::fs::read_to_string(sys.join(file)).ok();
    let seen = read("ifindex")
        .and_then(|i| i.trim().parse::<u32>().ok())
        .zip(read("address").map(|a| a.trim().to_owned()));
    seen.is_some() && seen == identity(interface) && sys.join("device").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads loopback's features as `ethtool -k lo` does; switching needs
    /// root and a network namespace of its own (the interop tests do it).
    #[test]
    fn loopback_lists_udp_segmentation_among_its_features() {
        assert!(is_loopback("lo"));
        let lo = Device::open("lo").expect("loopback's features");
        assert!(
            lo.features.iter().any(|f| f == TX_UDP_SEGMENTATION),
            "{:?}",
            lo.features
        );
        assert!(lo.features.iter().any(|f| f == "tx-checksum-ip-generic"));
    }

    /// Moves this test's thread into a network namespace of its own, if
    /// root; false (skipped) without root, unless
    /// `CALLISTO_REQUIRE_ROOT_TESTS` is set.
    fn own_network_namespace() -> bool {
        if !super::super::root_or_skip("network namespace tests") {
            return false;
        }
        // SAFETY: unshare affects only the calling thread, this test's own.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
        true
    }

    /// A veth pair in this thread's network namespace, `name` and its peer.
    fn add_veth(name: &str) {
        let peer = format!("{name}-p");
        let peer = if peer.len() < libc::IFNAMSIZ {
            peer
        } else {
            "callisto-p".into()
        };
        let status = std::process::Command::new("ip")
            .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
            .status()
            .expect("ip (iproute2)");
        assert!(status.success(), "ip link add {name}");
    }

    /// Off while the guard lives, on again after; in a network namespace
    /// of this test's thread, never on the machine's loopback. Needs root;
    /// skipped without it unless `CALLISTO_REQUIRE_ROOT_TESTS` is set.
    #[test]
    fn udp_segmentation_is_off_while_the_guard_lives() {
        if !own_network_namespace() {
            return;
        }
        // A device of this namespace only, and not a loopback one.
        add_veth("callisto-v0");
        assert!(is_loopback("lo"));
        assert!(!is_loopback("callisto-v0"));
        assert!(!is_on_a_bus("lo"));
        assert!(!is_on_a_bus("callisto-v0"));
        let lo = Device::open("lo").unwrap();
        let bit = lo
            .features
            .iter()
            .position(|f| f == TX_UDP_SEGMENTATION)
            .unwrap();
        assert!(lo.active(bit).unwrap(), "on in a fresh namespace");
        let guard = UdpSegmentationOff::switch_off("lo")
            .unwrap()
            .expect("switched");
        assert!(!lo.active(bit).unwrap());
        // Already off: nothing to switch, nothing to restore.
        assert!(UdpSegmentationOff::switch_off("lo").unwrap().is_none());
        assert!(!lo.active(bit).unwrap());
        drop(guard);
        assert!(lo.active(bit).unwrap());
    }

    /// A veth of a network namespace of this test's own, named like one of
    /// the machine's cards (which /sys, mounted for the machine's
    /// namespace, still shows): not taken for that card. Needs root.
    #[test]
    fn a_namesake_of_a_card_in_another_namespace_is_not_on_a_bus() {
        let card = std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|name| is_on_a_bus(name));
        let Some(card) = card else {
            eprintln!("skipped: no network card on this machine");
            return;
        };
        if !own_network_namespace() {
            return;
        }
        assert!(!is_on_a_bus(&card), "{card} is not in this namespace yet");
        add_veth(&card);
        assert!(
            std::path::Path::new("/sys/class/net")
                .join(&card)
                .join("device")
                .exists(),
            "/sys still shows the machine's {card}"
        );
        assert!(!is_on_a_bus(&card), "this namespace's {card} is a veth");
    }

    #[test]
    fn no_such_interface_is_an_error_not_a_panic() {
        assert!(Device::open("no-such-if0").is_err());
        assert!(Device::open("a\0b").is_err());
        assert!(Device::open(&"x".repeat(40)).is_err());
        assert!(!is_loopback("no-such-if0"));
        assert!(!is_on_a_bus("no-such-if0"));
    }
}
