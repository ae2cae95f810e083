//! The server state machine driven by the client state machine, with
//! injected time and a fake relay allocator: no sockets, no sleeping.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::routes::Flow;
use super::*;
use crate::auth::rest_credentials;
use crate::client::{Client, Event};
use crate::stun::Icmp;

const USER: &str = "alice";
const PASS: &str = "wonderland";

#[derive(Clone, Default)]
struct FakeRelays {
    live: Rc<RefCell<BTreeSet<u32>>>,
    fail: Rc<RefCell<bool>>,
    /// Every port above an allocation's is taken.
    no_pairs: Rc<RefCell<bool>>,
    /// Added to every port, so that two servers (two workers) get
    /// different ones.
    base: u16,
    /// IPv6 relays are had (at [`relay_ip6`]), not refused.
    ipv6: bool,
    /// An IPv6 relay gets the port of the slot below it: the same port as
    /// the IPv4 half of a dual allocation, on another address.
    ipv6_reuses_ports: bool,
    /// IPv4 relays are refused: an IPv6-only server.
    no_ipv4: bool,
    /// The relays told to send with DF, and their family.
    dont_fragment: Rc<RefCell<BTreeSet<(u32, bool)>>>,
    /// Setting DF fails.
    no_dont_fragment: bool,
}

impl RelayAllocator for FakeRelays {
    fn allocate(&mut self, id: RelayId, ipv6: bool, even: bool) -> io::Result<SocketAddr> {
        if ipv6 && !self.ipv6 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no IPv6 relay"));
        }
        if !ipv6 && self.no_ipv4 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no IPv4 relay"));
        }
        if *self.fail.borrow() {
            return Err(io::Error::other("no ports"));
        }
        self.live.borrow_mut().insert(id.0);
        let slot = if ipv6 && self.ipv6_reuses_ports {
            id.0.saturating_sub(1)
        } else {
            id.0
        };
        let port = 50000 + self.base + slot as u16;
        assert!(
            !even || port % 2 == 0 || id.0 % 2 == 1,
            "test relays are even for even ids"
        );
        let ip = if ipv6 { relay_ip6() } else { relay_ip() };
        Ok(SocketAddr::new(ip, port))
    }

    fn release(&mut self, id: RelayId) {
        self.live.borrow_mut().remove(&id.0);
    }

    /// The held port is its address.
    fn hold_next(&mut self, addr: SocketAddr) -> io::Result<HeldPort> {
        if *self.no_pairs.borrow() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "taken"));
        }
        Ok(Box::new(SocketAddr::new(addr.ip(), addr.port() + 1)))
    }

    fn allocate_held(&mut self, id: RelayId, held: HeldPort) -> io::Result<SocketAddr> {
        self.live.borrow_mut().insert(id.0);
        Ok(*held.downcast::<SocketAddr>().expect("a held address"))
    }

    fn dont_fragment(&mut self, id: RelayId, ipv6: bool) -> io::Result<()> {
        if self.no_dont_fragment {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no DF here"));
        }
        assert!(self.live.borrow().contains(&id.0), "DF on a live relay");
        self.dont_fragment.borrow_mut().insert((id.0, ipv6));
        Ok(())
    }
}

/// A private address: peers there are refused unless they are our relays.
fn relay_ip() -> IpAddr {
    "10.9.9.9".parse().unwrap()
}

/// The IPv6 relay address of [`FakeRelays`] with `ipv6`.
fn relay_ip6() -> IpAddr {
    "fd00::9".parse().unwrap()
}

fn config() -> Config {
    let mut credentials = Credentials::new("test.realm");
    credentials.add_user(USER, PASS);
    credentials.add_user("bob", "builder");
    credentials.add_secret(b"rest-secret");
    Config {
        credentials,
        relay_ips: vec![relay_ip()],
        relay_ports: 50000..=50999,
        ..Config::default()
    }
}

fn five(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.7".parse().unwrap(), port),
        server: "192.0.2.1:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

/// [`five`] over IPv6.
fn five6(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("2001:db8:5::7".parse().unwrap(), port),
        server: "[2001:db8::1]:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

/// A server with a fake relay allocator, sharing `Shared` with the test.
fn setup(cfg: Config, epoch: Instant) -> (Arc<Shared>, Server<FakeRelays>) {
    setup_with(cfg, &FakeRelays::default(), epoch)
}

/// [`setup`] with `relays`, which the test keeps to look at or steer.
fn setup_with(
    cfg: Config,
    relays: &FakeRelays,
    epoch: Instant,
) -> (Arc<Shared>, Server<FakeRelays>) {
    let shared = Arc::new(Shared::new(cfg, b"k", (epoch, 1_000)));
    let server = Server::new(shared.clone(), relays.clone());
    (shared, server)
}

/// Runs client ↔ server until neither has anything to say.
fn pump(
    server: &mut Server<FakeRelays>,
    client: &mut Client,
    five: FiveTuple,
    now: Instant,
) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(mut req) = client.poll_transmit() {
        if let Output::Reply { data, .. } = server.on_client(now, five, &mut req) {
            client.handle_input(now, &data);
        }
    }
    while let Some(e) = client.poll_event() {
        events.push(e);
    }
    events
}

fn allocated(
    server: &mut Server<FakeRelays>,
    five: FiveTuple,
    now: Instant,
) -> (Client, SocketAddr) {
    allocated_in(server, five, now, false)
}

/// [`allocated`], of an IPv6 relay if `ipv6`.
fn allocated_in(
    server: &mut Server<FakeRelays>,
    five: FiveTuple,
    now: Instant,
    ipv6: bool,
) -> (Client, SocketAddr) {
    let mut client = Client::new(USER, PASS, false, five.client.port().into());
    if ipv6 {
        client.allocate_ipv6(now);
    } else {
        client.allocate(now);
    }
    let events = pump(server, &mut client, five, now);
    match events.as_slice() {
        [
            Event::Allocated {
                relayed,
                mapped,
                lifetime,
            },
        ] => {
            assert_eq!(*mapped, five.client);
            assert_eq!(*lifetime, DEFAULT_LIFETIME);
            (client, *relayed)
        }
        other => panic!("{other:?}"),
    }
}

/// `c`'s next request, sent to `s` from `five`, answered with a
/// challenge; returns the request `c` sends again in answer.
fn after_the_challenge(
    s: &mut Server<FakeRelays>,
    c: &mut Client,
    five: FiveTuple,
    now: Instant,
) -> Vec<u8> {
    let mut first = c.poll_transmit().unwrap();
    let Output::Reply { data, .. } = s.on_client(now, five, &mut first) else {
        panic!("no challenge")
    };
    c.handle_input(now, &data);
    c.poll_transmit().expect("the request again, signed")
}

fn failed_code(events: &[Event]) -> u16 {
    match events {
        [Event::Failed { code, .. }] => *code,
        other => panic!("expected one failure, got {other:?}"),
    }
}

fn error_code(out: &Output) -> u16 {
    let Output::Reply { data, .. } = out else {
        panic!("{out:?}")
    };
    let msg = Message::parse(data).unwrap();
    assert_eq!(msg.class(), Class::Error);
    stun::decode_error(msg.get(attr::ERROR_CODE).unwrap())
        .unwrap()
        .0
}

const PEER: &str = "203.0.113.9:4000";

fn peer() -> SocketAddr {
    PEER.parse().unwrap()
}

#[test]
fn binding_returns_the_mapped_address() {
    let (_, mut s) = setup(config(), Instant::now());
    let now = Instant::now();
    let tid = [7u8; 12];
    let mut b = MessageBuilder::new(method::BINDING, Class::Request, &tid);
    b.fingerprint();
    let Output::Reply { data, .. } = s.on_client(now, five(1), &mut b.finish()) else {
        panic!()
    };
    let msg = Message::parse(&data).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert!(
        msg.has_fingerprint(),
        "a request with FINGERPRINT gets one back"
    );
    let mapped = stun::decode_xor_address(
        attr::XOR_MAPPED_ADDRESS,
        msg.get(attr::XOR_MAPPED_ADDRESS).unwrap(),
        &tid,
    )
    .unwrap();
    assert_eq!(mapped, five(1).client);
}

#[test]
fn allocate_challenge_then_success_and_retransmission() {
    let relays = FakeRelays::default();
    let (shared, mut s) = setup_with(config(), &relays, Instant::now());
    let now = Instant::now();

    // A bare Allocate gets 401 with REALM and NONCE, and no integrity.
    let tid = [1u8; 12];
    let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, &tid);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let out = s.on_client(now, five(1), &mut b.finish());
    assert_eq!(error_code(&out), 401);
    let Output::Reply { data, .. } = &out else {
        unreachable!()
    };
    let msg = Message::parse(data).unwrap();
    assert_eq!(msg.get(attr::REALM).unwrap(), b"test.realm");
    assert!(msg.get(attr::NONCE).is_some());
    assert!(!msg.has_integrity());

    let (client, relayed) = allocated(&mut s, five(1), now);
    assert_eq!(relayed.ip(), relay_ip());
    assert_eq!(relays.live.borrow().len(), 1);
    assert_eq!(shared.allocation_count(), 1);
    drop(client);

    // Same 5-tuple, new Allocate: 437.
    let mut c2 = Client::new(USER, PASS, false, 99);
    c2.allocate(now);
    assert_eq!(failed_code(&pump(&mut s, &mut c2, five(1), now)), 437);
}

/// A server with alternates: IPv4 and IPv6 ones for UDP and TCP
/// clients, one IPv4 one for TLS clients.
fn redirecting() -> Config {
    Config {
        alternates: Alternates {
            udp_tcp: vec![
                "192.0.2.10:3478".parse().unwrap(),
                "[2001:db8::10]:3478".parse().unwrap(),
                "192.0.2.11:3479".parse().unwrap(),
            ],
            tls: vec!["192.0.2.20:5349".parse().unwrap()],
        },
        ..config()
    }
}

/// What a client that asks `s` for an allocation over `five` hears.
fn allocate_events(s: &mut Server<FakeRelays>, five: FiveTuple, now: Instant) -> Vec<Event> {
    let mut c = Client::new(USER, PASS, false, five.client.port().into());
    c.allocate(now);
    pump(s, &mut c, five, now)
}

#[test]
fn allocations_are_sent_to_the_alternate_servers_in_turn() {
    let (shared, mut s) = setup(redirecting(), Instant::now());
    let now = Instant::now();
    let redirected = |events: Vec<Event>| match events.as_slice() {
        [Event::Redirected { alternate }] => *alternate,
        other => panic!("expected a redirection, got {other:?}"),
    };
    // In turn, and only to those of the client's family.
    let seen: Vec<SocketAddr> = (1..=4)
        .map(|port| redirected(allocate_events(&mut s, five(port), now)))
        .collect();
    let v4 = |a: &str| a.parse::<SocketAddr>().unwrap();
    assert_eq!(
        seen,
        [
            v4("192.0.2.10:3478"),
            v4("192.0.2.11:3479"),
            v4("192.0.2.10:3478"),
            v4("192.0.2.11:3479")
        ]
    );
    assert_eq!(
        redirected(allocate_events(&mut s, five6(1), now)),
        v4("[2001:db8::10]:3478")
    );
    // An IPv4 client of a dual-stack socket is an IPv4 client.
    let mapped = FiveTuple {
        client: "[::ffff:198.51.100.8]:1000".parse().unwrap(),
        ..five6(1)
    };
    assert!(redirected(allocate_events(&mut s, mapped, now)).is_ipv4());
    // TLS clients go to the TLS alternates; TCP ones to the others.
    let over = |transport, port| FiveTuple {
        transport,
        ..five(port)
    };
    assert_eq!(
        redirected(allocate_events(&mut s, over(Transport::Tls, 10), now)),
        v4("192.0.2.20:5349")
    );
    assert!(redirected(allocate_events(&mut s, over(Transport::Tcp, 11), now)).port() != 5349);
    assert_eq!(shared.allocation_count(), 0, "nothing was allocated here");

    // No IPv6 TLS alternate: an IPv6 TLS client is served here.
    let tls6 = FiveTuple {
        transport: Transport::Tls,
        ..five6(2)
    };
    assert!(matches!(
        allocate_events(&mut s, tls6, now).as_slice(),
        [Event::Allocated { .. }]
    ));
}

#[test]
fn alternates_changed_while_running_apply_to_the_next_allocate_only() {
    let (shared, mut s) = setup(config(), Instant::now());
    let now = Instant::now();
    let (mut kept, _) = allocated(&mut s, five(1), now);
    let elsewhere: SocketAddr = "192.0.2.10:3478".parse().unwrap();
    shared.set_alternates(Alternates {
        udp_tcp: vec![elsewhere],
        tls: Vec::new(),
    });
    assert_eq!(
        allocate_events(&mut s, five(2), now),
        [Event::Redirected {
            alternate: elsewhere
        }]
    );
    // The allocation made before is served as before.
    kept.refresh(now, 600);
    assert!(matches!(
        pump(&mut s, &mut kept, five(1), now).as_slice(),
        [Event::Refreshed { .. }]
    ));
    // None again: served here.
    shared.set_alternates(Alternates::default());
    assert!(matches!(
        allocate_events(&mut s, five(3), now).as_slice(),
        [Event::Allocated { .. }]
    ));
    assert_eq!(shared.allocation_count(), 2);
}

#[test]
fn a_redirection_comes_before_the_challenge_and_is_signed_when_the_request_is() {
    let (shared, mut s) = setup(redirecting(), Instant::now());
    let now = Instant::now();
    let alternate_of = |out: &Output| {
        assert_eq!(error_code(out), 300);
        let Output::Reply { data, .. } = out else {
            unreachable!()
        };
        let msg = Message::parse(data).unwrap();
        let to = stun::decode_address(
            attr::ALTERNATE_SERVER,
            msg.get(attr::ALTERNATE_SERVER).unwrap(),
        )
        .unwrap();
        (to, msg.has_integrity(), msg.get(attr::NONCE).is_some())
    };
    // The first Allocate, unauthenticated: sent on at once, unsigned, with
    // no nonce (the alternate challenges with its own).
    let mut bare = request_with(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])],
    );
    let (to, signed, nonce) = alternate_of(&s.on_client(now, five(1), &mut bare));
    assert_eq!(to, "192.0.2.10:3478".parse().unwrap());
    assert!(!signed && !nonce);

    // A signed one (the client had a nonce): signed with the user's key.
    let out = signed_allocate(&mut s, five(2), 9, &[], now);
    let Output::Reply { data, .. } = &out else {
        panic!("{out:?}")
    };
    let (to, signed, _) = alternate_of(&out);
    assert_eq!(to, "192.0.2.11:3479".parse().unwrap());
    assert!(signed);
    let key = crate::auth::long_term_key(USER, "test.realm", PASS);
    assert!(Message::parse(data).unwrap().verify_integrity(&key));
    // Signed with a wrong password: 401, not an address.
    let mut refresh = request_with(method::REFRESH, &[]);
    let Output::Reply { data, .. } = s.on_client(now, five(3), &mut refresh) else {
        panic!()
    };
    let nonce = Message::parse(&data)
        .unwrap()
        .get(attr::NONCE)
        .unwrap()
        .to_vec();
    let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, &[3; 12]);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, USER.as_bytes())
        .attr(attr::REALM, b"test.realm")
        .attr(attr::NONCE, &nonce)
        .integrity(&crate::auth::long_term_key(USER, "test.realm", "wrong"));
    let out = s.on_client(now, five(3), &mut b.finish());
    assert_eq!(error_code(&out), 401);
    assert_eq!(shared.allocation_count(), 0);

    // Other requests are answered here: a Refresh without an allocation
    // is challenged.
    let mut refresh = request_with(method::REFRESH, &[]);
    assert_eq!(error_code(&s.on_client(now, five(4), &mut refresh)), 401);

    // An unsigned redirection answers an unauthenticated request only:
    // once our client has authenticated, a forged one fails the Allocate.
    let (_, mut plain) = setup(config(), now);
    let mut c = Client::new(USER, PASS, false, 5);
    c.allocate(now);
    let authed = after_the_challenge(&mut plain, &mut c, five(5), now);
    let tid = *Message::parse(&authed).unwrap().transaction_id();
    let mut forged = MessageBuilder::new(method::ALLOCATE, Class::Error, &tid);
    forged.error(300, "Try Alternate");
    forged.address(attr::ALTERNATE_SERVER, "192.0.2.66:3478".parse().unwrap());
    c.handle_input(now, &forged.finish());
    assert_eq!(
        failed_code(&std::iter::from_fn(|| c.poll_event()).collect::<Vec<_>>()),
        300
    );
}

#[test]
fn retransmitted_allocate_gets_the_same_answer() {
    let (_, mut s) = setup(config(), Instant::now());
    let now = Instant::now();
    let mut c = Client::new(USER, PASS, false, 5);
    c.allocate(now);
    let mut authed = after_the_challenge(&mut s, &mut c, five(1), now);
    let Output::Reply { data: a, .. } = s.on_client(now, five(1), &mut authed) else {
        panic!()
    };
    let Output::Reply { data: b, .. } =
        s.on_client(now + Duration::from_millis(500), five(1), &mut authed)
    else {
        panic!()
    };
    assert_eq!(a, b);
    assert_eq!(s.allocation_count(), 1);
}

#[test]
fn wrong_password_and_unknown_user_fail_with_401() {
    let (_, mut s) = setup(config(), Instant::now());
    let now = Instant::now();
    for (user, pass) in [(USER, "wrong"), ("mallory", "x")] {
        let mut c = Client::new(user, pass, false, 1);
        c.allocate(now);
        assert_eq!(failed_code(&pump(&mut s, &mut c, five(2), now)), 401);
    }
    assert_eq!(s.allocation_count(), 0);
}

/// REST credentials make allocations until they expire; an allocation they
/// made before goes on being refreshed after (as in coturn), as long as
/// their secret is still in use.
#[test]
fn rest_credentials_work_until_they_expire() {
    let t0 = Instant::now();
    let cfg = config();
    let secrets = cfg.credentials.secrets().clone();
    let (_, mut s) = setup(cfg, t0);
    let (u, p) = rest_credentials(b"rest-secret", "carol", 2_000);
    let mut c = Client::new(&u, &p, false, 1);
    c.allocate(t0);
    assert!(matches!(
        pump(&mut s, &mut c, five(3), t0)[..],
        [Event::Allocated { .. }]
    ));

    let mut late = Client::new(&u, &p, false, 2);
    let t1 = t0 + Duration::from_secs(1_000);
    late.allocate(t1);
    assert_eq!(failed_code(&pump(&mut s, &mut late, five(4), t1)), 401);

    // The allocation made in time lives on past the expiry.
    for after in [1_000, 5_000] {
        let t = t0 + Duration::from_secs(after);
        c.refresh(t, 600);
        assert!(
            matches!(
                pump(&mut s, &mut c, five(3), t)[..],
                [Event::Refreshed { .. }]
            ),
            "{after} s on"
        );
        c.create_permission(t, peer().ip());
        assert!(matches!(
            pump(&mut s, &mut c, five(3), t)[..],
            [Event::PermissionCreated(_)]
        ));
    }
    // Its credentials do not sign for another 5-tuple's allocation.
    let t2 = t0 + Duration::from_secs(5_000);
    let mut elsewhere = Client::new(&u, &p, false, 4);
    elsewhere.allocate(t2);
    assert_eq!(failed_code(&pump(&mut s, &mut elsewhere, five(6), t2)), 401);
    // Its secret taken out of use: refused at its next request.
    secrets.set(vec![b"another-secret".to_vec()]);
    c.refresh(t2, 600);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(3), t2)), 401);

    let (u, _) = rest_credentials(b"rest-secret", "carol", 5_000);
    let mut forged = Client::new(&u, "not-the-hmac", false, 3);
    forged.allocate(t0);
    assert_eq!(failed_code(&pump(&mut s, &mut forged, five(5), t0)), 401);
}

#[test]
fn stale_nonce_is_renewed_transparently() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    // Past the nonce lifetime the next request gets 438, then succeeds.
    let later = t0 + Duration::from_secs(700);
    c.create_permission(later, peer().ip());
    let mut req = c.poll_transmit().unwrap();
    let out = s.on_client(later, five(1), &mut req);
    assert_eq!(error_code(&out), 438);
    let Output::Reply { data, .. } = out else {
        unreachable!()
    };
    c.handle_input(later, &data);
    let events = pump(&mut s, &mut c, five(1), later);
    assert_eq!(events, vec![Event::PermissionCreated(peer().ip())]);
}

/// A nonce given to one 5-tuple is of no use from another: the request
/// gets 438 and a nonce for where it came from, which the client must
/// then use (RFC 8489 §9.2.5, as after a restart or a NAT rebinding).
/// Not counted as an authentication failure.
#[test]
fn a_nonce_is_bound_to_its_five_tuple() {
    let t0 = Instant::now();
    let (shared, mut s) = setup(config(), t0);
    let mut c = Client::new(USER, PASS, false, 1);
    c.allocate(t0);
    // The authenticated retry arrives from another port: its nonce is foreign.
    let mut retry = after_the_challenge(&mut s, &mut c, five(1), t0);
    let mut replayed = retry.clone();
    let out = s.on_client(t0, five(2), &mut retry);
    assert_eq!(error_code(&out), 438);
    assert_eq!(error_code(&s.on_client(t0, five(2), &mut replayed)), 438);
    assert_eq!(
        s.allocation_count(),
        0,
        "the foreign nonce allocated nothing"
    );
    // The client, told so, retries with the nonce given to five(2).
    let Output::Reply { data, .. } = out else {
        unreachable!()
    };
    c.handle_input(t0, &data);
    assert!(matches!(
        pump(&mut s, &mut c, five(2), t0)[..],
        [Event::Allocated { .. }]
    ));
    assert_eq!(shared.allocation_count(), 1);
}

/// After a restart (another nonce key), a client's next request gets 438,
/// and its retry with the new nonce reaches the request's real answer: its
/// allocation is gone (437).
#[test]
fn a_nonce_from_before_a_restart_is_stale() {
    let t0 = Instant::now();
    let (_, mut before) = setup(config(), t0);
    let (mut c, _) = allocated(&mut before, five(1), t0);
    let restarted = Arc::new(Shared::new(config(), b"a new key", (t0, 1_000)));
    let mut after = Server::new(restarted, FakeRelays::default());
    let t1 = t0 + Duration::from_secs(30);
    c.refresh(t1, 600);
    let mut req = c.poll_transmit().unwrap();
    let out = after.on_client(t1, five(1), &mut req);
    assert_eq!(error_code(&out), 438);
    let Output::Reply { data, .. } = out else {
        unreachable!()
    };
    c.handle_input(t1, &data);
    assert_eq!(failed_code(&pump(&mut after, &mut c, five(1), t1)), 437);
}

#[test]
fn permissions_and_send_indications_and_data_indications() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);

    // Without a permission, data goes nowhere in either direction.
    let mut send = c.send_to(peer(), b"hello");
    assert_eq!(s.on_client(t0, five(1), &mut send), Output::None);
    let mut buf = vec![0u8; HEADROOM + 64];
    buf[HEADROOM..HEADROOM + 3].copy_from_slice(b"hey");
    let relay = s.relay_of(&five(1)).expect("allocated");
    assert_eq!(s.on_peer(t0, relay, peer(), &mut buf, 3), Output::None);

    c.create_permission(t0, peer().ip());
    assert_eq!(
        pump(&mut s, &mut c, five(1), t0),
        vec![Event::PermissionCreated(peer().ip())]
    );

    let Output::ToPeer {
        relay: r,
        peer: p,
        range,
    } = s.on_client(t0, five(1), &mut send)
    else {
        panic!()
    };
    assert_eq!((r, p), (relay, peer()));
    assert_eq!(&send[range], b"hello");

    // The permission is per IP: another port of the same host may answer.
    let other_port = SocketAddr::new(peer().ip(), 5000);
    let Output::ToClient { to, range } = s.on_peer(t0, relay, other_port, &mut buf, 3) else {
        panic!()
    };
    assert_eq!(to, five(1));
    c.handle_input(t0, &buf[range]);
    assert_eq!(
        c.poll_event(),
        Some(Event::Data {
            peer: other_port,
            data: b"hey".to_vec()
        })
    );

    // Permissions last 300 s.
    let late = t0 + Duration::from_secs(301);
    assert_eq!(s.on_client(late, five(1), &mut send), Output::None);
    assert_eq!(s.on_peer(late, relay, peer(), &mut buf, 3), Output::None);
}

/// The Data indication (with ICMP) `error` becomes on `relay`, as the
/// client reads it; `None` when the server drops the error.
fn icmp_heard(
    s: &mut Server<FakeRelays>,
    c: &mut Client,
    now: Instant,
    relay: RelayId,
    error: IcmpError,
) -> Option<Event> {
    let mut buf = [0u8; 64];
    match s.on_icmp(now, relay, error, &mut buf) {
        Output::ToClient { to, range } => {
            assert_eq!(to, five(1));
            let msg = Message::parse(&buf[range.clone()]).unwrap();
            assert_eq!(
                (msg.class(), msg.method()),
                (Class::Indication, method::DATA)
            );
            assert!(
                msg.get(attr::DATA).is_none(),
                "an ICMP indication has no DATA"
            );
            c.handle_input(now, &buf[range]);
            c.poll_event()
        }
        Output::None => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn icmp_errors_reach_the_client_for_permitted_peers_only() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let relay = s.relay_of(&five(1)).expect("allocated");
    let unreachable = |peer, icmp_type, code| IcmpError {
        peer,
        icmp_type,
        code,
        mtu: 1400,
    };
    // Port unreachable, without a permission: dropped.
    let port_unreachable = unreachable(peer(), 3, 3);
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, port_unreachable),
        None
    );

    c.create_permission(t0, peer().ip());
    pump(&mut s, &mut c, five(1), t0);
    // Now heard, with the peer's port, and no MTU (only "fragmentation
    // needed" carries one).
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, port_unreachable),
        Some(Event::Icmp {
            peer: peer(),
            icmp: Icmp {
                icmp_type: 3,
                code: 3,
                error_data: 0
            }
        })
    );
    // Permissions are by address: another port of the peer is covered.
    let other_port = SocketAddr::new(peer().ip(), 9);
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, unreachable(other_port, 11, 0)),
        Some(Event::Icmp {
            peer: other_port,
            icmp: Icmp {
                icmp_type: 11,
                code: 0,
                error_data: 0
            }
        })
    );
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, unreachable(peer(), 3, 4)),
        Some(Event::Icmp {
            peer: peer(),
            icmp: Icmp {
                icmp_type: 3,
                code: 4,
                error_data: 1400
            }
        })
    );
    // Other types (a redirect, a source quench, an echo reply) are not
    // relayed, nor are ICMPv6 numbers on an IPv4 relay.
    for icmp_type in [0, 1, 2, 4, 5, 8, 12] {
        assert_eq!(
            icmp_heard(&mut s, &mut c, t0, relay, unreachable(peer(), icmp_type, 0)),
            None,
            "type {icmp_type}"
        );
    }
    // Nor anything once the permission has expired, or for a relay
    // without an allocation.
    let late = t0 + Duration::from_secs(301);
    assert_eq!(
        icmp_heard(&mut s, &mut c, late, relay, port_unreachable),
        None
    );
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, RelayId(relay.0 + 1), port_unreachable),
        None
    );
}

#[test]
fn icmpv6_errors_reach_the_client_with_their_own_types() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.relay_ips.push(relay_ip6());
    let mut s = dual_setup(cfg, t0);
    let (mut c, _) = allocated_in(&mut s, five(1), t0, true);
    let relay = s.relay_of(&five(1)).expect("allocated");
    let peer6 = peer6();
    c.create_permission(t0, peer6.ip());
    pump(&mut s, &mut c, five(1), t0);
    let error = |icmp_type, code| IcmpError {
        peer: peer6,
        icmp_type,
        code,
        mtu: 1280,
    };
    let heard = |icmp_type, code, error_data| {
        Some(Event::Icmp {
            peer: peer6,
            icmp: Icmp {
                icmp_type,
                code,
                error_data,
            },
        })
    };
    // Destination unreachable (port), packet too big (with its MTU), time
    // exceeded.
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, error(1, 4)),
        heard(1, 4, 0)
    );
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, error(2, 0)),
        heard(2, 0, 1280)
    );
    assert_eq!(
        icmp_heard(&mut s, &mut c, t0, relay, error(3, 0)),
        heard(3, 0, 0)
    );
    // Parameter problem, echo request and reply: not relayed; nor IPv4's
    // time exceeded (11) on an IPv6 relay.
    for icmp_type in [4, 11, 128, 129] {
        assert_eq!(
            icmp_heard(&mut s, &mut c, t0, relay, error(icmp_type, 0)),
            None
        );
    }
}

#[test]
fn icmp_errors_count_against_the_bandwidth_limit() {
    let t0 = Instant::now();
    let mut cfg = config();
    // Room for two ICMP indications of 44 bytes in the first second.
    cfg.bps_per_allocation = 100;
    let (_, mut s) = setup(cfg, t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let relay = s.relay_of(&five(1)).expect("allocated");
    c.create_permission(t0, peer().ip());
    pump(&mut s, &mut c, five(1), t0);
    let error = IcmpError {
        peer: peer(),
        icmp_type: 3,
        code: 3,
        mtu: 0,
    };
    let heard = (0..5)
        .filter(|_| icmp_heard(&mut s, &mut c, t0, relay, error).is_some())
        .count();
    assert_eq!(heard, 2);
}

/// The address a CreatePermission request names.
fn permission_names(request: &[u8]) -> SocketAddr {
    let msg = Message::parse(request).unwrap();
    assert_eq!(msg.method(), method::CREATE_PERMISSION);
    stun::decode_xor_address(
        attr::XOR_PEER_ADDRESS,
        msg.get(attr::XOR_PEER_ADDRESS).unwrap(),
        msg.transaction_id(),
    )
    .unwrap()
}

/// A CreatePermission may name the peer's port (browsers' do; so does our
/// client's `create_permission_for`): the permission is for the IP all
/// the same, whatever port answers.
#[test]
fn a_permission_naming_a_port_is_for_the_whole_ip() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let relay = s.relay_of(&five(1)).expect("allocated");
    c.create_permission_for(t0, peer());
    let request = c.poll_transmit().expect("a CreatePermission");
    assert_eq!(
        permission_names(&request),
        peer(),
        "the request names the port"
    );
    c.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        pump(&mut s, &mut c, five(1), t0 + Duration::from_secs(1)),
        vec![Event::PermissionCreated(peer().ip())]
    );
    let other_port = SocketAddr::new(peer().ip(), peer().port() + 1);
    let mut buf = vec![0u8; HEADROOM + 64];
    buf[HEADROOM..HEADROOM + 3].copy_from_slice(b"hey");
    let Output::ToClient { to, .. } = s.on_peer(t0, relay, other_port, &mut buf, 3) else {
        panic!("another port of the permitted IP is let through")
    };
    assert_eq!(to, five(1));

    // Its renewal, a minute before it would end, names the port again.
    let renewal_due = t0 + Duration::from_secs(1 + 300 - 60);
    c.handle_timeout(renewal_due);
    let renewal = c.poll_transmit().expect("a renewal");
    assert_eq!(
        permission_names(&renewal),
        peer(),
        "the renewal names the port too"
    );
}

#[test]
fn channels_both_ways_and_their_rules() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let relay = s.relay_of(&five(1)).expect("allocated");
    let ch = c.bind_channel(t0, peer());
    assert_eq!(
        pump(&mut s, &mut c, five(1), t0),
        vec![Event::ChannelBound {
            peer: peer(),
            channel: ch
        }]
    );

    let mut framed = c.send_to(peer(), b"abc");
    assert_eq!(&framed[..2], &ch.to_be_bytes());
    let Output::ToPeer { range, .. } = s.on_client(t0, five(1), &mut framed) else {
        panic!()
    };
    assert_eq!(&framed[range], b"abc");

    let mut buf = vec![0u8; HEADROOM + 64];
    buf[HEADROOM..HEADROOM + 5].copy_from_slice(b"12345");
    let Output::ToClient { range, .. } = s.on_peer(t0, relay, peer(), &mut buf, 5) else {
        panic!()
    };
    assert_eq!(
        range,
        HEADROOM - 4..HEADROOM + 5,
        "UDP ChannelData is not padded"
    );
    c.handle_input(t0, &buf[range]);
    assert_eq!(
        c.poll_event(),
        Some(Event::Data {
            peer: peer(),
            data: b"12345".to_vec()
        })
    );

    // The same channel for another peer, or another channel for this peer: 400.
    let other: SocketAddr = "203.0.113.10:1".parse().unwrap();
    c.bind_channel_number(t0, other, ch);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 400);
    c.bind_channel_number(t0, peer(), ch + 1);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 400);
    // Out-of-range channel number: 400.
    c.bind_channel_number(t0, other, 0x3FFF);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 400);

    // Channels last 600 s; the permission they installed lasts 300 s.
    let mid = t0 + Duration::from_secs(301);
    assert_eq!(
        s.on_client(mid, five(1), &mut framed),
        Output::None,
        "permission expired"
    );
}

#[test]
fn stream_transports_pad_channel_data() {
    let t0 = Instant::now();
    let (shared, mut s) = setup(config(), t0);
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..five(9)
    };
    let mut c = Client::new(USER, PASS, true, 4);
    c.allocate(t0);
    let Event::Allocated { .. } = pump(&mut s, &mut c, tcp, t0).remove(0) else {
        panic!()
    };
    c.bind_channel(t0, peer());
    pump(&mut s, &mut c, tcp, t0);
    let mut buf = vec![0xEEu8; HEADROOM + 64];
    let relay = s.relay_of(&tcp).expect("allocated");
    let Output::ToClient { range, .. } = s.on_peer(t0, relay, peer(), &mut buf, 5) else {
        panic!()
    };
    assert_eq!(range.len(), 12, "4-byte header + 5 bytes + 3 padding");
    assert_eq!(&buf[range.end - 3..range.end], &[0, 0, 0]);
    // Closing the connection frees the allocation.
    s.on_client_closed(Instant::now(), tcp);
    assert_eq!(s.allocation_count(), 0);
    assert_eq!(shared.allocation_count(), 0);
}

#[test]
fn forbidden_peers_get_403_and_own_relays_are_allowed_on_relay_ports() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let (_, other_relay) = allocated(&mut s, five(2), t0);
    for bad in [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
    ] {
        c.create_permission(t0, bad.parse().unwrap());
        let code = failed_code(&pump(&mut s, &mut c, five(1), t0));
        // An IPv6 peer on an IPv4 relay is a family mismatch first.
        assert_eq!(code, if bad.contains(':') { 443 } else { 403 }, "{bad}");
    }
    // Another allocation of this server is fine...
    c.bind_channel(t0, other_relay);
    let events = pump(&mut s, &mut c, five(1), t0);
    assert!(
        matches!(events[..], [Event::ChannelBound { .. }]),
        "{events:?}"
    );
    // ...any other port on the relay IP is not, even inside the relay range.
    for port in [22, other_relay.port() + 7] {
        let target = SocketAddr::new(relay_ip(), port);
        c.bind_channel(t0, target);
        assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 403);
        // Nor can a Send indication reach it through the relay IP's permission.
        let mut send = c.send_to(target, b"x");
        assert_eq!(s.on_client(t0, five(1), &mut send), Output::None);
    }
}

#[test]
fn explicitly_allowed_peers() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
    let (_, mut s) = setup(cfg, t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    c.create_permission(t0, "127.0.0.1".parse().unwrap());
    assert!(matches!(
        pump(&mut s, &mut c, five(1), t0)[..],
        [Event::PermissionCreated(_)]
    ));
}

#[test]
fn lifetimes_refresh_and_delete() {
    let t0 = Instant::now();
    let relays = FakeRelays::default();
    let (shared, mut s) = setup_with(config(), &relays, t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    assert!(s.poll_timeout().is_some());

    // Refresh at 500 s keeps it past the original 600 s.
    let t1 = t0 + Duration::from_secs(500);
    c.refresh(t1, 600);
    assert_eq!(
        pump(&mut s, &mut c, five(1), t1),
        vec![Event::Refreshed {
            lifetime: DEFAULT_LIFETIME
        }]
    );
    s.on_timeout(t0 + Duration::from_secs(700));
    assert_eq!(s.allocation_count(), 1);

    // A huge lifetime is capped at the maximum.
    let t2 = t0 + Duration::from_secs(800);
    c.refresh(t2, u32::MAX);
    assert_eq!(
        pump(&mut s, &mut c, five(1), t2),
        vec![Event::Refreshed {
            lifetime: Duration::from_secs(3600)
        }]
    );

    // Lifetime 0 deletes it and frees the relay and the quota.
    let t3 = t0 + Duration::from_secs(900);
    c.refresh(t3, 0);
    assert_eq!(
        pump(&mut s, &mut c, five(1), t3),
        vec![Event::Refreshed {
            lifetime: Duration::ZERO
        }]
    );
    assert_eq!(s.allocation_count(), 0);
    assert!(relays.live.borrow().is_empty());
    assert_eq!(shared.allocation_count(), 0);

    // Refresh without an allocation: 437.
    c.refresh(t3, 600);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t3)), 437);
}

#[test]
fn allocations_expire_by_themselves() {
    let t0 = Instant::now();
    let relays = FakeRelays::default();
    let (shared, mut s) = setup_with(config(), &relays, t0);
    allocated(&mut s, five(1), t0);
    s.on_timeout(t0 + Duration::from_secs(599));
    assert_eq!(s.allocation_count(), 1);
    s.on_timeout(t0 + Duration::from_secs(600));
    assert_eq!(s.allocation_count(), 0);
    assert!(relays.live.borrow().is_empty());
    assert_eq!(shared.allocation_count(), 0);
}

/// A worker that stops ends its allocations (each logged as ended) and
/// gives their places back; the other workers' stay.
#[test]
fn a_stopping_worker_ends_its_allocations_and_gives_their_places_back() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_allocations = 3;
    let relays = FakeRelays::default();
    let (shared, mut stopping) = setup_with(cfg, &relays, t0);
    let other_relays = FakeRelays::default();
    let mut other = Server::new(shared.clone(), other_relays.clone());
    allocated(&mut stopping, five(1), t0);
    allocated(&mut stopping, five(2), t0);
    allocated(&mut other, five(3), t0);
    assert_eq!(shared.allocation_count(), 3);

    stopping.end_all(t0 + Duration::from_secs(5));
    assert_eq!(stopping.allocation_count(), 0);
    assert!(relays.live.borrow().is_empty());
    assert_eq!(other.allocation_count(), 1);
    assert_eq!(other_relays.live.borrow().len(), 1);
    assert_eq!(shared.allocation_count(), 1);
    // The places are free again: the server takes two more.
    allocated(&mut other, five(4), t0);
    allocated(&mut other, five(5), t0);
}

/// After a panic, a server ends every allocation it holds, even those its
/// indexes lost, closes relay sockets no allocation holds, and serves
/// again from empty; other servers' allocations stay.
#[test]
fn a_reset_after_a_panic_ends_everything_the_server_held_and_it_serves_again() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_allocations = 4;
    cfg.user_quota = 4;
    let relays = FakeRelays::default();
    let (shared, mut s) = setup_with(cfg, &relays, t0);
    let other_relays = FakeRelays::default();
    let mut other = Server::new(shared.clone(), other_relays.clone());
    let (mut c1, _) = allocated(&mut s, five(1), t0);
    allocated(&mut s, five(2), t0);
    allocated(&mut other, five(3), t0);
    // What a panic half-way could leave: an index that lost its entry,
    // and a slot taken (with its quota places) and a relay socket bound
    // for an allocation never made.
    s.by_five.remove(&five(2));
    let Ok(orphan) = s.take_slot(USER, Source::of(five(4).client.ip())) else {
        panic!("a place is free");
    };
    s.relays.allocate(RelayId(orphan), false, false).unwrap();
    assert_eq!(relays.live.borrow().len(), 3);
    assert_eq!(shared.allocation_count(), 4, "every place taken");

    s.reset_after_panic(t0 + Duration::from_secs(5));
    assert_eq!(s.allocation_count(), 0);
    assert!(relays.live.borrow().is_empty(), "every relay socket closed");
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(other.allocation_count(), 1);
    assert_eq!(shared.allocation_count(), 1, "the places are given back");

    // Its clients hear that their allocation is gone, and allocate again,
    // up to the user's whole quota: no place stayed taken.
    let t1 = t0 + Duration::from_secs(6);
    c1.refresh(t1, 600);
    assert_eq!(failed_code(&pump(&mut s, &mut c1, five(1), t1)), 437);
    allocated(&mut s, five(1), t1);
    allocated(&mut s, five(2), t1);
    allocated(&mut s, five(4), t1);
    assert_eq!(shared.allocation_count(), 4);
}

/// Slots given back on a refused Allocate, and slots installed, are no
/// longer the server's to give back after a panic: a reset after both
/// kinds leaves the places of other servers' allocations alone.
#[test]
fn a_reset_gives_back_only_places_nothing_else_accounts_for() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_allocations = 3;
    let relays = FakeRelays::default();
    let (shared, mut s) = setup_with(cfg, &relays, t0);
    let mut other = Server::new(shared.clone(), FakeRelays::default());
    allocated(&mut other, five(1), t0);
    allocated(&mut s, five(2), t0);
    // A refused Allocate (a RESERVATION-TOKEN nobody was given) takes a
    // slot and gives it straight back.
    let refused = signed_allocate(
        &mut s,
        five(3),
        3,
        &[(attr::RESERVATION_TOKEN, &[7; 8])],
        t0,
    );
    assert_eq!(error_code(&refused), 508);
    assert!(s.unfilled.is_empty());
    assert_eq!(shared.allocation_count(), 2);

    s.reset_after_panic(t0 + Duration::from_secs(1));
    assert_eq!(shared.allocation_count(), 1, "only the other server's");
    assert_eq!(other.allocation_count(), 1);
}

#[test]
fn quotas() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.user_quota = 2;
    cfg.max_allocations = 3;
    let (_, mut s) = setup(cfg, t0);
    allocated(&mut s, five(1), t0);
    allocated(&mut s, five(2), t0);
    let mut c = Client::new(USER, PASS, false, 3);
    c.allocate(t0);
    assert_eq!(
        failed_code(&pump(&mut s, &mut c, five(3), t0)),
        486,
        "user quota"
    );
    let mut bob = Client::new("bob", "builder", false, 4);
    bob.allocate(t0);
    assert!(matches!(
        pump(&mut s, &mut bob, five(4), t0)[..],
        [Event::Allocated { .. }]
    ));
    let mut bob2 = Client::new("bob", "builder", false, 5);
    bob2.allocate(t0);
    assert_eq!(
        failed_code(&pump(&mut s, &mut bob2, five(5), t0)),
        508,
        "server capacity"
    );
}

/// One client host gets `source_quota` allocations, whatever usernames
/// it has credentials for (a web page hands out fresh ones to anyone who
/// joins a room); another host still gets its own, and a deleted
/// allocation gives its place back.
#[test]
fn a_source_gets_no_more_allocations_than_its_quota() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.source_quota = 2;
    let (shared, mut s) = setup(cfg, t0);
    allocated(&mut s, five(1), t0);
    let mut bob = Client::new("bob", "builder", false, 2);
    bob.allocate(t0);
    assert!(matches!(
        pump(&mut s, &mut bob, five(2), t0)[..],
        [Event::Allocated { .. }]
    ));
    // A third, under a REST username of its own: still the same host.
    let rest_user = format!("{}:mallory", 1_000 + 3_600);
    let rest_pass = crate::auth::rest_password(b"rest-secret", &rest_user);
    let mut mallory = Client::new(&rest_user, &rest_pass, false, 3);
    mallory.allocate(t0);
    assert_eq!(failed_code(&pump(&mut s, &mut mallory, five(3), t0)), 486);
    assert_eq!(shared.allocation_count(), 2);

    // Another host is not held back by the first.
    let elsewhere = FiveTuple {
        client: "198.51.100.8:4".parse().unwrap(),
        ..five(4)
    };
    let mut other = Client::new(&rest_user, &rest_pass, false, 4);
    other.allocate(t0);
    assert!(matches!(
        pump(&mut s, &mut other, elsewhere, t0)[..],
        [Event::Allocated { .. }]
    ));

    // Deleting one gives its place back.
    bob.refresh(t0, 0);
    pump(&mut s, &mut bob, five(2), t0);
    let mut mallory = Client::new(&rest_user, &rest_pass, false, 5);
    mallory.allocate(t0);
    assert!(matches!(
        pump(&mut s, &mut mallory, five(5), t0)[..],
        [Event::Allocated { .. }]
    ));
}

/// Ports held for RESERVATION-TOKENs count against the source's quota
/// too, or allocating with the R bit and deleting, again and again, would
/// hold the port range from one host under ever new usernames.
#[test]
fn a_source_holds_no_more_ports_than_allocations() {
    let mut cfg = config();
    cfg.source_quota = 2;
    two_ports_held_then_refused(cfg);
}

#[test]
fn channels_per_allocation_are_limited() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_channels = 3;
    let (_, mut s) = setup(cfg, t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    let peer_on = |port: u16| SocketAddr::new(peer().ip(), port);
    for port in 1..=3 {
        c.bind_channel(t0, peer_on(port));
        assert!(matches!(
            pump(&mut s, &mut c, five(1), t0)[..],
            [Event::ChannelBound { .. }]
        ));
    }
    c.bind_channel(t0, peer_on(4));
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 508);
    // Renewing a bound one is no new channel.
    let later = t0 + Duration::from_secs(100);
    c.bind_channel(later, peer_on(1));
    assert!(matches!(
        pump(&mut s, &mut c, five(1), later)[..],
        [Event::ChannelBound { .. }]
    ));
}

#[test]
fn relay_exhaustion_is_508() {
    let t0 = Instant::now();
    let relays = FakeRelays::default();
    *relays.fail.borrow_mut() = true;
    let (shared, mut s) = setup_with(config(), &relays, t0);
    let mut c = Client::new(USER, PASS, false, 3);
    c.allocate(t0);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(3), t0)), 508);
    assert_eq!(shared.allocation_count(), 0, "the quota is given back");
}

#[test]
fn wrong_credentials_on_someone_elses_allocation() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    allocated(&mut s, five(1), t0);
    let mut bob = Client::new("bob", "builder", false, 8);
    bob.refresh(t0, 600);
    assert_eq!(failed_code(&pump(&mut s, &mut bob, five(1), t0)), 441);
}

fn request_with(method: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = MessageBuilder::new(method, Class::Request, &[9; 12]);
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    b.finish()
}

#[test]
fn unknown_required_attributes_get_420() {
    let (_, mut s) = setup(config(), Instant::now());
    let mut req = request_with(
        method::BINDING,
        &[(0x0077, b"x"), (0x8077, b"optional is fine")],
    );
    let out = s.on_client(Instant::now(), five(1), &mut req);
    assert_eq!(error_code(&out), 420);
    let Output::Reply { data, .. } = out else {
        unreachable!()
    };
    let msg = Message::parse(&data).unwrap();
    assert_eq!(
        stun::decode_unknown(msg.get(attr::UNKNOWN_ATTRIBUTES).unwrap()).unwrap(),
        vec![0x0077]
    );
}

#[test]
fn allocate_attribute_errors() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    // Authenticate with a real client first to learn a nonce, then craft requests.
    let mut c = Client::new(USER, PASS, false, 1);
    c.allocate(t0);
    let mut first = c.poll_transmit().unwrap();
    let Output::Reply { data, .. } = s.on_client(t0, five(1), &mut first) else {
        panic!()
    };
    let msg = Message::parse(&data).unwrap();
    let nonce = msg.get(attr::NONCE).unwrap().to_vec();
    let key = crate::auth::long_term_key(USER, "test.realm", PASS);
    let signed = |attrs: &[(u16, &[u8])]| {
        let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, &[4; 12]);
        for (t, v) in attrs {
            b.attr(*t, v);
        }
        b.attr(attr::USERNAME, USER.as_bytes())
            .attr(attr::REALM, b"test.realm")
            .attr(attr::NONCE, &nonce)
            .integrity(&key);
        b.finish()
    };
    let code = |s: &mut Server<FakeRelays>, mut req: Vec<u8>| {
        error_code(&s.on_client(t0, five(1), &mut req))
    };
    assert_eq!(code(&mut s, signed(&[])), 400, "no REQUESTED-TRANSPORT");
    assert_eq!(
        code(
            &mut s,
            signed(&[(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])])
        ),
        442,
        "TCP relaying"
    );
    assert_eq!(
        code(
            &mut s,
            signed(&[
                (attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
                (attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0])
            ])
        ),
        440
    );
    assert_eq!(
        code(
            &mut s,
            signed(&[
                (attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
                (attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
            ])
        ),
        440,
        "no IPv6 relay here"
    );
    assert_eq!(
        code(
            &mut s,
            signed(&[
                (attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
                (attr::EVEN_PORT, &[0x80, 0])
            ])
        ),
        400,
        "EVEN-PORT is one byte"
    );
    for (what, attrs) in [
        (
            "a token of 4 bytes",
            vec![(attr::RESERVATION_TOKEN, &[1u8, 2, 3, 4][..])],
        ),
        (
            "a token with EVEN-PORT",
            vec![
                (attr::RESERVATION_TOKEN, &[1u8; 8][..]),
                (attr::EVEN_PORT, &[0u8][..]),
            ],
        ),
        (
            "a token with REQUESTED-ADDRESS-FAMILY",
            vec![
                (attr::RESERVATION_TOKEN, &[1u8; 8][..]),
                (attr::REQUESTED_ADDRESS_FAMILY, &[1u8, 0, 0, 0][..]),
            ],
        ),
        (
            "a token with ADDITIONAL-ADDRESS-FAMILY",
            vec![
                (attr::RESERVATION_TOKEN, &[1u8; 8][..]),
                (attr::ADDITIONAL_ADDRESS_FAMILY, &[2u8, 0, 0, 0][..]),
            ],
        ),
        (
            "both address family attributes",
            vec![
                (attr::REQUESTED_ADDRESS_FAMILY, &[1u8, 0, 0, 0][..]),
                (attr::ADDITIONAL_ADDRESS_FAMILY, &[2u8, 0, 0, 0][..]),
            ],
        ),
        (
            "ADDITIONAL-ADDRESS-FAMILY asking for IPv4",
            vec![(attr::ADDITIONAL_ADDRESS_FAMILY, &[1u8, 0, 0, 0][..])],
        ),
        (
            "a pair of ports in two families (RFC 8656 §7.2)",
            vec![
                (attr::EVEN_PORT, &[0x80u8][..]),
                (attr::ADDITIONAL_ADDRESS_FAMILY, &[2u8, 0, 0, 0][..]),
            ],
        ),
    ] {
        let mut attrs = attrs;
        attrs.push((attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]));
        assert_eq!(code(&mut s, signed(&attrs)), 400, "{what}");
    }
    assert_eq!(
        code(
            &mut s,
            signed(&[
                (attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]),
                (attr::RESERVATION_TOKEN, &[7; 8])
            ])
        ),
        508,
        "a token nobody was given"
    );
    // Missing REALM with integrity present: 400.
    let mut b = MessageBuilder::new(method::ALLOCATE, Class::Request, &[5; 12]);
    b.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, USER.as_bytes())
        .integrity(&key);
    assert_eq!(code(&mut s, b.finish()), 400);
    assert_eq!(s.allocation_count(), 0);
}

#[test]
fn unauthenticated_answers_are_rate_limited() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.unauth_rate = 5;
    let (_, mut s) = setup(cfg, t0);
    let mut req = request_with(method::BINDING, &[]);
    let answered = (0..50)
        .filter(|_| s.on_client(t0, five(1), &mut req) != Output::None)
        .count();
    assert_eq!(answered, 10, "a burst of twice the rate");
    // Another source is not affected; the first recovers with time.
    let other = FiveTuple {
        client: "198.51.100.8:1".parse().unwrap(),
        ..five(1)
    };
    assert_ne!(s.on_client(t0, other, &mut req), Output::None);
    assert_ne!(
        s.on_client(t0 + Duration::from_secs(1), five(1), &mut req),
        Output::None
    );
}

/// Chromium's first requests: a bare Binding and an Allocate with only
/// REQUESTED-TRANSPORT (20 and 28 bytes, measured).
fn browser_requests() -> (Vec<u8>, Vec<u8>) {
    (
        request_with(method::BINDING, &[]),
        request_with(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])],
        ),
    )
}

fn answer_len(out: Output) -> Option<usize> {
    match out {
        Output::Reply { data, .. } => Some(data.len()),
        Output::None => None,
        other => panic!("{other:?}"),
    }
}

#[test]
fn browsers_are_answered_at_once_within_the_allowance() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut binding, mut allocate) = browser_requests();
    assert_eq!((binding.len(), allocate.len()), (20, 28));
    let b = answer_len(s.on_client(t0, five(1), &mut binding)).expect("Binding answered");
    let a = answer_len(s.on_client(t0, five(2), &mut allocate)).expect("401 answered");
    assert!(b > 20 && a > 28, "answers are larger than these requests");
}

#[test]
fn without_allowance_answers_wait_until_retransmissions_pay_for_them() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.unauth_allowance = 0;
    let (_, mut s) = setup(cfg, t0);
    let (mut binding, mut allocate) = browser_requests();
    let (mut sent, mut answered) = (0, 0);
    for req in [&mut binding, &mut allocate] {
        let mut tries = 0;
        answered += loop {
            tries += 1;
            sent += req.len();
            if let Some(n) = answer_len(s.on_client(t0, five(1), req)) {
                break n;
            }
            assert!(tries < 10);
        };
        assert!(tries > 1, "the first request alone does not pay");
        assert!(
            answered <= sent,
            "{answered} bytes answered for {sent} received"
        );
    }
    // Over TCP the source address is proven: answered at once.
    let tcp = FiveTuple {
        client: "203.0.113.9:5000".parse().unwrap(),
        transport: Transport::Tcp,
        ..five(1)
    };
    assert!(answer_len(s.on_client(t0, tcp, &mut allocate)).is_some());
}

#[test]
fn a_spoofed_flood_gets_back_no_more_than_it_sent_plus_the_allowance() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.unauth_rate = 1_000_000;
    let allowance = cfg.unauth_allowance as usize;
    let (_, mut s) = setup(cfg, t0);
    let (_, mut allocate) = browser_requests();
    let mut answered = 0;
    for i in 0..1000 {
        answered += answer_len(s.on_client(t0, five(i), &mut allocate)).unwrap_or(0);
    }
    assert!(answered > 0);
    assert!(
        answered <= 1000 * allocate.len() + allowance,
        "{answered} bytes answered"
    );
    // Time refills the allowance (an eighth of it a second).
    let later = t0 + Duration::from_secs(8);
    assert!(answer_len(s.on_client(later, five(1), &mut allocate)).is_some());
}

#[test]
fn bandwidth_limit_drops_the_excess() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.bps_per_allocation = 1000;
    let (_, mut s) = setup(cfg, t0);
    let (mut c, _) = allocated(&mut s, five(1), t0);
    c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(1), t0);
    let mut framed = c.send_to(peer(), &[0u8; 400]);
    let sent = (0..5)
        .filter(|_| s.on_client(t0, five(1), &mut framed) != Output::None)
        .count();
    assert_eq!(sent, 2, "1000 bytes of budget: two 400-byte packets");
    assert_ne!(
        s.on_client(t0 + Duration::from_secs(1), five(1), &mut framed),
        Output::None
    );
    // What the log will say was relayed: the packets let through only.
    let slot = s.by_five[&five(1)] as usize;
    let view = &s.allocations[slot].as_ref().unwrap().view;
    assert_eq!(view.relayed[TO_PEER].get(), (3, 1200));
    assert_eq!(view.relayed[TO_CLIENT].get(), (0, 0));
}

#[test]
fn garbage_is_dropped_silently() {
    let (_, mut s) = setup(config(), Instant::now());
    for junk in [
        &b""[..],
        b"\x00",
        b"\x00\x01\x00\x04\x21\x12\xa4\x42",
        &[0xFF; 64],
        &[0x40, 0x00, 0x00, 0x10],
    ] {
        assert_eq!(
            s.on_client(Instant::now(), five(1), &mut junk.to_vec()),
            Output::None
        );
    }
}

/// Two workers sharing one `Shared`, as the UDP driver runs them.
fn two_workers(cfg: Config, t0: Instant) -> (Server<FakeRelays>, Server<FakeRelays>) {
    let shared = Arc::new(Shared::new(cfg, b"k", (t0, 1_000)));
    let other = FakeRelays {
        base: 500,
        ..FakeRelays::default()
    };
    (
        Server::new(shared.clone(), FakeRelays::default()),
        Server::new(shared, other),
    )
}

#[test]
fn relay_between_allocations_of_two_workers_skips_the_kernel() {
    let t0 = Instant::now();
    let (w1, w2) = two_workers(config(), t0);
    let mut w = [w1, w2];
    let (mut a, relay_a, mut b, relay_b) = relayed_in_place_both_ways(&mut w, t0);
    let [w1, w2] = &mut w;

    // Past B's permission for A (300 s), B's worker would drop A's data,
    // and so does A's. Renewing B's channel renews the permission, and A's
    // worker sees it.
    let late = t0 + Duration::from_secs(301);
    a.refresh(late, 600);
    pump(w1, &mut a, five(1), late);
    a.bind_channel(late, relay_b);
    pump(w1, &mut a, five(1), late);
    let mut framed = a.send_to(relay_b, b"late");
    assert_eq!(w1.on_client(late, five(1), &mut framed), Output::None);
    b.bind_channel(late, relay_a);
    pump(w2, &mut b, five(2), late);
    let mut framed = a.send_to(relay_b, b"renewed");
    assert!(matches!(
        w1.on_client(late, five(1), &mut framed),
        Output::ToClient { to, .. } if to == five(2)
    ));

    // Once B's allocation is gone, A's data takes the kernel path again
    // (and finds nobody at B's relayed address).
    b.refresh(late, 0);
    pump(w2, &mut b, five(2), late);
    let mut framed = a.send_to(relay_b, b"gone");
    assert!(matches!(
        w1.on_client(late, five(1), &mut framed),
        Output::ToPeer { peer, .. } if peer == relay_b
    ));

    // A new allocation that gets B's old address is found afresh, not
    // mistaken for B.
    let (mut c, relay_c) = allocated(w2, five(3), late);
    assert_eq!(relay_c, relay_b, "the fake allocator reuses the port");
    c.bind_channel(late, relay_a);
    pump(w2, &mut c, five(3), late);
    let mut framed = a.send_to(relay_b, b"to c");
    assert!(matches!(
        w1.on_client(late, five(1), &mut framed),
        Output::ToClient { to, .. } if to == five(3)
    ));
}

#[test]
fn across_workers_only_from_the_receivers_address_and_within_its_budget() {
    let t0 = Instant::now();
    // With a bandwidth limit, the receiver's budget holds for the sender's
    // worker too: 12 bytes a second, 5 at a time.
    let mut cfg = config();
    cfg.bps_per_allocation = 12;
    let (mut w1, mut w2) = two_workers(cfg, t0);
    let (mut a, relay_a) = allocated(&mut w1, five(1), t0);
    let (mut b, relay_b) = allocated(&mut w2, five(2), t0);
    a.bind_channel(t0, relay_b);
    pump(&mut w1, &mut a, five(1), t0);
    b.bind_channel(t0, relay_a);
    pump(&mut w2, &mut b, five(2), t0);
    let mut sent = |at: Instant| {
        let mut framed = a.send_to(relay_b, b"hello");
        w1.on_client(at, five(1), &mut framed)
    };
    assert!(matches!(sent(t0), Output::ToClient { .. }));
    assert!(matches!(sent(t0), Output::ToClient { .. }));
    assert_eq!(sent(t0), Output::None, "over B's budget");
    // B's own worker, receiving from a peer, finds the budget spent too.
    let relay = w2.relay_of(&five(2)).unwrap();
    let mut buf = vec![0u8; HEADROOM + 5 + TAILROOM];
    assert_eq!(w2.on_peer(t0, relay, relay_a, &mut buf, 5), Output::None);
    // Half a second refills 6 bytes: one more gets through.
    assert!(matches!(
        sent(t0 + Duration::from_millis(500)),
        Output::ToClient { .. }
    ));

    // A receiver on another listening address is not reachable from this
    // worker's socket.
    let (mut w1, mut w2) = two_workers(config(), t0);
    let elsewhere = FiveTuple {
        server: "192.0.2.2:3478".parse().unwrap(),
        ..five(2)
    };
    let (mut a, relay_a) = allocated(&mut w1, five(1), t0);
    let (mut b, relay_b) = allocated(&mut w2, elsewhere, t0);
    a.bind_channel(t0, relay_b);
    pump(&mut w1, &mut a, five(1), t0);
    b.bind_channel(t0, relay_a);
    pump(&mut w2, &mut b, elsewhere, t0);
    let mut framed = a.send_to(relay_b, b"hello");
    assert!(matches!(
        w1.on_client(t0, five(1), &mut framed),
        Output::ToPeer { .. }
    ));
}

/// `five(port)`, on a TCP connection to the same address.
fn stream_five(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..five(port)
    }
}

/// `client` takes `message` as data `data` from `peer`.
fn assert_receives(
    client: &mut Client,
    now: Instant,
    message: &[u8],
    peer: SocketAddr,
    data: &[u8],
) {
    client.handle_input(now, message);
    assert_eq!(
        client.poll_event(),
        Some(Event::Data {
            peer,
            data: data.to_vec()
        })
    );
}

/// Keeps what is relayed in place to a stream connection's client.
#[derive(Default)]
struct RecordingInbox(std::sync::Mutex<Vec<Vec<u8>>>);

impl StreamInbox for RecordingInbox {
    fn push(&self, message: &[u8]) -> bool {
        self.0.lock().unwrap().push(message.to_vec());
        true
    }
}

/// Makes `server` a stream connection's, as the stream driver does: with
/// an inbox, and able to send from the UDP listening address of `five()`.
fn on_a_connection(server: &mut Server<FakeRelays>) -> Inbox {
    let inbox = Inbox(Arc::new(RecordingInbox::default()));
    server.set_stream_inbox(inbox.clone());
    server.set_udp_source(five(0).server);
    inbox
}

#[test]
fn relay_in_place_reaches_stream_clients_through_their_inbox() {
    let t0 = Instant::now();
    // A on UDP, B and C on TCP connections of their own.
    let (mut w, mut conn_b) = two_workers(config(), t0);
    let mut conn_c = Server::new(
        conn_b.shared().clone(),
        FakeRelays {
            base: 700,
            ..FakeRelays::default()
        },
    );
    let inbox_b = on_a_connection(&mut conn_b);
    let inbox_c = on_a_connection(&mut conn_c);
    let (mut a, relay_a) = allocated(&mut w, five(1), t0);
    let (mut b, relay_b) = allocated(&mut conn_b, stream_five(2), t0);
    let (mut c, relay_c) = allocated(&mut conn_c, stream_five(3), t0);
    for (client, server, f, peers) in [
        (&mut a, &mut w, five(1), [relay_b, relay_c]),
        (&mut b, &mut conn_b, stream_five(2), [relay_a, relay_c]),
        (&mut c, &mut conn_c, stream_five(3), [relay_a, relay_b]),
    ] {
        for p in peers {
            client.bind_channel(t0, p);
        }
        pump(server, client, f, t0);
    }

    // UDP → TCP: into B's inbox, on B's channel for A.
    let mut framed = a.send_to(relay_b, b"a to b");
    let Output::ToStream { inbox, range } = w.on_client(t0, five(1), &mut framed) else {
        panic!("expected B's inbox")
    };
    assert_eq!(inbox, inbox_b);
    assert_receives(&mut b, t0, &framed[range], relay_a, b"a to b");

    // TCP → UDP: from the UDP listening address, to A's 5-tuple.
    let mut framed = b.send_to(relay_a, b"b to a");
    let Output::ToClient { to, range } = conn_b.on_client(t0, stream_five(2), &mut framed) else {
        panic!("expected delivery to A")
    };
    assert_eq!(to, five(1));
    assert_receives(&mut a, t0, &framed[range], relay_b, b"b to a");

    // TCP → TCP: into C's inbox.
    let mut framed = b.send_to(relay_c, b"b to c");
    let Output::ToStream { inbox, range } = conn_b.on_client(t0, stream_five(2), &mut framed)
    else {
        panic!("expected C's inbox")
    };
    assert_eq!(inbox, inbox_c);
    assert_receives(&mut c, t0, &framed[range], relay_b, b"b to c");

    // A connection whose driver cannot send from A's listening address
    // leaves A's data to the kernel path.
    conn_c.set_udp_source("192.0.2.9:3478".parse().unwrap());
    let mut framed = c.send_to(relay_a, b"c to a");
    assert!(matches!(
        conn_c.on_client(t0, stream_five(3), &mut framed),
        Output::ToPeer { peer, .. } if peer == relay_a
    ));
}

/// A (`five(1)`) on the first of `servers` and B (`five(2)`) on the last
/// (the same one if there is one): A's data goes through the kernel until
/// B has a channel for A, then in place to B's client, re-framed with B's
/// channel number; and B's back. Returns A, A's and B's relayed address.
fn relayed_in_place_both_ways(
    servers: &mut [Server<FakeRelays>],
    t0: Instant,
) -> (Client, SocketAddr, Client, SocketAddr) {
    let (ia, ib) = (0, servers.len() - 1);
    let (mut a, relay_a) = allocated(&mut servers[ia], five(1), t0);
    let (mut b, relay_b) = allocated(&mut servers[ib], five(2), t0);
    a.bind_channel(t0, relay_b);
    pump(&mut servers[ia], &mut a, five(1), t0);

    // B has no channel for A yet: the kernel path (through B's relay socket).
    let mut framed = a.send_to(relay_b, b"hello");
    assert!(
        matches!(servers[ia].on_client(t0, five(1), &mut framed), Output::ToPeer { peer, .. } if peer == relay_b)
    );

    let ch_b = b.bind_channel(t0, relay_a);
    pump(&mut servers[ib], &mut b, five(2), t0);
    let mut framed = a.send_to(relay_b, b"hello");
    let Output::ToClient { to, range } = servers[ia].on_client(t0, five(1), &mut framed) else {
        panic!("expected delivery by A's server")
    };
    assert_eq!(to, five(2));
    assert_eq!(&framed[range.clone()][..2], &ch_b.to_be_bytes());
    assert_receives(&mut b, t0, &framed[range], relay_a, b"hello");
    let mut framed = b.send_to(relay_a, b"world");
    let Output::ToClient { to, range } = servers[ib].on_client(t0, five(2), &mut framed) else {
        panic!("expected delivery by B's server")
    };
    assert_eq!(to, five(1));
    assert_receives(&mut a, t0, &framed[range], relay_b, b"world");
    (a, relay_a, b, relay_b)
}

#[test]
fn relay_between_own_allocations_skips_the_kernel() {
    let t0 = Instant::now();
    let mut s = [setup(config(), t0).1];
    let (a, _, _, relay_b) = relayed_in_place_both_ways(&mut s, t0);
    // Expired permissions stop it, as they would stop the kernel path.
    let late = t0 + Duration::from_secs(301);
    let mut framed = a.send_to(relay_b, b"late");
    assert_eq!(s[0].on_client(late, five(1), &mut framed), Output::None);
}

/// ChannelData to another of our allocations that has no channel for the
/// sender, only a permission (a browser that binds none, as Firefox): in
/// place as a Data indication when the driver left room for its header in
/// front of the data, as the UDP workers do; through the kernel path when
/// it did not.
#[test]
fn channel_data_between_own_allocations_goes_as_a_data_indication_in_place() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut a, relay_a) = allocated(&mut s, five(1), t0);
    let (mut b, relay_b) = allocated(&mut s, five(2), t0);
    a.bind_channel(t0, relay_b);
    pump(&mut s, &mut a, five(1), t0);
    b.create_permission(t0, relay_a.ip());
    pump(&mut s, &mut b, five(2), t0);
    for data in [&b"odd"[..], b"four", b"hello"] {
        let message = a.send_to(relay_b, data);
        let mut buf = vec![0xeeu8; HEADROOM + message.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + message.len()].copy_from_slice(&message);
        let datagram = HEADROOM..HEADROOM + message.len();
        let Output::ToClient { to, range } = s.on_client_in(t0, five(1), &mut buf, datagram) else {
            panic!("expected delivery in place")
        };
        assert_eq!(to, five(2));
        let padding = stun::padding(data.len());
        assert!(
            buf[range.end - padding..range.end].iter().all(|&b| b == 0),
            "padded with zeros"
        );
        assert_receives(&mut b, t0, &buf[range], relay_a, data);
    }
    let mut no_room = a.send_to(relay_b, b"tight");
    assert!(
        matches!(s.on_client(t0, five(1), &mut no_room), Output::ToPeer { peer, range, .. } if peer == relay_b && range == (4..9))
    );
}

/// Send indications (Firefox sends all its media so) from one of our
/// allocations to another are relayed in place too: as a Data indication
/// while the receiver only permits the sender, written where the Send
/// indication's header was, and as ChannelData once it has a channel. A
/// layout with no room for the Data indication's header before the data
/// takes the kernel path.
#[test]
fn send_indications_between_own_allocations_skip_the_kernel() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let (mut a, relay_a) = allocated(&mut s, five(1), t0);
    let (mut b, relay_b) = allocated(&mut s, five(2), t0);
    a.create_permission(t0, relay_b.ip());
    pump(&mut s, &mut a, five(1), t0);
    // B permits nobody yet: the kernel path, whose relay socket drops it.
    let mut framed = a.send_to(relay_b, b"early");
    assert!(
        matches!(s.on_client(t0, five(1), &mut framed), Output::ToPeer { peer, .. } if peer == relay_b)
    );

    b.create_permission(t0, relay_a.ip());
    pump(&mut s, &mut b, five(2), t0);
    for data in [&b"odd"[..], b"four", b"hello"] {
        let mut framed = a.send_to(relay_b, data);
        let Output::ToClient { to, range } = s.on_client(t0, five(1), &mut framed) else {
            panic!("expected delivery in place")
        };
        assert_eq!(to, five(2));
        assert_eq!(
            &framed[range.clone()][..2],
            &[0x00, 0x17],
            "a Data indication"
        );
        assert!(Message::parse(&framed[range.clone()]).is_ok());
        assert_receives(&mut b, t0, &framed[range], relay_a, data);
    }

    // DATA before XOR-PEER-ADDRESS (as coturn's and Pion's clients send),
    // with or without FINGERPRINT: 24 bytes before the data, too few for
    // the indication's 36, but the address after it leaves room to move
    // the data 12 bytes on, even with no byte of the buffer to spare.
    for data in [&b"data first"[..], b"odd", b"four"] {
        for fingerprint in [false, true] {
            let mut m = MessageBuilder::new(method::SEND, Class::Indication, &[3; 12]);
            m.attr(attr::DATA, data)
                .xor_address(attr::XOR_PEER_ADDRESS, relay_b);
            if fingerprint {
                m.fingerprint();
            }
            let mut framed = m.finish();
            let Output::ToClient { to, range } = s.on_client(t0, five(1), &mut framed) else {
                panic!("expected delivery in place")
            };
            assert_eq!(to, five(2));
            assert_receives(&mut b, t0, &framed[range], relay_a, data);
        }
    }

    // With B's channel: ChannelData.
    let ch_b = b.bind_channel(t0, relay_a);
    pump(&mut s, &mut b, five(2), t0);
    let mut framed = a.send_to(relay_b, b"world");
    let Output::ToClient { to, range } = s.on_client(t0, five(1), &mut framed) else {
        panic!("expected delivery in place")
    };
    assert_eq!(to, five(2));
    assert_eq!(&framed[range.clone()][..2], &ch_b.to_be_bytes());
    assert_receives(&mut b, t0, &framed[range], relay_a, b"world");
}

/// An authenticated Allocate from `five` (tid `id`), with a nonce for that
/// 5-tuple learnt from a 401 first.
fn signed_allocate(
    s: &mut Server<FakeRelays>,
    five: FiveTuple,
    id: u8,
    attrs: &[(u16, &[u8])],
    now: Instant,
) -> Output {
    let mut all: Vec<(u16, &[u8])> = vec![(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])];
    all.extend_from_slice(attrs);
    signed_request(s, five, method::ALLOCATE, id, &all, now)
}

/// A request of `method` with `attrs`, signed with a nonce the server
/// gave in a 401 just before.
fn signed_request(
    s: &mut Server<FakeRelays>,
    five: FiveTuple,
    method: u16,
    id: u8,
    attrs: &[(u16, &[u8])],
    now: Instant,
) -> Output {
    // A Refresh, not an Allocate, which a server with alternates answers
    // with one of them rather than a challenge.
    let mut unauthenticated = request_with(method::REFRESH, &[]);
    let Output::Reply { data, .. } = s.on_client(now, five, &mut unauthenticated) else {
        panic!("no 401")
    };
    let nonce = Message::parse(&data)
        .unwrap()
        .get(attr::NONCE)
        .unwrap()
        .to_vec();
    let key = crate::auth::long_term_key(USER, "test.realm", PASS);
    let mut b = MessageBuilder::new(method, Class::Request, &[id; 12]);
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    b.attr(attr::USERNAME, USER.as_bytes())
        .attr(attr::REALM, b"test.realm")
        .attr(attr::NONCE, &nonce)
        .integrity(&key);
    s.on_client(now, five, &mut b.finish())
}

/// The relayed address and the reservation token of a success response.
fn relayed_and_token(out: &Output) -> (SocketAddr, Option<Vec<u8>>) {
    let Output::Reply { data, .. } = out else {
        panic!("{out:?}")
    };
    let msg = Message::parse(data).unwrap();
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    let relayed = stun::decode_xor_address(
        attr::XOR_RELAYED_ADDRESS,
        msg.get(attr::XOR_RELAYED_ADDRESS).unwrap(),
        msg.transaction_id(),
    )
    .unwrap();
    (
        relayed,
        msg.get(attr::RESERVATION_TOKEN).map(<[u8]>::to_vec),
    )
}

/// A dual allocation (RFC 8656 §7.2) is not offered: the client gets its
/// IPv4 relay, and ADDRESS-ERROR-CODE says why there is no IPv6 one.
#[test]
fn a_dual_allocation_gets_ipv4_and_says_why_not_ipv6() {
    let t0 = Instant::now();
    let (_, mut s) = setup(config(), t0);
    let out = signed_allocate(
        &mut s,
        five(1),
        1,
        &[(
            attr::ADDITIONAL_ADDRESS_FAMILY,
            &[attr::FAMILY_IPV6, 0, 0, 0],
        )],
        t0,
    );
    let (relayed, _) = relayed_and_token(&out);
    assert!(relayed.is_ipv4(), "{relayed}");
    let Output::Reply { data, .. } = &out else {
        unreachable!()
    };
    let msg = Message::parse(data).unwrap();
    let address_error = msg
        .get(attr::ADDRESS_ERROR_CODE)
        .expect("ADDRESS-ERROR-CODE");
    // As RFC 8656 §18.12 lays it out, and coturn writes it: the family,
    // a reserved byte, then class and number.
    assert_eq!(&address_error[..4], &[attr::FAMILY_IPV6, 0, 4, 40]);
    assert_eq!(
        stun::decode_address_error(address_error).unwrap(),
        (attr::FAMILY_IPV6, 440, "Address Family not Supported")
    );
    assert_eq!(s.allocation_count(), 1);
}

/// coturn and its clients number ADDITIONAL-ADDRESS-FAMILY and
/// ADDRESS-ERROR-CODE as the draft before RFC 8656 did (0x8032, 0x8033).
/// A dual allocation asked for that way is served, and answered in the
/// numbering it was asked in.
#[test]
fn a_dual_allocation_in_the_drafts_numbering_is_answered_in_it() {
    let t0 = Instant::now();
    let draft = [(
        attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT,
        &[attr::FAMILY_IPV6, 0, 0, 0][..],
    )];
    let relayed = |out: &Output| -> Vec<SocketAddr> {
        let Output::Reply { data, .. } = out else {
            panic!("{out:?}")
        };
        let msg = Message::parse(data).unwrap();
        msg.attrs()
            .filter(|a| a.typ == attr::XOR_RELAYED_ADDRESS)
            .map(|a| stun::decode_xor_address(a.typ, a.value, msg.transaction_id()).unwrap())
            .collect()
    };

    let mut s = dual_setup(config(), t0);
    let both = relayed(&signed_allocate(&mut s, five(1), 1, &draft, t0));
    assert!(
        matches!(both.as_slice(), [a, b] if a.is_ipv4() && b.is_ipv6()),
        "{both:?}"
    );
    assert_eq!(s.relays_of(&five(1)).iter().flatten().count(), 2);

    // No IPv6 relays: the IPv4 one, and why not in the draft's numbering.
    let (_, mut s) = setup(config(), t0);
    let out = signed_allocate(&mut s, five(1), 1, &draft, t0);
    assert_eq!(relayed(&out).len(), 1);
    let Output::Reply { data, .. } = &out else {
        unreachable!()
    };
    let msg = Message::parse(data).unwrap();
    assert_eq!(msg.get(attr::ADDRESS_ERROR_CODE), None);
    let why = msg.get(attr::ADDRESS_ERROR_CODE_DRAFT).expect("0x8033");
    assert_eq!(
        stun::decode_address_error(why).unwrap(),
        (attr::FAMILY_IPV6, 440, "Address Family not Supported")
    );
}

/// A client that asks for no family (as browsers) gets an IPv4 relay, as
/// RFC 8656 has it; from a server without IPv4 relays, 440, which says so
/// (it was 508, "try again later"). With `DefaultFamily::Client` it gets
/// its own family's; with `Ipv6`, IPv6.
#[test]
fn a_client_that_asks_for_no_family_gets_the_default_one() {
    let t0 = Instant::now();
    let cases = [
        (DefaultFamily::Ipv4, five6(1), false),
        (DefaultFamily::Client, five6(2), true),
        (DefaultFamily::Client, five(3), false),
        (DefaultFamily::Ipv6, five(4), true),
    ];
    for (family, f, ipv6) in cases {
        let mut cfg = config();
        cfg.default_family = family;
        let mut s = dual_setup(cfg, t0);
        let (_, relayed) = allocated(&mut s, f, t0);
        assert_eq!(relayed.is_ipv6(), ipv6, "{family:?} for {}", f.client);
    }
    // An IPv6-only server.
    let relays = FakeRelays {
        ipv6: true,
        no_ipv4: true,
        ..FakeRelays::default()
    };
    for (family, code) in [
        (DefaultFamily::Ipv4, Some(440)),
        (DefaultFamily::Client, None),
    ] {
        let mut cfg = config();
        cfg.default_family = family;
        let mut s = Server::new(
            Arc::new(Shared::new(cfg, b"k", (t0, 1_000))),
            relays.clone(),
        );
        let mut c = Client::new(USER, PASS, false, 5);
        c.allocate(t0);
        let events = pump(&mut s, &mut c, five6(5), t0);
        match code {
            Some(code) => assert_eq!(failed_code(&events), code, "{family:?}"),
            None => assert!(
                matches!(events.as_slice(), [Event::Allocated { relayed, .. }] if relayed.is_ipv6()),
                "{family:?}: {events:?}"
            ),
        }
    }
}

/// A server whose relays come in both families.
fn dual_setup(cfg: Config, t0: Instant) -> Server<FakeRelays> {
    let shared = Arc::new(Shared::new(cfg, b"k", (t0, 1_000)));
    Server::new(
        shared,
        FakeRelays {
            ipv6: true,
            ..FakeRelays::default()
        },
    )
}

fn peer6() -> SocketAddr {
    "[2001:db8:1::9]:4000".parse().unwrap()
}

/// A dual allocation (RFC 8656 §7.2) from `five`: both relays.
fn dual_allocated(
    s: &mut Server<FakeRelays>,
    five: FiveTuple,
    t0: Instant,
) -> (Client, SocketAddr, SocketAddr) {
    let mut c = Client::new(USER, PASS, false, five.client.port().into());
    c.allocate_dual(t0);
    match pump(s, &mut c, five, t0).as_slice() {
        [
            Event::Allocated { relayed, .. },
            Event::Ipv6Relay(Ok(relayed6)),
        ] => {
            assert!(
                relayed.is_ipv4() && relayed6.is_ipv6(),
                "{relayed} {relayed6}"
            );
            let (r, r6) = (*relayed, *relayed6);
            (c, r, r6)
        }
        other => panic!("{other:?}"),
    }
}

/// What a Send indication or ChannelData from the client goes out of.
fn sent_from(
    s: &mut Server<FakeRelays>,
    five: FiveTuple,
    mut data: Vec<u8>,
    t0: Instant,
) -> Option<(RelayId, SocketAddr)> {
    match s.on_client(t0, five, &mut data) {
        Output::ToPeer { relay, peer, .. } => Some((relay, peer)),
        _ => None,
    }
}

/// Data from `from` to `relay`, relayed to the client or not.
fn reaches_client(
    s: &mut Server<FakeRelays>,
    relay: RelayId,
    from: SocketAddr,
    t0: Instant,
) -> bool {
    let mut buf = vec![0u8; HEADROOM + 64];
    buf[HEADROOM..HEADROOM + 3].copy_from_slice(b"hey");
    matches!(
        s.on_peer(t0, relay, from, &mut buf, 3),
        Output::ToClient { .. }
    )
}

/// One allocation, two relays: each family's peers are reached through the
/// relay of their family, with permissions and channels of their own, and
/// one channel number names one peer across both.
#[test]
fn a_dual_allocation_relays_each_family_through_its_own_relay() {
    let t0 = Instant::now();
    let mut s = dual_setup(config(), t0);
    let (mut c, _, relayed6) = dual_allocated(&mut s, five(1), t0);
    assert_eq!(relayed6.ip(), relay_ip6());
    assert_eq!(s.allocation_count(), 1);
    let [Some(r4), Some(r6)] = s.relays_of(&five(1)) else {
        panic!("two relays")
    };

    c.create_permission(t0, peer().ip());
    c.create_permission(t0, peer6().ip());
    assert_eq!(
        pump(&mut s, &mut c, five(1), t0),
        vec![
            Event::PermissionCreated(peer().ip()),
            Event::PermissionCreated(peer6().ip())
        ]
    );
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer(), b"4"), t0),
        Some((r4, peer()))
    );
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer6(), b"6"), t0),
        Some((r6, peer6()))
    );
    assert!(reaches_client(&mut s, r6, peer6(), t0));
    assert!(reaches_client(&mut s, r4, peer(), t0));
    // Each relay has its own permissions.
    assert!(!reaches_client(
        &mut s,
        r4,
        SocketAddr::new(peer6().ip(), 1),
        t0
    ));

    let n6 = c.bind_channel(t0, peer6());
    let n4 = c.bind_channel(t0, peer());
    let bound = pump(&mut s, &mut c, five(1), t0);
    assert_eq!(bound.len(), 2, "{bound:?}");
    assert!(
        bound
            .iter()
            .all(|e| matches!(e, Event::ChannelBound { .. }))
    );
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer6(), b"6"), t0),
        Some((r6, peer6()))
    );
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer(), b"4"), t0),
        Some((r4, peer()))
    );
    // Another IPv4 peer may not take the number of the IPv6 one.
    let other4: SocketAddr = "203.0.113.10:4000".parse().unwrap();
    c.bind_channel_number(t0, other4, n6);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(1), t0)), 400);
    assert_ne!(n4, n6);
}

/// Refresh with REQUESTED-ADDRESS-FAMILY refreshes or deletes the relay of
/// that family only (RFC 8656 §7.3); without it, both. A half left alone
/// still serves, whichever it is.
#[test]
fn a_dual_allocation_loses_one_half_at_a_time() {
    let t0 = Instant::now();
    let mut s = dual_setup(config(), t0);
    let lifetime_zero = 0u32.to_be_bytes();
    let family = |f: u8| [f, 0, 0, 0];
    let (six, four) = (family(attr::FAMILY_IPV6), family(attr::FAMILY_IPV4));
    let refresh = |s: &mut Server<FakeRelays>, five, id, fam: &[u8; 4]| {
        let attrs: &[(u16, &[u8])] = &[
            (attr::LIFETIME, &lifetime_zero),
            (attr::REQUESTED_ADDRESS_FAMILY, fam),
        ];
        signed_request(s, five, method::REFRESH, id, attrs, t0)
    };

    // The IPv6 half goes; the IPv4 one stays.
    let (mut c, _, _) = dual_allocated(&mut s, five(1), t0);
    c.create_permission(t0, peer().ip());
    c.create_permission(t0, peer6().ip());
    pump(&mut s, &mut c, five(1), t0);
    let [Some(r4), Some(_)] = s.relays_of(&five(1)) else {
        panic!()
    };
    assert!(matches!(
        refresh(&mut s, five(1), 1, &six),
        Output::Reply { .. }
    ));
    assert_eq!(s.relays_of(&five(1)), [Some(r4), None]);
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer6(), b"6"), t0),
        None
    );
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer(), b"4"), t0),
        Some((r4, peer()))
    );
    assert_eq!(
        error_code(&refresh(&mut s, five(1), 2, &six)),
        443,
        "no IPv6 relay left"
    );

    // The IPv4 half goes; the IPv6 one stands alone, found as before.
    let (mut c, _, _) = dual_allocated(&mut s, five(2), t0);
    c.create_permission(t0, peer6().ip());
    pump(&mut s, &mut c, five(2), t0);
    let [Some(_), Some(r6)] = s.relays_of(&five(2)) else {
        panic!()
    };
    assert!(matches!(
        refresh(&mut s, five(2), 3, &four),
        Output::Reply { .. }
    ));
    assert_eq!(s.relays_of(&five(2)), [Some(r6), None]);
    assert_eq!(
        sent_from(&mut s, five(2), c.send_to(peer6(), b"6"), t0),
        Some((r6, peer6()))
    );
    assert!(reaches_client(&mut s, r6, peer6(), t0));
    assert_eq!(s.allocation_count(), 2);

    // Without a family, a Refresh deletes both halves; expiry takes both.
    let (_c, _, _) = dual_allocated(&mut s, five(3), t0);
    let zero: &[(u16, &[u8])] = &[(attr::LIFETIME, &lifetime_zero)];
    assert!(matches!(
        signed_request(&mut s, five(3), method::REFRESH, 4, zero, t0),
        Output::Reply { .. }
    ));
    assert_eq!(s.relays_of(&five(3)), [None, None]);
    s.on_timeout(t0 + DEFAULT_LIFETIME + Duration::from_secs(1));
    assert_eq!(s.allocation_count(), 0);
    assert!(s.relays().live.borrow().is_empty(), "every relay released");
    assert_eq!(s.shared().allocation_count(), 0, "every quota given back");
}

/// The IPv6 half counts against the quotas as an allocation: over them,
/// the client keeps its IPv4 relay and is told why there is no other.
#[test]
fn a_dual_allocation_over_the_quota_gets_its_ipv4_half() {
    let t0 = Instant::now();
    let mut s = dual_setup(
        Config {
            user_quota: 1,
            ..config()
        },
        t0,
    );
    let mut c = Client::new(USER, PASS, false, 1);
    c.allocate_dual(t0);
    match pump(&mut s, &mut c, five(1), t0).as_slice() {
        [
            Event::Allocated { relayed, .. },
            Event::Ipv6Relay(Err(Some(486))),
        ] => {
            assert!(relayed.is_ipv4())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.relays_of(&five(1))[1], None);
}

#[test]
fn an_rtp_rtcp_pair_gets_adjacent_ports_through_a_reservation() {
    let t0 = Instant::now();
    let (shared, mut s) = setup(config(), t0);
    // RTP: an even port, and a token for the one above it.
    let rtp = signed_allocate(&mut s, five(1), 1, &[(attr::EVEN_PORT, &[0x80])], t0);
    let (rtp_addr, token) = relayed_and_token(&rtp);
    let token = token.expect("a RESERVATION-TOKEN");
    assert_eq!(token.len(), 8);
    assert_eq!(rtp_addr.port() % 2, 0);
    assert_eq!(shared.reservation_count(), 1);
    // The retransmitted request gets the same answer, token included.
    assert_eq!(
        signed_allocate(&mut s, five(1), 1, &[(attr::EVEN_PORT, &[0x80])], t0),
        rtp
    );
    assert_eq!(shared.reservation_count(), 1);
    // RTCP, from the client's second socket, redeems it.
    let rtcp = signed_allocate(&mut s, five(2), 2, &[(attr::RESERVATION_TOKEN, &token)], t0);
    let (rtcp_addr, none) = relayed_and_token(&rtcp);
    assert_eq!(
        rtcp_addr,
        SocketAddr::new(rtp_addr.ip(), rtp_addr.port() + 1)
    );
    assert_eq!(none, None);
    assert_eq!(shared.reservation_count(), 0);
    assert_eq!(s.allocation_count(), 2);
    // A token is good once.
    let again = signed_allocate(&mut s, five(3), 3, &[(attr::RESERVATION_TOKEN, &token)], t0);
    assert_eq!(error_code(&again), 508);
    assert_eq!(s.allocation_count(), 2);
    assert_eq!(
        shared.allocation_count(),
        2,
        "the refused one gave its quota back"
    );
}

#[test]
fn a_reservation_lapses_after_thirty_seconds() {
    let t0 = Instant::now();
    let (shared, mut s) = setup(config(), t0);
    let rtp = signed_allocate(&mut s, five(1), 1, &[(attr::EVEN_PORT, &[0x80])], t0);
    let token = relayed_and_token(&rtp).1.unwrap();
    // The sweep frees the held port once the reservation is over.
    s.on_timeout(t0 + RESERVATION_LIFETIME - Duration::from_secs(1));
    assert_eq!(shared.reservation_count(), 1);
    s.on_timeout(t0 + RESERVATION_LIFETIME + Duration::from_secs(1));
    assert_eq!(shared.reservation_count(), 0);
    let late = signed_allocate(
        &mut s,
        five(2),
        2,
        &[(attr::RESERVATION_TOKEN, &token)],
        t0 + RESERVATION_LIFETIME,
    );
    assert_eq!(error_code(&late), 508);
}

#[test]
fn no_free_pair_of_ports_is_508_and_leaves_nothing_behind() {
    let t0 = Instant::now();
    let (shared, mut s) = setup(config(), t0);
    // Without the R bit the port above does not matter.
    let plain = signed_allocate(&mut s, five(1), 1, &[(attr::EVEN_PORT, &[0])], t0);
    assert_eq!(relayed_and_token(&plain).1, None);
    *s.relays().no_pairs.borrow_mut() = true;
    let out = signed_allocate(&mut s, five(2), 2, &[(attr::EVEN_PORT, &[0x80])], t0);
    assert_eq!(error_code(&out), 508);
    assert_eq!(
        s.relays().live.borrow().len(),
        1,
        "the tried ports were released"
    );
    assert_eq!(shared.allocation_count(), 1);
    assert_eq!(shared.reservation_count(), 0);
}

#[test]
fn a_user_holds_no_more_ports_than_allocations() {
    let mut cfg = config();
    cfg.user_quota = 2;
    two_ports_held_then_refused(cfg);
}

/// Allocates with the R bit and deletes, again and again, from one client
/// with one username: each round leaves a held port behind, up to a quota
/// of 2 in `cfg`, and then the allocation is refused.
fn two_ports_held_then_refused(cfg: Config) {
    let t0 = Instant::now();
    let (shared, mut s) = setup(cfg, t0);
    for round in 0..4u8 {
        let out = signed_allocate(&mut s, five(1), round, &[(attr::EVEN_PORT, &[0x80])], t0);
        if round < 2 {
            assert!(relayed_and_token(&out).1.is_some(), "round {round}");
            let slot = s.by_five[&five(1)];
            s.remove_allocation(slot, Ended::Deleted, t0);
        } else {
            assert_eq!(error_code(&out), 508, "round {round}");
        }
    }
    assert_eq!(shared.reservation_count(), 2);
    assert_eq!(
        s.relays().live.borrow().len(),
        0,
        "refused rounds released their port"
    );
}

/// Steps of a relay/relay session between client A (on one worker) and
/// client B (on the other), for the property below.
#[derive(Debug, Clone)]
enum Step {
    /// (Re)binds the sender's channel to the other's relayed address.
    Bind {
        a: bool,
    },
    /// Creates (or renews) a permission for the other's relay IP.
    Permit {
        a: bool,
    },
    /// `room`: received with a UDP worker's headroom, or in a buffer of
    /// its own size (as a stream frame); `data_first`: a Send indication
    /// with DATA before XOR-PEER-ADDRESS.
    Send {
        a: bool,
        byte: u8,
        room: bool,
        data_first: bool,
    },
    Wait {
        secs: u16,
    },
    /// Refreshes the sender's allocation; 0 deletes it.
    Refresh {
        a: bool,
        secs: u16,
    },
    /// Another host on the other's relay IP sends to A's (or B's) relayed
    /// address: it takes from the receiver's bandwidth budget.
    Stray {
        a: bool,
    },
}

fn arb_step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        1 => any::<bool>().prop_map(|a| Step::Bind { a }),
        1 => any::<bool>().prop_map(|a| Step::Permit { a }),
        4 => (any::<bool>(), any::<u8>(), any::<bool>(), any::<bool>())
            .prop_map(|(a, byte, room, data_first)| Step::Send { a, byte, room, data_first }),
        1 => any::<bool>().prop_map(|a| Step::Stray { a }),
        1 => prop_oneof![0u16..5, 250u16..350, 550u16..650].prop_map(|secs| Step::Wait { secs }),
        1 => (any::<bool>(), prop_oneof![Just(0u16), 1u16..700])
            .prop_map(|(a, secs)| Step::Refresh { a, secs }),
    ]
}

/// `message` again with DATA before XOR-PEER-ADDRESS, if it is a Send
/// indication, as coturn's and Pion's clients lay them out.
fn with_data_first(message: &[u8]) -> Vec<u8> {
    let Ok(msg) = Message::parse(message) else {
        return message.to_vec();
    };
    let (Some(data), Some(peer)) = (msg.get(attr::DATA), msg.get(attr::XOR_PEER_ADDRESS)) else {
        return message.to_vec();
    };
    let mut b = MessageBuilder::new(method::SEND, Class::Indication, msg.transaction_id());
    b.attr(attr::DATA, data).attr(attr::XOR_PEER_ADDRESS, peer);
    b.finish()
}

/// Plays `steps` with A on one worker and B on another, each on UDP or on
/// a TCP connection (`tcp`: A's, B's); returns what each client saw, in
/// order (true: A). Data that the sender's worker hands to a relay socket
/// is carried as the kernel would: into the receiving worker's `on_peer`,
/// from the sender's relayed address.
fn play(cfg: Config, tcp: (bool, bool), steps: &[Step]) -> Vec<(bool, Event)> {
    let t0 = Instant::now();
    let mut now = t0;
    let (mut w1, mut w2) = two_workers(cfg, t0);
    let fa = if tcp.0 { stream_five(1) } else { five(1) };
    let fb = if tcp.1 { stream_five(2) } else { five(2) };
    let inbox_a = tcp.0.then(|| on_a_connection(&mut w1));
    let inbox_b = tcp.1.then(|| on_a_connection(&mut w2));
    let (mut a, relay_a) = allocated(&mut w1, fa, t0);
    let (mut b, relay_b) = allocated(&mut w2, fb, t0);
    let mut seen = Vec::new();
    for step in steps {
        match *step {
            Step::Bind { a: true } => {
                a.bind_channel(now, relay_b);
            }
            Step::Bind { a: false } => {
                b.bind_channel(now, relay_a);
            }
            Step::Permit { a: true } => a.create_permission(now, relay_b.ip()),
            Step::Permit { a: false } => b.create_permission(now, relay_a.ip()),
            Step::Refresh { a: true, secs } => a.refresh(now, secs.into()),
            Step::Refresh { a: false, secs } => b.refresh(now, secs.into()),
            Step::Wait { secs } => {
                now += Duration::from_secs(secs.into());
                w1.on_timeout(now);
                w2.on_timeout(now);
            }
            Step::Stray { a: to_a } => {
                let (w, f, client) = if to_a {
                    (&mut w1, fa, &mut a)
                } else {
                    (&mut w2, fb, &mut b)
                };
                let stray = SocketAddr::new(relay_ip(), 40000);
                let mut buf = vec![0u8; HEADROOM + 9 + TAILROOM];
                if let Some(id) = w.relay_of(&f)
                    && let Output::ToClient { range, .. } = w.on_peer(now, id, stray, &mut buf, 9)
                {
                    client.handle_input(now, &buf[range]);
                }
            }
            Step::Send {
                a: from_a,
                byte,
                room,
                data_first,
            } => {
                let (sender, ws, wr, fs, fr, from, to, inbox) = if from_a {
                    (&a, &mut w1, &mut w2, fa, fb, relay_a, relay_b, &inbox_b)
                } else {
                    (&b, &mut w2, &mut w1, fb, fa, relay_b, relay_a, &inbox_a)
                };
                let mut message = sender.send_to(to, &[byte; 9]);
                if data_first {
                    message = with_data_first(&message);
                }
                // With the room a UDP worker leaves around a datagram, so
                // that ChannelData can go in place as a Data indication.
                let (head, tail) = if room { (HEADROOM, TAILROOM) } else { (0, 0) };
                let mut framed = vec![0u8; head + message.len() + tail];
                framed[head..head + message.len()].copy_from_slice(&message);
                let datagram = head..head + message.len();
                let delivered = match ws.on_client_in(now, fs, &mut framed, datagram) {
                    Output::ToClient { to: t, range } => {
                        assert_eq!(t, fr, "in place to the wrong client");
                        Some(framed[range].to_vec())
                    }
                    Output::ToStream { inbox: got, range } => {
                        assert_eq!(Some(got), inbox.clone(), "in place to the wrong inbox");
                        Some(framed[range].to_vec())
                    }
                    Output::ToPeer { peer, range, .. } => {
                        assert_eq!(peer, to);
                        let payload = framed[range].to_vec();
                        let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
                        buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(&payload);
                        match wr.relay_of(&fr) {
                            Some(id) => match wr.on_peer(now, id, from, &mut buf, payload.len()) {
                                Output::ToClient { range, .. } => Some(buf[range].to_vec()),
                                _ => None,
                            },
                            None => None,
                        }
                    }
                    _ => None,
                };
                if let Some(d) = delivered {
                    if from_a {
                        b.handle_input(now, &d);
                    } else {
                        a.handle_input(now, &d);
                    }
                }
            }
        }
        seen.extend(
            pump(&mut w1, &mut a, fa, now)
                .into_iter()
                .map(|e| (true, e)),
        );
        seen.extend(
            pump(&mut w2, &mut b, fb, now)
                .into_iter()
                .map(|e| (false, e)),
        );
    }
    seen
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    /// Relaying in place between workers changes nothing either client
    /// sees: whatever the channels, permissions, lifetimes and deletions,
    /// each gets the same data, on the same terms, as through the kernel
    /// path.
    ///
    /// Either client may be on a TCP connection: then it receives through
    /// its connection's inbox, and sends to a UDP client from the UDP
    /// listening address.
    ///
    /// With a bandwidth limit (`bps`, 0: none) the same data is dropped
    /// either way.
    #[test]
    fn relaying_across_workers_is_invisible(
        tcp in (proptest::bool::ANY, proptest::bool::ANY),
        bps in proptest::prop_oneof![proptest::strategy::Just(0u64), 1u64..40],
        steps in proptest::collection::vec(arb_step(), 1..40),
    ) {
        let mut cfg = config();
        cfg.bps_per_allocation = bps;
        let in_place = play(cfg.clone(), tcp, &steps);
        cfg.relay_in_place = false;
        let kernel = play(cfg, tcp, &steps);
        proptest::prop_assert_eq!(in_place, kernel);
    }
}

fn kernel_config() -> Config {
    Config {
        kernel_routes: true,
        ..config()
    }
}

fn route(
    five: FiveTuple,
    channel: u16,
    relay: SocketAddr,
    peer: SocketAddr,
    expires: Instant,
) -> KernelRoute {
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    KernelRoute {
        client: v4(five.client),
        server: v4(five.server),
        channel,
        relay: v4(relay),
        peer: v4(peer),
        expires,
    }
}

fn indication_route(
    five: FiveTuple,
    relay: SocketAddr,
    peer: IpAddr,
    expires: Instant,
) -> IndicationRoute {
    let (SocketAddr::V4(client), SocketAddr::V4(server), SocketAddr::V4(relay), IpAddr::V4(peer)) =
        (five.client, five.server, relay, peer)
    else {
        panic!("IPv4 only")
    };
    IndicationRoute {
        client,
        server,
        relay,
        peer,
        expires,
    }
}

#[test]
fn kernel_routes_follow_channels_permissions_and_lifetimes() {
    let t0 = Instant::now();
    let (_, mut s) = setup(kernel_config(), t0);
    let (mut c, relayed) = allocated(&mut s, five(1), t0);
    assert_eq!(s.route_changes().count(), 0, "no permission, no route");

    // A channel and the permission it installs: the permission ends first.
    let ch = c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(1), t0);
    let r = |expires| route(five(1), ch, relayed, peer(), expires);
    let i = |expires| indication_route(five(1), relayed, peer().ip(), expires);
    let secs = |n| t0 + Duration::from_secs(n);
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::Set(r(secs(300))),
            RouteChange::SetIndications(i(secs(300)))
        ]
    );

    // Renewing the permission moves the routes' end to it.
    c.create_permission(secs(100), peer().ip());
    pump(&mut s, &mut c, five(1), secs(100));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::Set(r(secs(400))),
            RouteChange::SetIndications(i(secs(400)))
        ]
    );

    // A refresh that does not bring the end closer changes nothing.
    c.refresh(secs(200), 600);
    pump(&mut s, &mut c, five(1), secs(200));
    assert_eq!(s.route_changes().count(), 0);

    // The permission expires: the routes go with it; renewed, they return,
    // the channel's until the channel's end.
    s.on_timeout(secs(401));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::RemoveIndications(i(secs(400))),
            RouteChange::Remove(r(secs(400)))
        ]
    );
    c.create_permission(secs(402), peer().ip());
    pump(&mut s, &mut c, five(1), secs(402));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::Set(r(secs(600))),
            RouteChange::SetIndications(i(secs(702)))
        ]
    );

    // Deleting the allocation removes them.
    c.refresh(secs(403), 0);
    pump(&mut s, &mut c, five(1), secs(403));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::RemoveIndications(i(secs(702))),
            RouteChange::Remove(r(secs(600)))
        ]
    );
}

#[test]
fn a_permission_alone_gets_a_route_for_data_indications() {
    let t0 = Instant::now();
    let (_, mut s) = setup(kernel_config(), t0);
    let (mut c, relayed) = allocated(&mut s, five(1), t0);
    c.create_permission(t0, peer().ip());
    pump(&mut s, &mut c, five(1), t0);
    let i = indication_route(five(1), relayed, peer().ip(), t0 + Duration::from_secs(300));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [RouteChange::SetIndications(i)]
    );
}

#[test]
fn kernel_routes_go_when_the_allocation_expires() {
    let t0 = Instant::now();
    let (_, mut s) = setup(kernel_config(), t0);
    let (mut c, relayed) = allocated(&mut s, five(1), t0);
    let ch = c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(1), t0);
    c.create_permission(t0 + Duration::from_secs(301), peer().ip());
    pump(&mut s, &mut c, five(1), t0 + Duration::from_secs(301));
    let end = t0 + DEFAULT_LIFETIME;
    let (r, i) = (
        route(five(1), ch, relayed, peer(), end),
        indication_route(five(1), relayed, peer().ip(), end),
    );
    assert_eq!(
        s.route_changes().collect::<Vec<_>>()[2..],
        [RouteChange::Set(r), RouteChange::SetIndications(i)],
        "the allocation's end comes before the permission's"
    );
    s.on_timeout(end);
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [RouteChange::RemoveIndications(i), RouteChange::Remove(r)]
    );
}

#[test]
fn no_kernel_routes_unless_asked_for_a_udp_client_on_a_known_address_and_limits_shared() {
    let t0 = Instant::now();
    let unspecified = FiveTuple {
        server: "0.0.0.0:3478".parse().unwrap(),
        ..five(1)
    };
    let cases = [
        ("not asked", config(), five(1)),
        (
            "bandwidth limit, the kernel's budgets not shared",
            Config {
                bps_per_allocation: 1000,
                ..kernel_config()
            },
            five(1),
        ),
        ("TCP client", kernel_config(), stream_five(1)),
        ("listening on 0.0.0.0", kernel_config(), unspecified),
    ];
    for (case, cfg, f) in cases {
        let (_, mut s) = setup(cfg, t0);
        let (mut c, _) = allocated(&mut s, f, t0);
        c.bind_channel(t0, peer());
        c.create_permission(t0, "203.0.113.77".parse().unwrap());
        pump(&mut s, &mut c, f, t0);
        assert_eq!(s.route_changes().count(), 0, "{case}");
    }
}

/// Over IPv6 the routes follow channels and permissions as over IPv4. An
/// IPv4 relay of an IPv6 client (the other half of a dual allocation)
/// gets none, as the kernel relays within one family. Under a bandwidth
/// limit, with the kernel's budgets shared, IPv6 relays get routes too.
#[test]
fn kernel_routes_over_ipv6_follow_channels_and_permissions() {
    let t0 = Instant::now();
    let secs = |n| t0 + Duration::from_secs(n);
    let mut cfg = kernel_config();
    cfg.relay_ips = vec![relay_ip(), relay_ip6()];
    let mut s = dual_setup(cfg.clone(), t0);
    let f = five6(1);
    let (mut c, relayed) = allocated_in(&mut s, f, t0, true);
    assert!(relayed.is_ipv6());
    let ch = c.bind_channel(t0, peer6());
    let other: std::net::Ipv6Addr = "2001:db8:1::77".parse().unwrap();
    c.create_permission(t0, other.into());
    pump(&mut s, &mut c, f, t0);
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(_) => panic!("IPv6 only"),
    };
    let r = KernelRoute6 {
        client: v6(f.client),
        server: v6(f.server),
        channel: ch,
        relay: v6(relayed),
        peer: v6(peer6()),
        expires: secs(300),
    };
    let i = |peer| IndicationRoute6 {
        client: r.client,
        server: r.server,
        relay: r.relay,
        peer,
        expires: secs(300),
    };
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::Set6(r),
            RouteChange::SetIndications6(i(*r.peer.ip())),
            RouteChange::SetIndications6(i(other)),
        ]
    );
    c.refresh(secs(10), 0);
    pump(&mut s, &mut c, f, secs(10));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::RemoveIndications6(i(*r.peer.ip())),
            RouteChange::RemoveIndications6(i(other)),
            RouteChange::Remove6(r),
        ]
    );

    // Both halves of a dual allocation from an IPv6 client: routes for the
    // IPv6 one alone.
    let (mut c, relayed, relayed6) = dual_allocated(&mut s, five6(2), t0);
    assert!(relayed.is_ipv4() && relayed6.is_ipv6());
    c.bind_channel(t0, peer());
    c.bind_channel(t0, peer6());
    pump(&mut s, &mut c, five6(2), t0);
    let changes: Vec<_> = s.route_changes().collect();
    assert!(
        matches!(
            changes.as_slice(),
            [RouteChange::Set6(r), RouteChange::SetIndications6(i)]
                if SocketAddr::from(r.relay) == relayed6 && SocketAddr::from(i.relay) == relayed6
        ),
        "{changes:?}"
    );

    // Under a bandwidth limit, with the kernel's budgets shared.
    let relays = FakeRelays {
        ipv6: true,
        ..FakeRelays::default()
    };
    let (_budgets, mut s) = with_kernel_budgets(t0, relays);
    let (mut c, relayed) = allocated_in(&mut s, f, t0, true);
    assert!(relayed.is_ipv6());
    c.bind_channel(t0, peer6());
    pump(&mut s, &mut c, f, t0);
    let changes: Vec<_> = s.route_changes().collect();
    assert!(
        matches!(
            changes.as_slice(),
            [RouteChange::Set6(r), RouteChange::SetIndications6(_)]
                if SocketAddr::from(r.relay) == relayed
        ),
        "{changes:?}"
    );
}

/// A server limited to 1,000 B/s per allocation, taking from budgets
/// shared as the kernel relay's are (on a clock at 7 s at `t0`).
fn with_kernel_budgets(t0: Instant, relays: FakeRelays) -> (SharedBudgets, Server<FakeRelays>) {
    let budgets = SharedBudgets::on_the_heap((t0, 7_000_000_000));
    let mut shared = Shared::new(
        Config {
            bps_per_allocation: 1000,
            ..kernel_config()
        },
        b"k",
        (t0, 1_000),
    );
    shared.share_budgets(budgets.clone());
    (budgets, Server::new(Arc::new(shared), relays))
}

/// With a bandwidth limit and the kernel relay's budgets shared, the
/// kernel gets routes, and the workers take from those very budgets (the
/// words of the allocation's relay port, on the kernel's clock), so that
/// what the kernel relays and what they relay count against one limit.
#[test]
fn with_shared_budgets_the_kernel_relays_and_the_workers_take_from_them() {
    let t0 = Instant::now();
    let (budgets, mut s) = with_kernel_budgets(t0, FakeRelays::default());
    let (mut c, relayed) = allocated(&mut s, five(1), t0);
    c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(1), t0);
    assert_ne!(s.route_changes().count(), 0, "routes for the kernel");

    let words = (*budgets.words).as_ref();
    let to_peer = &words[2 * usize::from(relayed.port())];
    let to_client = &words[2 * usize::from(relayed.port()) + 1];
    // The workers relay 400 bytes: paid up to 0.4 s past now, on the
    // kernel's clock.
    let mut framed = c.send_to(peer(), &[0u8; 400]);
    assert_ne!(s.on_client(t0, five(1), &mut framed), Output::None);
    assert_eq!(to_peer.load(Ordering::Relaxed), 7_400_000_000);
    // The kernel spends the rest (as its program would): the workers find
    // nothing left.
    to_peer.store(8_000_000_000, Ordering::Relaxed);
    assert_eq!(s.on_client(t0, five(1), &mut framed), Output::None);
    // Toward the client, the same: the kernel's spending counts.
    to_client.store(8_000_000_000, Ordering::Relaxed);
    let relay = s.relay_of(&five(1)).unwrap();
    let mut buf = vec![0u8; HEADROOM + 5 + TAILROOM];
    assert_eq!(s.on_peer(t0, relay, peer(), &mut buf, 5), Output::None);
    // A second later both are paid for again.
    let later = t0 + Duration::from_secs(1);
    assert_ne!(s.on_peer(later, relay, peer(), &mut buf, 5), Output::None);
    assert_ne!(s.on_client(later, five(1), &mut framed), Output::None);
}

/// The kernel's budgets are by port and family: an IPv6 relay on the same
/// port number as an IPv4 one keeps a budget of its own (once, the two
/// drew from one, and each new allocation refilled it).
#[test]
fn an_ipv6_relay_does_not_share_the_kernels_budget_of_its_port() {
    let t0 = Instant::now();
    let relays = FakeRelays {
        ipv6: true,
        ipv6_reuses_ports: true,
        ..FakeRelays::default()
    };
    let (budgets, mut s) = with_kernel_budgets(t0, relays);
    let (mut c, relayed, relayed6) = dual_allocated(&mut s, five(1), t0);
    assert_eq!(relayed.port(), relayed6.port());
    c.create_permission(t0, peer().ip());
    c.create_permission(t0, peer6().ip());
    pump(&mut s, &mut c, five(1), t0);
    // The kernel spends the whole of the port's budget toward peers.
    let words = (*budgets.words).as_ref();
    words[2 * usize::from(relayed.port())].store(8_000_000_000, Ordering::Relaxed);
    assert_eq!(
        sent_from(&mut s, five(1), c.send_to(peer(), &[0; 400]), t0),
        None
    );
    assert!(sent_from(&mut s, five(1), c.send_to(peer6(), &[0; 400]), t0).is_some());
}

#[test]
fn an_allocation_gets_a_bounded_number_of_kernel_routes() {
    let t0 = Instant::now();
    let (_, mut s) = setup(kernel_config(), t0);
    let f = five(1);
    let (mut c, _) = allocated(&mut s, f, t0);
    let n = KERNEL_ROUTES_PER_ALLOCATION;
    // n + 2 channels: n - 2 to ports of peer A, 4 to ports of peer B; and
    // permissions for C and D, without channels.
    let ip = |last: u8| IpAddr::from([203, 0, 113, last]);
    let (a, b, c_ip, d) = (ip(10), ip(11), ip(12), ip(13));
    let channels: Vec<SocketAddr> = (0..n as u16 - 2)
        .map(|p| SocketAddr::new(a, 4000 + p))
        .chain((0..4).map(|p| SocketAddr::new(b, 4000 + p)))
        .collect();
    for peer in &channels {
        c.bind_channel(t0, *peer);
    }
    c.create_permission(t0, c_ip);
    c.create_permission(t0, d);
    pump(&mut s, &mut c, f, t0);
    let mut maps = KernelMaps::default();
    for change in s.route_changes().collect::<Vec<_>>() {
        maps.apply(change);
    }
    // The first n channels get routes; of the permissions, B's does not:
    // two of B's channels have none, and the kernel must not send those
    // peers Data indications while the server sends them ChannelData.
    let routed: BTreeSet<SocketAddr> = maps.from_peer.keys().map(|(p, _)| *p).collect();
    assert_eq!(routed, channels[..n].iter().copied().collect());
    let permitted: BTreeSet<IpAddr> = maps.from_permitted.keys().map(|(ip, _)| *ip).collect();
    assert_eq!(permitted, [a, c_ip, d].into_iter().collect());
    check_routes(&mut s, &maps, f, t0);
}

/// What a client of the kernel relay does, for the property below.
#[derive(Debug, Clone)]
enum RouteStep {
    Bind {
        peer: usize,
    },
    Permit {
        peer: usize,
    },
    Refresh {
        secs: u16,
    },
    /// Time passes; with `sweep`, the server's timer runs (without, what
    /// has expired is still in its tables, and only the routes' own ends
    /// keep the kernel from following them).
    Wait {
        secs: u16,
        sweep: bool,
    },
    /// Allocates again (after a deletion or expiry).
    Allocate,
}

fn arb_route_step() -> impl proptest::strategy::Strategy<Value = RouteStep> {
    use proptest::prelude::*;
    prop_oneof![
        2 => (0..3usize).prop_map(|peer| RouteStep::Bind { peer }),
        2 => (0..3usize).prop_map(|peer| RouteStep::Permit { peer }),
        1 => prop_oneof![Just(0u16), 1u16..700].prop_map(|secs| RouteStep::Refresh { secs }),
        2 => (prop_oneof![0u16..5, 250u16..350, 550u16..650], any::<bool>())
            .prop_map(|(secs, sweep)| RouteStep::Wait { secs, sweep }),
        1 => Just(RouteStep::Allocate),
    ]
}

/// The kernel's maps as `net::kernel` keeps them: one entry per direction
/// and channel, one per permission, removed only for the flow that set it.
#[derive(Default)]
struct KernelMaps {
    from_client: HashMap<(SocketAddr, u16), KernelRoute<SocketAddr>>,
    from_peer: HashMap<(SocketAddr, SocketAddr), KernelRoute<SocketAddr>>,
    from_permitted: HashMap<(IpAddr, SocketAddr), AnyIndicationRoute>,
}

type AnyIndicationRoute = IndicationRoute<SocketAddr, IpAddr>;

/// A permission's route of either family, with its addresses as
/// `SocketAddr`s and `IpAddr`s.
fn any_family_indication<A: Into<SocketAddr>, I: Into<IpAddr>>(
    r: IndicationRoute<A, I>,
) -> AnyIndicationRoute {
    IndicationRoute {
        client: r.client.into(),
        server: r.server.into(),
        relay: r.relay.into(),
        peer: r.peer.into(),
        expires: r.expires,
    }
}

/// A channel route of either family, with its addresses as `SocketAddr`s.
fn any_family<A: Into<SocketAddr>>(r: KernelRoute<A>) -> KernelRoute<SocketAddr> {
    KernelRoute {
        client: r.client.into(),
        server: r.server.into(),
        channel: r.channel,
        relay: r.relay.into(),
        peer: r.peer.into(),
        expires: r.expires,
    }
}

impl KernelMaps {
    fn set(&mut self, r: KernelRoute<SocketAddr>) {
        self.from_client.insert((r.client, r.channel), r);
        self.from_peer.insert((r.peer, r.relay), r);
    }

    fn remove(&mut self, r: KernelRoute<SocketAddr>) {
        let (c, p) = ((r.client, r.channel), (r.peer, r.relay));
        let same = |o: &KernelRoute<SocketAddr>| o.same_flow(&r);
        if self.from_client.get(&c).is_some_and(same) {
            self.from_client.remove(&c);
        }
        if self.from_peer.get(&p).is_some_and(same) {
            self.from_peer.remove(&p);
        }
    }

    fn apply(&mut self, change: RouteChange) {
        match change {
            RouteChange::Set(r) => self.set(any_family(r)),
            RouteChange::Set6(r) => self.set(any_family(r)),
            RouteChange::Remove(r) => self.remove(any_family(r)),
            RouteChange::Remove6(r) => self.remove(any_family(r)),
            RouteChange::SetIndications(r) => self.permit(any_family_indication(r)),
            RouteChange::SetIndications6(r) => self.permit(any_family_indication(r)),
            RouteChange::RemoveIndications(r) => self.unpermit(any_family_indication(r)),
            RouteChange::RemoveIndications6(r) => self.unpermit(any_family_indication(r)),
        }
    }

    fn permit(&mut self, r: AnyIndicationRoute) {
        self.from_permitted.insert((r.peer, r.relay), r);
    }

    fn unpermit(&mut self, r: AnyIndicationRoute) {
        let key = (r.peer, r.relay);
        if self
            .from_permitted
            .get(&key)
            .is_some_and(|o| o.same_flow(&r))
        {
            self.from_permitted.remove(&key);
        }
    }

    /// How the kernel would pass on data from `peer` to `relay` at `now`:
    /// to which client, on which channel (`None`: as a Data indication).
    fn to_client(
        &self,
        peer: SocketAddr,
        relay: SocketAddr,
        now: Instant,
    ) -> Option<(SocketAddr, Option<u16>)> {
        if let Some(r) = self
            .from_peer
            .get(&(peer, relay))
            .filter(|r| r.expires > now)
        {
            return Some((r.client, Some(r.channel)));
        }
        self.from_permitted
            .get(&(peer.ip(), relay))
            .filter(|r| r.expires > now)
            .map(|r| (r.client, None))
    }
}

/// Checks the kernel's maps against the server at `now`: every route the
/// kernel would follow does what the server would do, and, while the
/// allocation has no more channels and permissions than get routes, every
/// channel and permission the server would relay through has such a route.
fn check_routes(s: &mut Server<FakeRelays>, maps: &KernelMaps, f: FiveTuple, now: Instant) {
    let relay = s.relay_of(&f);
    for r in maps.from_client.values().filter(|r| r.expires > now) {
        let mut framed = ChannelData::header(r.channel, 3).to_vec();
        framed.extend_from_slice(b"abc");
        let out = s.on_client(now, f, &mut framed);
        let relay = relay.expect("a live route without an allocation");
        assert_eq!(
            out,
            Output::ToPeer {
                relay,
                peer: r.peer,
                range: 4..7
            },
            "kernel route {r:?} relays what the server would not"
        );
        assert_eq!(r.relay.port(), 50000 + relay.0 as u16);
    }
    assert!(
        relay.is_some()
            || (maps.from_peer.values().all(|r| r.expires <= now)
                && maps.from_permitted.values().all(|r| r.expires <= now)),
        "a live route without an allocation"
    );
    let Some(relay) = relay else { return };
    let a = s.allocations[relay.0 as usize].as_ref().expect("allocated");
    // From peers: every address a route or the allocation names, and
    // another port of each IP.
    let relay_addr = a.relay_addr;
    let complete = a.access.channels.len() <= KERNEL_ROUTES_PER_ALLOCATION
        && a.access.permissions.len() <= KERNEL_ROUTES_PER_ALLOCATION;
    let mut sources: Vec<SocketAddr> = maps.from_peer.keys().map(|(p, _)| *p).collect();
    sources.extend(a.access.channels.iter().map(|c| c.peer));
    let ips = maps.from_permitted.keys().map(|(ip, _)| *ip);
    let ips = ips.chain(a.access.permissions.iter().map(|(ip, _)| *ip));
    sources.extend(ips.map(|ip| SocketAddr::new(ip, 9999)).collect::<Vec<_>>());
    let channels: Vec<(u16, SocketAddr)> = a
        .access
        .channels
        .iter()
        .map(|c| (c.number, c.peer))
        .collect();
    for from in sources {
        let kernel = maps.to_client(from, relay_addr, now);
        let mut buf = vec![0u8; HEADROOM + 3 + TAILROOM];
        let server = match s.on_peer(now, relay, from, &mut buf, 3) {
            Output::ToClient { to, range } => {
                let framed = &buf[range];
                let channel =
                    (framed[0] & 0xc0 == 0x40).then(|| u16::from_be_bytes([framed[0], framed[1]]));
                if channel.is_none() {
                    let tid: [u8; 12] = framed[8..20].try_into().unwrap();
                    let (prefix, len) = stun::data_indication_prefix(from, 3, &tid);
                    assert_eq!(&framed[..len], &prefix[..len], "a Data indication");
                }
                Some((to.client, channel))
            }
            Output::None => None,
            other => panic!("from a peer: {other:?}"),
        };
        match (kernel, server) {
            (Some(k), s) => assert_eq!(
                Some(k),
                s,
                "from {from}: the kernel relays what the server would not"
            ),
            (None, Some(s)) if complete => {
                panic!("from {from}: the server relays {s:?} but the kernel has no live route")
            }
            (None, _) => {}
        }
    }
    for (number, peer) in channels {
        let mut framed = ChannelData::header(number, 3).to_vec();
        framed.extend_from_slice(b"abc");
        if let (Output::ToPeer { .. }, true) = (s.on_client(now, f, &mut framed), complete) {
            let r = maps.from_client.get(&(f.client, number));
            assert!(
                r.is_some_and(|r| r.expires > now && r.peer == peer),
                "channel {number:#x} to {peer} is relayed by the server but has no live route: {r:?}"
            );
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    /// The kernel relay never relays what the server would not, and
    /// relays every channel the server would: whatever the channels,
    /// permissions, refreshes, deletions and expiries, the routes the
    /// server reports, applied in order, match its own decisions at every
    /// moment.
    #[test]
    fn kernel_routes_match_what_the_server_relays(
        steps in proptest::collection::vec(arb_route_step(), 1..40),
        ipv6 in proptest::prelude::any::<bool>(),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let (f, peers, mut s): (_, [SocketAddr; 3], _) = if ipv6 {
            let mut cfg = kernel_config();
            cfg.relay_ips = vec![relay_ip(), relay_ip6()];
            (
                five6(1),
                [
                    "[2001:db8::9]:4000".parse().unwrap(),
                    "[2001:db8::9]:4001".parse().unwrap(),
                    "[2001:db8::10]:4000".parse().unwrap(),
                ],
                dual_setup(cfg, t0),
            )
        } else {
            (
                five(1),
                [
                    "203.0.113.9:4000".parse().unwrap(),
                    "203.0.113.9:4001".parse().unwrap(),
                    "203.0.113.10:4000".parse().unwrap(),
                ],
                setup(kernel_config(), t0).1,
            )
        };
        let mut maps = KernelMaps::default();
        let (mut c, _) = allocated_in(&mut s, f, t0, ipv6);
        for step in &steps {
            match *step {
                RouteStep::Bind { peer } => {
                    c.bind_channel(now, peers[peer]);
                }
                RouteStep::Permit { peer } => c.create_permission(now, peers[peer].ip()),
                RouteStep::Refresh { secs } => c.refresh(now, secs.into()),
                RouteStep::Wait { secs, sweep } => {
                    now += Duration::from_secs(secs.into());
                    if sweep {
                        s.on_timeout(now);
                    }
                }
                RouteStep::Allocate => {
                    if s.relay_of(&f).is_none() {
                        c = allocated_in(&mut s, f, now, ipv6).0;
                    }
                }
            }
            pump(&mut s, &mut c, f, now);
            for change in s.route_changes().collect::<Vec<_>>() {
                maps.apply(change);
            }
            check_routes(&mut s, &maps, f, now);
        }
    }
}

/// A server whose relays record DF (IPv6 ones too), and their record.
fn setup_df(cfg: Config, now: Instant) -> (Server<FakeRelays>, FakeRelays) {
    let relays = FakeRelays {
        ipv6: true,
        ..FakeRelays::default()
    };
    (setup_with(cfg, &relays, now).1, relays)
}

/// Relays on which DF cannot be set.
fn without_dont_fragment() -> FakeRelays {
    FakeRelays {
        no_dont_fragment: true,
        ..FakeRelays::default()
    }
}

#[test]
fn dont_fragment_in_an_allocate_sets_df_on_each_of_its_relays() {
    let now = Instant::now();
    let mut cfg = config();
    cfg.relay_ips = vec![relay_ip(), relay_ip6()];
    let (mut s, relays) = setup_df(cfg, now);
    // Without the attribute, the system's default.
    allocated(&mut s, five(1), now);
    assert!(relays.dont_fragment.borrow().is_empty());

    // With it, on a dual allocation: both relays, each in its family.
    let mut c = Client::new(USER, PASS, false, 2);
    c.set_dont_fragment(true);
    c.allocate_dual(now);
    let events = pump(&mut s, &mut c, five(2), now);
    assert!(
        matches!(
            events.as_slice(),
            [Event::Allocated { .. }, Event::Ipv6Relay(Ok(_))]
        ),
        "{events:?}"
    );
    let [Some(v4), Some(v6)] = s.relays_of(&five(2)) else {
        panic!("a dual allocation")
    };
    assert_eq!(
        *relays.dont_fragment.borrow(),
        BTreeSet::from([(v4.0, false), (v6.0, true)])
    );

    // A server that cannot set DF refuses the Allocate, and keeps nothing.
    let relays = without_dont_fragment();
    let (shared, mut s) = setup_with(config(), &relays, now);
    let mut c = Client::new(USER, PASS, false, 3);
    c.set_dont_fragment(true);
    c.allocate(now);
    assert_eq!(failed_code(&pump(&mut s, &mut c, five(3), now)), 508);
    assert_eq!(shared.allocation_count(), 0);
    assert!(
        relays.live.borrow().is_empty(),
        "the relay socket is closed"
    );
}

#[test]
fn a_send_indication_with_dont_fragment_sets_df_from_then_on() {
    let now = Instant::now();
    let (mut s, relays) = setup_df(config(), now);
    let (mut c, _) = allocated(&mut s, five(1), now);
    let relay = s.relay_of(&five(1)).unwrap();
    // Not for a peer without a permission: that indication is dropped.
    c.set_dont_fragment(true);
    let mut unpermitted = c.send_to(peer(), b"x");
    assert_eq!(s.on_client(now, five(1), &mut unpermitted), Output::None);
    assert!(relays.dont_fragment.borrow().is_empty());

    c.create_permission(now, peer().ip());
    pump(&mut s, &mut c, five(1), now);
    c.set_dont_fragment(false);
    let mut plain = c.send_to(peer(), b"plain");
    assert!(matches!(
        s.on_client(now, five(1), &mut plain),
        Output::ToPeer { .. }
    ));
    assert!(relays.dont_fragment.borrow().is_empty());
    c.set_dont_fragment(true);
    let mut df = c.send_to(peer(), b"df");
    assert!(matches!(
        s.on_client(now, five(1), &mut df),
        Output::ToPeer { .. }
    ));
    assert_eq!(
        *relays.dont_fragment.borrow(),
        BTreeSet::from([(relay.0, false)])
    );

    // Where DF cannot be set, the indication is discarded (RFC 8656 §11.2).
    let (_, mut s) = setup_with(config(), &without_dont_fragment(), now);
    let (mut c, _) = allocated(&mut s, five(2), now);
    c.create_permission(now, peer().ip());
    pump(&mut s, &mut c, five(2), now);
    let mut plain = c.send_to(peer(), b"plain");
    assert!(matches!(
        s.on_client(now, five(2), &mut plain),
        Output::ToPeer { .. }
    ));
    c.set_dont_fragment(true);
    let mut df = c.send_to(peer(), b"df");
    assert_eq!(s.on_client(now, five(2), &mut df), Output::None);
}

#[test]
fn dont_fragment_takes_an_allocation_out_of_the_kernel_relay() {
    let t0 = Instant::now();
    let (mut s, _) = setup_df(kernel_config(), t0);
    let (mut c, relayed) = allocated(&mut s, five(1), t0);
    let ch = c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(1), t0);
    let expires = t0 + Duration::from_secs(300);
    assert_eq!(
        s.route_changes().count(),
        2,
        "a channel route and an indication route"
    );
    // DF from a Send indication: the kernel forgets both routes, since it
    // keeps the DF bit the client's datagram came with.
    c.set_dont_fragment(true);
    let mut tid_only = MessageBuilder::new(method::SEND, Class::Indication, &[9; 12]);
    tid_only
        .xor_address(attr::XOR_PEER_ADDRESS, peer())
        .attr(attr::DATA, b"df")
        .attr(attr::DONT_FRAGMENT, &[]);
    assert!(matches!(
        s.on_client(t0, five(1), &mut tid_only.finish()),
        Output::ToPeer { .. }
    ));
    assert_eq!(
        s.route_changes().collect::<Vec<_>>(),
        [
            RouteChange::RemoveIndications(indication_route(
                five(1),
                relayed,
                peer().ip(),
                expires
            )),
            RouteChange::Remove(route(five(1), ch, relayed, peer(), expires)),
        ]
    );
    // And learns none after.
    c.create_permission(t0 + Duration::from_secs(60), peer().ip());
    pump(&mut s, &mut c, five(1), t0 + Duration::from_secs(60));
    assert_eq!(s.route_changes().count(), 0);

    // An allocation that asks in its Allocate never gets routes.
    let mut c = Client::new(USER, PASS, false, 2);
    c.set_dont_fragment(true);
    c.allocate(t0);
    pump(&mut s, &mut c, five(2), t0);
    c.bind_channel(t0, peer());
    pump(&mut s, &mut c, five(2), t0);
    assert_eq!(s.route_changes().count(), 0);
}
