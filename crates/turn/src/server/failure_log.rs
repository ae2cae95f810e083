//! How many authentication failures reach the log. Each one is worth a
//! line (who failed, as whom, why: what an operator needs to tell expired
//! credentials from a wrong password, and what fail2ban reads), but
//! anyone can send failures as fast as the network carries them, from as
//! many spoofed addresses as they like, so the lines are bounded across
//! the whole process; the failures left out are counted in the next line.
//! (The web server bounds its lines about refused WebSockets with it too.)

use std::time::{Duration, Instant};

/// What a client sent, fit for a log line: read as UTF-8 (lossily), cut
/// at `max_chars` characters ("…" marking the cut), and escaped, so that
/// it can neither flood a line nor forge another.
pub fn loggable(bytes: &[u8], max_chars: usize) -> String {
    let lossy = String::from_utf8_lossy(bytes);
    let mut cut: String = lossy.chars().take(max_chars).collect();
    if lossy.chars().nth(max_chars).is_some() {
        cut.push('…');
    }
    cut.escape_debug().to_string()
}

/// Lines allowed per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);

/// The budget of log lines. Sans-IO: the caller brings the time.
#[derive(Debug, Default)]
pub struct FailureLog {
    window_start: Option<Instant>,
    logged: u32,
    /// Failures left out since the last line.
    left_out: u64,
}

impl FailureLog {
    /// `Some(n)` if this failure gets a line, `n` being how many before it
    /// did not; `None` if it is left out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= WINDOW {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged >= LINES_PER_WINDOW {
            self.left_out = self.left_out.saturating_add(1);
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_client_sent_is_cut_and_escaped() {
        assert_eq!(loggable(b"alice", 64), "alice");
        assert_eq!(loggable(b"abcdef", 3), "abc…");
        assert_eq!(loggable(b"abc", 3), "abc");
        assert_eq!(loggable(b"a\nforged line", 64), "a\\nforged line");
        assert_eq!(loggable(b"\xffok", 64), "\u{fffd}ok");
    }

    #[test]
    fn ten_lines_a_second_and_the_rest_counted_in_the_next() {
        let t0 = Instant::now();
        let mut log = FailureLog::default();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(log.admit(t0), Some(0));
        }
        for i in 0..25 {
            assert_eq!(log.admit(t0 + Duration::from_millis(i * 10)), None);
        }
        let next = t0 + WINDOW;
        assert_eq!(
            log.admit(next),
            Some(25),
            "the next line says 25 were left out"
        );
        assert_eq!(log.admit(next), Some(0));
        // A quiet spell: a new window whenever the next failure comes.
        assert_eq!(log.admit(next + Duration::from_secs(3600)), Some(0));
    }
}
