//! The table of counters and bans, of a size fixed when it is made.
//!
//! A flood from a million addresses must neither grow memory without bound nor push the heavy
//! hitters out. The table is set-associative, like a CPU cache: a subject can only live in the
//! eight slots of the set its hash names, and a newcomer to a full set takes the slot of the
//! lightest subject there (no count in the window, then the fewest events; a ban goes last). A
//! sprayer with a million addresses sending a few requests each fills sets with light subjects
//! that replace one another, while an address sending hundreds keeps its slot, because it only
//! loses it to seven heavier neighbours. Lookups read eight slots under one of 64 locks.

use std::{
    hash::BuildHasher,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::{Policy, Reason, Subject};

/// Slots of one set.
const WAYS: usize = 8;
/// Independent locks; a power of two.
const SHARDS: usize = 64;

/// Bytes one tracked subject takes (each slot, used or not, once its shard is in use).
pub const SLOT_BYTES: usize = std::mem::size_of::<Option<Slot>>();

/// A ban in force (or, in [`Guard::record`]'s answer, just started). Times are the caller's
/// milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    /// Why.
    pub reason: Reason,
    /// When it started.
    pub started: u64,
    /// When it ends.
    pub until: u64,
    /// 1 for a first ban, 2 for the first repeat, and so on.
    pub strike: u32,
}

impl Ban {
    /// Milliseconds left at `now`.
    pub fn remaining_ms(&self, now: u64) -> u64 {
        self.until.saturating_sub(now)
    }

    /// Whole seconds left at `now`, rounded up: the `Retry-After` of a banned request.
    pub fn retry_after_secs(&self, now: u64) -> u64 {
        self.remaining_ms(now).div_ceil(1_000).max(1)
    }
}

/// Events in a sliding window, estimated from two aligned fixed windows (the current one and a
/// share of the previous one that the sliding window still covers), as nginx and Cloudflare do:
/// exact enough for a threshold, and 24 bytes however many events.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    /// Start of the current fixed window.
    start: u64,
    cur: u32,
    prev: u32,
    len: u32,
}

impl Window {
    /// Counts one event at `now`; the estimate of events in the last `len` ms, this one included.
    fn add(&mut self, now: u64, len: u64) -> u64 {
        let len = len.clamp(1, u64::from(u32::MAX));
        let start = now - now % len;
        if u64::from(self.len) != len {
            *self = Self {
                start,
                len: len as u32,
                ..Self::default()
            };
        } else if start != self.start {
            self.prev = if start == self.start + len { self.cur } else { 0 };
            self.cur = 0;
            self.start = start;
        }
        self.cur = self.cur.saturating_add(1);
        let into = now - start;
        u64::from(self.prev) * (len - into) / len + u64::from(self.cur)
    }

    /// Events that still count at `now` (an upper bound), for choosing whom to forget.
    fn weight(&self, now: u64) -> u64 {
        if now >= self.start + 2 * u64::from(self.len) {
            0
        } else {
            u64::from(self.cur) + u64::from(self.prev)
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct BanState {
    ban: Ban,
    /// Until then a new ban is a repeat and lasts longer; then the subject's record is clean.
    forget_at: u64,
}

#[derive(Debug)]
struct Slot {
    subject: Subject,
    refusals: Window,
    invalid: Window,
    /// The current ban, or the last one while it still makes the next a repeat.
    ban: Option<BanState>,
}

impl Slot {
    /// Who is forgotten first when a newcomer needs the slot: the least, by class then value.
    fn keep_score(&self, now: u64) -> (u8, u64) {
        match self.ban {
            Some(b) if b.ban.until > now => (3, b.ban.until),
            Some(b) if b.forget_at > now => (2, b.forget_at),
            _ => (1, self.refusals.weight(now) + self.invalid.weight(now)),
        }
    }
}

/// Counters and bans of clients and keys, in a fixed amount of memory.
pub struct Guard {
    /// Each shard's sets, allocated on first use: an idle gateway pays nothing.
    shards: Box<[Mutex<Vec<Option<Slot>>>]>,
    sets_per_shard: usize,
    /// Seeded per process: clients choose their addresses, and must not be able to aim them all
    /// at one set.
    hasher: foldhash::quality::RandomState,
    /// Slots holding a ban or a ban's memory: while none does, a check takes no lock.
    banned: AtomicUsize,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("capacity", &self.capacity())
            .field("banned", &self.banned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// A table that tracks at most `capacity` subjects (rounded up to a power of two, at least
    /// 512): at most `capacity * SLOT_BYTES` bytes.
    pub fn new(capacity: usize) -> Self {
        let sets_per_shard = capacity.div_ceil(SHARDS * WAYS).max(1).next_power_of_two();
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            sets_per_shard,
            hasher: foldhash::quality::RandomState::default(),
            banned: AtomicUsize::new(0),
        }
    }

    /// Subjects the table can track at once.
    pub fn capacity(&self) -> usize {
        SHARDS * self.sets_per_shard * WAYS
    }

    /// The most memory the table takes, in bytes (every shard in use).
    pub fn max_bytes(&self) -> usize {
        self.capacity() * SLOT_BYTES
    }

    /// Memory the table takes now, in bytes.
    pub fn bytes(&self) -> usize {
        let used = self.shards.iter().filter(|s| !lock(s).is_empty()).count();
        used * self.sets_per_shard * WAYS * SLOT_BYTES
    }

    fn place(&self, subject: &Subject) -> (usize, usize) {
        let h = self.hasher.hash_one(subject) as usize;
        let set = (h / SHARDS) & (self.sets_per_shard - 1);
        (h & (SHARDS - 1), set * WAYS)
    }

    fn shard(&self, ix: usize) -> MutexGuard<'_, Vec<Option<Slot>>> {
        lock(&self.shards[ix])
    }

    /// Whether any subject is (or was recently) banned: while not, [`Guard::check`] is `None`
    /// for everyone, and callers can skip building a subject.
    #[inline]
    pub fn may_ban(&self) -> bool {
        self.banned.load(Ordering::Relaxed) > 0
    }

    /// The ban `subject` is under at `now`, if any.
    #[inline]
    pub fn check(&self, subject: &Subject, now: u64) -> Option<Ban> {
        if self.banned.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let (shard, set) = self.place(subject);
        let slots = self.shard(shard);
        let slot = slots
            .get(set..set + WAYS)?
            .iter()
            .flatten()
            .find(|s| s.subject == *subject)?;
        slot.ban.map(|b| b.ban).filter(|b| b.until > now)
    }

    /// The slot of `subject` in its set, taking the lightest one for a newcomer.
    fn slot_in<'s>(
        &self,
        slots: &'s mut Vec<Option<Slot>>,
        set: usize,
        subject: &Subject,
        now: u64,
    ) -> &'s mut Slot {
        if slots.is_empty() {
            slots.resize_with(self.sets_per_shard * WAYS, || None);
        }
        let set = &mut slots[set..set + WAYS];
        let i = match set
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.subject == *subject))
        {
            Some(i) => i,
            None => {
                let victim = set.iter().position(Option::is_none).unwrap_or_else(|| {
                    (0..WAYS)
                        .min_by_key(|&i| set[i].as_ref().map(|s| s.keep_score(now)))
                        .unwrap_or(0)
                });
                if set[victim].as_ref().is_some_and(|s| s.ban.is_some()) {
                    self.banned.fetch_sub(1, Ordering::Relaxed);
                }
                set[victim] = Some(Slot {
                    subject: subject.clone(),
                    refusals: Window::default(),
                    invalid: Window::default(),
                    ban: None,
                });
                victim
            }
        };
        set[i].as_mut().expect("the slot was just found or filled")
    }

    /// Counts one event against `subject` at `now`; `Some` when it starts a ban. Events while the
    /// subject is banned do not count (the ban would never end).
    pub fn record(&self, subject: &Subject, reason: Reason, policy: &Policy, now: u64) -> Option<Ban> {
        let (shard, set) = self.place(subject);
        let mut slots = self.shard(shard);
        let slot = self.slot_in(&mut slots, set, subject, now);
        if slot.ban.is_some_and(|b| b.ban.until > now) {
            return None;
        }
        let window = match reason {
            Reason::Refusals => &mut slot.refusals,
            Reason::InvalidKeys => &mut slot.invalid,
        };
        if window.add(now, policy.window_ms) < u64::from(policy.threshold.max(1)) {
            return None;
        }
        let strike = match slot.ban {
            Some(b) if b.forget_at > now => b.ban.strike.saturating_add(1),
            _ => 1,
        };
        let until = now.saturating_add(policy.ban_for(strike));
        let ban = Ban {
            reason,
            started: now,
            until,
            strike,
        };
        if slot.ban.is_none() {
            self.banned.fetch_add(1, Ordering::Relaxed);
        }
        slot.ban = Some(BanState {
            ban,
            forget_at: until.saturating_add(policy.escalation_window_ms),
        });
        slot.refusals = Window::default();
        slot.invalid = Window::default();
        Some(ban)
    }

    /// Puts `subject` under `ban` (one another replica started), unless it is under a ban that
    /// lasts longer already. Whether anything changed.
    pub fn impose(&self, subject: &Subject, ban: Ban, forget_at: u64, now: u64) -> bool {
        if ban.until <= now {
            return false;
        }
        let (shard, set) = self.place(subject);
        let mut slots = self.shard(shard);
        let slot = self.slot_in(&mut slots, set, subject, now);
        match slot.ban {
            Some(b) if b.ban.until >= ban.until => false,
            old => {
                if old.is_none() {
                    self.banned.fetch_add(1, Ordering::Relaxed);
                }
                slot.ban = Some(BanState { ban, forget_at });
                true
            }
        }
    }

    /// Lifts `subject`'s ban and forgets its record (the next ban is a first one again). Whether
    /// a ban was in force.
    pub fn lift(&self, subject: &Subject, now: u64) -> bool {
        let (shard, set) = self.place(subject);
        let mut slots = self.shard(shard);
        let Some(slot) = slots
            .get_mut(set..set + WAYS)
            .and_then(|s| s.iter_mut().flatten().find(|s| s.subject == *subject))
        else {
            return false;
        };
        let Some(b) = slot.ban.take() else {
            return false;
        };
        self.banned.fetch_sub(1, Ordering::Relaxed);
        slot.refusals = Window::default();
        slot.invalid = Window::default();
        b.ban.until > now
    }

    /// Every ban in force at `now`.
    pub fn active(&self, now: u64) -> Vec<(Subject, Ban)> {
        let mut out = Vec::new();
        if self.banned.load(Ordering::Relaxed) == 0 {
            return out;
        }
        for shard in self.shards.iter() {
            let slots = lock(shard);
            for s in slots.iter().flatten() {
                if let Some(b) = s.ban.filter(|b| b.ban.until > now) {
                    out.push((s.subject.clone(), b.ban));
                }
            }
        }
        out
    }

    /// Forgets records that no longer matter at `now` (bans past their escalation memory,
    /// counters with nothing in the window). Returns the bans in force.
    pub fn sweep(&self, now: u64) -> usize {
        let mut active = 0;
        for shard in self.shards.iter() {
            let mut slots = lock(shard);
            for entry in slots.iter_mut() {
                let Some(s) = entry else { continue };
                match s.ban {
                    Some(b) if b.ban.until > now => active += 1,
                    Some(b) if b.forget_at > now => {}
                    Some(_) => {
                        s.ban = None;
                        self.banned.fetch_sub(1, Ordering::Relaxed);
                    }
                    None => {}
                }
                if s.ban.is_none() && s.keep_score(now).1 == 0 {
                    *entry = None;
                }
            }
        }
        active
    }

    /// Subjects tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).iter().flatten().count()).sum()
    }

    /// Whether no subject is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A slot is plain data updated in place: a panic elsewhere cannot leave it half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn ip(n: u32) -> Subject {
        Subject::ip(IpAddr::V4(Ipv4Addr::from(n)))
    }

    fn policy() -> Policy {
        Policy {
            threshold: 10,
            window_ms: 1_000,
            ban_ms: 5_000,
            escalation_window_ms: 60_000,
            escalation_factor: 2,
            max_ban_ms: 15_000,
        }
    }

    /// Sends `n` events spread over `over` ms from `at`; the ban they started, if any.
    fn burst(g: &Guard, s: &Subject, n: u64, at: u64, over: u64) -> Option<Ban> {
        (0..n).find_map(|i| g.record(s, Reason::Refusals, &policy(), at + i * over / n))
    }

    #[test]
    fn the_threshold_within_the_window_bans_and_slower_traffic_does_not() {
        let g = Guard::new(4096);
        let (fast, slow) = (ip(1), ip(2));
        // Eight a second, for a minute: never ten in any one second.
        assert_eq!(burst(&g, &slow, 480, 0, 60_000), None);
        let ban = burst(&g, &fast, 10, 0, 500).expect("ten in half a second");
        assert_eq!((ban.strike, ban.until - ban.started), (1, 5_000));
        assert_eq!(g.check(&fast, ban.until - 1), Some(ban));
        assert_eq!(g.check(&fast, ban.until), None);
        assert_eq!(g.check(&slow, 1_000), None);
        // While banned, events do not count: the ban does not grow.
        assert_eq!(burst(&g, &fast, 100, 1_000, 100), None);
        assert_eq!(g.active(1_000), vec![(fast, ban)]);
    }

    #[test]
    fn repeats_within_the_escalation_window_last_longer_and_then_the_record_is_clean() {
        let g = Guard::new(4096);
        let s = ip(7);
        let mut at = 0;
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let ban = burst(&g, &s, 10, at, 100).unwrap();
            lengths.push((ban.strike, ban.until - ban.started));
            at = ban.until + 1_000;
        }
        assert_eq!(lengths, vec![(1, 5_000), (2, 10_000), (3, 15_000), (4, 15_000)]);
        // A quiet hour later, a ban is a first one again.
        at += 61_000;
        assert_eq!(g.sweep(at), 0);
        assert_eq!(burst(&g, &s, 10, at, 100).unwrap().strike, 1);
    }

    #[test]
    fn lifting_a_ban_forgets_the_record() {
        let g = Guard::new(4096);
        let s = Subject::Key("team-a/acme".into());
        let ban = burst(&g, &s, 10, 0, 100).unwrap();
        assert!(g.lift(&s, 1_000));
        assert_eq!(g.check(&s, 1_000), None);
        assert!(!g.lift(&s, 1_000));
        assert_eq!(burst(&g, &s, 10, ban.until, 100).unwrap().strike, 1);
    }

    #[test]
    fn a_ban_from_another_replica_holds_unless_a_longer_one_does() {
        let g = Guard::new(4096);
        let s = ip(9);
        let ban = |until, strike| Ban {
            reason: Reason::InvalidKeys,
            started: 0,
            until,
            strike,
        };
        assert!(g.impose(&s, ban(10_000, 2), 20_000, 0));
        assert_eq!(g.check(&s, 9_999).map(|b| b.strike), Some(2));
        assert!(!g.impose(&s, ban(5_000, 1), 20_000, 0));
        assert!(!g.impose(&s, ban(50, 1), 20_000, 100), "already over");
        assert!(g.impose(&s, ban(12_000, 3), 20_000, 0));
        assert_eq!(g.check(&s, 11_000).map(|b| b.until), Some(12_000));
    }

    /// A million addresses, a few events each, interleaved with ten heavy hitters: the table
    /// stays at its size and every heavy hitter is banned.
    #[test]
    fn a_spray_from_a_million_addresses_stays_in_bounds_and_the_heavy_hitters_are_banned() {
        let g = Guard::new(16_384);
        let heavy: Vec<Subject> = (0..10).map(|i| ip(0x0a00_0000 + i)).collect();
        let mut banned = std::collections::HashSet::new();
        for n in 0..1_000_000u32 {
            let now = u64::from(n) / 100; // 10 s in all; 100,000 events a second
            let s = ip(0x7f00_0000 + n);
            assert_eq!(g.record(&s, Reason::Refusals, &policy(), now), None);
            // Each heavy hitter sends one every 5 ms: 200 a second, against 10 a second to ban.
            if n % 500 == 0 {
                for h in &heavy {
                    if g.record(h, Reason::Refusals, &policy(), now).is_some() {
                        banned.insert(h.clone());
                    }
                }
            }
        }
        assert_eq!(banned.len(), heavy.len());
        assert!(g.len() <= g.capacity());
        assert_eq!(g.bytes(), g.max_bytes());
        assert!(g.max_bytes() <= 16_384 * 128, "{} bytes", g.max_bytes());
    }
}
