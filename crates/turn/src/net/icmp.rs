//! ICMP errors met by what relay sockets send (RFC 8656 §11.5), and the
//! DF bit they send with (DONT-FRAGMENT).
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

/// From now on `socket`'s datagrams leave with DF set (IPv4) and are never
/// fragmented here (both families), as a client's DONT-FRAGMENT asks
/// (RFC 8656 §7.2, §11.2). One too big for the path's MTU, as the kernel
/// knows it, is refused with `EMSGSIZE`, and [`next_error`] then reports
/// it with the MTU. Linux's default instead sets DF only on datagrams that
/// fit, and fragments the others.
#[cfg(target_os = "linux")]
pub fn dont_fragment(socket: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(
            socket,
            libc::SOL_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        set_int_option(
            socket,
            libc::SOL_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}

#[cfg(not(target_os = "linux"))]
pub fn dont_fragment<S>(_socket: &S, _ipv6: bool) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Takes the next entry off `socket`'s error queue: `Some` for an ICMP
/// error or a datagram refused as too big for the path (see
/// [`dont_fragment`]), `None` for another kind. `WouldBlock` when the
/// queue is empty.
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
    let Some(peer) = super::batch::to_socket_addr(&name) else {
        return Ok(None);
    };
    Ok(match error.ee_origin {
        libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6 => Some(IcmpError {
            peer,
            icmp_type: error.ee_type,
            code: error.ee_code,
            mtu: error.ee_info,
        }),
        // A datagram the kernel would not send: too big for the path's
        // MTU on a socket that may not fragment (DONT-FRAGMENT). Told as
        // the error a router would have sent, with the MTU, so the client
        // learns it as from any hop on the path.
        libc::SO_EE_ORIGIN_LOCAL if error.ee_errno == libc::EMSGSIZE as u32 => {
            let (icmp_type, code) = if peer.is_ipv6() { (2, 0) } else { (3, 4) };
            Some(IcmpError {
                peer,
                icmp_type,
                code,
                mtu: error.ee_info,
            })
        }
        _ => None,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn next_error<S>(_socket: &S) -> io::Result<Option<IcmpError>> {
    Err(io::ErrorKind::WouldBlock.into())
}
