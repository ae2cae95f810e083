//! A plain UDP forwarder on the same I/O path as the TURN UDP workers
//! (mio, recvmmsg with the same growing reads, sendmmsg and GSO), with no
//! protocol at all: the practical ceiling of packets per second for a relay
//! on this machine.
//!
//! A client opens a lane by sending `LANE <dest>` from its socket; the
//! forwarder binds a lane socket, answers with its address, and from then
//! on forwards client → dest through the lane socket and dest → client
//! through the main socket.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callisto_turn::net::batch::{self, ReadRamp, RecvBatch, SendBatch};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

const MAIN: Token = Token(0);

/// Runs until `stop`; `ready` receives the main socket's address.
pub fn run(
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<SocketAddr>,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let std = StdUdpSocket::bind(listen)?;
    std.set_nonblocking(true)?;
    // As the TURN workers do: each datagram's TOS is read and passed on.
    batch::receive_tos(&std, listen.is_ipv6())?;
    let _ = ready.send(std.local_addr()?);
    let mut main = UdpSocket::from_std(std);
    poll.registry()
        .register(&mut main, MAIN, Interest::READABLE)?;
    // Lanes by client address, and lane sockets by token.
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut lanes: Vec<(UdpSocket, SocketAddr, SocketAddr)> = Vec::new(); // (socket, client, dest)
    let mut rx: Box<RecvBatch> = Box::default();
    let mut tx = SendBatch::default();
    let mut out: Vec<(usize, SocketAddr, u8, std::ops::Range<usize>)> = Vec::new();
    let mut events = Events::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        let polled = std::time::Instant::now();
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        // As the TURN workers do: small first reads after a wait.
        let first = batch::first_read(polled.elapsed());
        for ev in events.iter() {
            if ev.token() == MAIN {
                let mut ramp = ReadRamp::new(usize::MAX, first);
                while let Some(want) = ramp.next() {
                    let n = match rx.recv_up_to(&main, 0, want) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            ramp.failed();
                            continue;
                        }
                    };
                    out.clear();
                    for i in 0..n {
                        let (Some(from), len) = (rx.addrs[i], rx.lens[i]) else {
                            continue;
                        };
                        if let Some(&lane) = by_client.get(&from) {
                            let range = i * batch::SLOT..i * batch::SLOT + len;
                            out.push((lane, lanes[lane].2, rx.tos[i], range));
                        } else if let Some(dest) = std::str::from_utf8(&rx.slot(i)[..len])
                            .ok()
                            .and_then(|t| t.strip_prefix("LANE "))
                            .and_then(|d| d.trim().parse::<SocketAddr>().ok())
                        {
                            let s = StdUdpSocket::bind(SocketAddr::new(listen.ip(), 0))?;
                            s.set_nonblocking(true)?;
                            batch::receive_tos(&s, listen.is_ipv6())?;
                            let addr = s.local_addr()?;
                            let mut s = UdpSocket::from_std(s);
                            poll.registry().register(
                                &mut s,
                                Token(lanes.len() + 1),
                                Interest::READABLE,
                            )?;
                            by_client.insert(from, lanes.len());
                            lanes.push((s, from, dest));
                            let _ = main.send_to(addr.to_string().as_bytes(), from);
                        }
                    }
                    let all = rx.slot_all();
                    for run in out.chunk_by(|a, b| a.0 == b.0) {
                        tx.send_coalescing(
                            &lanes[run[0].0].0,
                            run.iter()
                                .map(|(_, dest, tos, r)| (*dest, *tos, &all[r.clone()])),
                            n == batch::BATCH,
                        );
                    }
                    if !ramp.got(want, n) {
                        break;
                    }
                }
            } else {
                let lane = ev.token().0 - 1;
                let mut ramp = ReadRamp::new(usize::MAX, first);
                while let Some(want) = ramp.next() {
                    let n = match rx.recv_up_to(&lanes[lane].0, 0, want) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            ramp.failed();
                            continue;
                        }
                    };
                    let client = lanes[lane].1;
                    let all = rx.slot_all();
                    tx.send_coalescing(
                        &main,
                        (0..n).map(|i| {
                            let range = i * batch::SLOT..i * batch::SLOT + rx.lens[i];
                            (client, rx.tos[i], &all[range])
                        }),
                        n == batch::BATCH,
                    );
                    if !ramp.got(want, n) {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}
