//! Who a request from a reverse proxy is really for. Behind nginx or Caddy
//! every connection comes from the proxy's address, so without this the
//! logs name the proxy for everyone, and `--max-connections-per-ip` caps
//! all of its clients together: 512 WebSockets for the whole server.
//!
//! A proxy says whom it serves in X-Forwarded-For, appending the address
//! its own client connected from. Everything left of that is whatever the
//! client sent, so the header is read from the right: past the proxies we
//! trust, the first address is the client's. Only connections from the
//! trusted proxies are read at all; anyone else's X-Forwarded-For is
//! ignored, or any client could claim any address.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use callisto_signal::Remote;
use ipnet::IpNet;

/// The header proxies name their clients in.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The addresses whose X-Forwarded-For is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies { nets }
    }

    /// Whether `ip` is one of the trusted proxies' (an IPv4 address seen
    /// through a dual-stack socket as `::ffff:a.b.c.d` counts as IPv4).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The client of a request that came from `peer` with these
    /// X-Forwarded-For header values, in the order they came. Direct when
    /// `peer` is not trusted, or names no one else.
    ///
    /// An entry that is not an address (`unknown`, a proxy's obfuscated
    /// name, garbage) ends the search at the trusted hop to its right: who
    /// is behind it cannot be known, and the proxy that added it is the
    /// nearest address that can be believed.
    pub fn client<'a, I>(&self, peer: SocketAddr, forwarded_for: I) -> Remote
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: DoubleEndedIterator,
    {
        if !self.trusts(peer.ip()) {
            return Remote::Direct(peer);
        }
        let proxied = |client: IpAddr| {
            if client == peer.ip().to_canonical() {
                Remote::Direct(peer)
            } else {
                Remote::Proxied {
                    client,
                    proxy: peer,
                }
            }
        };
        let mut nearest = peer.ip().to_canonical();
        for value in forwarded_for.into_iter().rev() {
            let Ok(value) = std::str::from_utf8(value) else {
                return proxied(nearest);
            };
            // Empty elements are allowed in a header list, and mean nothing.
            for entry in value.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
                let Some(ip) = parse_entry(entry) else {
                    return proxied(nearest);
                };
                if !self.trusts(ip) {
                    return proxied(ip);
                }
                nearest = ip;
            }
        }
        // Proxies all the way: the leftmost is as near the client as known.
        proxied(nearest)
    }
}

/// One X-Forwarded-For entry: an address, with or without a port, IPv6
/// with or without brackets.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = IpAddr::from_str(entry)
        .ok()
        .or_else(|| SocketAddr::from_str(entry).ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')
                .and_then(|v6| Ipv6Addr::from_str(v6).ok())
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// Reads a `--trusted-proxy` value: an address, a CIDR block, or `none`
/// (trust no proxy at all).
pub fn parse_flag(value: &str) -> Result<Option<IpNet>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if let Ok(ip) = IpAddr::from_str(value) {
        return Ok(Some(IpNet::from(ip)));
    }
    IpNet::from_str(value)
        .map(|net| Some(net.trunc()))
        .map_err(|_| {
            format!(
                "{value:?} is not an address or CIDR block (such as 10.0.0.5 or 10.0.0.0/24), nor `none`"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loopback() -> TrustedProxies {
        TrustedProxies::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])
    }

    fn proxy() -> SocketAddr {
        "127.0.0.1:41000".parse().unwrap()
    }

    fn client_of(trusted: &TrustedProxies, peer: SocketAddr, headers: &[&str]) -> Remote {
        trusted.client(peer, headers.iter().map(|h| h.as_bytes()))
    }

    fn proxied(client: &str) -> Remote {
        Remote::Proxied {
            client: client.parse().unwrap(),
            proxy: proxy(),
        }
    }

    #[test]
    fn the_client_is_the_rightmost_address_not_a_proxy() {
        let t = loopback();
        assert_eq!(
            client_of(&t, proxy(), &["198.51.100.7"]),
            proxied("198.51.100.7")
        );
        // What the client sent itself, left of it, is not believed.
        assert_eq!(
            client_of(&t, proxy(), &["203.0.113.1, 198.51.100.7"]),
            proxied("198.51.100.7")
        );
        // A chain of trusted proxies is walked through.
        assert_eq!(
            client_of(&t, proxy(), &["203.0.113.1, 198.51.100.7, 127.0.0.9"]),
            proxied("198.51.100.7")
        );
        // Several header lines are one list, in order.
        assert_eq!(
            client_of(&t, proxy(), &["203.0.113.1", "198.51.100.7,127.0.0.9"]),
            proxied("198.51.100.7")
        );
    }

    #[test]
    fn the_forms_proxies_write_are_read() {
        let t = loopback();
        for (entry, ip) in [
            ("198.51.100.7:5060", "198.51.100.7"),
            ("2001:db8::7", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("  198.51.100.7\t", "198.51.100.7"),
        ] {
            assert_eq!(client_of(&t, proxy(), &[entry]), proxied(ip), "{entry}");
        }
    }

    #[test]
    fn anyone_elses_header_is_ignored() {
        let t = loopback();
        let stranger: SocketAddr = "192.0.2.50:50000".parse().unwrap();
        assert_eq!(
            client_of(&t, stranger, &["198.51.100.7"]),
            Remote::Direct(stranger)
        );
        // Trusting no one: the header means nothing, even from loopback.
        let none = TrustedProxies::default();
        assert_eq!(
            client_of(&none, proxy(), &["198.51.100.7"]),
            Remote::Direct(proxy())
        );
        // A dual-stack socket's view of an IPv4 proxy is still that proxy.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:41000".parse().unwrap();
        assert!(matches!(
            client_of(&t, mapped, &["198.51.100.7"]),
            Remote::Proxied { .. }
        ));
    }

    #[test]
    fn what_cannot_be_read_stops_at_the_nearest_proxy() {
        let t = loopback();
        // No header, or an empty one: the proxy itself.
        assert_eq!(client_of(&t, proxy(), &[]), Remote::Direct(proxy()));
        assert_eq!(client_of(&t, proxy(), &[" , "]), Remote::Direct(proxy()));
        for garbage in ["unknown", "_hidden", "198.51.100.300", "2001:db8::7]:1"] {
            assert_eq!(
                client_of(&t, proxy(), &[garbage]),
                Remote::Direct(proxy()),
                "{garbage}"
            );
            // Behind another trusted proxy: that one.
            assert_eq!(
                client_of(
                    &t,
                    proxy(),
                    &[&format!("198.51.100.7, {garbage}, 127.0.0.9")]
                ),
                proxied("127.0.0.9"),
                "{garbage}"
            );
        }
        assert_eq!(
            t.client(proxy(), [&b"\xff198.51.100.7"[..]]),
            Remote::Direct(proxy())
        );
        // All proxies: the leftmost.
        assert_eq!(
            client_of(&t, proxy(), &["127.0.0.3, 127.0.0.2"]),
            proxied("127.0.0.3")
        );
    }

    #[test]
    fn the_flag_takes_addresses_blocks_and_none() {
        assert_eq!(
            parse_flag("10.0.0.5"),
            Ok(Some("10.0.0.5/32".parse().unwrap()))
        );
        assert_eq!(
            parse_flag("fd00::1"),
            Ok(Some("fd00::1/128".parse().unwrap()))
        );
        assert_eq!(
            parse_flag("10.0.0.9/24"),
            Ok(Some("10.0.0.0/24".parse().unwrap()))
        );
        assert_eq!(parse_flag("NONE"), Ok(None));
        let err = parse_flag("proxy.lan").unwrap_err();
        assert!(err.contains("proxy.lan") && err.contains("CIDR"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Arbitrary header bytes: no panic, and the client is the peer or
        /// an address that was in the header.
        #[test]
        fn any_header_gives_the_peer_or_an_address_it_named(
            headers in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4),
            text in "[0-9a-f:.,\\[\\] ]{0,80}",
        ) {
            let t = loopback();
            let mut all: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
            all.push(text.as_bytes());
            match t.client(proxy(), all.iter().copied()) {
                Remote::Direct(peer) => prop_assert_eq!(peer, proxy()),
                Remote::Proxied { client, proxy: via } => {
                    prop_assert_eq!(via, proxy());
                    let named = all.iter().any(|h| {
                        String::from_utf8_lossy(h)
                            .split(',')
                            .filter_map(|e| parse_entry(e.trim()))
                            .any(|ip| ip == client)
                    });
                    prop_assert!(named, "{client} was not in the header");
                }
            }
        }

        /// Whatever a client puts in X-Forwarded-For itself, once a trusted
        /// proxy appends the address it connected from, that address is
        /// the client.
        #[test]
        fn a_client_cannot_claim_another_address(
            claimed in "[ -~]{0,80}",
            client in any::<[u8; 4]>(),
        ) {
            let client = IpAddr::from(client);
            prop_assume!(!loopback().trusts(client));
            let header = format!("{claimed}, {client}");
            prop_assert_eq!(
                loopback().client(proxy(), [header.as_bytes()]),
                Remote::Proxied { client, proxy: proxy() }
            );
            // And from a peer that is not trusted, nothing in it counts.
            let peer = SocketAddr::new(client, 50000);
            prop_assert_eq!(loopback().client(peer, [header.as_bytes()]), Remote::Direct(peer));
        }
    }
}
