//! "No heap allocation per relayed packet in steady state", shown: a
//! counting allocator around the real UDP driver (its worker thread, real
//! sockets on loopback, the state machine) while ChannelData and Send/Data
//! indications are relayed both ways. A test binary of its own, because the
//! allocator is process-wide: nothing else may run while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callisto_turn::auth::Credentials;
use callisto_turn::client::{Client, Event};
use callisto_turn::net::RelayConfig;
use callisto_turn::net::udp::UdpWorkers;
use callisto_turn::policy::PeerPolicy;
use callisto_turn::server::{Config, Shared};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn socket() -> UdpSocket {
    let s = UdpSocket::bind((LOOPBACK, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Runs the client's transactions over `sock` until `done` sees its event.
fn drive(sock: &UdpSocket, server: SocketAddr, client: &mut Client, done: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        while let Some(t) = client.poll_transmit() {
            sock.send_to(&t, server).unwrap();
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            client.handle_input(Instant::now(), &buf[..n]);
        }
        while let Some(e) = client.poll_event() {
            assert!(!matches!(e, Event::Failed { .. }), "{e:?}");
            if done(&e) {
                return;
            }
        }
    }
    panic!("the server did not answer");
}

#[test]
fn relaying_allocates_nothing_in_steady_state() {
    let mut credentials = Credentials::new("no-alloc");
    credentials.add_user("u", "p");
    let config = Config {
        credentials,
        policy: PeerPolicy::new(vec!["127.0.0.1/32".parse().unwrap()], vec![]),
        relay_ips: vec![LOOPBACK],
        relay_ports: 20000..=60999,
        ..Config::default()
    };
    let shared = Arc::new(Shared::with_system_clock(config, b"no-alloc nonce key"));
    let relay = RelayConfig {
        ipv4: Some(LOOPBACK),
        ipv6: None,
        ports: 20000..=60999,
    };
    let workers = UdpWorkers::start((LOOPBACK, 0).into(), 1, relay, shared, None).unwrap();
    let server = workers.local_addr;

    let (sock, by_channel, by_indication) = (socket(), socket(), socket());
    let (channel_peer, indication_peer) = (
        by_channel.local_addr().unwrap(),
        by_indication.local_addr().unwrap(),
    );
    let mut client = Client::new("u", "p", false, 7);
    let now = Instant::now();
    client.allocate(now);
    drive(&sock, server, &mut client, |e| {
        matches!(e, Event::Allocated { .. })
    });
    let relayed = client.relayed_address().unwrap();
    client.bind_channel(now, channel_peer);
    drive(&sock, server, &mut client, |e| {
        matches!(e, Event::ChannelBound { .. })
    });
    // The channel's permission covers the IP, so the other peer goes by
    // Send and Data indications.

    let payload = [0x5a; 200];
    let to_channel = client.send_to(channel_peer, &payload);
    let to_indication = client.send_to(indication_peer, &payload);
    assert_ne!(to_channel[0] & 0xC0, 0, "ChannelData");
    assert_eq!(to_indication[0] & 0xC0, 0, "a STUN Send indication");
    let (mut at_peer, mut at_client) = ([0u8; 2048], [0u8; 2048]);
    let mut round_trips = |count: usize| {
        for _ in 0..count {
            for (frame, peer) in [(&to_channel, &by_channel), (&to_indication, &by_indication)] {
                sock.send_to(frame, server).unwrap();
                let (n, from) = peer.recv_from(&mut at_peer).unwrap();
                assert_eq!((&at_peer[..n], from), (&payload[..], relayed));
                peer.send_to(&at_peer[..n], relayed).unwrap();
                let (n, from) = sock.recv_from(&mut at_client).unwrap();
                assert_eq!(from, server);
                assert!(n > payload.len() && at_client[..n].ends_with(&payload));
            }
        }
    };

    round_trips(200); // warm-up: every lazily built table is built
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    round_trips(2000);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
    workers.stop();
    assert_eq!(
        allocations, 0,
        "8,000 relayed packets (ChannelData and indications, both ways) allocated {allocations} times"
    );
}
