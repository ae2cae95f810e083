//! Bandwidth budgets (`--turn-bps-per-allocation`): the bytes per second
//! an allocation may relay, each direction.
//!
//! A budget is one word: the moment by which everything let through so
//! far is paid for at the allowed rate. A packet may go if, with its own
//! bytes added, that moment stays within a second of now: a token bucket
//! that holds one second's bytes, in the form known as GCRA. One word, so
//! that every worker, and the kernel relay on every CPU, can take from the
//! same budget with a compare-and-swap and no lock. With the kernel relay,
//! the words are those of its `budgets` map, mapped into this process
//! ([`SharedBudgets`], from `net::kernel`), so a limit holds however an
//! allocation's packets are split between the kernel and the workers; the
//! program's `over_budget` is this module's [`take`] in C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a budget holds: one second's bytes.
const SECOND_NS: u64 = 1_000_000_000;

/// Words of shared budgets ([`SharedBudgets`]): two for every port of an
/// IPv4 relay, then two for every port of an IPv6 one (a port number may
/// relay in both families at once).
pub const SHARED_BUDGET_WORDS: usize = 2 * IPV6_BUDGETS;

/// Where the IPv6 relays' budgets start (`IPV6_BUDGETS` in relay.bpf.c).
const IPV6_BUDGETS: usize = 2 * (u16::MAX as usize + 1);

/// Budget words, wherever they live: an allocation's own, or the kernel
/// relay's map.
pub type BudgetWords = Arc<dyn AsRef<[AtomicU64]> + Send + Sync>;

/// Budgets kept outside the server, which it must take from instead of
/// its own: the kernel relay's (see `KernelRelay::budgets`).
#[derive(Clone)]
pub struct SharedBudgets {
    /// Two words per relay port and family: toward the peer at twice the
    /// port (plus [`SHARED_BUDGET_WORDS`] / 2 for IPv6), toward the client
    /// after it. Shorter than that: not used.
    pub words: BudgetWords,
    /// An `Instant` and the same moment on the words' clock, in ns (the
    /// kernel's: `CLOCK_MONOTONIC`).
    pub clock: (Instant, u64),
}

impl SharedBudgets {
    /// Whether they hold both budgets of every port.
    pub(super) fn cover_every_port(&self) -> bool {
        (*self.words).as_ref().len() >= SHARED_BUDGET_WORDS
    }
}

#[cfg(test)]
impl SharedBudgets {
    /// Every port's budgets, as the kernel relay's, but on the heap, on a
    /// clock that reads `clock.1` ns at `clock.0`.
    pub(super) fn on_the_heap(clock: (Instant, u64)) -> Self {
        let words: Vec<AtomicU64> = (0..SHARED_BUDGET_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect();
        SharedBudgets {
            words: Arc::new(words),
            clock,
        }
    }
}

impl std::fmt::Debug for SharedBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudgets")
            .field("words", &(*self.words).as_ref().len())
            .field("clock", &self.clock)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    ToPeer = 0,
    ToClient = 1,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::ToPeer => "to_peer",
            Direction::ToClient => "to_client",
        }
    }
}

/// One allocation's two budgets.
pub(super) struct Budget {
    words: BudgetWords,
    /// Where its two words are in `words`.
    at: usize,
    bytes_per_sec: u64,
    clock: (Instant, u64),
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("at", &self.at)
            .field("bytes_per_sec", &self.bytes_per_sec)
            .finish()
    }
}

impl Budget {
    /// The budgets of the allocation relayed at `relay`, full: in `shared`
    /// if given (which an earlier allocation on that port and family may
    /// have spent), else its own, on `clock` (an `Instant` and 0).
    pub(super) fn new(
        bytes_per_sec: u64,
        shared: Option<&SharedBudgets>,
        relay: SocketAddr,
        clock: Instant,
    ) -> Self {
        let family = if relay.is_ipv6() { IPV6_BUDGETS } else { 0 };
        let budget = match shared {
            Some(s) => Budget {
                words: s.words.clone(),
                at: family + 2 * usize::from(relay.port()),
                bytes_per_sec,
                clock: s.clock,
            },
            None => Budget {
                words: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
                at: 0,
                bytes_per_sec,
                clock: (clock, 0),
            },
        };
        for word in budget.words() {
            // Paid for long ago: a whole second's bytes may go.
            word.store(0, Ordering::Relaxed);
        }
        budget
    }

    fn words(&self) -> &[AtomicU64] {
        let all: &[AtomicU64] = (*self.words).as_ref();
        all.get(self.at..self.at + 2).unwrap_or(&[])
    }

    /// Takes `bytes` in direction `dir` at `now`; false: not enough left,
    /// the packet is to be dropped (and is counted).
    pub(super) fn take(&self, dir: Direction, bytes: usize, now: Instant) -> bool {
        let now_ns = self.clock.1 + now.saturating_duration_since(self.clock.0).as_nanos() as u64;
        let taken = self
            .words()
            .get(dir as usize)
            .is_some_and(|word| take(word, bytes, now_ns, self.bytes_per_sec));
        if !taken {
            metrics::counter!("callisto_turn_over_budget_packets_total", "direction" => dir.label())
                .increment(1);
        }
        taken
    }
}

/// Takes `bytes` from the budget `paid` of `bytes_per_sec` (not zero) at
/// `now_ns`; false: there are not enough, and nothing was taken.
pub fn take(paid: &AtomicU64, bytes: usize, now_ns: u64, bytes_per_sec: u64) -> bool {
    let cost = (bytes as u128 * u128::from(SECOND_NS) / u128::from(bytes_per_sec.max(1)))
        .try_into()
        .unwrap_or(u64::MAX);
    let mut was = paid.load(Ordering::Relaxed);
    loop {
        let until = was.max(now_ns).saturating_add(cost);
        if until - now_ns > SECOND_NS {
            return false;
        }
        match paid.compare_exchange_weak(was, until, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => was = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_second_of_bytes_then_what_time_pays_for() {
        let paid = AtomicU64::new(0);
        let ms = |n: u64| n * 1_000_000;
        // 1,000 bytes a second: ten 100-byte packets at once, not eleven.
        assert_eq!((0..11).filter(|_| take(&paid, 100, 0, 1000)).count(), 10);
        // A tenth of a second pays for one more.
        assert!(!take(&paid, 100, ms(99), 1000));
        assert!(take(&paid, 100, ms(100), 1000));
        assert!(!take(&paid, 100, ms(100), 1000));
        // Idle time refills no more than a second's bytes.
        assert_eq!(
            (0..20)
                .filter(|_| take(&paid, 100, ms(60_000), 1000))
                .count(),
            10
        );
        // A packet larger than a second's bytes never goes.
        assert!(!take(&AtomicU64::new(0), 1001, 0, 1000));
    }

    #[test]
    fn shared_budgets_are_emptied_for_each_new_allocation_and_kept_apart() {
        let t0 = Instant::now();
        let shared = SharedBudgets::on_the_heap((t0, 5 * SECOND_NS));
        assert!(shared.cover_every_port());
        let a = Budget::new(100, Some(&shared), relay(50000), t0);
        assert!(a.take(Direction::ToPeer, 100, t0));
        assert!(!a.take(Direction::ToPeer, 1, t0));
        // The words are the shared ones, and on their clock.
        assert_eq!(
            (*shared.words).as_ref()[100000].load(Ordering::Relaxed),
            6 * SECOND_NS
        );
        // The other direction, and the other ports, are untouched.
        assert!(a.take(Direction::ToClient, 100, t0));
        let b = Budget::new(100, Some(&shared), relay(50001), t0);
        assert!(b.take(Direction::ToPeer, 100, t0));
        // A new allocation on the port starts full.
        let again = Budget::new(100, Some(&shared), relay(50000), t0);
        assert!(again.take(Direction::ToPeer, 100, t0 + Duration::from_millis(1)));
        // An IPv6 relay on the same port number has budgets of its own,
        // after every IPv4 port's.
        let v6: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
        let c = Budget::new(100, Some(&shared), v6, t0);
        assert!(c.take(Direction::ToPeer, 100, t0));
        assert_eq!(
            (*shared.words).as_ref()[2 * 65536 + 100000].load(Ordering::Relaxed),
            6 * SECOND_NS
        );
        assert!(!again.take(Direction::ToPeer, 100, t0 + Duration::from_millis(2)));
    }

    fn relay(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 9, 9, 9], port))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Over any run of packets, what is let through never exceeds a
        /// second's bytes plus what the elapsed time pays for, and nothing
        /// is refused while the budget has room for it.
        #[test]
        fn never_more_than_the_rate_allows(
            rate in 1u64..100_000,
            packets in proptest::collection::vec((0usize..2000, 0u64..50_000_000), 1..200),
        ) {
            let paid = AtomicU64::new(0);
            let (mut now, mut let_through) = (0u64, 0u128);
            for (bytes, gap) in packets {
                now += gap;
                let before = paid.load(Ordering::Relaxed);
                let room = SECOND_NS.saturating_sub(before.saturating_sub(now));
                let cost = bytes as u128 * u128::from(SECOND_NS) / u128::from(rate);
                let went = take(&paid, bytes, now, rate);
                proptest::prop_assert_eq!(went, cost <= u128::from(room));
                if went {
                    let_through += bytes as u128;
                }
                let allowed = u128::from(rate) * u128::from(SECOND_NS + now) / u128::from(SECOND_NS);
                // Costs rounded down to the ns lend a fraction of a byte.
                proptest::prop_assert!(let_through <= allowed + 1, "{} > {}", let_through, allowed);
            }
        }
    }
}
