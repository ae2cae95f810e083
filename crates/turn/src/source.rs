//! A client's source, as the limits per source count it: an IPv4 address,
//! or the /64 of an IPv6 one, since a host gets a whole /64 and may pick
//! any address in it. An IPv4-mapped IPv6 address (a dual-stack socket's
//! IPv4 client) counts as the IPv4 address it carries.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
}

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.to_bits()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.to_bits()),
                None => Source::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let host =
            |net: u16, low: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, net, 0, 0, 0, low));
        assert_eq!(Source::of(host(7, 1)), Source::of(host(7, 2)));
        assert_ne!(Source::of(host(7, 1)), Source::of(host(8, 1)));
        let v4 = Ipv4Addr::new(192, 0, 2, 9);
        assert_eq!(
            Source::of(IpAddr::V6(v4.to_ipv6_mapped())),
            Source::of(IpAddr::V4(v4))
        );
        assert_ne!(
            Source::of(IpAddr::V4(v4)),
            Source::of("192.0.2.10".parse().unwrap())
        );
    }
}
