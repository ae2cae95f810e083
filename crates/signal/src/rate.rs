//! Per-connection rate limiting: a token bucket, plus a second bucket that
//! counts refusals so that a client which keeps flooding can be cut off while
//! a client with one burst too many only gets an error.

use std::time::{Duration, Instant};

/// What to do with one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit: refuse this message with `rate-limited`.
    Refuse,
    /// Over the limit for long enough: close the connection.
    Disconnect,
}

#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Bucket {
            capacity,
            per_sec,
            tokens: capacity,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket of `burst` messages refilled at `per_sec`; after `strikes`
/// refusals that were not forgiven (one is forgiven per second), the verdict
/// becomes [`Verdict::Disconnect`].
#[derive(Debug, Clone)]
pub struct RateLimiter {
    messages: Bucket,
    strikes: Bucket,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32, strikes: u32, now: Instant) -> Self {
        RateLimiter {
            messages: Bucket::new(f64::from(burst.max(1)), f64::from(per_sec.max(1)), now),
            strikes: Bucket::new(f64::from(strikes.max(1)), 1.0, now),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.messages.take(now) {
            Verdict::Allow
        } else if self.strikes.take(now) {
            Verdict::Refuse
        } else {
            Verdict::Disconnect
        }
    }

    /// How long until one more message is allowed; for tests and logs.
    pub fn retry_after(&self) -> Duration {
        let missing = (1.0 - self.messages.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.messages.per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_then_refill() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 5, 3, t0);
        for _ in 0..5 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
        assert_eq!(r.check(t0), Verdict::Refuse);
        assert!(r.retry_after() > Duration::ZERO);
        // 100 ms at 10/s gives one token back.
        assert_eq!(r.check(t0 + Duration::from_millis(100)), Verdict::Allow);
        assert_eq!(r.check(t0 + Duration::from_millis(100)), Verdict::Refuse);
    }

    #[test]
    fn sustained_flood_disconnects() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 1, 3, t0);
        assert_eq!(r.check(t0), Verdict::Allow);
        assert_eq!(r.check(t0), Verdict::Refuse);
        assert_eq!(r.check(t0), Verdict::Refuse);
        assert_eq!(r.check(t0), Verdict::Refuse);
        assert_eq!(r.check(t0), Verdict::Disconnect);
    }

    #[test]
    fn occasional_overrun_is_forgiven() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1, 1, 2, t0);
        for i in 0..20u64 {
            let now = t0 + Duration::from_secs(i);
            assert_eq!(r.check(now), Verdict::Allow);
            assert_eq!(r.check(now), Verdict::Refuse, "second {i}");
        }
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut r = RateLimiter::new(10, 1, 1, t0);
        assert_eq!(r.check(t0), Verdict::Allow);
        assert_eq!(r.check(t0 - Duration::from_secs(5)), Verdict::Refuse);
    }
}
