//! Concurrency slots: a counter of requests in flight, checked against the limit in force.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

/// The requests one key has in flight. The limit is not stored: each acquire passes the limit of
/// the configuration it read, so an upgrade N→M admits M−N more at once and a downgrade cuts
/// nothing in flight but admits again only below M.
#[derive(Debug, Default)]
pub struct SlotPool {
    in_flight: AtomicU32,
}

/// Refusal: every slot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotsFull {
    /// Requests in flight when the request was refused.
    pub in_flight: u32,
}

/// Whatever holds a [`SlotPool`] inside it. A guard keeps its owner alive: a pool embedded in a
/// larger per-key state costs no allocation and no pointer hop of its own on the request path.
pub trait SlotOwner: Send + Sync + 'static {
    /// The pool.
    fn pool(&self) -> &SlotPool;
}

impl SlotOwner for SlotPool {
    fn pool(&self) -> &SlotPool {
        self
    }
}

/// A taken slot, returned when dropped (on success, error, timeout, client abort or panic).
#[derive(Debug)]
pub struct SlotGuard<O: SlotOwner = SlotPool> {
    owner: Arc<O>,
    /// Requests in flight counting this one, when it was admitted.
    pub in_flight: u32,
}

impl<O: SlotOwner> SlotGuard<O> {
    /// What holds the pool the slot was taken from.
    pub fn owner(&self) -> &Arc<O> {
        &self.owner
    }
}

impl SlotPool {
    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Takes a slot if fewer than `limit` are in flight; never waits.
    pub fn try_acquire(self: &Arc<Self>, limit: u32) -> Result<SlotGuard, SlotsFull> {
        Self::try_acquire_in(self, limit)
    }

    /// Takes a slot of the pool `owner` holds, if fewer than `limit` are in flight; never waits.
    pub fn try_acquire_in<O: SlotOwner>(owner: &Arc<O>, limit: u32) -> Result<SlotGuard<O>, SlotsFull> {
        let pool = owner.pool();
        let mut current = pool.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return Err(SlotsFull { in_flight: current });
            }
            match pool.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(SlotGuard {
                        owner: Arc::clone(owner),
                        in_flight: current + 1,
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }
}

impl<O: SlotOwner> Drop for SlotGuard<O> {
    fn drop(&mut self) {
        self.owner.pool().in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Release(usize),
        Resize(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            3 => any::<usize>().prop_map(Op::Release),
            1 => (0u32..12).prop_map(Op::Resize),
        ]
    }

    proptest! {
        /// Model check: in flight never exceeds the limit in force at admission, refusals happen
        /// exactly when the pool is full, and every slot comes back.
        #[test]
        fn never_over_limit_and_all_slots_return(limit in 0u32..12, ops in proptest::collection::vec(op(), 1..200)) {
            let pool = Arc::new(SlotPool::default());
            let mut limit = limit;
            let mut held: Vec<SlotGuard> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire => {
                        let before = held.len() as u32;
                        match pool.try_acquire(limit) {
                            Ok(g) => {
                                prop_assert!(before < limit);
                                prop_assert_eq!(g.in_flight, before + 1);
                                held.push(g);
                            }
                            Err(full) => {
                                prop_assert!(before >= limit);
                                prop_assert_eq!(full.in_flight, before);
                            }
                        }
                    }
                    Op::Release(i) if !held.is_empty() => { held.swap_remove(i % held.len()); }
                    Op::Release(_) => {}
                    Op::Resize(n) => limit = n,
                }
                prop_assert_eq!(pool.in_flight(), held.len() as u32);
            }
            drop(held);
            prop_assert_eq!(pool.in_flight(), 0);
        }
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let pool = Arc::new(SlotPool::default());
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Ok(g) = pool.try_acquire(5) {
                            assert!(pool.in_flight() <= 5);
                            admitted.fetch_add(1, Ordering::Relaxed);
                            drop(g);
                        }
                    }
                });
            }
        });
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(pool.in_flight(), 0);
    }
}
