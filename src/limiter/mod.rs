//! The limiter core: per-key concurrency slot pools and GCRA rate buckets.
//!
//! Knows nothing of HTTP or Kubernetes: callers pass the limit in force with each call, so a
//! configuration reload resizes a pool simply by passing a new limit, without touching the
//! requests in flight. Time comes from a [`Clock`], so tests run on a manual clock.

mod gcra;
mod slots;

pub use gcra::{Bucket, RateDecision, RateParams};
pub use slots::{SlotGuard, SlotPool, SlotsFull};

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// A monotonic source of nanoseconds.
pub trait Clock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed origin; never decreases.
    fn now_nanos(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Clone, Debug)]
pub struct MonotonicClock {
    origin: std::time::Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now_nanos(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, nanos: u64) {
        self.0.fetch_add(nanos, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
