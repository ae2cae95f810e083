//! ICMP errors met by what relay sockets send (RFC 8656 §11.5).
//!
//! A relay socket asks the kernel to queue the ICMP errors its datagrams
//! meet (`IP_RECVERR`, `IPV6_RECVERR`); without that, Linux drops them for
//! an unconnected socket. Each queued error raises `EPOLLERR` on the socket,
//! and its entry says the type, the code, the MTU when there is one, and
//! the datagram's destination (the peer) with its port. The drivers read
//! them here and hand them to [`Server::on_icmp`](crate::server::Server::on_icmp),
//! which tells the client. That also covers datagrams the kernel relay
//! sent: the kernel matches the error to the relay socket by the ports in
//! the datagram it quotes. No crate reads the error queue (socket2 and
//! tokio do not), hence the `recvmsg` by hand.

use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

#[cfg(target_os = "linux")]
use super::batch::set_int_option;
#[cfg(target_os = "linux")]
use super::cmsg;
use crate::server::IcmpError;

/// Asks the kernel to queue the ICMP errors `socket`'s datagrams meet.
#[cfg(target_os = "linux")]
pub fn enable(socket: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        set_int_option(socket, libc::SOL_IP, libc::IP_RECVERR, 1)
    }
}

#[cfg(not(target_os = "linux"))]
pub fn enable<S>(_socket: &S, _ipv6: bool) -> io::Result<()> {
    Ok(())
}

/// Takes the next entry off `socket`'s error queue: `Some` for an ICMP
/// error, `None` for another kind (a local error, such as a datagram too
/// large for the path). `WouldBlock` when the queue is empty.
#[cfg(target_os = "linux")]
pub fn next_error(socket: &impl AsRawFd) -> io::Result<Option<IcmpError>> {
    // The quoted datagram is not needed, only the control message: one
    // byte of room, and MSG_TRUNC in the flags says the rest was cut.
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // u64s, for the alignment control messages need.
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the lengths it gives.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg just filled msg_controllen bytes of `control`.
    let filled = unsafe { cmsg::filled(&msg) };
    let error = cmsg::find(filled, libc::SOL_IP, libc::IP_RECVERR)
        .or_else(|| cmsg::find(filled, libc::SOL_IPV6, libc::IPV6_RECVERR))
        .and_then(|d| d.get(..std::mem::size_of::<libc::sock_extended_err>()));
    let Some(error) = error else {
        return Ok(None);
    };
    // SAFETY: `error` holds a whole sock_extended_err, a plain C struct
    // for which any bits are a value; read unaligned, as a slice promises
    // no alignment.
    let error: libc::sock_extended_err = unsafe { std::ptr::read_unaligned(error.as_ptr().cast()) };
    let icmp = matches!(
        error.ee_origin,
        libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
    );
    Ok(match (icmp, super::batch::to_socket_addr(&name)) {
        (true, Some(peer)) => Some(IcmpError {
            peer,
            icmp_type: error.ee_type,
            code: error.ee_code,
            mtu: error.ee_info,
        }),
        _ => None,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn next_error<S>(_socket: &S) -> io::Result<Option<IcmpError>> {
    Err(io::ErrorKind::WouldBlock.into())
}
