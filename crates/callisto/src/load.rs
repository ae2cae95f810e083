//! `callisto load`: many native peers (crate `callisto-peer`) against one
//! server, in rooms of their own, for a bounded time. Each peer meets the
//! others of its room, then writes in the chat at a steady rate once it
//! is connected to all of them; each message carries when it was sent,
//! so the receivers measure its delivery (signaling, ICE, DTLS and SCTP
//! all in the path). The report says how many joined and connected, how
//! long that took, and whether every message arrived.
//!
//! With `--media`, those taking part send the test pattern and the tone
//! (about 210 kbit/s) to everyone they meet, and the report counts the
//! frames received. With `--watching`, some of each room's peers join to watch, as a
//! broadcast's audience: they meet only those taking part.
//!
//! Everything is bounded: the number of peers (250 rooms of at most 16),
//! the time (at most 600 s), and each peer stops writing a second before
//! the end, so what is in flight lands before everyone leaves.

use std::time::{Duration, Instant};

use anyhow::Context;
use callisto_peer::{
    Command, Fingerprint, MediaCounts, PeerConfig, PeerEvent, RelayTransport, RelayUse, Running,
};
use serde_json::json;

use crate::cli::LoadArgs;

/// Chat stops this long before everyone leaves.
const QUIET_BEFORE_LEAVING: Duration = Duration::from_secs(1);
/// How long a peer is given to leave after the end, before it counts as stuck.
const LEAVE_GRACE: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub server: String,
    pub rooms: u32,
    pub peers: u32,
    /// Of each room's `peers`, how many (the last to join) watch.
    pub watching: u32,
    pub duration: Duration,
    pub ramp: Duration,
    /// Between two chat messages of one peer; none: no chat.
    pub chat_every: Option<Duration>,
    pub access: Option<String>,
    pub pin: Option<Fingerprint>,
    /// Through the server's TURN only, or directly.
    pub relay: RelayUse,
    /// How they reach the TURN server for that.
    pub relay_over: RelayTransport,
    /// Whether those taking part send the test pattern and the tone.
    pub send_media: bool,
}

impl LoadPlan {
    fn from_args(args: &LoadArgs) -> anyhow::Result<LoadPlan> {
        let seconds = |value: f64, flag: &str| {
            if value.is_finite() && (0.0..=600.0).contains(&value) {
                Ok(value)
            } else {
                Err(anyhow::anyhow!("{flag} {value}: give 0 to 600"))
            }
        };
        let ramp = seconds(args.ramp, "--ramp")?;
        let rate = seconds(args.chat_rate, "--chat-rate")?;
        if args.watching >= args.peers {
            anyhow::bail!(
                "--watching {} leaves none of the --peers {} taking part: there would be nothing to watch",
                args.watching,
                args.peers
            );
        }
        if ramp >= f64::from(args.duration) {
            anyhow::bail!(
                "--ramp {ramp} is not shorter than --for {}: nobody would stay",
                args.duration
            );
        }
        Ok(LoadPlan {
            server: args.target.server.clone(),
            rooms: args.rooms,
            peers: args.peers,
            watching: args.watching,
            duration: Duration::from_secs(u64::from(args.duration)),
            ramp: Duration::from_secs_f64(ramp),
            chat_every: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
            access: args.target.access.clone(),
            pin: args.target.tls_fingerprint,
            relay: if args.relay_only {
                RelayUse::Only
            } else {
                RelayUse::Never
            },
            relay_over: args.relay_over.into(),
            send_media: args.media,
        })
    }
}

/// p50, p99 and the largest of some durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Spread {
    fn of(mut samples: Vec<Duration>) -> Option<Spread> {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        (!samples.is_empty()).then(|| Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

/// What a load run showed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub peers: usize,
    pub joined: usize,
    /// From asking to join to `welcome`.
    pub join: Option<Spread>,
    /// Connections up, counted at both ends, and how many there should be.
    pub connections: usize,
    pub connections_expected: usize,
    /// From `welcome` to each connection up.
    pub connect: Option<Spread>,
    pub chat_sent: u64,
    pub chat_received: u64,
    /// Every message written by a peer connected to all the others of its
    /// room, times those others.
    pub chat_expected: u64,
    /// From writing a message to its arrival.
    pub chat: Option<Spread>,
    /// Media received, all peers together (with `send_media`).
    pub media: MediaCounts,
    pub errors: Vec<String>,
}

impl Report {
    /// Everyone joined, connected to everyone, heard everything, and left cleanly.
    pub fn all_well(&self) -> bool {
        self.joined == self.peers
            && self.connections == self.connections_expected
            && self.chat_received == self.chat_expected
            && self.errors.is_empty()
    }
}

#[derive(Debug, Default)]
struct PeerOutcome {
    join: Option<Duration>,
    connects: Vec<Duration>,
    sent: u64,
    expected: u64,
    received: u64,
    latencies: Vec<Duration>,
    media: MediaCounts,
    error: Option<String>,
}

/// Runs the plan and reports.
pub async fn load(plan: &LoadPlan) -> anyhow::Result<Report> {
    let mut tag = [0u8; 6];
    getrandom::fill(&mut tag).context("reading random bytes for the room names")?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let epoch = Instant::now();
    let end = epoch + plan.duration;
    let total = plan.rooms * plan.peers;
    let taking_part = plan.peers - plan.watching.min(plan.peers - 1);
    let mut tasks = Vec::new();
    let mut connections_expected = 0;
    for i in 0..total {
        let (room, seat) = (i / plan.peers, i % plan.peers);
        let watching = seat >= taking_part;
        // Whom it meets, and so whom its messages reach: everyone else,
        // or, watching, those taking part alone.
        let others = if watching {
            taking_part
        } else {
            plan.peers - 1
        };
        connections_expected += others as usize;
        let start = epoch + plan.ramp.mul_f64(f64::from(i) / f64::from(total));
        let config = PeerConfig {
            server: plan.server.clone(),
            room: format!("load-{tag}-{room}"),
            name: format!("load {room}/{seat}"),
            watching,
            access: plan.access.clone(),
            bind: None,
            pin: plan.pin,
            relay: plan.relay,
            send_media: plan.send_media,
            save_files: None,
            relay_over: plan.relay_over,
        };
        tasks.push(tokio::spawn(one_peer(
            config,
            u64::from(others),
            plan.chat_every,
            epoch,
            start,
            end,
        )));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| PeerOutcome {
            error: Some(format!("the peer's task failed: {e}")),
            ..PeerOutcome::default()
        }));
    }
    let peers = outcomes.len();
    let mut report = Report {
        peers,
        connections_expected,
        ..Report::default()
    };
    let (mut joins, mut connects, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    for outcome in outcomes {
        report.joined += usize::from(outcome.join.is_some());
        joins.extend(outcome.join);
        report.connections += outcome.connects.len();
        connects.extend(outcome.connects);
        report.chat_sent += outcome.sent;
        report.chat_expected += outcome.expected;
        report.chat_received += outcome.received;
        latencies.extend(outcome.latencies);
        report.media += outcome.media;
        report.errors.extend(outcome.error);
    }
    report.join = Spread::of(joins);
    report.connect = Spread::of(connects);
    report.chat = Spread::of(latencies);
    Ok(report)
}

/// One peer: joins at `start`, chats once connected to all `others`,
/// leaves at `end`.
async fn one_peer(
    config: PeerConfig,
    others: u64,
    chat_every: Option<Duration>,
    epoch: Instant,
    start: Instant,
    end: Instant,
) -> PeerOutcome {
    tokio::time::sleep_until(start.into()).await;
    let asked = Instant::now();
    let Running {
        commands,
        mut events,
        task: peer,
    } = callisto_peer::spawn(config);
    let mut out = PeerOutcome::default();
    let mut joined_at = None;
    let mut ticks = tokio::time::interval(chat_every.unwrap_or(Duration::from_secs(3600)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let quiet = end - QUIET_BEFORE_LEAVING;
    let mut leaving = false;
    loop {
        let ready = chat_every.is_some()
            && out.connects.len() as u64 == others
            && Instant::now() < quiet
            && !leaving;
        tokio::select! {
            event = events.recv() => match event {
                Some(PeerEvent::Joined { .. }) if joined_at.is_none() => {
                    let now = Instant::now();
                    joined_at = Some(now);
                    out.join = Some(now - asked);
                }
                Some(PeerEvent::Connected { .. }) => {
                    let since = joined_at.map_or(Duration::ZERO, |at| at.elapsed());
                    out.connects.push(since);
                }
                Some(PeerEvent::Chat { text, .. }) => {
                    if let Some(sent) = text.strip_prefix("load ").and_then(|t| t.split(' ').nth(1)).and_then(|us| us.parse::<u64>().ok()) {
                        out.received += 1;
                        out.latencies.push(epoch.elapsed().saturating_sub(Duration::from_micros(sent)));
                    }
                }
                Some(_) => {}
                // The peer ended: left, or failed (its result says).
                None => break,
            },
            _ = ticks.tick(), if ready => {
                let text = format!("load {} {}", out.sent, epoch.elapsed().as_micros());
                if commands.send(Command::Chat { text, to: None }).is_ok() {
                    out.sent += 1;
                    out.expected += others;
                }
            }
            () = tokio::time::sleep_until(end.into()), if !leaving => {
                leaving = true;
                let _ = commands.send(Command::Leave);
            }
        }
    }
    match tokio::time::timeout(LEAVE_GRACE, peer).await {
        Ok(Ok(Ok(summary))) => {
            for p in summary.peers {
                out.media += p.media;
            }
        }
        Ok(Ok(Err(e))) => out.error = Some(e.to_string()),
        Ok(Err(e)) => out.error = Some(format!("the peer's task failed: {e}")),
        Err(_) => out.error = Some("did not leave in time".into()),
    }
    out
}

/// `callisto load`: runs and prints the report; whether all went well.
pub async fn run(args: LoadArgs) -> anyhow::Result<bool> {
    let plan = LoadPlan::from_args(&args)?;
    let report = load(&plan).await?;
    let mut errors: Vec<(String, usize)> = Vec::new();
    for error in &report.errors {
        match errors.iter_mut().find(|(e, _)| e == error) {
            Some((_, n)) => *n += 1,
            None => errors.push((error.clone(), 1)),
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let spread_json = |s: Option<Spread>| {
        s.map(|s| json!({"p50Ms": ms(s.p50), "p99Ms": ms(s.p99), "maxMs": ms(s.max)}))
    };
    if args.json {
        let value = json!({
            "server": plan.server, "rooms": plan.rooms, "peersPerRoom": plan.peers,
            "watchingPerRoom": plan.watching,
            "seconds": plan.duration.as_secs(),
            "peers": report.peers, "joined": report.joined, "join": spread_json(report.join),
            "connections": report.connections, "connectionsExpected": report.connections_expected,
            "connect": spread_json(report.connect),
            "chatSent": report.chat_sent, "chatReceived": report.chat_received,
            "chatExpected": report.chat_expected, "chat": spread_json(report.chat),
            "media": plan.send_media,
            "videoFramesReceived": report.media.video_frames, "audioFramesReceived": report.media.audio_frames,
            "errors": errors.iter().map(|(e, n)| json!({"error": e, "peers": n})).collect::<Vec<_>>(),
            "allWell": report.all_well(),
        });
        println!("{value}");
    } else {
        let spread = |s: Option<Spread>| match s {
            Some(s) => format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            ),
            None => "-".into(),
        };
        println!(
            "{} rooms of {} peers ({} watching) on {}, for {} s",
            plan.rooms,
            plan.peers,
            plan.watching,
            plan.server,
            plan.duration.as_secs()
        );
        println!(
            "joined:      {} of {}; {}",
            report.joined,
            report.peers,
            spread(report.join)
        );
        println!(
            "connections: {} of {} (each counted at both ends); after joining, {}",
            report.connections,
            report.connections_expected,
            spread(report.connect)
        );
        println!(
            "chat:        {} written, {} of {} received; {}",
            report.chat_sent,
            report.chat_received,
            report.chat_expected,
            spread(report.chat)
        );
        if plan.send_media {
            println!(
                "media:       {} video and {} audio frames received",
                report.media.video_frames, report.media.audio_frames
            );
        }
        if errors.is_empty() {
            println!("errors:      none");
        }
        for (error, n) in &errors {
            println!("error ({n} peers): {error}");
        }
    }
    Ok(report.all_well())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_pick_their_ranks() {
        let ms = Duration::from_millis;
        assert_eq!(Spread::of(vec![]), None);
        assert_eq!(
            Spread::of(vec![ms(3)]),
            Some(Spread {
                p50: ms(3),
                p99: ms(3),
                max: ms(3)
            })
        );
        let hundred: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = Spread::of(hundred).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (ms(51), ms(99), ms(100)));
    }
}
