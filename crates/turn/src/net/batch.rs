//! Batched UDP I/O: `recvmmsg` and `sendmmsg` on Linux, one datagram per
//! call elsewhere. Written by hand because this is the relay's hot path and
//! the crates that batch (quinn-udp) shape their API around QUIC's needs
//! (one destination per send), while a TURN server sends each datagram of a
//! batch to a different client.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Datagrams per batch.
pub const BATCH: usize = 32;
/// Bytes per slot: the largest datagram plus headroom and tailroom.
pub const SLOT: usize = 65_536 + 64;

/// The kernel's message headers for [`BATCH`] datagrams, linked once
/// (header → address storage, header → iovec), so a system call writes only
/// what it carries instead of clearing 7 KB of headers first. (That clearing
/// stood out in a profile at one datagram per wake-up; the CPU saved was
/// within the benchmark's noise.)
#[cfg(target_os = "linux")]
struct MsgHeaders {
    storage: Box<[libc::sockaddr_storage; BATCH]>,
    iovs: Box<[libc::iovec; BATCH]>,
    hdrs: Box<[libc::mmsghdr; BATCH]>,
}

// SAFETY: the raw pointers inside point only into the struct's own heap
// allocations (and, for `RecvBatch`, into its buffer), which move with it.
#[cfg(target_os = "linux")]
unsafe impl Send for MsgHeaders {}

#[cfg(target_os = "linux")]
impl MsgHeaders {
    fn new() -> Self {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut h = unsafe {
            MsgHeaders {
                storage: Box::new(std::mem::zeroed()),
                iovs: Box::new(std::mem::zeroed()),
                hdrs: Box::new(std::mem::zeroed()),
            }
        };
        for i in 0..BATCH {
            let m = &mut h.hdrs[i].msg_hdr;
            m.msg_name = (&mut h.storage[i] as *mut libc::sockaddr_storage).cast();
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_iov = &mut h.iovs[i];
            m.msg_iovlen = 1;
        }
        h
    }
}

/// Receive buffers for up to [`BATCH`] datagrams.
pub struct RecvBatch {
    bufs: Vec<u8>,
    #[cfg(target_os = "linux")]
    h: MsgHeaders,
    /// Where in its slot each datagram is written (`None`: not set up yet).
    offset: Option<usize>,
    pub lens: [usize; BATCH],
    pub addrs: [Option<SocketAddr>; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
            #[cfg(target_os = "linux")]
            h: MsgHeaders::new(),
            offset: None,
            lens: [0; BATCH],
            addrs: [None; BATCH],
        }
    }
}

impl RecvBatch {
    /// Every slot, for sending ranges straight out of the buffers.
    pub fn slot_all(&self) -> &[u8] {
        &self.bufs
    }

    /// Slot `i`, whole.
    pub fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }

    /// Receives up to [`BATCH`] datagrams, each written at `offset` in its
    /// slot (leaving headroom in front). Returns how many arrived;
    /// `WouldBlock` when none.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &impl AsRawFd, offset: usize) -> io::Result<usize> {
        if self.offset != Some(offset) {
            let base = self.bufs.as_mut_ptr();
            for (i, iov) in self.h.iovs.iter_mut().enumerate() {
                // SAFETY: slot i starts at i * SLOT < bufs.len(), and
                // offset + 8 < SLOT (HEADROOM is far below that).
                iov.iov_base = unsafe { base.add(i * SLOT + offset) }.cast();
                iov.iov_len = SLOT - offset - 8;
            }
            self.offset = Some(offset);
        }
        // SAFETY: the headers point into `self.bufs` and `self.h`, alive and
        // unaliased for the call, with the exact sizes of those regions.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.h.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.h.hdrs[i].msg_len as usize;
            self.addrs[i] = to_socket_addr(&self.h.storage[i]);
            // The kernel shrank it to the address it wrote.
            self.h.hdrs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as u32;
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &std::net::UdpSocket, offset: usize) -> io::Result<usize> {
        let (len, addr) = socket.recv_from(&mut self.slot(0)[offset..SLOT - 8])?;
        self.lens[0] = len;
        self.addrs[0] = Some(addr);
        Ok(1)
    }
}

#[cfg(target_os = "linux")]
fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel filled an AF_INET address into the storage,
            // which is large and aligned enough for any address type.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for AF_INET6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `s` as the kernel wants it; returns its length.
#[cfg(target_os = "linux")]
fn from_socket_addr(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let p = (s as *mut libc::sockaddr_storage).cast::<u8>();
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { p.cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { p.cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

/// Sends datagrams with as few system calls as possible.
pub struct SendBatch {
    #[cfg(target_os = "linux")]
    h: MsgHeaders,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            #[cfg(target_os = "linux")]
            h: MsgHeaders::new(),
        }
    }
}

impl SendBatch {
    /// Sends every (destination, bytes) of `msgs` from `socket`; returns
    /// how many went out. Datagrams the kernel will not take right now are
    /// dropped and counted, as a router would: blocking here would stall
    /// every client.
    #[cfg(target_os = "linux")]
    pub fn send<'a>(
        &mut self,
        socket: &impl AsRawFd,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> usize {
        let mut msgs = msgs.into_iter();
        let mut sent = 0;
        loop {
            let mut k = 0;
            for (addr, data) in msgs.by_ref().take(BATCH) {
                self.h.hdrs[k].msg_hdr.msg_namelen = from_socket_addr(addr, &mut self.h.storage[k]);
                self.h.iovs[k].iov_base = data.as_ptr() as *mut libc::c_void;
                self.h.iovs[k].iov_len = data.len();
                k += 1;
            }
            if k == 0 {
                return sent;
            }
            sent += self.flush(socket, k);
            if k < BATCH {
                return sent;
            }
        }
    }

    /// Sends the first `k` prepared headers.
    #[cfg(target_os = "linux")]
    fn flush(&mut self, socket: &impl AsRawFd, k: usize) -> usize {
        let (mut off, mut retries, mut sent) = (0, 0, 0);
        while off < k {
            // SAFETY: headers 0..k point at addresses in `self.h` and at the
            // caller's slices, which outlive this call (`send` borrows them).
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.h.hdrs.as_mut_ptr().add(off),
                    (k - off) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                off += n as usize;
                sent += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if retries < 3 => {
                    retries += 1;
                    std::thread::yield_now();
                }
                _ => {
                    // Skip the datagram the kernel refused (an unreachable
                    // destination, say) and go on.
                    metrics::counter!("callisto_turn_send_drops_total").increment(1);
                    off += 1;
                }
            }
        }
        sent
    }

    #[cfg(not(target_os = "linux"))]
    pub fn send<'a>(
        &mut self,
        socket: &std::net::UdpSocket,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> usize {
        msgs.into_iter()
            .filter(|(a, d)| socket.send_to(d, a).is_ok())
            .count()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn round_trip_a_batch() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        let msgs = payloads.iter().map(|p| (to, p.as_slice()));
        assert_eq!(SendBatch::default().send(&a, msgs), 40);
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 40 {
            let n = batch.recv(&b, 48).unwrap();
            for i in 0..n {
                assert_eq!(batch.addrs[i], Some(a.local_addr().unwrap()));
                let len = batch.lens[i];
                got.push(batch.slot(i)[48..48 + len].to_vec());
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(
            batch.recv(&b, 48).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    /// The headers are set up once and reused: a new offset, a new
    /// address family and a short batch after a full one must all work.
    #[test]
    fn headers_are_reused_across_offsets_families_and_sizes() {
        let mut tx = SendBatch::default();
        let mut rx = RecvBatch::default();
        for (family, ip) in [
            ("v4", "127.0.0.1"),
            ("v6", "[::1]"),
            ("v4 again", "127.0.0.1"),
        ] {
            let a = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
            let b = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
            let to = b.local_addr().unwrap();
            for (count, offset) in [(BATCH, 0), (3, 48), (1, 0)] {
                let payloads: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; 10 + i]).collect();
                let sent = tx.send(&a, payloads.iter().map(|p| (to, p.as_slice())));
                assert_eq!(sent, count, "{family}");
                let mut got = Vec::new();
                while got.len() < count {
                    let n = rx.recv(&b, offset).unwrap();
                    for i in 0..n {
                        assert_eq!(rx.addrs[i], Some(a.local_addr().unwrap()), "{family}");
                        let len = rx.lens[i];
                        got.push(rx.slot(i)[offset..offset + len].to_vec());
                    }
                }
                assert_eq!(got, payloads, "{family}, {count} at offset {offset}");
            }
        }
    }
}
