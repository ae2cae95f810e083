//! systemd's service notifications (`Type=notify`): the server says when it
//! is ready (every port bound, so units ordered after it find it
//! listening) and when it stops, and with `WatchdogSec=` it pings the
//! watchdog while [`Health`] finds nothing stopped. A server whose runtime
//! hangs, or that lost a part, stops pinging, and systemd restarts it;
//! what stopped is in `systemctl status` (STATUS=). Not under systemd (no
//! `NOTIFY_SOCKET`), all of this does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Sends `states` to systemd, if it listens; a failure is logged, never
/// fatal: systemd then restarts the service or reports it, and serving
/// matters more.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

/// Every port is bound and served.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status(SERVING)]);
}

/// Shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

const SERVING: &str = "serving";

/// With `WatchdogSec=`, pings systemd's watchdog at half its period while
/// `health` finds nothing stopped, until `stop`.
pub fn feed_watchdog(health: Health, stop: CancellationToken) {
    if let Some(period) = sd_notify::watchdog_enabled() {
        tracing::info!(
            watchdog_s = period.as_secs_f64(),
            "systemd's watchdog is fed while every part runs"
        );
        tokio::spawn(watchdog(health, period / 2, stop));
    }
}

/// Each `every`, what [`Feeder::tick`] says.
async fn watchdog(health: Health, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    let mut feeder = Feeder::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let problems = health.problems();
        if !problems.is_empty() && feeder.fed() {
            tracing::error!(
                problems = %problems.join("; "),
                "no longer feeding systemd's watchdog: systemd will restart the server"
            );
        }
        for message in feeder.tick(&problems) {
            notify(&[message.as_state()]);
        }
    }
}

/// What to tell the watchdog at each tick: a ping while nothing has
/// stopped; else no ping, so that systemd restarts the server once its
/// period runs out, and the problems as the status (when they change).
#[derive(Debug, Default)]
struct Feeder {
    /// The status last said, if not [`SERVING`].
    said: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Message {
    Ping,
    Status(String),
}

impl Message {
    fn as_state(&self) -> NotifyState<'_> {
        match self {
            Message::Ping => NotifyState::Watchdog,
            Message::Status(s) => NotifyState::Status(s),
        }
    }
}

impl Feeder {
    /// Whether the last tick pinged.
    fn fed(&self) -> bool {
        self.said.is_none()
    }

    fn tick(&mut self, problems: &[String]) -> Vec<Message> {
        let mut out = Vec::new();
        let now = if problems.is_empty() {
            out.push(Message::Ping);
            None
        } else {
            Some(problems.join("; "))
        };
        if now != self.said {
            out.push(Message::Status(
                now.clone().unwrap_or_else(|| SERVING.to_owned()),
            ));
        }
        self.said = now;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pings while all is well; once a part stops, no more pings, and the
    /// status says what stopped (once); pings again once it is back.
    #[test]
    fn pings_only_while_healthy_and_says_why_not() {
        let mut feeder = Feeder::default();
        let broken = vec!["TURN UDP worker 1 (of 2) has stopped".to_owned()];
        assert_eq!(feeder.tick(&[]), [Message::Ping]);
        assert_eq!(feeder.tick(&[]), [Message::Ping]);
        assert!(feeder.fed());
        assert_eq!(
            feeder.tick(&broken),
            [Message::Status(broken[0].clone())],
            "no ping"
        );
        assert!(!feeder.fed());
        assert_eq!(feeder.tick(&broken), [], "said once");
        let worse = vec![
            broken[0].clone(),
            "the TURN TCP listener on 127.0.0.1:3478 has stopped".to_owned(),
        ];
        assert_eq!(feeder.tick(&worse), [Message::Status(worse.join("; "))]);
        assert_eq!(
            feeder.tick(&[]),
            [Message::Ping, Message::Status("serving".to_owned())]
        );
        assert_eq!(feeder.tick(&[]), [Message::Ping]);
    }
}
