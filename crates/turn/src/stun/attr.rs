//! Attribute types and the encodings of their values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{MAGIC_COOKIE, StunError};

pub const MAPPED_ADDRESS: u16 = 0x0001;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const CHANNEL_NUMBER: u16 = 0x000C;
pub const LIFETIME: u16 = 0x000D;
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA: u16 = 0x0013;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const EVEN_PORT: u16 = 0x0018;
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
pub const DONT_FRAGMENT: u16 = 0x001A;
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
pub const USERHASH: u16 = 0x001E;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const RESERVATION_TOKEN: u16 = 0x0022;
pub const PRIORITY: u16 = 0x0024;
pub const USE_CANDIDATE: u16 = 0x0025;
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
/// ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE as the draft before
/// RFC 8656 numbered them, and as coturn (4.6 and its clients, such as
/// `turnutils_uclient -Z`) still does. Unassigned by IANA; the server
/// takes a dual-allocation request in either numbering and answers in the
/// one it was asked in.
pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: u16 = 0x8032;
pub const ADDRESS_ERROR_CODE_DRAFT: u16 = 0x8033;
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
pub const ICMP: u16 = 0x8004;
pub const SOFTWARE: u16 = 0x8022;
pub const ALTERNATE_SERVER: u16 = 0x8023;
pub const FINGERPRINT: u16 = 0x8028;
pub const ICE_CONTROLLED: u16 = 0x8029;
pub const ICE_CONTROLLING: u16 = 0x802A;
pub const RESPONSE_ORIGIN: u16 = 0x802B;
pub const OTHER_ADDRESS: u16 = 0x802C;

/// Comprehension-required attributes this codec understands; any other in
/// 0x0000..=0x7FFF gets a 420 (Unknown Attribute).
pub fn is_known(typ: u16) -> bool {
    matches!(
        typ,
        MAPPED_ADDRESS
            | USERNAME
            | MESSAGE_INTEGRITY
            | ERROR_CODE
            | UNKNOWN_ATTRIBUTES
            | CHANNEL_NUMBER
            | LIFETIME
            | XOR_PEER_ADDRESS
            | DATA
            | REALM
            | NONCE
            | XOR_RELAYED_ADDRESS
            | REQUESTED_ADDRESS_FAMILY
            | EVEN_PORT
            | REQUESTED_TRANSPORT
            | DONT_FRAGMENT
            | MESSAGE_INTEGRITY_SHA256
            | PASSWORD_ALGORITHM
            | USERHASH
            | XOR_MAPPED_ADDRESS
            | RESERVATION_TOKEN
            | PRIORITY
            | USE_CANDIDATE
    )
}

/// Address family codes.
pub const FAMILY_IPV4: u8 = 0x01;
pub const FAMILY_IPV6: u8 = 0x02;

/// Password algorithm codes (RFC 8489 §18.5).
pub const PASSWORD_ALGORITHM_MD5: u16 = 0x0001;
pub const PASSWORD_ALGORITHM_SHA256: u16 = 0x0002;

/// REQUESTED-TRANSPORT protocol number for UDP.
pub const TRANSPORT_UDP: u8 = 17;

/// Encodes MAPPED-ADDRESS-style values; returns bytes and length.
pub fn encode_address(addr: SocketAddr) -> ([u8; 20], usize) {
    let mut out = [0u8; 20];
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&ip.octets());
            (out, 8)
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_IPV6;
            out[4..20].copy_from_slice(&ip.octets());
            (out, 20)
        }
    }
}

/// Encodes XOR-MAPPED-ADDRESS-style values.
pub fn encode_xor_address(addr: SocketAddr, tid: &[u8; 12]) -> ([u8; 20], usize) {
    let (mut out, len) = encode_address(addr);
    xor_in_place(&mut out[..len], tid);
    (out, len)
}

fn xor_in_place(v: &mut [u8], tid: &[u8; 12]) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    v[2] ^= cookie[0];
    v[3] ^= cookie[1];
    for (i, b) in v[4..].iter_mut().enumerate() {
        *b ^= if i < 4 { cookie[i] } else { tid[i - 4] };
    }
}

/// Decodes MAPPED-ADDRESS-style values.
pub fn decode_address(typ: u16, v: &[u8]) -> Result<SocketAddr, StunError> {
    let bad = StunError::BadAttr(typ);
    if v.len() < 4 {
        return Err(bad);
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    let ip = match (v[1], v.len()) {
        (FAMILY_IPV4, 8) => IpAddr::V4(Ipv4Addr::new(v[4], v[5], v[6], v[7])),
        (FAMILY_IPV6, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&v[4..20]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(bad),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Decodes XOR-MAPPED-ADDRESS-style values.
pub fn decode_xor_address(typ: u16, v: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, StunError> {
    if v.len() != 8 && v.len() != 20 {
        return Err(StunError::BadAttr(typ));
    }
    let mut copy = [0u8; 20];
    copy[..v.len()].copy_from_slice(v);
    xor_in_place(&mut copy[..v.len()], tid);
    decode_address(typ, &copy[..v.len()])
}

/// Decodes ERROR-CODE into (code, reason).
pub fn decode_error(v: &[u8]) -> Result<(u16, &str), StunError> {
    if v.len() < 4 {
        return Err(StunError::BadAttr(ERROR_CODE));
    }
    let class = u16::from(v[2] & 0x07);
    let number = u16::from(v[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(StunError::BadAttr(ERROR_CODE));
    }
    let reason = std::str::from_utf8(&v[4..]).map_err(|_| StunError::BadAttr(ERROR_CODE))?;
    Ok((class * 100 + number, reason))
}

/// Decodes ADDRESS-ERROR-CODE into (family, code, reason).
pub fn decode_address_error(v: &[u8]) -> Result<(u8, u16, &str), StunError> {
    let (code, reason) = decode_error(v).map_err(|_| StunError::BadAttr(ADDRESS_ERROR_CODE))?;
    Ok((v[0], code, reason))
}

/// Decodes a 4-byte big-endian value (LIFETIME, PRIORITY, ...).
pub fn decode_u32(typ: u16, v: &[u8]) -> Result<u32, StunError> {
    let b: [u8; 4] = v.try_into().map_err(|_| StunError::BadAttr(typ))?;
    Ok(u32::from_be_bytes(b))
}

/// Decodes CHANNEL-NUMBER (the number, then two reserved bytes).
pub fn decode_channel(v: &[u8]) -> Result<u16, StunError> {
    if v.len() != 4 {
        return Err(StunError::BadAttr(CHANNEL_NUMBER));
    }
    Ok(u16::from_be_bytes([v[0], v[1]]))
}

/// Decodes UNKNOWN-ATTRIBUTES.
pub fn decode_unknown(v: &[u8]) -> Result<Vec<u16>, StunError> {
    if v.len() % 2 != 0 {
        return Err(StunError::BadAttr(UNKNOWN_ATTRIBUTES));
    }
    Ok(v.chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

/// A UTF-8 text attribute (USERNAME, REALM, NONCE, SOFTWARE) with a length
/// limit in bytes (the RFC's limits: 513 for USERNAME, 763 for the others).
pub fn decode_text(typ: u16, v: &[u8], max: usize) -> Result<&str, StunError> {
    if v.len() > max {
        return Err(StunError::BadAttr(typ));
    }
    std::str::from_utf8(v).map_err(|_| StunError::BadAttr(typ))
}

/// A typed attribute, for code that wants the whole message decoded (the
/// client, tests). The server's hot path reads raw values instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    XorPeerAddress(SocketAddr),
    XorRelayedAddress(SocketAddr),
    AlternateServer(SocketAddr),
    Username(String),
    Realm(String),
    Nonce(String),
    Software(String),
    AlternateDomain(String),
    ErrorCode(u16, String),
    /// The family, the code and the reason.
    AddressErrorCode(u8, u16, String),
    UnknownAttributes(Vec<u16>),
    ChannelNumber(u16),
    Lifetime(u32),
    Data(Vec<u8>),
    RequestedTransport(u8),
    RequestedAddressFamily(u8),
    AdditionalAddressFamily(u8),
    EvenPort(bool),
    DontFragment,
    ReservationToken([u8; 8]),
    PasswordAlgorithm(u16, Vec<u8>),
    PasswordAlgorithms(Vec<(u16, Vec<u8>)>),
    Userhash([u8; 32]),
    Priority(u32),
    UseCandidate,
    IceControlled(u64),
    IceControlling(u64),
    Icmp(Icmp),
    Other(u16, Vec<u8>),
}

/// The value of an ICMP attribute (RFC 8656 §18.13): the ICMP error a
/// datagram sent toward a peer met, carried to the client in a Data
/// indication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    /// 7 bits on the wire.
    pub icmp_type: u8,
    /// 9 bits on the wire.
    pub code: u16,
    /// The next hop's MTU for "fragmentation needed" (ICMPv4 3/4) and
    /// "packet too big" (ICMPv6 2); zero otherwise.
    pub error_data: u32,
}

impl Icmp {
    /// The attribute's 8 bytes. The RFC's figure gives the type 7 bits and
    /// the code 9 bits of the second 16-bit word, after 16 reserved bits.
    /// (Some libraries read a byte each instead, which changes the type
    /// they see; no browser reads this attribute.)
    pub fn encode(self) -> [u8; 8] {
        let word = (u16::from(self.icmp_type & 0x7F) << 9) | (self.code & 0x1FF);
        let mut v = [0u8; 8];
        v[2..4].copy_from_slice(&word.to_be_bytes());
        v[4..8].copy_from_slice(&self.error_data.to_be_bytes());
        v
    }

    /// Reads the attribute's value; the reserved bits are ignored.
    pub fn decode(v: &[u8]) -> Option<Icmp> {
        let v: &[u8; 8] = v.try_into().ok()?;
        let word = u16::from_be_bytes([v[2], v[3]]);
        Some(Icmp {
            icmp_type: (word >> 9) as u8,
            code: word & 0x1FF,
            error_data: u32::from_be_bytes([v[4], v[5], v[6], v[7]]),
        })
    }
}

impl Attr {
    /// Decodes one attribute value.
    pub fn decode(typ: u16, v: &[u8], tid: &[u8; 12]) -> Result<Attr, StunError> {
        let bad = || StunError::BadAttr(typ);
        let text = |max| decode_text(typ, v, max).map(str::to_owned);
        let one_byte =
            || -> Result<u8, StunError> { if v.len() == 4 { Ok(v[0]) } else { Err(bad()) } };
        let u64v = || -> Result<u64, StunError> {
            let b: [u8; 8] = v.try_into().map_err(|_| bad())?;
            Ok(u64::from_be_bytes(b))
        };
        Ok(match typ {
            MAPPED_ADDRESS => Attr::MappedAddress(decode_address(typ, v)?),
            XOR_MAPPED_ADDRESS => Attr::XorMappedAddress(decode_xor_address(typ, v, tid)?),
            XOR_PEER_ADDRESS => Attr::XorPeerAddress(decode_xor_address(typ, v, tid)?),
            XOR_RELAYED_ADDRESS => Attr::XorRelayedAddress(decode_xor_address(typ, v, tid)?),
            ALTERNATE_SERVER => Attr::AlternateServer(decode_address(typ, v)?),
            USERNAME => Attr::Username(text(513)?),
            REALM => Attr::Realm(text(763)?),
            NONCE => Attr::Nonce(text(763)?),
            SOFTWARE => Attr::Software(text(763)?),
            ALTERNATE_DOMAIN => Attr::AlternateDomain(text(255)?),
            ERROR_CODE => {
                let (code, reason) = decode_error(v)?;
                Attr::ErrorCode(code, reason.to_owned())
            }
            ADDRESS_ERROR_CODE => {
                let (family, code, reason) = decode_address_error(v)?;
                Attr::AddressErrorCode(family, code, reason.to_owned())
            }
            UNKNOWN_ATTRIBUTES => Attr::UnknownAttributes(decode_unknown(v)?),
            CHANNEL_NUMBER => Attr::ChannelNumber(decode_channel(v)?),
            LIFETIME => Attr::Lifetime(decode_u32(typ, v)?),
            PRIORITY => Attr::Priority(decode_u32(typ, v)?),
            DATA => Attr::Data(v.to_vec()),
            REQUESTED_TRANSPORT => Attr::RequestedTransport(one_byte()?),
            REQUESTED_ADDRESS_FAMILY => Attr::RequestedAddressFamily(one_byte()?),
            ADDITIONAL_ADDRESS_FAMILY => Attr::AdditionalAddressFamily(one_byte()?),
            EVEN_PORT => match v {
                [b] => Attr::EvenPort(b & 0x80 != 0),
                _ => return Err(bad()),
            },
            DONT_FRAGMENT if v.is_empty() => Attr::DontFragment,
            USE_CANDIDATE if v.is_empty() => Attr::UseCandidate,
            RESERVATION_TOKEN => Attr::ReservationToken(v.try_into().map_err(|_| bad())?),
            USERHASH => Attr::Userhash(v.try_into().map_err(|_| bad())?),
            ICE_CONTROLLED => Attr::IceControlled(u64v()?),
            ICE_CONTROLLING => Attr::IceControlling(u64v()?),
            ICMP => Attr::Icmp(Icmp::decode(v).ok_or_else(bad)?),
            PASSWORD_ALGORITHM => {
                let (alg, rest) = decode_algorithm(v).ok_or_else(bad)?;
                if !rest.is_empty() {
                    return Err(bad());
                }
                Attr::PasswordAlgorithm(alg.0, alg.1)
            }
            PASSWORD_ALGORITHMS => {
                let mut list = Vec::new();
                let mut rest = v;
                while !rest.is_empty() {
                    let (alg, r) = decode_algorithm(rest).ok_or_else(bad)?;
                    list.push(alg);
                    rest = r;
                }
                Attr::PasswordAlgorithms(list)
            }
            DONT_FRAGMENT | USE_CANDIDATE => return Err(bad()),
            MESSAGE_INTEGRITY | MESSAGE_INTEGRITY_SHA256 | FINGERPRINT => {
                Attr::Other(typ, v.to_vec())
            }
            other => Attr::Other(other, v.to_vec()),
        })
    }

    /// The attribute's type code.
    pub fn typ(&self) -> u16 {
        match self {
            Attr::MappedAddress(_) => MAPPED_ADDRESS,
            Attr::XorMappedAddress(_) => XOR_MAPPED_ADDRESS,
            Attr::XorPeerAddress(_) => XOR_PEER_ADDRESS,
            Attr::XorRelayedAddress(_) => XOR_RELAYED_ADDRESS,
            Attr::AlternateServer(_) => ALTERNATE_SERVER,
            Attr::Username(_) => USERNAME,
            Attr::Realm(_) => REALM,
            Attr::Nonce(_) => NONCE,
            Attr::Software(_) => SOFTWARE,
            Attr::AlternateDomain(_) => ALTERNATE_DOMAIN,
            Attr::ErrorCode(..) => ERROR_CODE,
            Attr::AddressErrorCode(..) => ADDRESS_ERROR_CODE,
            Attr::UnknownAttributes(_) => UNKNOWN_ATTRIBUTES,
            Attr::ChannelNumber(_) => CHANNEL_NUMBER,
            Attr::Lifetime(_) => LIFETIME,
            Attr::Data(_) => DATA,
            Attr::RequestedTransport(_) => REQUESTED_TRANSPORT,
            Attr::RequestedAddressFamily(_) => REQUESTED_ADDRESS_FAMILY,
            Attr::AdditionalAddressFamily(_) => ADDITIONAL_ADDRESS_FAMILY,
            Attr::EvenPort(_) => EVEN_PORT,
            Attr::DontFragment => DONT_FRAGMENT,
            Attr::ReservationToken(_) => RESERVATION_TOKEN,
            Attr::PasswordAlgorithm(..) => PASSWORD_ALGORITHM,
            Attr::PasswordAlgorithms(_) => PASSWORD_ALGORITHMS,
            Attr::Userhash(_) => USERHASH,
            Attr::Priority(_) => PRIORITY,
            Attr::UseCandidate => USE_CANDIDATE,
            Attr::IceControlled(_) => ICE_CONTROLLED,
            Attr::IceControlling(_) => ICE_CONTROLLING,
            Attr::Icmp(_) => ICMP,
            Attr::Other(t, _) => *t,
        }
    }

    /// Appends the attribute to a message.
    pub fn encode(&self, b: &mut super::MessageBuilder) {
        let typ = self.typ();
        match self {
            Attr::MappedAddress(a) | Attr::AlternateServer(a) => {
                b.address(typ, *a);
            }
            Attr::XorMappedAddress(a) | Attr::XorPeerAddress(a) | Attr::XorRelayedAddress(a) => {
                b.xor_address(typ, *a);
            }
            Attr::Username(s)
            | Attr::Realm(s)
            | Attr::Nonce(s)
            | Attr::Software(s)
            | Attr::AlternateDomain(s) => {
                b.attr(typ, s.as_bytes());
            }
            Attr::ErrorCode(code, reason) => {
                b.error(*code, reason);
            }
            Attr::AddressErrorCode(family, code, reason) => {
                b.address_error(*family, *code, reason);
            }
            Attr::UnknownAttributes(list) => {
                let v: Vec<u8> = list.iter().flat_map(|t| t.to_be_bytes()).collect();
                b.attr(typ, &v);
            }
            Attr::ChannelNumber(c) => {
                let c = c.to_be_bytes();
                b.attr(typ, &[c[0], c[1], 0, 0]);
            }
            Attr::Lifetime(v) | Attr::Priority(v) => {
                b.u32(typ, *v);
            }
            Attr::Data(d) | Attr::Other(_, d) => {
                b.attr(typ, d);
            }
            Attr::RequestedTransport(p)
            | Attr::RequestedAddressFamily(p)
            | Attr::AdditionalAddressFamily(p) => {
                b.attr(typ, &[*p, 0, 0, 0]);
            }
            Attr::EvenPort(r) => {
                b.attr(typ, &[if *r { 0x80 } else { 0 }]);
            }
            Attr::DontFragment | Attr::UseCandidate => {
                b.attr(typ, &[]);
            }
            Attr::ReservationToken(t) => {
                b.attr(typ, t);
            }
            Attr::Userhash(h) => {
                b.attr(typ, h);
            }
            Attr::PasswordAlgorithm(alg, params) => {
                b.attr(typ, &encode_algorithm(*alg, params));
            }
            Attr::PasswordAlgorithms(list) => {
                let v: Vec<u8> = list
                    .iter()
                    .flat_map(|(a, p)| encode_algorithm(*a, p))
                    .collect();
                b.attr(typ, &v);
            }
            Attr::IceControlled(v) | Attr::IceControlling(v) => {
                b.attr(typ, &v.to_be_bytes());
            }
            Attr::Icmp(icmp) => {
                b.attr(typ, &icmp.encode());
            }
        }
    }
}

type Algorithm = (u16, Vec<u8>);

fn decode_algorithm(v: &[u8]) -> Option<(Algorithm, &[u8])> {
    let alg = u16::from_be_bytes([*v.first()?, *v.get(1)?]);
    let len = usize::from(u16::from_be_bytes([*v.get(2)?, *v.get(3)?]));
    let params = v.get(4..4 + len)?.to_vec();
    let next = (4 + len).next_multiple_of(4);
    Some(((alg, params), v.get(next..).unwrap_or(&[])))
}

fn encode_algorithm(alg: u16, params: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + params.len().next_multiple_of(4));
    v.extend_from_slice(&alg.to_be_bytes());
    v.extend_from_slice(&(params.len() as u16).to_be_bytes());
    v.extend_from_slice(params);
    v.resize(4 + params.len().next_multiple_of(4), 0);
    v
}
