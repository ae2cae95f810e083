//! The process's open-file limit. Every connection and every relay socket
//! is a file descriptor, and the usual soft limit (1,024 under systemd and
//! most shells) would let a few hundred idle connections take them all, so
//! the binary raises it to the hard limit at start, as nginx and Go
//! programs do, and the TURN server sizes its connection limit from it.

use std::io;

fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// The soft limit: how many descriptors this process may have open.
pub fn limit() -> io::Result<u64> {
    Ok(get()?.rlim_cur)
}

/// Raises the soft limit to the hard one; returns the limit now in force.
pub fn raise_to_hard_limit() -> io::Result<u64> {
    let mut limit = get()?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit; raising the soft limit up to
        // the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
