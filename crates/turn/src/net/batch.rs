//! Batched UDP I/O: `recvmmsg` and `sendmmsg` on Linux, one datagram per
//! call elsewhere. Written by hand because this is the relay's hot path and
//! the crates that batch (quinn-udp) shape their API around QUIC's needs
//! (one destination per send), while a TURN server sends each datagram of a
//! batch to a different client. Under load, runs of same-size datagrams to
//! one destination within a batch go out as one UDP GSO send each.
//!
//! Each datagram's TOS byte (IPv4) or traffic class (IPv6), its DSCP and
//! ECN bits, is read with it and can be given to what is sent, so the
//! relay passes them on (RFC 8656 §14's preferred behaviour).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

#[cfg(target_os = "linux")]
use super::cmsg;

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
    /// Per header, room for its control messages: the TOS received, or
    /// the GSO segment size and the TOS sent.
    controls: Box<[Control; BATCH]>,
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
                controls: Box::new([Control::new(); BATCH]),
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

    /// Points header `i` at its whole control buffer, for a receive.
    fn control_for_receive(&mut self, i: usize) {
        let m = &mut self.hdrs[i].msg_hdr;
        m.msg_control = (&mut self.controls[i] as *mut Control).cast();
        m.msg_controllen = std::mem::size_of::<Control>() as _;
    }
}

/// Asks the kernel to hand each datagram's TOS byte (traffic class over
/// IPv6) to reads of `socket`, for [`RecvBatch::tos`].
#[cfg(target_os = "linux")]
pub fn receive_tos(socket: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::SOL_IPV6, libc::IPV6_RECVTCLASS, 1)
    } else {
        set_int_option(socket, libc::SOL_IP, libc::IP_RECVTOS, 1)
    }
}

/// `setsockopt` of an int-valued option.
#[cfg(target_os = "linux")]
pub(crate) fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid descriptor, and a c_int option of its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn receive_tos<S>(_socket: &S, _ipv6: bool) -> io::Result<()> {
    Ok(())
}

/// The TOS byte (or traffic class) among the control messages a receive
/// filled into `m`; 0 without one.
#[cfg(target_os = "linux")]
fn received_tos(m: &libc::msghdr) -> u8 {
    // SAFETY: a receive just filled msg_controllen bytes of our buffer.
    let control = unsafe { cmsg::filled(m) };
    // IP_TOS comes as one byte, IPV6_TCLASS as an int.
    if let Some(&tos) = cmsg::find(control, libc::SOL_IP, libc::IP_TOS).and_then(|d| d.first()) {
        return tos;
    }
    cmsg::find(control, libc::SOL_IPV6, libc::IPV6_TCLASS)
        .and_then(|d| d.get(..4))
        .and_then(|d| d.try_into().ok())
        .map_or(0, |d| libc::c_int::from_ne_bytes(d) as u8)
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
    /// Each datagram's TOS byte or traffic class, from sockets that
    /// [`receive_tos`]; 0 from others.
    pub tos: [u8; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        #[cfg(target_os = "linux")]
        let mut h = MsgHeaders::new();
        #[cfg(target_os = "linux")]
        for i in 0..BATCH {
            h.control_for_receive(i);
        }
        RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
            #[cfg(target_os = "linux")]
            h,
            offset: None,
            lens: [0; BATCH],
            addrs: [None; BATCH],
            tos: [0; BATCH],
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
        self.recv_up_to(socket, offset, BATCH)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &std::net::UdpSocket, offset: usize) -> io::Result<usize> {
        self.recv_up_to(socket, offset, BATCH)
    }

    /// As [`RecvBatch::recv`], taking at most `max` (≤ [`BATCH`]) datagrams.
    #[cfg(target_os = "linux")]
    pub fn recv_up_to(
        &mut self,
        socket: &impl AsRawFd,
        offset: usize,
        max: usize,
    ) -> io::Result<usize> {
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
                max.clamp(1, BATCH) as u32,
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
            let m = &mut self.h.hdrs[i].msg_hdr;
            self.tos[i] = if m.msg_controllen > 0 {
                received_tos(m)
            } else {
                0
            };
            // The kernel shrank these to what it wrote.
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_controllen = std::mem::size_of::<Control>() as _;
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn recv_up_to(
        &mut self,
        socket: &std::net::UdpSocket,
        offset: usize,
        _max: usize,
    ) -> io::Result<usize> {
        let (len, addr) = socket.recv_from(&mut self.slot(0)[offset..SLOT - 8])?;
        self.lens[0] = len;
        self.addrs[0] = Some(addr);
        self.tos[0] = 0;
        Ok(1)
    }
}

/// Datagrams asked for by the first read of a socket's turn, after a wait.
pub const FIRST_READ: usize = 2;

/// A poll that took longer than this slept: the worker had caught up. (One
/// that finds events waiting returns in about a microsecond; a wake-up takes
/// a context switch, several.)
const WOKE_UP: std::time::Duration = std::time::Duration::from_micros(5);

/// The first read of each socket's turn in a round whose poll took
/// `poll_took`: [`FIRST_READ`] after a wait, a whole [`BATCH`] when work was
/// already waiting (see [`ReadRamp`]).
pub fn first_read(poll_took: std::time::Duration) -> usize {
    if poll_took > WOKE_UP {
        FIRST_READ
    } else {
        BATCH
    }
}

/// How many datagrams to ask the kernel for, read after read, during one
/// socket's turn: a first read of a given size (a worker that had to wait
/// for work starts at [`FIRST_READ`]), doubling while reads come back full,
/// up to [`BATCH`], until the turn's budget is spent.
///
/// Why not a whole batch from the start: then the datagrams of one flow
/// travel as a convoy. The first waits until the last has been copied in,
/// and the next hop (often a process on the other CPU) idles until the
/// whole group arrives. With 8 packets in flight on one allocation, small
/// first reads took Callisto from about 57,000 to 80,000 round trips/s in
/// pattern (a), and from 78,000 to 120,000 in pattern (b), at less CPU per
/// packet (`callisto bench turn --rate 0 --allocations 1`).
/// Why 2 and not 1: a read that returns fewer than asked proves the socket
/// empty (the next datagram raises a new edge), so a lone datagram, the
/// usual case below saturation, still costs one call. Why only after a
/// wait: a worker that finds work waiting has other flows to serve while
/// the next hops work, and small reads would only add calls (with 500
/// allocations in closed loop, 35 % more `recvmmsg` and `sendmmsg` calls
/// and 5–10 % fewer round trips).
#[derive(Debug)]
pub struct ReadRamp {
    want: usize,
    left: usize,
}

impl ReadRamp {
    /// A turn of at most `budget` datagrams, the first read asking for
    /// `first` (1 to [`BATCH`]).
    pub fn new(budget: usize, first: usize) -> Self {
        ReadRamp {
            want: first.clamp(1, BATCH),
            left: budget,
        }
    }

    /// How many datagrams to ask for next; `None` once the turn is spent.
    pub fn next(&self) -> Option<usize> {
        (self.left > 0).then(|| self.want.min(self.left))
    }

    /// Records that a read asked for `asked` datagrams got `n`. True when the
    /// socket may hold more; false when it was found empty.
    pub fn got(&mut self, asked: usize, n: usize) -> bool {
        self.left = self.left.saturating_sub(n);
        if n < asked {
            return false;
        }
        self.want = (self.want * 2).min(BATCH);
        true
    }

    /// Records a failed read (an ICMP error reported on the socket, say): it
    /// spends a read's worth of the turn, so errors alone end it too.
    pub fn failed(&mut self) {
        self.left = self.left.saturating_sub(self.want);
    }
}

#[cfg(target_os = "linux")]
pub(crate) fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
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

/// Datagrams per GSO send at most (the kernel's `UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send at most: the whole must fit one IP packet's length.
pub const GSO_MAX_BYTES: usize = 60_000;
/// The largest datagram sent by GSO. Larger ones go one by one, so the
/// kernel may fragment them (GSO refuses segments above the path MTU).
pub const GSO_MAX_SEGMENT: usize = 1472;

/// Where the run of datagrams starting at `i` ends: consecutive datagrams to
/// one destination with one TOS, all of one size but the last, which may be
/// shorter. The kernel sends such a run with one pass through its stack
/// (UDP GSO) and splits it into datagrams again; the receiver sees no
/// difference.
pub fn gso_run(dests: &[SocketAddr], lens: &[usize], tos: &[u8], i: usize) -> usize {
    let size = lens[i];
    let mut j = i + 1;
    if size == 0 || size > GSO_MAX_SEGMENT {
        return j;
    }
    let mut total = size;
    while j < dests.len().min(lens.len()).min(tos.len())
        && j - i < GSO_MAX_SEGMENTS
        && dests[j] == dests[i]
        && tos[j] == tos[i]
        && lens[j - 1] == size
        && lens[j] > 0
        && lens[j] <= size
        && total + lens[j] <= GSO_MAX_BYTES
    {
        total += lens[j];
        j += 1;
    }
    j
}

/// `SOL_UDP` / `UDP_SEGMENT` from linux/udp.h (the libc crate has them only
/// for some C libraries).
#[cfg(target_os = "linux")]
const SOL_UDP: libc::c_int = 17;
#[cfg(target_os = "linux")]
const UDP_SEGMENT: libc::c_int = 103;

/// A control message carrying UDP_SEGMENT, laid out as CMSG_SPACE(2).
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

/// A control message carrying IP_TOS or IPV6_TCLASS, laid out as
/// CMSG_SPACE(4).
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy)]
struct TosCmsg {
    hdr: libc::cmsghdr,
    tos: libc::c_int,
    _pad: [u8; 4],
}

/// One header's control messages when sending: the GSO one, the TOS one,
/// or both in a row (each is its own CMSG_SPACE, so the second sits where
/// CMSG_NXTHDR looks for it). When receiving, room for what the kernel
/// writes.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy)]
struct Control {
    gso: GsoCmsg,
    tos: TosCmsg,
}

#[cfg(target_os = "linux")]
impl Control {
    fn new() -> Self {
        // SAFETY: all-zero is a valid cmsghdr.
        let mut c: Control = unsafe { std::mem::zeroed() };
        c.gso.hdr.cmsg_len = (std::mem::offset_of!(GsoCmsg, size) + 2) as _;
        c.gso.hdr.cmsg_level = SOL_UDP;
        c.gso.hdr.cmsg_type = UDP_SEGMENT;
        c.tos.hdr.cmsg_len = (std::mem::offset_of!(TosCmsg, tos) + 4) as _;
        c
    }

    /// Fills in what header `hdr` sends a run with: a GSO segment size when
    /// `segment` is given, a TOS when `tos` is not 0 (the socket's
    /// default), for a destination of family `ipv6`.
    fn attach(&mut self, hdr: &mut libc::msghdr, segment: Option<u16>, tos: u8, ipv6: bool) {
        if tos != 0 {
            (self.tos.hdr.cmsg_level, self.tos.hdr.cmsg_type) = if ipv6 {
                (libc::SOL_IPV6, libc::IPV6_TCLASS)
            } else {
                (libc::SOL_IP, libc::IP_TOS)
            };
            self.tos.tos = libc::c_int::from(tos);
        }
        if let Some(size) = segment {
            self.gso.size = size;
        }
        let (start, len): (*mut libc::c_void, usize) = match (segment.is_some(), tos != 0) {
            (false, false) => (std::ptr::null_mut(), 0),
            (true, false) => ((&mut self.gso as *mut GsoCmsg).cast(), size_of::<GsoCmsg>()),
            (false, true) => ((&mut self.tos as *mut TosCmsg).cast(), size_of::<TosCmsg>()),
            (true, true) => ((self as *mut Control).cast(), size_of::<Control>()),
        };
        hdr.msg_control = start;
        hdr.msg_controllen = len as _;
    }
}

/// Whether this kernel takes UDP_SEGMENT (Linux 4.18 and later).
#[cfg(target_os = "linux")]
fn gso_supported() -> bool {
    let Ok(probe) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    set_int_option(&probe, SOL_UDP, UDP_SEGMENT, 1200).is_ok()
}

/// One datagram to send: where to, its TOS byte or traffic class (DSCP and
/// ECN; 0 leaves the socket's default), and its bytes.
pub type Datagram<'a> = (SocketAddr, u8, &'a [u8]);

/// Sends datagrams with as few system calls, and as few passes through the
/// kernel's stack, as possible: one `sendmmsg` per batch, and runs of
/// same-size datagrams to one destination as one GSO send.
pub struct SendBatch {
    #[cfg(target_os = "linux")]
    h: MsgHeaders,
    /// Per datagram of the batch: its destination.
    #[cfg(target_os = "linux")]
    dests: Vec<SocketAddr>,
    /// Per datagram of the batch: its length.
    #[cfg(target_os = "linux")]
    lens: [usize; BATCH],
    /// Per datagram of the batch: its TOS.
    #[cfg(target_os = "linux")]
    tos: [u8; BATCH],
    /// Per header: its first datagram and how many it carries.
    #[cfg(target_os = "linux")]
    runs: [(usize, usize); BATCH],
    gso: bool,
}

impl Default for SendBatch {
    fn default() -> Self {
        #[cfg(target_os = "linux")]
        {
            SendBatch {
                h: MsgHeaders::new(),
                dests: Vec::with_capacity(BATCH),
                lens: [0; BATCH],
                tos: [0; BATCH],
                runs: [(0, 0); BATCH],
                gso: gso_supported(),
            }
        }
        #[cfg(not(target_os = "linux"))]
        SendBatch { gso: false }
    }
}

impl SendBatch {
    /// Sends every (destination, bytes) of `msgs` from `socket`; returns
    /// how many datagrams went out. Datagrams the kernel will not take right
    /// now are dropped and counted, as a router would: blocking here would
    /// stall every client.
    #[cfg(target_os = "linux")]
    pub fn send<'a>(
        &mut self,
        socket: &impl AsRawFd,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> usize {
        self.send_coalescing(socket, msgs.into_iter().map(|(to, d)| (to, 0, d)), false)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn send<'a>(
        &mut self,
        socket: &std::net::UdpSocket,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> usize {
        self.send_coalescing(socket, msgs.into_iter().map(|(to, d)| (to, 0, d)), false)
    }

    /// [`send`](Self::send) of [`Datagram`]s, each with its TOS, and with
    /// `coalesce` runs of same-size datagrams to one destination go
    /// through the kernel's stack once (UDP GSO).
    ///
    /// Worth it only when behind: GSO cuts the CPU per datagram by a fifth
    /// to a half under load, but the first datagram of a run reaches its
    /// receiver only when the last is ready, so a lone flow loses the
    /// overlap between sender and receiver (measured: one allocation in
    /// closed loop carried half the round trips). The UDP worker coalesces
    /// only after a full receive batch.
    #[cfg(target_os = "linux")]
    pub fn send_coalescing<'a>(
        &mut self,
        socket: &impl AsRawFd,
        msgs: impl IntoIterator<Item = Datagram<'a>>,
        coalesce: bool,
    ) -> usize {
        let coalesce = coalesce && self.gso;
        let mut msgs = msgs.into_iter();
        let mut sent = 0;
        loop {
            self.dests.clear();
            for (k, (addr, tos, data)) in msgs.by_ref().take(BATCH).enumerate() {
                self.dests.push(addr);
                self.lens[k] = data.len();
                self.tos[k] = tos;
                self.h.iovs[k].iov_base = data.as_ptr() as *mut libc::c_void;
                self.h.iovs[k].iov_len = data.len();
            }
            let k = self.dests.len();
            if k == 0 {
                return sent;
            }
            // One header per run (per datagram without GSO).
            let (mut m, mut i) = (0, 0);
            while i < k {
                let j = if coalesce {
                    gso_run(&self.dests, &self.lens[..k], &self.tos[..k], i)
                } else {
                    i + 1
                };
                let hdr = &mut self.h.hdrs[m].msg_hdr;
                hdr.msg_namelen = from_socket_addr(self.dests[i], &mut self.h.storage[m]);
                hdr.msg_iov = &mut self.h.iovs[i];
                hdr.msg_iovlen = j - i;
                let segment = (j - i > 1).then_some(self.lens[i] as u16);
                self.h.controls[m].attach(hdr, segment, self.tos[i], self.dests[i].is_ipv6());
                self.runs[m] = (i, j - i);
                m += 1;
                i = j;
            }
            sent += self.flush(socket, m);
            if k < BATCH {
                return sent;
            }
        }
    }

    /// Sends the first `m` prepared headers; returns the datagrams sent.
    #[cfg(target_os = "linux")]
    fn flush(&mut self, socket: &impl AsRawFd, m: usize) -> usize {
        let (mut off, mut retries, mut sent) = (0, 0, 0);
        while off < m {
            // SAFETY: headers 0..m point at addresses, iovecs and control
            // messages in `self` and at the caller's slices, which outlive
            // this call (`send` borrows them).
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.h.hdrs.as_mut_ptr().add(off),
                    (m - off) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                let n = n as usize;
                sent += self.runs[off..off + n].iter().map(|r| r.1).sum::<usize>();
                off += n;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if retries < 3 => {
                    retries += 1;
                    std::thread::yield_now();
                }
                _ if self.runs[off].1 > 1 => {
                    // The kernel refused the run as a whole (a segment above
                    // the path MTU, or a device without checksum offload,
                    // EIO): send its datagrams one by one, and after EIO
                    // never use GSO again.
                    if err.raw_os_error() == Some(libc::EIO) {
                        tracing::info!(
                            "UDP GSO refused by the network device; sending datagrams one by one"
                        );
                        self.gso = false;
                    }
                    sent += self.send_run_singly(socket, off);
                    off += 1;
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

    /// Sends the datagrams of header `m` one `sendto` each.
    #[cfg(target_os = "linux")]
    fn send_run_singly(&mut self, socket: &impl AsRawFd, m: usize) -> usize {
        let (first, count) = self.runs[m];
        let hdr = &self.h.hdrs[m].msg_hdr;
        let mut sent = 0;
        for iov in &self.h.iovs[first..first + count] {
            // SAFETY: the iovec points into the caller's slice, the address
            // into `self.h.storage`, both alive for this call.
            let r = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    iov.iov_base,
                    iov.iov_len,
                    libc::MSG_DONTWAIT,
                    hdr.msg_name.cast(),
                    hdr.msg_namelen,
                )
            };
            if r >= 0 {
                sent += 1;
            } else {
                metrics::counter!("callisto_turn_send_drops_total").increment(1);
            }
        }
        sent
    }

    #[cfg(not(target_os = "linux"))]
    pub fn send_coalescing<'a>(
        &mut self,
        socket: &std::net::UdpSocket,
        msgs: impl IntoIterator<Item = Datagram<'a>>,
        _coalesce: bool,
    ) -> usize {
        msgs.into_iter()
            .filter(|(a, _, d)| socket.send_to(d, a).is_ok())
            .count()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use proptest::prelude::Just;

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
        // Reads as a turn makes them: 2, 4, 8, 16, then the rest.
        for want in [2, 4, 8, 16] {
            let n = batch.recv_up_to(&b, 48, want).unwrap();
            assert_eq!(n, want, "recvmmsg takes no more than asked");
            for i in 0..n {
                let len = batch.lens[i];
                got.push(batch.slot(i)[48..48 + len].to_vec());
            }
        }
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

    /// Runs of one size to one destination go out as one GSO send each; the
    /// receivers must get exactly the datagrams, in order, that went in,
    /// each with its TOS.
    #[test]
    fn gso_runs_arrive_as_the_datagrams_they_were() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (b, c) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        receive_tos(&b, false).unwrap();
        receive_tos(&c, false).unwrap();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        let mut msgs: Vec<(SocketAddr, u8, Vec<u8>)> = Vec::new();
        let mut push = |to, count: usize, len: usize, tos: u8| {
            for _ in 0..count {
                let n = msgs.len();
                msgs.push((to, tos, (0..len).map(|x| (x + n) as u8).collect()));
            }
        };
        push(to_b, 10, 100, 0); // a run
        push(to_b, 1, 60, 0); // its shorter last datagram
        push(to_b, 5, 100, 0); // a new run
        push(to_c, 3, 100, 0); // another destination
        push(to_b, 1, 2000, 0); // too large for GSO
        push(to_b, 70, 50, 0); // more than one GSO send takes
        push(to_c, 1, GSO_MAX_SEGMENT, 0); // the largest one grouped
        push(to_c, 1, GSO_MAX_SEGMENT, 0);
        push(to_c, 4, 100, 0xb9); // a run with a TOS (EF, ECT(1))
        push(to_c, 4, 100, 0x2a); // another TOS (AF11, ECT(0)): a new run
        let mut tx = SendBatch::default();
        let sent = tx.send_coalescing(
            &a,
            msgs.iter().map(|(to, tos, d)| (*to, *tos, d.as_slice())),
            true,
        );
        assert_eq!(sent, msgs.len());
        let mut rx = RecvBatch::default();
        for (sock, to) in [(&b, to_b), (&c, to_c)] {
            let want: Vec<(u8, &[u8])> = msgs
                .iter()
                .filter(|m| m.0 == to)
                .map(|m| (m.1, m.2.as_slice()))
                .collect();
            let mut got = Vec::new();
            while got.len() < want.len() {
                let n = rx.recv(sock, 0).unwrap();
                for i in 0..n {
                    let len = rx.lens[i];
                    got.push((rx.tos[i], rx.slot(i)[..len].to_vec()));
                }
            }
            let got: Vec<(u8, &[u8])> = got.iter().map(|(t, d)| (*t, d.as_slice())).collect();
            assert_eq!(got, want);
            assert_eq!(
                rx.recv(sock, 0).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
        assert!(
            tx.gso,
            "this kernel takes UDP_SEGMENT, and no send was refused"
        );
    }

    /// The TOS byte (traffic class over IPv6), DSCP and ECN bits both,
    /// goes out with each datagram and is read with it, over both
    /// families; 0 leaves the socket's default, and a socket that did not
    /// ask for TOS reads 0.
    #[test]
    fn each_datagram_keeps_its_tos() {
        let mut tx = SendBatch::default();
        let mut rx = RecvBatch::default();
        for ip in ["127.0.0.1", "[::1]"] {
            let a = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
            let b = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
            let to = b.local_addr().unwrap();
            let tos = [0xb9u8, 0, 0x2a, 0x01, 0xff, 0x03];
            let sent = tx.send_coalescing(&a, tos.iter().map(|t| (to, *t, &b"x"[..])), false);
            assert_eq!(sent, tos.len());
            // Not asked for yet: 0 for all.
            let n = rx.recv(&b, 0).unwrap();
            assert_eq!(n, tos.len());
            assert!(rx.tos[..n].iter().all(|&t| t == 0), "{ip}");

            receive_tos(&b, to.is_ipv6()).unwrap();
            tx.send_coalescing(&a, tos.iter().map(|t| (to, *t, &b"x"[..])), false);
            let n = rx.recv(&b, 0).unwrap();
            assert_eq!(rx.tos[..n], tos, "{ip}");
        }
    }

    /// A turn over a socket with `queued` datagrams: the reads asked for,
    /// and whether the turn ended with the socket possibly holding more.
    fn turn(queued: usize, budget: usize, failures: &[bool]) -> (Vec<usize>, bool) {
        let (mut ramp, mut queued, mut asks) =
            (ReadRamp::new(budget, FIRST_READ), queued, Vec::new());
        let mut failures = failures.iter();
        while let Some(want) = ramp.next() {
            asks.push(want);
            if failures.next() == Some(&true) {
                ramp.failed();
                continue;
            }
            let n = want.min(queued);
            queued -= n;
            if !ramp.got(want, n) {
                return (asks, false);
            }
        }
        (asks, true)
    }

    #[test]
    fn reads_start_small_and_grow_to_full_batches() {
        assert_eq!(
            turn(1, 512, &[]),
            (vec![2], false),
            "a lone datagram: one call"
        );
        assert_eq!(turn(2, 512, &[]), (vec![2, 4], false));
        assert_eq!(turn(8, 512, &[]), (vec![2, 4, 8], false));
        let (asks, more) = turn(1000, 512, &[]);
        assert_eq!(asks[..6], [2, 4, 8, 16, 32, 32]);
        assert_eq!(asks.iter().sum::<usize>(), 512);
        assert!(more, "the turn ended, not the queue");
        assert_eq!(turn(0, 512, &[]), (vec![2], false));
        // Small first reads only after the poll waited.
        assert_eq!(first_read(std::time::Duration::ZERO), BATCH);
        assert_eq!(first_read(std::time::Duration::from_millis(1)), FIRST_READ);
        // Reads that only fail end the turn too, without growing.
        let (asks, more) = turn(10, 64, &[true; 100]);
        assert_eq!(asks, vec![2; 32]);
        assert!(more);
    }

    proptest::proptest! {
        /// Whatever is queued, a turn reads exactly what it may (all that is
        /// queued, or its budget), never asks for more than a batch or than
        /// is left of the budget, and doubles only after a full read;
        /// some reads fail.
        #[test]
        fn a_turn_reads_what_it_may_and_ends(
            queued in 0usize..3000,
            budget in 1usize..1000,
            failures in proptest::collection::vec(proptest::bool::weighted(0.1), 0..40),
        ) {
            let (asks, more) = turn(queued, budget, &failures);
            let failed = |k: usize| failures.get(k) == Some(&true);
            proptest::prop_assert_eq!(asks[0], FIRST_READ.min(budget));
            proptest::prop_assert!(asks.iter().all(|&a| (1..=BATCH).contains(&a)));
            let mut left = budget;
            let mut read = 0;
            for (k, &a) in asks.iter().enumerate() {
                proptest::prop_assert!(a <= left);
                if failed(k) {
                    left = left.saturating_sub(a);
                    continue;
                }
                let n = a.min(queued - read);
                read += n;
                left -= n;
                if let Some(&next) = asks.get(k + 1) {
                    proptest::prop_assert_eq!(n, a, "asked again after a short read");
                    proptest::prop_assert_eq!(next, (2 * a).min(BATCH).min(left));
                }
            }
            let failures_seen = (0..asks.len()).filter(|&k| failed(k)).count();
            if failures_seen == 0 {
                proptest::prop_assert_eq!(read, queued.min(budget));
                proptest::prop_assert_eq!(more, queued >= budget);
            }
            proptest::prop_assert!(asks.len() <= budget + 1);
        }

        /// Runs cover every datagram once, in order, and each is as long as
        /// the rules allow: one destination, one size but a shorter last,
        /// within the kernel's limits.
        #[test]
        fn gso_runs_follow_the_rules(
            msgs in proptest::collection::vec((0u8..3, proptest::prop_oneof![
                Just(0usize), 1usize..64, Just(100usize), Just(1200usize), Just(1472usize), 1473usize..2000,
            ], proptest::prop_oneof![Just(0u8), Just(0xb9u8)]), 1..BATCH),
        ) {
            let dests: Vec<SocketAddr> = msgs
                .iter()
                .map(|(d, _, _)| SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(*d))))
                .collect();
            let lens: Vec<usize> = msgs.iter().map(|m| m.1).collect();
            let tos: Vec<u8> = msgs.iter().map(|m| m.2).collect();
            let mut i = 0;
            while i < lens.len() {
                let j = gso_run(&dests, &lens, &tos, i);
                proptest::prop_assert!(j > i && j <= lens.len());
                let run = &lens[i..j];
                proptest::prop_assert!(j - i <= GSO_MAX_SEGMENTS);
                proptest::prop_assert!(dests[i..j].iter().all(|d| *d == dests[i]));
                proptest::prop_assert!(tos[i..j].iter().all(|t| *t == tos[i]));
                proptest::prop_assert!(run[..run.len() - 1].iter().all(|&l| l == run[0]));
                if j - i > 1 {
                    proptest::prop_assert!(run[0] > 0 && run[0] <= GSO_MAX_SEGMENT);
                    proptest::prop_assert!(*run.last().unwrap() > 0 && *run.last().unwrap() <= run[0]);
                    proptest::prop_assert!(run.iter().sum::<usize>() <= GSO_MAX_BYTES);
                }
                // As long as allowed: the next datagram could not join.
                if j < lens.len() && run[0] > 0 && run[0] <= GSO_MAX_SEGMENT {
                    let joins = dests[j] == dests[i]
                        && tos[j] == tos[i]
                        && lens[j - 1] == run[0]
                        && lens[j] > 0
                        && lens[j] <= run[0]
                        && j - i < GSO_MAX_SEGMENTS
                        && run.iter().sum::<usize>() + lens[j] <= GSO_MAX_BYTES;
                    proptest::prop_assert!(!joins, "run {i}..{j} stopped early");
                }
                i = j;
            }
        }
    }
}
