//! The RFC 5769 test vectors: parse them, verify integrity and fingerprint,
//! and rebuild them byte for byte.

use std::net::SocketAddr;

use callisto_turn::auth::long_term_key;
use callisto_turn::stun::{self, Attr, Class, Message, MessageBuilder, attr, method};

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|b| (b as char).to_digit(16).unwrap() as u8)
        .collect();
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

const PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";
const TID: [u8; 12] = [
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
];

// RFC 5769 §2.1
const SAMPLE_REQUEST: &str = "
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf";

// RFC 5769 §2.2
const SAMPLE_IPV4_RESPONSE: &str = "
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96";

// RFC 5769 §2.3
const SAMPLE_IPV6_RESPONSE: &str = "
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c";

// RFC 5769 §2.4
const SAMPLE_LONG_TERM: &str = "
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

#[test]
fn sample_request() {
    let bytes = hex(SAMPLE_REQUEST);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.method(), method::BINDING);
    assert_eq!(msg.class(), Class::Request);
    assert_eq!(msg.transaction_id(), &TID);
    assert!(msg.has_fingerprint());
    assert!(msg.verify_integrity(PASSWORD.as_bytes()));
    assert!(!msg.verify_integrity(b"wrong"));
    let attrs: Vec<Attr> = msg
        .attrs()
        .map(|a| Attr::decode(a.typ, a.value, msg.transaction_id()).unwrap())
        .collect();
    assert_eq!(
        attrs,
        vec![
            Attr::Software("STUN test client".into()),
            Attr::Priority(0x6e0001ff),
            Attr::IceControlled(0x932ff9b151263b36),
            Attr::Username("evtj:h6vY".into()),
        ]
    );
    // Rebuild it byte for byte (the RFC pads with spaces).
    let mut b = MessageBuilder::new(method::BINDING, Class::Request, &TID);
    b.padding_byte(b' ');
    for a in &attrs {
        a.encode(&mut b);
    }
    b.integrity(PASSWORD.as_bytes()).fingerprint();
    assert_eq!(b.finish(), bytes);
}

fn check_response(text: &str, expected: SocketAddr) {
    let bytes = hex(text);
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert!(msg.verify_integrity(PASSWORD.as_bytes()));
    let mapped = msg.get(attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(
        stun::decode_xor_address(attr::XOR_MAPPED_ADDRESS, mapped, &TID).unwrap(),
        expected
    );
    // Byte-for-byte rebuild (the RFC pads SOFTWARE with a space).
    let mut b = MessageBuilder::new(method::BINDING, Class::Success, &TID);
    b.padding_byte(b' ')
        .attr(attr::SOFTWARE, b"test vector")
        .xor_address(attr::XOR_MAPPED_ADDRESS, expected)
        .integrity(PASSWORD.as_bytes())
        .fingerprint();
    assert_eq!(b.finish(), bytes);
}

#[test]
fn sample_ipv4_response() {
    check_response(SAMPLE_IPV4_RESPONSE, "192.0.2.1:32853".parse().unwrap());
}

#[test]
fn sample_ipv6_response() {
    check_response(
        SAMPLE_IPV6_RESPONSE,
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap(),
    );
}

#[test]
fn sample_long_term_request() {
    let bytes = hex(SAMPLE_LONG_TERM);
    let msg = Message::parse(&bytes).unwrap();
    let username = msg.get(attr::USERNAME).unwrap();
    assert_eq!(std::str::from_utf8(username).unwrap(), "マトリックス");
    assert_eq!(
        msg.get(attr::NONCE).unwrap(),
        b"f//499k954d6OL34oL9FSTvy64sA"
    );
    assert_eq!(msg.get(attr::REALM).unwrap(), b"example.org");
    // The password after SASLprep is "TheMatrIX".
    let key = long_term_key("マトリックス", "example.org", "TheMatrIX");
    assert!(msg.verify_integrity(&key));
    assert!(!msg.verify_integrity(&long_term_key("マトリックス", "example.org", "other")));
}

#[test]
fn a_flipped_bit_breaks_the_fingerprint() {
    let mut bytes = hex(SAMPLE_REQUEST);
    bytes[30] ^= 1;
    assert_eq!(
        Message::parse(&bytes).unwrap_err(),
        stun::StunError::BadFingerprint
    );
}
