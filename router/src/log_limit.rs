//! Rate-limited warnings, for events a peer or a client can cause in a loop.

use std::time::{Duration, Instant};

/// At most one log line a second for one kind of event, with the number of events it stood
/// for, so that a peer repeating a bad input cannot flood the log.
#[derive(Debug, Default)]
pub struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
    total: u64,
}

impl LogLimit {
    /// How often a line may be logged.
    pub const EVERY: Duration = Duration::from_secs(1);

    /// Counts one event. Returns `Some(n)` when this one is to be logged, `n` being how many
    /// went unlogged since the last line.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&mut self, now: Instant) -> Option<u64> {
        self.total = self.total.saturating_add(1);
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Every event counted, logged or not.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_says_how_many_it_stands_for() {
        let mut limit = LogLimit::default();
        let start = Instant::now();
        assert_eq!(limit.hit_at(start), Some(0));
        for ms in 1..=999 {
            assert_eq!(limit.hit_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(limit.hit_at(start + Duration::from_secs(1)), Some(999));
        assert_eq!(limit.total(), 1001);
    }
}
