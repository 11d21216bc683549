//! The wall clock, injected: the agent's parts stamp statuses and drift events and seed
//! sequence numbers through a [`Clock`] they are given, so tests run on a fixed clock
//! and no logic reads the system time itself. Delays and timeouts use tokio's clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Tells the time of day, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_unix_ms(&self) -> i64;
}

/// A clock shared by the agent's parts.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clock: the only place the agent reads the wall time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that says what it is told, for tests.
#[derive(Debug, Default)]
pub struct FixedClock(AtomicI64);

impl FixedClock {
    pub fn new(now_unix_ms: i64) -> Arc<FixedClock> {
        Arc::new(FixedClock(AtomicI64::new(now_unix_ms)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_clock_moves_only_when_told() {
        let c = FixedClock::new(1_000);
        assert_eq!(c.now_unix_ms(), 1_000);
        c.advance(5);
        assert_eq!(c.now_unix_ms(), 1_005);
        assert!(SystemClock.now_unix_ms() > 1_600_000_000_000, "after 2020");
    }
}
