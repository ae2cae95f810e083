//! Who is at the other end of a signaling connection, as the logs name it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The client of a connection: the socket's own peer, or, through a
/// reverse proxy the server trusts, the client that proxy says it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Connected to us itself.
    Direct(SocketAddr),
    /// Reached us through `proxy`, which named `client` in
    /// X-Forwarded-For (proxies give no port, or one not worth logging).
    Proxied { client: IpAddr, proxy: SocketAddr },
}

impl Remote {
    /// The client's address, whichever way it came.
    pub fn ip(&self) -> IpAddr {
        match self {
            Remote::Direct(addr) => addr.ip(),
            Remote::Proxied { client, .. } => *client,
        }
    }
}

impl fmt::Display for Remote {
    /// The client first, so that a log search for an address finds both.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Direct(addr) => write!(f, "{addr}"),
            Remote::Proxied { client, proxy } => write!(f, "{client} (via {proxy})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_comes_first_and_the_proxy_after() {
        let direct = Remote::Direct("198.51.100.7:50000".parse().unwrap());
        assert_eq!(direct.to_string(), "198.51.100.7:50000");
        let proxied = Remote::Proxied {
            client: "2001:db8::7".parse().unwrap(),
            proxy: "127.0.0.1:41000".parse().unwrap(),
        };
        assert_eq!(proxied.to_string(), "2001:db8::7 (via 127.0.0.1:41000)");
        assert_eq!(proxied.ip(), "2001:db8::7".parse::<IpAddr>().unwrap());
    }
}
