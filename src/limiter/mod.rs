//! The limiter core: per-key concurrency slot pools and GCRA rate buckets, in process memory
//! (exact for one replica) or in Redis (shared by every replica, [`shared`]).
//!
//! Knows nothing of HTTP or Kubernetes: callers pass the limit in force with each call, so a
//! configuration reload resizes a pool simply by passing a new limit, without touching the
//! requests in flight. Time is passed in as monotonic nanoseconds, so tests state the instant of
//! every call instead of sleeping.

mod gcra;
pub mod shared;
mod slots;

pub use gcra::{Gcra, RateParams, RateRefusal};
pub use shared::{SharedDecision, SharedLease, SharedLimiter, SharedOptions};
pub use slots::{SlotGuard, SlotOwner, SlotPool, SlotsFull};
