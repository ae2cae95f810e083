//! `callisto bench turn --generator uclient`: the same servers, loaded by
//! coturn's own test client, `turnutils_uclient`, instead of ours.
//!
//! The issue's reference figures (coturn ≈ 4.7 µs of server CPU per relayed
//! packet in pattern (a), turn-rs losing packets in (b)) were measured with
//! this client, so this mode repeats that measurement for every server, in
//! one run, with the servers taking turns. uclient paces itself (one message
//! per client every millisecond at most; in practice 20–25 k packets/s on
//! this machine) and reports RTT in whole milliseconds, so the rows give
//! server CPU per relayed packet, loss and memory; rates and latency come
//! from our own generator.
//!
//! - Pattern (a): `-e 127.0.0.1 -r PORT` against `turnutils_peer` as echo
//!   peer; every message is relayed to the peer and its echo back.
//! - Pattern (b): `-y`, client to client; every message is relayed out of
//!   one allocation and into the other.
//!
//! Either way a delivered message is two relayed packets and a message lost
//! on the way at least one, so relayed packets are counted as messages
//! sent + messages received.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::turn::{
    Figures, PASS, Target, USER, free_port, proc_cpu_seconds, softirq_threads_cpu_seconds,
};
use crate::cli::{BenchPattern, BenchTurnArgs};

/// What uclient's last lines say about a run.
#[derive(Debug, Clone, PartialEq)]
pub struct UclientTotals {
    pub sent: u64,
    pub received: u64,
    /// uclient's own loss figure, in percent.
    pub lost_percent: f64,
}

/// Reads the totals from uclient's output: the last
/// `tot_send_msgs=N, tot_recv_msgs=M` (its running totals end with the
/// final ones) and `Total lost packets N (P%)`. `None` if the run did not
/// get that far.
pub fn parse_totals(output: &str) -> Option<UclientTotals> {
    let number_after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let (sent, received) = output.lines().rev().find_map(|line| {
        Some((
            number_after(line, "tot_send_msgs=")?,
            number_after(line, "tot_recv_msgs=")?,
        ))
    })?;
    let lost_percent = output.lines().rev().find_map(|line| {
        let rest = &line[line.find("Total lost packets")?..];
        let inside = &rest[rest.find('(')? + 1..];
        inside[..inside.find('%')?].trim().parse::<f64>().ok()
    })?;
    Some(UclientTotals {
        sent,
        received,
        lost_percent,
    })
}

/// A helper process killed when dropped, whatever happened meanwhile.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs uclient once against `target`: `clients` sessions (pattern b: `-y`,
/// so they pair up), `messages` each of `payload` bytes.
pub(super) fn measure(
    target: &Target,
    pattern: BenchPattern,
    clients: usize,
    payload: usize,
    args: &BenchTurnArgs,
) -> Result<Figures, String> {
    run(target, pattern, clients, payload, args).map_err(|e| format!("{e:#}"))
}

fn run(
    target: &Target,
    pattern: BenchPattern,
    clients: usize,
    payload: usize,
    args: &BenchTurnArgs,
) -> anyhow::Result<Figures> {
    let mut uclient = Command::new("turnutils_uclient");
    uclient
        .args(["-u", USER, "-w", PASS, "-c", "-z", "1"])
        .args([
            "-p",
            &target.tls_port.unwrap_or(target.addr.port()).to_string(),
        ])
        .args(["-m", &clients.to_string()])
        .args(["-n", &args.uclient_messages.to_string()])
        .args(["-l", &payload.to_string()])
        .args(args.uclient_tcp.then_some("-t"))
        .args(args.uclient_tls.then_some("-S"))
        .args(args.send_indications.then_some("-s"));
    // Kept alive until uclient is done (pattern a only).
    let _peer = match pattern {
        BenchPattern::A => {
            let port = free_port()?;
            let peer = Command::new("turnutils_peer")
                .args(["-L", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting turnutils_peer (apt-get install coturn)")?;
            uclient.args(["-e", "127.0.0.1", "-r", &port.to_string()]);
            std::thread::sleep(Duration::from_millis(200));
            Some(Reaped(peer))
        }
        BenchPattern::B => {
            uclient.arg("-y");
            None
        }
    };
    uclient.arg(target.addr.ip().to_string());
    let cpu0 = target.cpu_seconds();
    let peer_cpu = || {
        _peer
            .as_ref()
            .and_then(|p| proc_cpu_seconds(p.0.id()))
            .unwrap_or(0.0)
    };
    let others0 = peer_cpu() + softirq_threads_cpu_seconds() + children_cpu_seconds();
    let mut child = Reaped(
        uclient
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting turnutils_uclient (apt-get install coturn)")?,
    );
    // uclient sets up its sessions one after another (about 0.1 s each),
    // then sends for messages/1000 s at least; a run that takes far longer
    // is stuck, and is ended rather than waited for.
    let limit = Duration::from_secs(60)
        .saturating_add(Duration::from_millis(200).saturating_mul(clients as u32))
        .saturating_add(Duration::from_millis(
            args.uclient_messages.saturating_mul(10),
        ));
    let mut stdout = child.0.stdout.take().context("uclient's output")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            bail!("turnutils_uclient did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu = target.cpu_seconds() - cpu0;
    // uclient has been waited for: its time is in the children's now.
    let total_cpu =
        cpu + peer_cpu() + softirq_threads_cpu_seconds() + children_cpu_seconds() - others0;
    let output = reader.join().unwrap_or_default();
    let last_lines = || {
        let lines: Vec<&str> = output.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    };
    if !status.success() {
        bail!("turnutils_uclient failed ({status}): {}", last_lines());
    }
    let totals = parse_totals(&output)
        .with_context(|| format!("no totals in uclient's output: {}", last_lines()))?;
    let relayed = totals.sent + totals.received;
    Ok([
        f64::NAN,
        f64::NAN,
        f64::NAN,
        cpu * 1e6 / relayed.max(1) as f64,
        total_cpu * 1e6 / relayed.max(1) as f64,
        f64::NAN,
        f64::NAN,
        totals.lost_percent,
        target.rss_mib(),
    ])
}

/// CPU time of this process's children that have ended and been waited
/// for, in seconds: across one uclient run, uclient's own (the servers and
/// the echo peer are still running, and the earlier ones were waited for
/// before it started).
fn children_cpu_seconds() -> f64 {
    // SAFETY: a zeroed rusage is valid, and getrusage writes only into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tail of a real run (coturn 4.6.1's uclient against Callisto).
    const TAIL: &str = "\
5: : start_mclient: msz=10, tot_send_msgs=1599, tot_recv_msgs=1596, tot_send_bytes ~ 159900, tot_recv_bytes ~ 159600
6: : start_mclient: tot_send_msgs=2000, tot_recv_msgs=1998
6: : start_mclient: tot_send_bytes ~ 200000, tot_recv_bytes ~ 199800
6: : Total transmit time is 6
6: : Total lost packets 2 (0.100000%), total send dropped 0 (0.000000%)
6: : Average round trip delay 0.000000 ms; min = 0 ms, max = 0 ms
";

    #[test]
    fn the_final_totals_are_read_not_the_running_ones() {
        assert_eq!(
            parse_totals(TAIL),
            Some(UclientTotals {
                sent: 2000,
                received: 1998,
                lost_percent: 0.1
            })
        );
    }

    #[test]
    fn a_run_that_stopped_early_has_no_totals() {
        assert_eq!(
            parse_totals("0: : error 508 (Insufficient Capacity)\n"),
            None
        );
        let no_loss_line: String = TAIL
            .lines()
            .filter(|l| !l.contains("lost"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_totals(&no_loss_line), None);
    }

    proptest! {
        #[test]
        fn arbitrary_output_never_panics(text in ".{0,400}") {
            let _ = parse_totals(&text);
        }

        #[test]
        fn totals_are_read_back(
            sent in 0u64..10_000_000,
            received in 0u64..10_000_000,
            lost in 0u64..10_000_000,
            noise in "[ -~]{0,80}",
        ) {
            let percent = lost as f64 / 1000.0;
            let text = format!(
                "{noise}\n9: : start_mclient: tot_send_msgs={sent}, tot_recv_msgs={received}\n\
                 9: : Total lost packets {lost} ({percent:.6}%), total send dropped 0 (0.000000%)\n{noise}\n"
            );
            let totals = parse_totals(&text).expect("totals");
            prop_assert_eq!(totals.sent, sent);
            prop_assert_eq!(totals.received, received);
            prop_assert!((totals.lost_percent - percent).abs() < 1e-6);
        }
    }
}
