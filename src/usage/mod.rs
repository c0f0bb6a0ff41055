//! Usage visibility: what each key did, counted exactly on the request path, and one access-log
//! line per request, written off it.
//!
//! [`Usage`] holds per-key counters (requests, admitted, refused by code, and the last minute's
//! requests and refusals) that the admin endpoint serves; [`AccessLog`] is a bounded queue to a
//! writer thread that turns [`Record`]s into JSON Lines. Neither knows the gateway: the gateway
//! passes key ids, codes and times in, so this module imports nothing of it.

mod log;

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;

pub use log::{AccessLog, LogTarget, Record};

const SHARDS: usize = 32;
/// The "last minute" of [`KeyUsage::last_minute`].
const MINUTE_MS: u64 = 60_000;

/// What one key did since the gateway started, and in the last minute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsage {
    /// Requests presented with the key.
    pub requests: u64,
    /// Requests the limits let through (forwarded, or a task accepted).
    pub admitted: u64,
    /// Requests the gateway answered itself, by code.
    #[serde(serialize_with = "as_map")]
    pub refused: Vec<(&'static str, u64)>,
    /// The last 60 seconds (a sliding estimate from two aligned minutes).
    pub last_minute: Minute,
    #[serde(skip)]
    window: Window,
}

fn as_map<S: serde::Serializer>(pairs: &[(&'static str, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (*k, *v)))
}

/// Requests and refusals in the last minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Requests.
    pub requests: u64,
    /// Of them, refused.
    pub refused: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Window {
    start: u64,
    cur: Minute,
    prev: Minute,
}

impl Window {
    fn roll(&mut self, now: u64) {
        let start = now - now % MINUTE_MS;
        if start != self.start {
            self.prev = if start == self.start + MINUTE_MS {
                self.cur
            } else {
                Minute::default()
            };
            self.cur = Minute::default();
            self.start = start;
        }
    }

    fn estimate(&self, now: u64) -> Minute {
        let mut w = *self;
        w.roll(now);
        let left = MINUTE_MS - (now - w.start);
        let share = |prev: u64, cur: u64| prev * left / MINUTE_MS + cur;
        Minute {
            requests: share(w.prev.requests, w.cur.requests),
            refused: share(w.prev.refused, w.cur.refused),
        }
    }
}

/// One lock's share of the keys.
type Shard = Mutex<HashMap<Arc<str>, KeyUsage>>;

/// Per-key usage counters, by key id (`namespace/name`).
pub struct Usage {
    shards: Box<[Shard]>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").finish_non_exhaustive()
    }
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Usage {
    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Arc<str>, KeyUsage>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one request of `key` at `now` (ms): admitted, or refused with `code`.
    pub fn count(&self, key: &Arc<str>, refused: Option<&'static str>, now: u64) {
        let mut shard = self.shard(key);
        let u = match shard.get_mut(&**key) {
            Some(u) => u,
            None => shard.entry(Arc::clone(key)).or_default(),
        };
        u.requests += 1;
        u.window.roll(now);
        u.window.cur.requests += 1;
        match refused {
            None => u.admitted += 1,
            Some(code) => {
                u.window.cur.refused += 1;
                match u.refused.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, n)) => *n += 1,
                    None => u.refused.push((code, 1)),
                }
            }
        }
    }

    /// What `key` did, as of `now` (ms); `None` if it sent nothing.
    pub fn of(&self, key: &str, now: u64) -> Option<KeyUsage> {
        let shard = self.shard(key);
        let mut u = shard.get(key)?.clone();
        u.last_minute = u.window.estimate(now);
        u.refused.sort();
        Some(u)
    }

    /// Every key that sent something, with its usage as of `now`, by key id.
    pub fn all(&self, now: u64) -> Vec<(Arc<str>, KeyUsage)> {
        let mut out: Vec<(Arc<str>, KeyUsage)> = Vec::new();
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(s.iter().map(|(k, u)| {
                let mut u = u.clone();
                u.last_minute = u.window.estimate(now);
                u.refused.sort();
                (Arc::clone(k), u)
            }));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Forgets the keys `keep` says are gone (deleted keys), so memory follows the key set.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| keep(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_by_outcome_and_the_last_minute() {
        let u = Usage::default();
        let k: Arc<str> = "team-a/acme".into();
        for i in 0..5 {
            u.count(&k, None, i);
        }
        for _ in 0..3 {
            u.count(&k, Some("rate_limit"), 10);
        }
        u.count(&k, Some("concurrency_limit_exceeded"), 20);
        let got = u.of("team-a/acme", 30).unwrap();
        assert_eq!((got.requests, got.admitted), (9, 5));
        assert_eq!(
            got.refused,
            vec![("concurrency_limit_exceeded", 1), ("rate_limit", 3)]
        );
        assert_eq!(
            got.last_minute,
            Minute {
                requests: 9,
                refused: 4
            }
        );
        // Half a minute into the next minute, half of the previous one still counts.
        assert_eq!(
            u.of("team-a/acme", 90_000).unwrap().last_minute,
            Minute {
                requests: 4,
                refused: 2
            }
        );
        assert_eq!(
            u.of("team-a/acme", 200_000).unwrap().last_minute,
            Minute::default()
        );
        assert_eq!(u.of("team-a/other", 0), None);
        u.retain(|k| k != "team-a/acme");
        assert!(u.all(0).is_empty());
    }
}
