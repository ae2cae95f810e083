//! Batched UDP I/O: `recvmmsg` and `sendmmsg` on Linux, one datagram per
//! call elsewhere. Written by hand because this is the relay's hot path and
//! the crates that batch (quinn-udp) shape their API around QUIC's needs
//! (one destination per send), while a TURN server sends each datagram of a
//! batch to a different client.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams per batch.
pub const BATCH: usize = 32;
/// Bytes per slot: the largest datagram plus headroom and tailroom.
pub const SLOT: usize = 65_536 + 64;

/// Receive buffers for up to [`BATCH`] datagrams.
pub struct RecvBatch {
    bufs: Vec<u8>,
    pub lens: [usize; BATCH],
    pub addrs: [Option<SocketAddr>; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
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
        // SAFETY: every pointer handed to recvmmsg points into `self.bufs`
        // or the local arrays below, all alive and unaliased for the call;
        // lengths are the exact sizes of those regions.
        unsafe {
            let mut storage: [libc::sockaddr_storage; BATCH] = std::mem::zeroed();
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            let base = self.bufs.as_mut_ptr();
            for i in 0..BATCH {
                iovs[i].iov_base = base.add(i * SLOT + offset).cast();
                iovs[i].iov_len = SLOT - offset - 8;
                hdrs[i].msg_hdr.msg_name = (&mut storage[i] as *mut libc::sockaddr_storage).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for i in 0..n {
                self.lens[i] = hdrs[i].msg_len as usize;
                self.addrs[i] = to_socket_addr(&storage[i]);
            }
            Ok(n)
        }
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

/// Sends `msgs` (destination, bytes) from `socket`, as few system calls as
/// possible. Datagrams the kernel will not take right now are dropped and
/// counted, as a router would: blocking here would stall every client.
#[cfg(target_os = "linux")]
pub fn send_batch(socket: &impl AsRawFd, msgs: &[(SocketAddr, &[u8])]) -> usize {
    let mut sent = 0;
    for chunk in msgs.chunks(BATCH) {
        // SAFETY: pointers reference the local arrays and the caller's
        // slices, alive for the duration of the call; lengths are theirs.
        // Addresses are copied into stack storage so a batch allocates nothing.
        unsafe {
            let mut storage: [libc::sockaddr_storage; BATCH] = std::mem::zeroed();
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for (i, (addr, data)) in chunk.iter().enumerate() {
                let sa = SockAddr::from(*addr);
                std::ptr::copy_nonoverlapping(
                    sa.as_ptr().cast::<u8>(),
                    (&mut storage[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                    sa.len() as usize,
                );
                iovs[i].iov_base = data.as_ptr() as *mut libc::c_void;
                iovs[i].iov_len = data.len();
                hdrs[i].msg_hdr.msg_name = (&mut storage[i] as *mut libc::sockaddr_storage).cast();
                hdrs[i].msg_hdr.msg_namelen = sa.len();
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            let mut off = 0;
            let mut retries = 0;
            while off < chunk.len() {
                let n = libc::sendmmsg(
                    socket.as_raw_fd(),
                    hdrs.as_mut_ptr().add(off),
                    (chunk.len() - off) as u32,
                    libc::MSG_DONTWAIT,
                );
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
                        // Skip the datagram the kernel refused (an
                        // unreachable destination, say) and go on.
                        metrics::counter!("callisto_turn_send_drops_total").increment(1);
                        off += 1;
                    }
                }
            }
        }
    }
    sent
}

#[cfg(not(target_os = "linux"))]
pub fn send_batch(socket: &std::net::UdpSocket, msgs: &[(SocketAddr, &[u8])]) -> usize {
    msgs.iter()
        .filter(|(a, d)| socket.send_to(d, a).is_ok())
        .count()
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
        let msgs: Vec<(SocketAddr, &[u8])> = payloads.iter().map(|p| (to, p.as_slice())).collect();
        assert_eq!(send_batch(&a, &msgs), 40);
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
}
