//! The process's open-file limit. Every connection and every relay socket
//! is a file descriptor, and the usual soft limit (1,024 under systemd and
//! most shells) would let a few hundred idle connections take them all, so
//! the binary raises it to the hard limit at start, as nginx and Go
//! programs do, and the web server and the TURN server size their
//! connection limits from it.

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

/// Connections a listener may hold: `wanted` (the `flag`'s value), but no
/// more than a quarter of the open-file limit. Each connection takes a
/// descriptor (a TURN one a second for its relay socket once it
/// allocates), so the web server's and TURN's connections together take at
/// most three quarters, whatever they do, and the rest stays for UDP
/// clients' relay sockets. Says in the log when the limit holds it lower.
pub fn connections_within_limit(wanted: usize, flag: &str) -> usize {
    let open_files = match limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit; connections are limited by {flag} alone");
            return wanted;
        }
    };
    let room = quarter(open_files);
    if room < wanted {
        tracing::warn!(
            open_file_limit = open_files,
            connections = room,
            "the open-file limit leaves room for fewer connections than {flag} {wanted}: raise it (systemd: LimitNOFILE=, shell: ulimit -n) to serve more"
        );
    }
    wanted.min(room)
}

fn quarter(open_files: u64) -> usize {
    usize::try_from(open_files / 4).unwrap_or(usize::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_a_quarter_of_the_descriptors() {
        assert_eq!(quarter(1024), 256);
        assert_eq!(quarter(256), 64);
        assert_eq!(quarter(3), 1);
        assert_eq!(
            quarter(u64::MAX),
            usize::try_from(u64::MAX / 4).unwrap_or(usize::MAX)
        );
    }
}
