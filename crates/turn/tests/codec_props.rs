//! Property tests for everything that parses bytes from the network:
//! arbitrary input never panics or reads out of bounds, and every message
//! we can build parses back to what we built.
//!
//! Case counts: 4,000 per property by default (what CI runs); set
//! PROPTEST_CASES=1000000 to run a million locally (see docs/turn.md).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use callisto_turn::auth::Credentials;
use callisto_turn::client::Client;
use callisto_turn::server::{
    self, Config, FiveTuple, HeldPort, RelayAllocator, RelayId, Server, Shared, Transport,
};
use callisto_turn::stun::{self, Attr, ChannelData, Class, Icmp, Message, MessageBuilder};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4000),
        ..ProptestConfig::default()
    }
}

/// Alternate servers of both families, for a server that redirects.
fn alternates() -> Vec<SocketAddr> {
    vec![
        "192.0.2.10:3478".parse().unwrap(),
        "[2001:db8::10]:3478".parse().unwrap(),
    ]
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

/// Up to `max` characters, cut back to at most `max` bytes at a character
/// boundary. (A filter rejected over a third of them, and proptest aborts a
/// run after 65,536 rejections: the documented million-case run failed.)
fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}"))
        .unwrap()
        .prop_map(move |mut s| {
            let mut end = s.len().min(max);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s
        })
}

fn arb_attr() -> impl Strategy<Value = Attr> {
    prop_oneof![
        arb_addr().prop_map(Attr::MappedAddress),
        arb_addr().prop_map(Attr::XorMappedAddress),
        arb_addr().prop_map(Attr::XorPeerAddress),
        arb_addr().prop_map(Attr::XorRelayedAddress),
        arb_addr().prop_map(Attr::AlternateServer),
        arb_text(100).prop_map(Attr::Username),
        arb_text(100).prop_map(Attr::Realm),
        arb_text(100).prop_map(Attr::Nonce),
        arb_text(100).prop_map(Attr::Software),
        (300u16..700, arb_text(60)).prop_map(|(c, r)| Attr::ErrorCode(c, r)),
        (any::<u8>(), 300u16..700, arb_text(60))
            .prop_map(|(f, c, r)| Attr::AddressErrorCode(f, c, r)),
        prop::collection::vec(any::<u16>(), 0..6).prop_map(Attr::UnknownAttributes),
        any::<u16>().prop_map(Attr::ChannelNumber),
        any::<u32>().prop_map(Attr::Lifetime),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Attr::Data),
        any::<u8>().prop_map(Attr::RequestedTransport),
        any::<u8>().prop_map(Attr::RequestedAddressFamily),
        any::<bool>().prop_map(Attr::EvenPort),
        Just(Attr::DontFragment),
        any::<[u8; 8]>().prop_map(Attr::ReservationToken),
        (any::<u16>(), prop::collection::vec(any::<u8>(), 0..9))
            .prop_map(|(a, p)| Attr::PasswordAlgorithm(a, p)),
        prop::collection::vec(
            (any::<u16>(), prop::collection::vec(any::<u8>(), 0..9)),
            0..4
        )
        .prop_map(Attr::PasswordAlgorithms),
        any::<[u8; 32]>().prop_map(Attr::Userhash),
        any::<u32>().prop_map(Attr::Priority),
        Just(Attr::UseCandidate),
        any::<u64>().prop_map(Attr::IceControlled),
        any::<u64>().prop_map(Attr::IceControlling),
        (0u8..128, 0u16..512, any::<u32>()).prop_map(|(icmp_type, code, error_data)| {
            Attr::Icmp(Icmp {
                icmp_type,
                code,
                error_data,
            })
        }),
    ]
}

fn arb_class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::Success),
        Just(Class::Error)
    ]
}

struct NoRelays;

impl RelayAllocator for NoRelays {
    fn allocate(&mut self, id: RelayId, _ipv6: bool, _even: bool) -> io::Result<SocketAddr> {
        Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            40000 + (id.0 % 1000) as u16,
        ))
    }
    fn release(&mut self, _id: RelayId) {}
    fn hold_next(&mut self, addr: SocketAddr) -> io::Result<HeldPort> {
        Ok(Box::new(SocketAddr::new(addr.ip(), addr.port() + 1)))
    }
    fn allocate_held(&mut self, _id: RelayId, held: HeldPort) -> io::Result<SocketAddr> {
        held.downcast::<SocketAddr>()
            .map(|a| *a)
            .map_err(|_| io::Error::other("not ours"))
    }
    fn dont_fragment(&mut self, _id: RelayId, _ipv6: bool) -> io::Result<()> {
        Ok(())
    }
}

/// An attribute type: half the time one the codec decodes, so that each
/// decoder sees arbitrary values (a uniform u16 would rarely name one).
fn attr_type() -> impl Strategy<Value = u16> {
    use stun::attr::*;
    prop_oneof![
        any::<u16>(),
        prop::sample::select(vec![
            MAPPED_ADDRESS,
            XOR_MAPPED_ADDRESS,
            XOR_PEER_ADDRESS,
            XOR_RELAYED_ADDRESS,
            ALTERNATE_SERVER,
            USERNAME,
            REALM,
            NONCE,
            SOFTWARE,
            ALTERNATE_DOMAIN,
            ERROR_CODE,
            ADDRESS_ERROR_CODE,
            UNKNOWN_ATTRIBUTES,
            CHANNEL_NUMBER,
            LIFETIME,
            PRIORITY,
            DATA,
            REQUESTED_TRANSPORT,
            REQUESTED_ADDRESS_FAMILY,
            ADDITIONAL_ADDRESS_FAMILY,
            EVEN_PORT,
            DONT_FRAGMENT,
            USE_CANDIDATE,
            RESERVATION_TOKEN,
            USERHASH,
            ICE_CONTROLLED,
            ICE_CONTROLLING,
            PASSWORD_ALGORITHM,
            PASSWORD_ALGORITHMS,
            ICMP,
            MESSAGE_INTEGRITY,
            MESSAGE_INTEGRITY_SHA256,
            FINGERPRINT,
        ]),
    ]
}

/// Mostly-valid STUN shapes with random attribute bytes, so the fuzz gets
/// past the header check more often than uniform bytes would.
fn stunish() -> impl Strategy<Value = Vec<u8>> {
    (
        0u16..0x3FFF,
        prop::collection::vec(
            (attr_type(), prop::collection::vec(any::<u8>(), 0..40)),
            0..6,
        ),
        any::<[u8; 12]>(),
    )
        .prop_map(|(typ, attrs, tid)| {
            let (m, c) = stun::split_type(typ);
            let mut b = MessageBuilder::new(m, c, &tid);
            for (t, v) in attrs {
                b.attr(t, &v);
            }
            b.finish()
        })
}

/// Requests a server answers without authentication, as browsers send
/// them, sometimes padded or with FINGERPRINT.
fn unauthenticated_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(stun::method::BINDING),
            Just(stun::method::ALLOCATE),
            Just(0x0FF)
        ],
        prop::option::of("[a-z]{0,60}"),
        any::<bool>(),
        any::<[u8; 12]>(),
    )
        .prop_map(|(method, software, fingerprint, tid)| {
            let mut b = MessageBuilder::new(method, Class::Request, &tid);
            if method == stun::method::ALLOCATE {
                b.attr(stun::attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            }
            if let Some(s) = software {
                b.attr(stun::attr::SOFTWARE, s.as_bytes());
            }
            if fingerprint {
                b.fingerprint();
            }
            b.finish()
        })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..300), stunish()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in any_input()) {
        let _ = stun::stream_frame_len(&bytes);
        if let Some(cd) = ChannelData::parse(&bytes) {
            prop_assert!(4 + cd.len <= bytes.len());
        }
        if let Ok(msg) = Message::parse(&bytes) {
            prop_assert_eq!(msg.as_bytes().len(), bytes.len());
            for a in msg.attrs() {
                let _ = Attr::decode(a.typ, a.value, msg.transaction_id());
            }
            let _ = msg.verify_integrity(b"key");
        }
    }

    #[test]
    fn built_messages_parse_back(
        method in 0u16..0x1000,
        class in arb_class(),
        tid in any::<[u8; 12]>(),
        attrs in prop::collection::vec(arb_attr(), 0..8),
        integrity in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        let mut b = MessageBuilder::new(method, class, &tid);
        for a in &attrs {
            a.encode(&mut b);
        }
        if integrity {
            b.integrity(b"secret");
        }
        if fingerprint {
            b.fingerprint();
        }
        let bytes = b.finish();
        let msg = Message::parse(&bytes).unwrap();
        prop_assert_eq!(msg.method(), method);
        prop_assert_eq!(msg.class(), class);
        prop_assert_eq!(msg.transaction_id(), &tid);
        prop_assert_eq!(msg.has_fingerprint(), fingerprint);
        prop_assert_eq!(msg.verify_integrity(b"secret"), integrity);
        let decoded: Vec<Attr> = msg
            .attrs()
            .map(|a| Attr::decode(a.typ, a.value, &tid).unwrap())
            .collect();
        prop_assert_eq!(decoded, attrs);
    }

    #[test]
    fn the_server_survives_anything(inputs in prop::collection::vec(any_input(), 1..20), peer_junk in prop::collection::vec(any::<u8>(), 0..100), redirecting in any::<bool>()) {
        let mut cfg = Config::default();
        let mut creds = Credentials::new("r");
        creds.add_user("u", "p");
        cfg.credentials = creds;
        if redirecting {
            cfg.alternates.udp_tcp = alternates();
        }
        let shared = std::sync::Arc::new(Shared::new(cfg, b"k", (Instant::now(), 1_000)));
        let mut s = Server::new(shared, NoRelays);
        let five = FiveTuple {
            client: "203.0.113.1:5000".parse().unwrap(),
            server: "192.0.2.1:3478".parse().unwrap(),
            transport: Transport::Udp,
        };
        let now = Instant::now();
        for input in &inputs {
            let mut input = input.clone();
            if let server::Output::ToPeer { range, .. } = s.on_client(now, five, &mut input) {
                prop_assert!(range.end <= input.len());
            }
        }
        let mut buf = vec![0u8; server::HEADROOM + peer_junk.len() + server::TAILROOM];
        buf[server::HEADROOM..server::HEADROOM + peer_junk.len()].copy_from_slice(&peer_junk);
        let _ = s.on_peer(now, RelayId(0), "203.0.113.2:1".parse().unwrap(), &mut buf, peer_junk.len());
        s.on_timeout(now + Duration::from_secs(4000));
        prop_assert_eq!(s.allocation_count(), 0);
    }

    /// No amplification: whatever one UDP source sends, unauthenticated,
    /// at whatever pace, the bytes answered never exceed the bytes it sent
    /// plus the allowance (and its refill, an eighth a second).
    #[test]
    fn answers_to_one_source_never_exceed_its_requests_plus_the_allowance(
        allowance in prop_oneof![Just(0u32), Just(512), 0u32..4096],
        inputs in prop::collection::vec((0u64..3000, prop_oneof![3 => unauthenticated_request(), 1 => any_input()]), 1..60),
        redirecting in any::<bool>(),
    ) {
        let mut cfg = Config::default();
        let mut creds = Credentials::new("r");
        creds.add_user("u", "p");
        cfg.credentials = creds;
        // A server with alternates answers a first Allocate with one of
        // them instead of a challenge: an unauthenticated answer too.
        if redirecting {
            cfg.alternates.udp_tcp = alternates();
        }
        cfg.unauth_rate = 1_000_000;
        cfg.unauth_allowance = allowance;
        let t0 = Instant::now();
        let shared = std::sync::Arc::new(Shared::new(cfg, b"k", (t0, 1_000)));
        let mut s = Server::new(shared, NoRelays);
        let (mut now, mut received, mut answered) = (t0, 0usize, 0usize);
        for (i, (delay_ms, input)) in inputs.iter().enumerate() {
            now += Duration::from_millis(*delay_ms);
            let five = FiveTuple {
                client: SocketAddr::new("203.0.113.1".parse().unwrap(), 5000 + i as u16),
                server: "192.0.2.1:3478".parse().unwrap(),
                transport: Transport::Udp,
            };
            received += input.len();
            if let server::Output::Reply { data, .. } = s.on_client(now, five, &mut input.clone()) {
                answered += data.len();
            }
            let refill = f64::from(allowance) / 8.0 * (now - t0).as_secs_f64();
            prop_assert!(
                answered as f64 <= (received + allowance as usize) as f64 + refill,
                "{} answered for {} received", answered, received
            );
        }
    }

    #[test]
    fn the_client_survives_anything(inputs in prop::collection::vec(any_input(), 1..20)) {
        let mut c = Client::new("u", "p", false, 1);
        let now = Instant::now();
        c.allocate(now);
        for input in &inputs {
            c.handle_input(now, input);
        }
        c.handle_timeout(now + Duration::from_secs(10));
        while c.poll_event().is_some() {}
    }
}
