//! Who may open another TCP or TLS connection. Each connection holds a
//! file descriptor, a task and its buffers for up to 30 s before it has to
//! allocate, so without a bound a single host opening connections in a loop
//! takes every descriptor the process has, and UDP clients then get 508
//! (Insufficient Capacity) because no relay socket can be opened. Bounded
//! here: connections in total, and connections from one source, where a
//! source is an IPv4 address or an IPv6 /64 (a host gets a whole /64 and
//! picks any address in it).
//!
//! No I/O and no clock of its own: the listeners ask [`Admission::admit`]
//! before they do anything with a new connection, and the [`Admitted`]
//! ticket gives the place back when the connection ends. The `callisto`
//! binary's web server admits its connections with it too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::source::Source;

/// How many stream connections may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In total, TCP and TLS together.
    pub total: usize,
    /// From one source (an IPv4 address or an IPv6 /64).
    pub per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            total: 10_000,
            per_source: 256,
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// [`ConnectionLimits::total`] connections are open.
    Total,
    /// [`ConnectionLimits::per_source`] connections are open from its source.
    PerSource,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerSource => "per_source",
        }
    }
}

/// Refusals since the last summary, for a log line at most every
/// [`SUMMARY_EVERY`]: a flood must not become a flood of log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalSummary {
    pub total: u64,
    pub per_source: u64,
    /// The source of the latest refusal.
    pub last_from: IpAddr,
}

/// The shortest time between two [`RefusalSummary`]s.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Open connections, by source. Shared by the TCP and TLS listeners.
#[derive(Debug)]
pub struct Admission {
    limits: ConnectionLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    by_source: HashMap<Source, usize>,
    refused_total: u64,
    refused_per_source: u64,
    last_summary: Option<Instant>,
}

/// A place taken by one open connection; dropping it gives the place back.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    /// None for a connection counted in the total only.
    source: Option<Source>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        s.open = s.open.saturating_sub(1);
        let Some(source) = self.source else {
            return;
        };
        if let Some(n) = s.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                s.by_source.remove(&source);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: ConnectionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a connection from `from`, or says why there is
    /// none; with the refusal, a summary of the refusals so far when one is
    /// due (at most every [`SUMMARY_EVERY`]).
    pub fn admit(
        self: &Arc<Self>,
        from: IpAddr,
        now: Instant,
    ) -> Result<Admitted, (Refused, Option<RefusalSummary>)> {
        self.take(from, Some(Source::of(from)), now)
    }

    /// [`Admission::admit`] for a connection that carries many clients (a
    /// reverse proxy's), so that only the total bounds it: its clients
    /// are told apart, and held to their share, further in.
    pub fn admit_in_total(
        self: &Arc<Self>,
        from: IpAddr,
        now: Instant,
    ) -> Result<Admitted, (Refused, Option<RefusalSummary>)> {
        self.take(from, None, now)
    }

    fn take(
        self: &Arc<Self>,
        from: IpAddr,
        source: Option<Source>,
        now: Instant,
    ) -> Result<Admitted, (Refused, Option<RefusalSummary>)> {
        let mut s = self.lock();
        let from_source = source
            .and_then(|source| s.by_source.get(&source).copied())
            .unwrap_or(0);
        let refused = if s.open >= self.limits.total {
            s.refused_total += 1;
            Refused::Total
        } else if source.is_some() && from_source >= self.limits.per_source {
            s.refused_per_source += 1;
            Refused::PerSource
        } else {
            s.open += 1;
            if let Some(source) = source {
                *s.by_source.entry(source).or_insert(0) += 1;
            }
            return Ok(Admitted {
                admission: self.clone(),
                source,
            });
        };
        let due = s
            .last_summary
            .is_none_or(|t| now.saturating_duration_since(t) >= SUMMARY_EVERY);
        let summary = due.then(|| {
            s.last_summary = Some(now);
            RefusalSummary {
                total: std::mem::take(&mut s.refused_total),
                per_source: std::mem::take(&mut s.refused_per_source),
                last_from: from,
            }
        });
        Err((refused, summary))
    }

    /// [`Admission::admit`] for a listener: a refusal is counted in the
    /// counter `metric` by reason, and the refusals are summed up in the
    /// log at most every [`SUMMARY_EVERY`], naming `what` was refused, with
    /// `advice` (what would let more in).
    pub fn admit_or_count(
        self: &Arc<Self>,
        from: IpAddr,
        now: Instant,
        metric: &'static str,
        what: &str,
        advice: &str,
    ) -> Option<Admitted> {
        self.admit(from, now)
            .map_err(|refusal| self.count(refusal, metric, what, advice))
            .ok()
    }

    /// Counts a refusal in the counter `metric` by reason, and logs the
    /// summary if one came with it: see [`Admission::admit_or_count`].
    pub fn count(
        &self,
        (why, summary): (Refused, Option<RefusalSummary>),
        metric: &'static str,
        what: &str,
        advice: &str,
    ) {
        metrics::counter!(metric, "reason" => why.as_str()).increment(1);
        if let Some(s) = summary {
            tracing::warn!(
                over_total = s.total,
                over_per_source = s.per_source,
                last_from = %s.last_from,
                total_limit = self.limits.total,
                per_source_limit = self.limits.per_source,
                "turned {what} connections away, too many were open; {advice}"
            );
        }
    }

    /// Connections open now, in total.
    pub fn open(&self) -> usize {
        self.lock().open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn one_source_gets_its_share_and_no_more() {
        let a = Admission::new(ConnectionLimits {
            total: 10,
            per_source: 2,
        });
        let now = Instant::now();
        let first = a.admit(v4(1), now).unwrap();
        let _second = a.admit(v4(1), now).unwrap();
        let (why, _) = a.admit(v4(1), now).unwrap_err();
        assert_eq!(why, Refused::PerSource);
        // Another source is not held back by the first.
        let _other = a.admit(v4(2), now).unwrap();
        // A closed connection gives its place back.
        drop(first);
        let _third = a.admit(v4(1), now).unwrap();
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn a_connection_for_many_clients_counts_in_the_total_only() {
        let a = Admission::new(ConnectionLimits {
            total: 3,
            per_source: 1,
        });
        let now = Instant::now();
        let proxy = v4(1);
        let first = a.admit_in_total(proxy, now).unwrap();
        let _second = a.admit_in_total(proxy, now).unwrap();
        // Its address's own share is untouched,
        let direct = a.admit(proxy, now).unwrap();
        // and the total holds.
        assert_eq!(a.admit_in_total(v4(2), now).unwrap_err().0, Refused::Total);
        drop((first, direct));
        assert_eq!(a.open(), 1);
        assert!(a.lock().by_source.is_empty());
    }

    #[test]
    fn the_total_holds_whatever_the_sources() {
        let a = Admission::new(ConnectionLimits {
            total: 3,
            per_source: 3,
        });
        let now = Instant::now();
        let held: Vec<_> = (1..=3).map(|i| a.admit(v4(i), now).unwrap()).collect();
        assert_eq!(a.admit(v4(4), now).unwrap_err().0, Refused::Total);
        drop(held);
        assert_eq!(a.open(), 0);
        assert!(a.admit(v4(4), now).is_ok());
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a = Admission::new(ConnectionLimits {
            total: 10,
            per_source: 1,
        });
        let now = Instant::now();
        let host = |low: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, low));
        let _one = a.admit(host(1), now).unwrap();
        assert_eq!(a.admit(host(2), now).unwrap_err().0, Refused::PerSource);
        // The next /64 is another source.
        let next = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1));
        let _two = a.admit(next, now).unwrap();
        let _three = a.admit(v4(9), now).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(a.admit(mapped, now).unwrap_err().0, Refused::PerSource);
    }

    #[test]
    fn refusals_are_summed_up_at_most_every_ten_seconds() {
        let a = Admission::new(ConnectionLimits {
            total: 2,
            per_source: 1,
        });
        let start = Instant::now();
        let _first = a.admit(v4(1), start).unwrap();
        // The first refusal is told at once.
        let (why, told) = a.admit(v4(1), start).unwrap_err();
        assert_eq!(why, Refused::PerSource);
        assert_eq!(
            told,
            Some(RefusalSummary {
                total: 0,
                per_source: 1,
                last_from: v4(1)
            })
        );
        // Then quiet, counting, until the time has come.
        let _second = a.admit(v4(2), start).unwrap();
        for i in 0..5 {
            let (why, told) = a.admit(v4(3), start + Duration::from_secs(i)).unwrap_err();
            assert_eq!((why, told), (Refused::Total, None));
        }
        assert_eq!(
            a.admit(v4(1), start + Duration::from_secs(9))
                .unwrap_err()
                .1,
            None
        );
        let (_, told) = a.admit(v4(4), start + SUMMARY_EVERY).unwrap_err();
        assert_eq!(
            told,
            Some(RefusalSummary {
                total: 7,
                per_source: 0,
                last_from: v4(4)
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Any sequence of connections opened and closed, from a handful
        /// of sources: the open counts never pass the limits, a refusal
        /// happens only at a limit, and closing everything leaves nothing.
        #[test]
        fn the_limits_always_hold(
            total in 1usize..8,
            per_source in 1usize..5,
            steps in proptest::collection::vec((any::<bool>(), 0u8..4, any::<prop::sample::Index>()), 0..200),
        ) {
            let a = Admission::new(ConnectionLimits { total, per_source });
            let now = Instant::now();
            let mut held: Vec<(u8, Admitted)> = Vec::new();
            for (open, source, pick) in steps {
                if open || held.is_empty() {
                    let from_source = held.iter().filter(|(s, _)| *s == source).count();
                    match a.admit(v4(source), now) {
                        Ok(t) => {
                            prop_assert!(held.len() < total && from_source < per_source);
                            held.push((source, t));
                        }
                        Err((Refused::Total, _)) => prop_assert_eq!(held.len(), total),
                        Err((Refused::PerSource, _)) => {
                            prop_assert!(held.len() < total);
                            prop_assert_eq!(from_source, per_source);
                        }
                    }
                } else {
                    held.swap_remove(pick.index(held.len()));
                }
                prop_assert_eq!(a.open(), held.len());
            }
            held.clear();
            prop_assert_eq!(a.open(), 0);
            prop_assert!(a.lock().by_source.is_empty());
        }
    }
}
