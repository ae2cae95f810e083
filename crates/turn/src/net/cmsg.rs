//! Reading the control messages a receive filled in: a datagram's TOS
//! byte, an ICMP error's details. Over plain bytes, so that a malformed
//! buffer can at worst yield nothing (it comes from the kernel, but the
//! walk is property-tested on arbitrary bytes all the same), instead of
//! the C macros' pointer arithmetic.

/// The data of the first control message of `level` and `typ` in
/// `control`, the bytes a receive filled in (its `msg_controllen`);
/// `None` if there is none, or the buffer ends before its data does.
#[cfg(target_os = "linux")]
pub fn find(control: &[u8], level: libc::c_int, typ: libc::c_int) -> Option<&[u8]> {
    let header = std::mem::size_of::<libc::cmsghdr>();
    // The kernel aligns each message, and the data after the header, to
    // a size_t.
    let align = |n: usize| n.checked_next_multiple_of(std::mem::size_of::<usize>());
    let data_start = align(header)?;
    let mut at = 0usize;
    while let Some(bytes) = control.get(at..at.checked_add(header)?) {
        // SAFETY: `bytes` holds a whole cmsghdr, a plain C struct for
        // which any bits are a value; read unaligned, as a slice
        // promises no alignment.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        // size_t with glibc, socklen_t with musl.
        let len: usize = h.cmsg_len as _;
        if len < data_start {
            return None;
        }
        let data = control.get(at.checked_add(data_start)?..at.checked_add(len)?)?;
        if h.cmsg_level == level && h.cmsg_type == typ {
            return Some(data);
        }
        at = at.checked_add(align(len)?)?;
    }
    None
}

/// The control bytes a receive filled into `m`.
///
/// # Safety
/// `m.msg_control` points at `m.msg_controllen` readable bytes (or is
/// null with a length of 0), which outlive the slice.
#[cfg(target_os = "linux")]
pub unsafe fn filled(m: &libc::msghdr) -> &[u8] {
    if m.msg_control.is_null() {
        return &[];
    }
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(m.msg_control.cast::<u8>(), m.msg_controllen as _) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A control message as the kernel lays it out, padded.
    fn message(level: libc::c_int, typ: libc::c_int, data: &[u8]) -> Vec<u8> {
        // SAFETY: all-zero is a valid cmsghdr.
        let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
        // SAFETY: CMSG_LEN and CMSG_SPACE have no preconditions.
        let (len, space) = unsafe {
            (
                libc::CMSG_LEN(data.len() as u32) as usize,
                libc::CMSG_SPACE(data.len() as u32) as usize,
            )
        };
        h.cmsg_len = len as _;
        h.cmsg_level = level;
        h.cmsg_type = typ;
        let mut out = vec![0u8; space];
        // SAFETY: `out` has room for the header at its start.
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast(), h) };
        let start = len - data.len();
        out[start..len].copy_from_slice(data);
        out
    }

    #[test]
    fn finds_the_message_asked_for_after_others() {
        let mut control = message(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[9; 16]);
        control.extend(message(libc::SOL_IP, libc::IP_TOS, &[0xb9]));
        assert_eq!(
            find(&control, libc::SOL_IP, libc::IP_TOS),
            Some(&[0xb9][..])
        );
        assert_eq!(find(&control, libc::SOL_IPV6, libc::IPV6_TCLASS), None);
        // Cut short: the data is not all there.
        let short = &control[..control.len() - 8];
        assert_eq!(find(short, libc::SOL_IP, libc::IP_TOS), None);
        assert_eq!(find(&[], libc::SOL_IP, libc::IP_TOS), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
        ))]

        /// Whatever the bytes, the walk ends, and what it finds lies
        /// within them.
        #[test]
        fn any_bytes_are_walked_safely(
            control in proptest::collection::vec(any::<u8>(), 0..200),
            level in prop_oneof![Just(libc::SOL_IP), Just(libc::SOL_IPV6), any::<i32>()],
            typ in prop_oneof![Just(libc::IP_TOS), Just(libc::IPV6_RECVERR), any::<i32>()],
        ) {
            if let Some(data) = find(&control, level, typ) {
                let (start, end) = (control.as_ptr() as usize, control.as_ptr() as usize + control.len());
                let d = data.as_ptr() as usize;
                prop_assert!(d >= start && d + data.len() <= end);
            }
        }

        /// Messages laid out as the kernel does are all found, in any
        /// order, with their data whole.
        #[test]
        fn well_formed_messages_are_found(
            messages in proptest::collection::vec(
                (0i32..4, 0i32..4, proptest::collection::vec(any::<u8>(), 0..24)),
                1..5,
            ),
        ) {
            let control: Vec<u8> = messages
                .iter()
                .flat_map(|(l, t, d)| message(*l, *t, d))
                .collect();
            for (l, t, _) in &messages {
                let first = messages.iter().find(|(l2, t2, _)| (l2, t2) == (l, t)).unwrap();
                prop_assert_eq!(find(&control, *l, *t), Some(&first.2[..]));
            }
        }
    }
}
