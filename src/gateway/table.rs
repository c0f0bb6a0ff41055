//! The key table a gateway enforces: one [`GatewayConfig`] turned into a lookup by token digest,
//! with each key's live limiter state carried over from the previous table.
//!
//! The live state (slot pool, rate buckets, recent request durations) belongs to the key's id,
//! not to the configuration, so a reload that changes a plan or moves a key to another plan keeps
//! the requests in flight and the quota already used.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use super::metrics::{ErrorCode, Metrics, PlanMetrics};
use crate::{
    api::BucketScope,
    config::{CompiledKey, GatewayConfig, KeyLimits, KeyMap, RateLimit, matches_any, pieces::KeyDelta},
    limiter::{
        Gcra, RateParams, RateRefusal, SharedDecision, SharedLease, SharedLimiter, SlotGuard, SlotOwner,
        SlotPool, SlotsFull,
        shared::{BucketName, SharedError, SharedRequest},
    },
};

/// Endpoint buckets one key may hold. A client walking random paths reaches this bound; beyond
/// it, full (idle) buckets are dropped first, and if none is idle the extra endpoints share one
/// overflow bucket, so memory stays bounded and the limit still holds.
pub const MAX_ENDPOINT_BUCKETS: usize = 1024;

/// Passes on a hash computed already.
#[derive(Default)]
struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Endpoint buckets are keyed by a 64-bit hash of the path, seeded at random per process: the
/// lookup then touches no memory beyond the map itself (a boxed path would be one more cache
/// miss per request). Two endpoints of one key whose hashes collide would share a bucket; with
/// at most [`MAX_ENDPOINT_BUCKETS`] endpoints the odds are about 1 in 10^13, and a client cannot
/// aim for a collision without the seed. The lowest bit is always set, which leaves
/// [`OVERFLOW`] free to name the shared bucket.
fn endpoint_hash(path: &str) -> u64 {
    static SEED: std::sync::LazyLock<foldhash::quality::RandomState> =
        std::sync::LazyLock::new(foldhash::quality::RandomState::default);
    SEED.hash_one(path) | 1
}

/// The bucket shared by the endpoints beyond [`MAX_ENDPOINT_BUCKETS`] while none of the others
/// is idle. No endpoint hashes to it.
const OVERFLOW: u64 = 0;

type EndpointMap = HashMap<u64, Gcra, BuildHasherDefault<PrehashedHasher>>;

/// A key's rate buckets: one for the whole key, or one per endpoint (plus [`OVERFLOW`]), as the
/// plan in force says. A reload that changes the plan's scope starts the new scope's buckets full,
/// as a new endpoint's bucket starts. One enum rather than both side by side keeps [`KeyState`]
/// within one cache line.
#[derive(Debug)]
enum Buckets {
    Key(Gcra),
    Endpoints(EndpointMap),
}

impl Buckets {
    fn key(&mut self, params: RateParams) -> &mut Gcra {
        if let Self::Endpoints(_) = self {
            *self = Self::Key(Gcra::new(params));
        }
        match self {
            Self::Key(bucket) => bucket,
            Self::Endpoints(_) => unreachable!("just replaced"),
        }
    }

    fn endpoints(&mut self) -> &mut EndpointMap {
        if let Self::Key(_) = self {
            *self = Self::Endpoints(EndpointMap::default());
        }
        match self {
            Self::Endpoints(map) => map,
            Self::Key(_) => unreachable!("just replaced"),
        }
    }
}

/// Endpoint buckets in `map`, not counting [`OVERFLOW`].
fn endpoint_count(map: &EndpointMap) -> usize {
    map.len() - usize::from(map.contains_key(&OVERFLOW))
}

/// The live limiter state of one key, shared across configuration reloads.
///
/// Kept to 48 bytes so that, with the `Arc`'s two counts, it is one 64-byte allocation: at a
/// million keys every request's state is a cache miss, and this makes it one line rather than two
/// or three (a test holds the size).
#[derive(Debug)]
pub struct KeyState {
    slots: SlotPool,
    /// Exponentially weighted mean of request durations, in microseconds (0: none seen yet).
    mean_micros: AtomicU32,
    /// Held for the few instructions of a bucket update; uncontended unless one key sends from
    /// many cores at once.
    buckets: Mutex<Buckets>,
}

impl KeyState {
    fn new(params: RateParams) -> Self {
        Self {
            slots: SlotPool::default(),
            mean_micros: AtomicU32::new(0),
            buckets: Mutex::new(Buckets::Key(Gcra::new(params))),
        }
    }

    /// Requests of this key in flight now.
    pub fn in_flight(&self) -> u32 {
        self.slots.in_flight()
    }

    /// Records how long an admitted request held its slot, for the `Retry-After` estimate.
    pub fn record_duration(&self, nanos: u64) {
        let micros = u32::try_from(nanos / 1_000).unwrap_or(u32::MAX);
        // Weight 1/8: follows a change of the upstream's latency within a few dozen requests.
        let old = self.mean_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            micros
        } else {
            old - old / 8 + micros / 8
        };
        self.mean_micros.store(new, Ordering::Relaxed);
    }

    /// Seconds until a slot is likely to free: with `in_flight` requests of mean duration `d`
    /// started at random times, one ends every `d / in_flight` on average. At least 1 s, since
    /// `Retry-After` counts whole seconds.
    fn slot_retry_after(&self, in_flight: u32) -> u64 {
        let mean = self.mean_micros.load(Ordering::Relaxed);
        let wait = mean / in_flight.max(1);
        u64::from(wait.div_ceil(1_000_000)).max(1)
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // A panic while holding the lock cannot leave a timestamp half-written.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the bucket a request draws on.
    fn with_bucket<R>(
        &self,
        scope: BucketScope,
        path: &str,
        now: u64,
        params: RateParams,
        f: impl FnOnce(&mut Gcra) -> R,
    ) -> R {
        if scope == BucketScope::Key {
            return f(self.buckets().key(params));
        }
        let hash = endpoint_hash(path);
        let mut guard = self.buckets();
        let buckets = guard.endpoints();
        if let Some(b) = buckets.get_mut(&hash) {
            return f(b);
        }
        if endpoint_count(buckets) >= MAX_ENDPOINT_BUCKETS {
            buckets.retain(|_, b| !b.is_idle(now));
            if endpoint_count(buckets) >= MAX_ENDPOINT_BUCKETS {
                return f(buckets.entry(OVERFLOW).or_insert_with(|| Gcra::new(params)));
            }
        }
        f(buckets.entry(hash).or_insert_with(|| Gcra::new(params)))
    }

    /// Drops endpoint buckets that are full again: they hold no information.
    pub fn sweep(&self, now: u64) -> usize {
        match &mut *self.buckets() {
            Buckets::Key(_) => 0,
            Buckets::Endpoints(map) => {
                let before = endpoint_count(map);
                map.retain(|_, b| !b.is_idle(now));
                before - endpoint_count(map)
            }
        }
    }

    /// Endpoint buckets held now.
    pub fn endpoint_buckets(&self) -> usize {
        match &*self.buckets() {
            Buckets::Key(_) => 0,
            Buckets::Endpoints(map) => endpoint_count(map),
        }
    }
}

impl SlotOwner for KeyState {
    fn pool(&self) -> &SlotPool {
        &self.slots
    }
}

/// An admitted key as one configuration defines it.
///
/// The table holds entries inline, each on one aligned 64-byte cache line: the digest, the
/// state, the profile and the id are all a request reads of it. Unaligned, an entry straddled two
/// lines; at a million keys each of them is a miss. The key's table is the gateway's one copy of
/// its keys: an entry and its state are most of the memory a key costs.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub struct KeyEntry {
    /// SHA-256 of the key's token: what the table looks it up by.
    digest: [u8; 32],
    /// Live state, shared with earlier and later tables.
    pub state: Arc<KeyState>,
    /// Plan, standing and limits: for a key that only takes its plan's, its plan's profile,
    /// which the table holds once per plan, so a plan change rewrites no entry.
    profile: Arc<KeyProfile>,
    /// `namespace/name` of the ApiKey (safe to log).
    pub id: Arc<str>,
}

/// What a key is besides its token and its state: its plan, its standing, its own limits. Every
/// key of a plan that is neither suspended nor expiring nor overriding shares one.
#[derive(Debug, PartialEq, Eq)]
struct KeyProfile {
    /// The key's plan in its table's plans (stable across tables that share this entry).
    plan_ix: u32,
    /// Refused with 403.
    suspended: bool,
    /// Unix seconds after which the key is refused.
    expires_at: Option<i64>,
    /// What the key overrides, and its plan's limits with them: resolved again when the plan
    /// changes. `None`: the plan's limits.
    own: Option<(crate::api::LimitOverrides, Arc<KeyLimits>)>,
}

impl KeyProfile {
    fn of_plan(plan_ix: u32) -> Self {
        Self {
            plan_ix,
            suspended: false,
            expires_at: None,
            own: None,
        }
    }
}

/// A key as its table enforces it: its entry with its plan's name, limits and metric handles.
#[derive(Clone, Copy, Debug)]
pub struct KeyView<'t> {
    entry: &'t KeyEntry,
    /// Limits in force for this key; shared by every key of a plan without overrides.
    pub limits: &'t Arc<KeyLimits>,
    /// Metric handles of the key's plan.
    pub metrics: &'t Arc<PlanMetrics>,
    /// Plan name (safe to log and to use as a metric label).
    pub plan: &'t Arc<str>,
    /// The plan's abuse policy, if it has one.
    pub abuse: Option<&'t PlanAbuse>,
}

impl std::ops::Deref for KeyView<'_> {
    type Target = KeyEntry;

    fn deref(&self) -> &KeyEntry {
        self.entry
    }
}

impl<'t> KeyView<'t> {
    /// `namespace/name` of the key, for as long as its table.
    pub fn entry_id(&self) -> &'t Arc<str> {
        &self.entry.id
    }

    /// Whether the key overrides some of its plan's limits.
    pub fn overridden(&self) -> bool {
        self.entry.profile.own.is_some()
    }
}

/// The entries by digest, in open addressing with linear probing, kept at most half full.
///
/// A lookup starts at the entry slot the digest names and reads the entries themselves, so a hit
/// costs one entry line, or the next one over (1.5 on average at half load). A general hash table
/// reads a line of control bytes first and the entry after it: one more dependent cache miss on
/// every request at a million keys. A key change removes entries by backward shift, which leaves
/// no tombstone, so a table patched many times probes as one built afresh. The digest is SHA-256
/// of a secret token: its first bytes are already uniform, and a client who grinds tokens towards
/// one cluster only lengthens its own lookups, by a few entries.
#[derive(Clone, Debug)]
struct DigestTable {
    /// A power of two in length; `None` is a free slot (the entry's `Arc`s give `Option` a niche,
    /// so a slot is exactly one entry).
    slots: Box<[Option<KeyEntry>]>,
    len: usize,
}

impl KeyEntry {
    /// SHA-256 of the key's token.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Refused with 403 `key_suspended`.
    #[inline]
    pub fn suspended(&self) -> bool {
        self.profile.suspended
    }

    /// Unix seconds after which the key is refused with 401 `key_expired`.
    #[inline]
    pub fn expires_at(&self) -> Option<i64> {
        self.profile.expires_at
    }

    fn plan_ix(&self) -> u32 {
        self.profile.plan_ix
    }

    fn own_limits(&self) -> Option<&Arc<KeyLimits>> {
        self.profile.own.as_ref().map(|(_, limits)| limits)
    }
}

impl DigestTable {
    fn with_capacity(entries: usize) -> Self {
        Self {
            slots: std::iter::repeat_with(|| None)
                .take(Self::slots_for(entries))
                .collect(),
            len: 0,
        }
    }

    /// Slots for `entries` at most half full: a miss (an unknown key) then reads 2.5 entries
    /// on average, a hit 1.5.
    fn slots_for(entries: usize) -> usize {
        (entries.max(8) * 2).next_power_of_two()
    }

    #[inline]
    fn home(&self, digest: &[u8; 32]) -> usize {
        // Bytes 0..4 choose the part (`KeyTable::part_of`); bytes 8..16 are independent of them.
        let [_, _, _, _, _, _, _, _, a, b, c, d, e, f, g, h, ..] = *digest;
        u64::from_le_bytes([a, b, c, d, e, f, g, h]) as usize & (self.slots.len() - 1)
    }

    /// Inserts `entry` unless its digest is present already (the configuration keys its entries
    /// by digest, so that would be a bug upstream; the first entry stays, as in a set).
    fn insert(&mut self, entry: KeyEntry) {
        if (self.len + 1) * 2 > self.slots.len() {
            let old = std::mem::replace(self, Self::with_capacity(self.len + 1));
            for e in old.slots.into_vec().into_iter().flatten() {
                self.insert(e);
            }
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(&entry.digest);
        loop {
            match &mut self.slots[i] {
                Some(e) if e.digest == entry.digest => return,
                Some(_) => i = (i + 1) & mask,
                free @ None => {
                    *free = Some(entry);
                    self.len += 1;
                    return;
                }
            }
        }
    }

    /// The slot holding the entry of `digest`.
    #[inline]
    fn find(&self, digest: &[u8; 32]) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(digest);
        // Ends: at most half the slots are taken, so the probe meets a free one.
        loop {
            if self.slots.get(i)?.as_ref()?.digest == *digest {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, digest: &[u8; 32]) -> Option<&KeyEntry> {
        self.slots[self.find(digest)?].as_ref()
    }

    fn get_mut(&mut self, digest: &[u8; 32]) -> Option<&mut KeyEntry> {
        let i = self.find(digest)?;
        self.slots[i].as_mut()
    }

    fn iter(&self) -> impl Iterator<Item = &KeyEntry> {
        self.slots.iter().flatten()
    }

    /// Takes out the entry of `digest`. Backward-shift deletion: the entries after it in its run
    /// move back where their probe would reach them, so no tombstone lengthens later lookups.
    fn remove(&mut self, digest: &[u8; 32]) -> Option<KeyEntry> {
        let mask = self.slots.len() - 1;
        let mut hole = self.find(digest)?;
        let removed = self.slots[hole].take();
        self.len -= 1;
        let mut j = (hole + 1) & mask;
        while let Some(e) = &self.slots[j] {
            let home = self.home(&e.digest);
            // The entry at `j` may fill the hole unless its home lies cyclically in (hole, j]:
            // then a probe from its home would stop at the hole before reaching it.
            let reachable_past_hole = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !reachable_past_hole {
                self.slots[hole] = self.slots[j].take();
                hole = j;
            }
            j = (j + 1) & mask;
        }
        removed
    }
}

/// Which of `count` parts (a power of two) holds the entry of `digest`.
#[inline]
fn part_of(digest: &[u8; 32], count: usize) -> usize {
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) as usize & (count - 1)
}

/// What the keys of one plan share: its name, its limits for keys without overrides, its metric
/// handles.
#[derive(Debug)]
struct PlanSlot {
    name: Arc<str>,
    limits: Arc<KeyLimits>,
    /// The profile of its keys that take its limits as they are.
    profile: Arc<KeyProfile>,
    metrics: Arc<PlanMetrics>,
    abuse: Option<PlanAbuse>,
}

/// A plan's abuse policy as the request path applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanAbuse {
    /// When a ban starts and how long it lasts.
    pub policy: crate::abuse::Policy,
    /// Whether the key is banned (from every address) rather than the client's address.
    pub by_key: bool,
}

impl From<&crate::config::AbusePolicy> for PlanAbuse {
    fn from(a: &crate::config::AbusePolicy) -> Self {
        Self {
            policy: crate::abuse::Policy {
                threshold: a.refusals,
                window_ms: a.window_ms,
                ban_ms: a.ban_ms,
                escalation_window_ms: a.escalation_window_ms,
                escalation_factor: a.escalation_factor,
                max_ban_ms: a.max_ban_ms,
            },
            by_key: a.by == crate::api::BanScope::Key,
        }
    }
}

/// The plans of a table, by the index entries name them with. A plan keeps its index for as long
/// as tables share entries, so that a plan change makes a new list and shares every entry.
#[derive(Debug, Default)]
struct Plans {
    /// `None`: a plan of an earlier configuration, gone from this one.
    slots: Vec<Option<PlanSlot>>,
    index: HashMap<Arc<str>, u32>,
}

impl Plans {
    /// The plans of `config`, keeping the indexes of `previous`.
    fn of(config: &GatewayConfig, previous: Option<&Plans>, metrics: &Metrics) -> Self {
        let mut index = previous.map(|p| p.index.clone()).unwrap_or_default();
        let mut slots: Vec<Option<PlanSlot>> = Vec::new();
        slots.resize_with(index.len(), || None);
        for (name, def) in &config.plans {
            let name: Arc<str> = name.as_str().into();
            let ix = *index.entry(Arc::clone(&name)).or_insert_with(|| {
                slots.push(None);
                (slots.len() - 1) as u32
            });
            // The entries sharing the previous table's profile keep pointing at the same one.
            let profile = previous
                .and_then(|p| p.get(ix))
                .map_or_else(|| Arc::new(KeyProfile::of_plan(ix)), |p| Arc::clone(&p.profile));
            slots[ix as usize] = Some(PlanSlot {
                profile,
                limits: Arc::new(KeyLimits::resolve(def, None)),
                metrics: metrics.plan(&name),
                abuse: def.abuse.as_ref().map(PlanAbuse::from),
                name,
            });
        }
        Self { slots, index }
    }

    fn get(&self, ix: u32) -> Option<&PlanSlot> {
        self.slots.get(ix as usize)?.as_ref()
    }

    /// The entry of `key` (token digest `hex_digest`), with `state` carried over or a fresh one;
    /// `None` when the digest is not hex or the plan is not in `config`.
    fn entry(
        &self,
        config: &GatewayConfig,
        hex_digest: &str,
        key: &CompiledKey,
        state: Option<Arc<KeyState>>,
    ) -> Option<KeyEntry> {
        let mut digest = [0u8; 32];
        // `GatewayConfig::check` guarantees 64 hex digits; skip rather than panic if not.
        hex::decode_to_slice(hex_digest, &mut digest).ok()?;
        let plan_def = config.plans.get(&key.plan)?;
        let plan_ix = *self.index.get(key.plan.as_str())?;
        let plan = self.get(plan_ix)?;
        let own = key
            .overrides
            .as_ref()
            .map(|o| (o.clone(), Arc::new(KeyLimits::resolve(plan_def, Some(o)))));
        let limits = own.as_ref().map_or(&plan.limits, |(_, l)| l);
        let state = state.unwrap_or_else(|| Arc::new(KeyState::new(rate_params(limits))));
        let profile = KeyProfile {
            plan_ix,
            suspended: key.suspended,
            expires_at: key.expires_at,
            own,
        };
        Some(KeyEntry {
            digest,
            id: Arc::clone(&key.id),
            state,
            profile: match profile == *plan.profile {
                true => Arc::clone(&plan.profile),
                false => Arc::new(profile),
            },
        })
    }
}

/// A configuration ready to enforce.
///
/// The entries are split into parts by the first bytes of their digest, each part shared between
/// tables until a change touches it: a key added, removed or rotated copies one part of about
/// 2,000 keys, and the parts it did not touch are neither copied nor dropped (at 100,000 keys a
/// copy of every entry and the drop of the old ones took most of a reload). Entries name their
/// plan by index, so a plan change shares every part and rewrites only the keys that override
/// their plan.
#[derive(Debug)]
pub struct KeyTable {
    /// The configuration this table enforces, without its keys: the entries are the gateway's
    /// one copy of them (`keys` is empty).
    pub config: Arc<GatewayConfig>,
    /// The keys of the configuration the table was built from, while someone else holds them
    /// (`gw up` does): a configuration around the same keys is then a plan change.
    keys_from: std::sync::Weak<KeyMap>,
    /// A power of two in length.
    parts: Box<[Arc<DigestTable>]>,
    plans: Plans,
    /// Entries per plan index.
    counts: Vec<usize>,
    /// Digests of the keys with limits of their own, which a plan change resolves again.
    overridden: Arc<std::collections::HashSet<[u8; 32]>>,
    len: usize,
}

impl KeyTable {
    /// The table of an empty configuration.
    pub fn empty() -> Self {
        Self::build(Arc::new(GatewayConfig::empty()), None, &Metrics::new())
    }

    /// Builds the table for `config`, carrying over each key's live state from `previous` by key id.
    pub fn build(config: Arc<GatewayConfig>, previous: Option<&KeyTable>, metrics: &Metrics) -> Self {
        Self::build_from(config, previous, None, metrics)
    }

    /// [`KeyTable::build`], patching `previous` when `delta` says which keys changed since it
    /// (an assembly from changed shards, whose `config` holds only the keys it changed): a key
    /// added, removed or rotated at 100,000 keys then costs a copy of one part and a few
    /// entries, not an entry and a lookup by id for every key.
    pub fn build_from(
        config: Arc<GatewayConfig>,
        previous: Option<&KeyTable>,
        delta: Option<&KeyDelta>,
        metrics: &Metrics,
    ) -> Self {
        if let (Some(previous), Some(delta)) = (previous, delta) {
            if delta.base != previous.config.hash {
                // The assembly and this table are fed by one loop, which applies every assembly
                // it makes or finds it enforced already: a bug if this happens.
                tracing::error!(
                    base = %delta.base,
                    enforced = %previous.config.hash,
                    "configuration delta made against another configuration than the one enforced"
                );
            }
            return Self::patched(config, previous, &delta.changed, metrics);
        }
        if let Some(previous) = previous
            && std::ptr::eq(previous.keys_from.as_ptr(), Arc::as_ptr(&config.keys))
        {
            // A plan change: the same keys under new plan limits.
            return Self::patched(Arc::new(config.without_keys()), previous, &[], metrics);
        }
        let old: HashMap<&str, &Arc<KeyState>> = previous
            .map(|p| p.entries().map(|e| (&*e.entry.id, &e.entry.state)).collect())
            .unwrap_or_default();
        let plans = Plans::of(&config, None, metrics);
        let count = crate::config::pieces::shard_count(config.keys.len());
        let mut parts: Vec<DigestTable> = (0..count)
            .map(|_| DigestTable::with_capacity(config.keys.len() / count))
            .collect();
        let mut counts = vec![0; plans.slots.len()];
        let mut overridden = std::collections::HashSet::new();
        for (hex_digest, key) in config.keys.iter() {
            let state = old.get(&*key.id).map(|s| Arc::clone(s));
            if let Some(entry) = plans.entry(&config, hex_digest, key, state) {
                counts[entry.plan_ix() as usize] += 1;
                if entry.own_limits().is_some() {
                    overridden.insert(entry.digest);
                }
                parts[part_of(&entry.digest, count)].insert(entry);
            }
        }
        let parts = parts.into_iter().map(Arc::new).collect();
        let mut table = Self::from_parts(
            Arc::new(config.without_keys()),
            parts,
            plans,
            counts,
            Arc::new(overridden),
        );
        table.keys_from = Arc::downgrade(&config.keys);
        table
    }

    fn from_parts(
        config: Arc<GatewayConfig>,
        parts: Box<[Arc<DigestTable>]>,
        plans: Plans,
        counts: Vec<usize>,
        overridden: Arc<std::collections::HashSet<[u8; 32]>>,
    ) -> Self {
        let len = parts.iter().map(|p| p.len).sum();
        Self {
            config,
            keys_from: std::sync::Weak::new(),
            parts,
            plans,
            counts,
            overridden,
            len,
        }
    }

    /// The previous table with the entries of `changed` digests taken out and put back as
    /// `config` has them. Live state follows the key id, so a rotated token (a new digest, the
    /// same key) keeps its requests in flight and its quota. Entries name their plan by index,
    /// so new plan limits need no entry rewritten but those of the keys with limits of their own.
    fn patched(
        config: Arc<GatewayConfig>,
        previous: &KeyTable,
        changed: &[String],
        metrics: &Metrics,
    ) -> Self {
        let plans = Plans::of(&config, Some(&previous.plans), metrics);
        let mut counts = previous.counts.clone();
        counts.resize(plans.slots.len(), 0);
        let mut overridden = Arc::clone(&previous.overridden);
        // Shares every part; the first write to one copies it (`make_mut`), once.
        let mut parts = previous.parts.clone();
        let count = parts.len();
        let mut states: HashMap<Arc<str>, Arc<KeyState>> = HashMap::new();
        for hex_digest in changed {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(hex_digest, &mut digest).is_ok() {
                let part = &mut parts[part_of(&digest, count)];
                if part.get(&digest).is_some()
                    && let Some(e) = Arc::make_mut(part).remove(&digest)
                {
                    counts[e.plan_ix() as usize] -= 1;
                    if e.own_limits().is_some() {
                        Arc::make_mut(&mut overridden).remove(&digest);
                    }
                    states.insert(e.id, e.state);
                }
            }
        }
        for hex_digest in changed {
            let Some(key) = config.keys.get(hex_digest) else {
                continue;
            };
            let state = states.remove(&*key.id);
            if let Some(entry) = plans.entry(&config, hex_digest, key, state) {
                counts[entry.plan_ix() as usize] += 1;
                if entry.own_limits().is_some() {
                    Arc::make_mut(&mut overridden).insert(entry.digest);
                }
                Arc::make_mut(&mut parts[part_of(&entry.digest, count)]).insert(entry);
            }
        }
        if previous.config.plans != config.plans {
            // The keys with limits of their own resolve them again against their plan's new ones.
            for digest in overridden.iter() {
                let part = &mut parts[part_of(digest, count)];
                let Some(e) = part.get(digest) else { continue };
                let Some((overrides, limits)) = &e.profile.own else {
                    continue;
                };
                let Some(def) = plans.get(e.plan_ix()).and_then(|p| config.plans.get(&*p.name)) else {
                    continue;
                };
                let resolved = KeyLimits::resolve(def, Some(overrides));
                if **limits == resolved {
                    continue;
                }
                let profile = Arc::new(KeyProfile {
                    own: Some((overrides.clone(), Arc::new(resolved))),
                    ..*e.profile
                });
                if let Some(e) = Arc::make_mut(part).get_mut(digest) {
                    e.profile = profile;
                }
            }
        }
        Self::from_parts(Arc::new(config.without_keys()), parts, plans, counts, overridden)
    }

    #[inline]
    fn view<'t>(&'t self, entry: &'t KeyEntry) -> Option<KeyView<'t>> {
        let plan = self.plans.get(entry.plan_ix())?;
        Some(KeyView {
            entry,
            limits: entry.own_limits().unwrap_or(&plan.limits),
            metrics: &plan.metrics,
            plan: &plan.name,
            abuse: plan.abuse.as_ref(),
        })
    }

    /// The key whose token has this SHA-256 digest.
    #[inline]
    pub fn get(&self, digest: &[u8; 32]) -> Option<KeyView<'_>> {
        self.view(self.parts[part_of(digest, self.parts.len())].get(digest)?)
    }

    /// Every admitted key.
    pub fn entries(&self) -> impl Iterator<Item = KeyView<'_>> {
        self.parts
            .iter()
            .flat_map(|p| p.iter())
            .filter_map(|e| self.view(e))
    }

    /// Number of admitted keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is admitted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots sold per plan: the sum of every key's slot limit, from the entry counts per plan
    /// and the keys with limits of their own, without a pass over the table.
    pub fn capacity(&self) -> std::collections::BTreeMap<&str, i64> {
        let max = |l: &KeyLimits| l.slots.as_ref().map_or(0, |s| i64::from(s.max));
        let mut capacity: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for (ix, slot) in self.plans.slots.iter().enumerate() {
            if let Some(p) = slot {
                let n = self.counts.get(ix).copied().unwrap_or(0) as i64;
                capacity.insert(&p.name, n * max(&p.limits));
            }
        }
        for digest in self.overridden.iter() {
            if let Some(e) = self.get(digest)
                && let Some(c) = capacity.get_mut(&**e.plan)
            {
                let plan_max = max(&self.plans.get(e.plan_ix()).expect("viewed").limits);
                *c += max(e.limits) - plan_max;
            }
        }
        capacity
    }
}

fn rate_params(limits: &KeyLimits) -> RateParams {
    limits
        .rate
        .as_ref()
        .map(|r| RateParams {
            per_second: r.per_second,
            burst: r.burst,
        })
        .unwrap_or(RateParams {
            per_second: 1,
            burst: 1,
        })
}

/// Concurrency figures for the limit headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// Slots of the key.
    pub limit: u32,
    /// In flight for this key, counting this request when it was admitted.
    pub current: u32,
    /// Free slots left when the request was received.
    pub remaining: u32,
}

/// Rate figures for the limit headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateView {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests a full bucket admits at once (the quota of the `RateLimit-Policy` window).
    pub burst: u32,
    /// Requests the bucket admits at once after this one.
    pub remaining: u32,
}

/// What a request was admitted with: held until the response ends.
#[derive(Debug)]
pub struct Admitted {
    /// The key's slot, when its path is under the plan's concurrency patterns.
    pub slot: Option<SlotGuard<KeyState>>,
    /// The gateway-wide upstream slot, when a cap is configured.
    pub upstream: Option<SlotGuard>,
    /// The slot lease in the shared state, when limits are shared by several replicas.
    pub lease: Option<SharedLease>,
    /// The slot of the request's upstream target, when the target caps its requests in flight.
    pub target: Option<SlotGuard>,
    /// The target's slot lease in the shared state, when limits are shared.
    pub target_lease: Option<SharedLease>,
    /// Concurrency figures, when a slot limit applies.
    pub slots: Option<SlotView>,
    /// Rate figures, when a rate limit applies.
    pub rate: Option<RateView>,
}

/// Why a request was refused by the limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot of the key is taken.
    Concurrency {
        /// Concurrency figures.
        slots: SlotView,
        /// Rate figures (unchanged: a refused request costs no quota).
        rate: Option<RateView>,
        /// Estimated seconds until a slot frees.
        retry_after: u64,
    },
    /// The key's (or endpoint's) bucket is empty.
    Rate {
        /// Concurrency figures (no slot was taken).
        slots: Option<SlotView>,
        /// Rate figures.
        rate: RateView,
        /// Seconds until the bucket admits one request.
        retry_after: u64,
        /// Nanoseconds until the bucket admits one request (what a task waits instead of failing).
        wait_nanos: u64,
    },
    /// The gateway-wide cap of requests to the upstream is reached.
    Upstream {
        /// The cap.
        limit: u32,
    },
    /// The shared state is unreachable and the policy is to fail closed.
    Unavailable,
    /// The request's upstream target refused it: all its slots in use, its bucket empty, or
    /// the target unusable. The key's slot was given back.
    Target {
        /// `target_concurrency_limit_exceeded`, `target_rate_limit` or `target_unavailable`.
        code: ErrorCode,
        /// The target's slots or requests per second (0 when unavailable).
        limit: u32,
        /// Seconds until the target is worth trying again.
        retry_after: u64,
        /// The key's concurrency figures, without this request.
        slots: Option<SlotView>,
        /// The key's rate figures.
        rate: Option<RateView>,
    },
}

impl Refusal {
    /// Whether the refusal is the client's doing (its own limits), which abuse policies count;
    /// not the upstream's capacity or the shared state's outage.
    pub fn is_the_clients(&self) -> bool {
        matches!(self, Self::Concurrency { .. } | Self::Rate { .. })
    }

    /// The error code the refusal is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Concurrency { .. } => ErrorCode::ConcurrencyLimitExceeded,
            Self::Rate { .. } => ErrorCode::RateLimit,
            Self::Upstream { .. } => ErrorCode::UpstreamConcurrencyLimitExceeded,
            Self::Unavailable => ErrorCode::LimiterUnavailable,
            Self::Target { code, .. } => *code,
        }
    }
}

/// The gateway-wide cap on requests in flight to the upstream.
#[derive(Debug)]
pub struct UpstreamCap {
    /// Requests in flight to the upstream.
    pub pool: Arc<SlotPool>,
    /// The cap.
    pub limit: u32,
}

enum Inner {
    Slots(SlotsFull),
    Upstream,
}

/// The slot limit and rate limit that apply to a request on `path`.
fn limits_for<'a>(entry: &KeyView<'a>, path: &str) -> (Option<u32>, Option<&'a RateLimit>) {
    let slots = entry
        .limits
        .slots
        .as_ref()
        .filter(|s| matches_any(&s.paths, path))
        .map(|s| s.max);
    let rate = entry.limits.rate.as_ref().filter(|r| matches_any(&r.paths, path));
    (slots, rate)
}

/// The key's limits on `path` with nothing left, for a request refused before the limiter (a
/// banned client): the slots in flight are read, no bucket is touched.
pub fn exhausted(entry: &KeyView<'_>, path: &str) -> (Option<SlotView>, Option<RateView>) {
    let (slots, rate) = limits_for(entry, path);
    let slots = slots.map(|limit| SlotView {
        limit,
        current: entry.state.in_flight(),
        remaining: 0,
    });
    let rate = rate.map(|r| RateView {
        per_second: r.per_second,
        burst: r.burst,
        remaining: 0,
    });
    (slots, rate)
}

/// Whether any limit applies to a request on `path` (if none does, no limiter state is needed).
pub fn is_limited(entry: &KeyView<'_>, path: &str) -> bool {
    let (slots, rate) = limits_for(entry, path);
    slots.is_some() || rate.is_some()
}

/// One replica's share of a limit enforced by `share` replicas: never more than the limit, never
/// zero unless the limit is.
pub(super) fn share_of(limit: u32, share: u32) -> u32 {
    // Alone is the rule: a division on every request would cost more than the rest of the
    // arithmetic of the decision.
    if share <= 1 || limit == 0 {
        limit
    } else {
        limit.div_ceil(share)
    }
}

/// The rate decision alone, for a request that holds no slot (a task submission: the task takes
/// its slot when it runs). `Ok(None)` when no rate limit covers `path`.
pub fn admit_rate(entry: &KeyView<'_>, path: &str, now: u64) -> Result<Option<RateView>, Refusal> {
    let Some(rate) = limits_for(entry, path).1 else {
        return Ok(None);
    };
    let params = RateParams {
        per_second: rate.per_second,
        burst: rate.burst,
    };
    let view = |remaining| RateView {
        per_second: params.per_second,
        burst: params.burst,
        remaining,
    };
    let decision = entry.state.with_bucket(rate.per, path, now, params, |bucket| {
        bucket.admit_with(now, params, || Ok::<(), std::convert::Infallible>(()))
    });
    match decision {
        Ok(((), remaining)) => Ok(Some(view(remaining))),
        Err(RateRefusal::Limited { retry_after_nanos }) => Err(Refusal::Rate {
            slots: None,
            rate: view(0),
            retry_after: retry_after_nanos.div_ceil(1_000_000_000).max(1),
            wait_nanos: retry_after_nanos,
        }),
        Err(RateRefusal::Other(never)) => match never {},
    }
}

/// The per-request limiter decision in process memory: rate bucket around slot acquisition, so a
/// request refused for want of a slot (or of upstream capacity) consumes no rate quota. Never
/// waits. `share` divides every limit: 1 when this replica enforces alone, the number of live
/// replicas when shared state is unreachable and each replica enforces its part.
pub fn admit(
    entry: &KeyView<'_>,
    path: &str,
    now: u64,
    cap: Option<&UpstreamCap>,
    share: u32,
) -> Result<Admitted, Refusal> {
    let (slot_limit, rate) = limits_for(entry, path);
    let slot_limit = slot_limit.map(|l| share_of(l, share));
    let take = || -> Result<(Option<SlotGuard<KeyState>>, Option<SlotGuard>), Inner> {
        let slot = match slot_limit {
            Some(limit) => Some(SlotPool::try_acquire_in(&entry.state, limit).map_err(Inner::Slots)?),
            None => None,
        };
        let upstream = match cap {
            Some(c) => Some(c.pool.try_acquire(c.limit).map_err(|_| Inner::Upstream)?),
            None => None,
        };
        Ok((slot, upstream))
    };
    let slot_view = |g: &Option<SlotGuard<KeyState>>| {
        slot_limit.zip(g.as_ref()).map(|(limit, g)| SlotView {
            limit,
            current: g.in_flight,
            remaining: limit.saturating_sub(g.in_flight),
        })
    };
    let full = |limit: u32, f: SlotsFull| Refusal::Concurrency {
        slots: SlotView {
            limit,
            current: f.in_flight,
            remaining: 0,
        },
        rate: None,
        retry_after: entry.state.slot_retry_after(f.in_flight),
    };

    let Some(rate) = rate else {
        return match take() {
            Ok((slot, upstream)) => Ok(Admitted {
                slots: slot_view(&slot),
                slot,
                upstream,
                lease: None,
                target: None,
                target_lease: None,
                rate: None,
            }),
            Err(Inner::Slots(f)) => Err(full(slot_limit.unwrap_or(0), f)),
            Err(Inner::Upstream) => Err(Refusal::Upstream {
                limit: cap.map_or(0, |c| c.limit),
            }),
        };
    };
    let params = RateParams {
        per_second: share_of(rate.per_second, share),
        burst: share_of(rate.burst, share),
    };
    let view = |remaining| RateView {
        per_second: params.per_second,
        burst: params.burst,
        remaining,
    };
    let decision = entry.state.with_bucket(rate.per, path, now, params, |bucket| {
        let d = bucket.admit_with(now, params, take);
        // A refusal for want of a slot reports the quota left, read without consuming it.
        let left =
            matches!(d, Err(RateRefusal::Other(Inner::Slots(_)))).then(|| bucket.remaining(now, params));
        (d, left)
    });
    match decision.0 {
        Ok(((slot, upstream), remaining)) => Ok(Admitted {
            slots: slot_view(&slot),
            slot,
            upstream,
            lease: None,
            target: None,
            target_lease: None,
            rate: Some(view(remaining)),
        }),
        Err(RateRefusal::Limited { retry_after_nanos }) => Err(Refusal::Rate {
            slots: slot_limit.map(|limit| {
                let current = entry.state.slots.in_flight();
                SlotView {
                    limit,
                    current,
                    remaining: limit.saturating_sub(current),
                }
            }),
            rate: view(0),
            retry_after: retry_after_nanos.div_ceil(1_000_000_000).max(1),
            wait_nanos: retry_after_nanos,
        }),
        Err(RateRefusal::Other(Inner::Slots(f))) => {
            let mut refusal = full(slot_limit.unwrap_or(0), f);
            if let Refusal::Concurrency { rate: r, .. } = &mut refusal {
                *r = decision.1.map(view);
            }
            Err(refusal)
        }
        Err(RateRefusal::Other(Inner::Upstream)) => Err(Refusal::Upstream {
            limit: cap.map_or(0, |c| c.limit),
        }),
    }
}

/// The per-request decision in the shared state: one round trip to Redis decides the slot and the
/// rate bucket together. The gateway-wide upstream cap is taken locally first, so a request refused
/// by it costs no shared quota. Besides the lease, the request also counts in the key's local
/// pool (without a limit), so that if Redis becomes unreachable the local fallback knows what this
/// replica already has in flight.
pub async fn admit_shared(
    entry: &KeyView<'_>,
    path: &str,
    limiter: &SharedLimiter,
    cap: Option<&UpstreamCap>,
) -> Result<Result<Admitted, Refusal>, SharedError> {
    let (slot_limit, rate) = limits_for(entry, path);
    let upstream = match cap {
        Some(c) => match c.pool.try_acquire(c.limit) {
            Ok(g) => Some(g),
            Err(_) => return Ok(Err(Refusal::Upstream { limit: c.limit })),
        },
        None => None,
    };
    if slot_limit.is_none() && rate.is_none() {
        return Ok(Ok(Admitted {
            slot: None,
            upstream,
            lease: None,
            target: None,
            target_lease: None,
            slots: None,
            rate: None,
        }));
    }
    let params = rate.map(|r| RateParams {
        per_second: r.per_second,
        burst: r.burst,
    });
    let bucket = rate.zip(params).map(|(r, p)| {
        let name = match r.per {
            BucketScope::Key => BucketName::Key,
            BucketScope::Endpoint => BucketName::Endpoint(path),
        };
        (name, p)
    });
    let decision = limiter
        .admit(SharedRequest {
            scope: &entry.id,
            slots: slot_limit,
            rate: bucket,
        })
        .await?;
    let view = |remaining: Option<u32>| {
        params.map(|p| RateView {
            per_second: p.per_second,
            burst: p.burst,
            remaining: remaining.unwrap_or(0),
        })
    };
    let slot_view = |current: u32| {
        slot_limit.map(|limit| SlotView {
            limit,
            current,
            remaining: limit.saturating_sub(current),
        })
    };
    Ok(match decision {
        SharedDecision::Admitted {
            lease,
            in_flight,
            rate_remaining,
        } => Ok(Admitted {
            slot: lease
                .is_some()
                .then(|| SlotPool::try_acquire_in(&entry.state, u32::MAX).ok())
                .flatten(),
            upstream,
            slots: slot_view(in_flight),
            rate: view(rate_remaining),
            lease,
            target: None,
            target_lease: None,
        }),
        SharedDecision::SlotsFull {
            in_flight,
            rate_remaining,
        } => Err(Refusal::Concurrency {
            slots: SlotView {
                limit: slot_limit.unwrap_or(0),
                current: in_flight,
                remaining: 0,
            },
            rate: view(rate_remaining),
            retry_after: entry.state.slot_retry_after(in_flight),
        }),
        SharedDecision::RateLimited {
            in_flight,
            retry_after_nanos,
        } => Err(Refusal::Rate {
            slots: slot_view(in_flight),
            rate: view(Some(0)).unwrap_or(RateView {
                per_second: 0,
                burst: 0,
                remaining: 0,
            }),
            retry_after: retry_after_nanos.div_ceil(1_000_000_000).max(1),
            wait_nanos: retry_after_nanos,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CompiledKey, CompiledPlan, RateLimit, SlotLimit};
    use sha2::{Digest, Sha256};

    const SEC: u64 = 1_000_000_000;

    fn config(slots: u32, per: BucketScope) -> Arc<GatewayConfig> {
        let mut c = GatewayConfig::empty();
        c.plans.insert(
            "p".into(),
            CompiledPlan {
                display_name: None,
                concurrency: Some(SlotLimit {
                    max: slots,
                    paths: vec!["/v1/*".into()],
                }),
                rate_limit: Some(RateLimit {
                    per_second: 1,
                    burst: 2,
                    per,
                    paths: vec!["/v1/*".into()],
                }),
                retained: false,
                tasks: None,
                abuse: None,
            },
        );
        std::sync::Arc::make_mut(&mut c.keys).insert("ab".repeat(32), CompiledKey::on_plan("ns/k", "p"));
        c.hash = c.content_hash();
        Arc::new(c)
    }

    #[test]
    fn a_plan_change_over_the_same_keys_gives_the_table_a_full_build_gives() {
        let metrics = Metrics::new();
        let mut a = (*config(3, BucketScope::Key)).clone();
        let keys = Arc::make_mut(&mut a.keys);
        keys.insert(
            "cd".repeat(32),
            CompiledKey {
                id: "ns/custom".into(),
                plan: "p".into(),
                overrides: Some(crate::api::LimitOverrides {
                    max_concurrent_requests: Some(7),
                    ..Default::default()
                }),
                suspended: true,
                expires_at: Some(42),
            },
        );
        a.hash = a.content_hash();
        let first = KeyTable::build(Arc::new(a.clone()), None, &metrics);
        let mut b = a.clone();
        b.plans.get_mut("p").unwrap().concurrency.as_mut().unwrap().max = 9;
        // A limit the override does not replace: the overriding key's own limits change too.
        b.plans
            .get_mut("p")
            .unwrap()
            .rate_limit
            .as_mut()
            .unwrap()
            .per_second = 5;
        b.hash = b.content_hash();
        assert!(std::ptr::eq(first.keys_from.as_ptr(), Arc::as_ptr(&b.keys)));
        assert!(
            first.config.keys.is_empty(),
            "the table keeps no second copy of its keys"
        );
        let fast = KeyTable::build(Arc::new(b.clone()), Some(&first), &metrics);
        let mut unshared = b.clone();
        unshared.keys = Arc::new((*b.keys).clone());
        let full = KeyTable::build(Arc::new(unshared), Some(&first), &metrics);
        assert_eq!(fast.len(), 2);
        assert_eq!(fast.len(), full.len());
        let custom = fast.get(&[0xcd; 32]).unwrap();
        assert_eq!(custom.limits.rate.as_ref().unwrap().per_second, 5);
        assert_eq!(custom.limits.slots.as_ref().unwrap().max, 7);
        // Capacity from the counts: 9 for the plain key, 7 for the one with its own limit.
        assert_eq!(fast.capacity(), full.capacity());
        assert_eq!(fast.capacity()["p"], 16);
        for f in full.entries() {
            let q = fast.get(&f.digest).expect("the same keys");
            assert_eq!(
                (&q.id, q.plan, q.limits, q.overridden()),
                (&f.id, f.plan, f.limits, f.overridden())
            );
            assert_eq!((q.suspended(), q.expires_at()), (f.suspended(), f.expires_at()));
            assert!(Arc::ptr_eq(&q.state, &f.state), "live state carried over");
        }
        let slots = |t: &KeyTable, d: &str| {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(d, &mut digest).unwrap();
            t.get(&digest).unwrap().limits.slots.as_ref().unwrap().max
        };
        assert_eq!(slots(&fast, &"ab".repeat(32)), 9);
        assert_eq!(slots(&fast, &"cd".repeat(32)), 7, "the override still wins");
    }

    /// A table of `n` keys whose digests all start with `prefix` bytes of 0xff, so that they
    /// share their first slot, which is the table's last: their probes collide and wrap around.
    fn crowded(n: usize, prefix: usize) -> (Arc<GatewayConfig>, Vec<[u8; 32]>) {
        let mut c = (*config(1, BucketScope::Key)).clone();
        let keys = Arc::make_mut(&mut c.keys);
        keys.clear();
        let digests: Vec<[u8; 32]> = (0..n)
            .map(|i| {
                let mut d: [u8; 32] = Sha256::digest(i.to_le_bytes()).into();
                d[..prefix].fill(0xff);
                // The part and the home slot come from bytes 0..4 and 8..16.
                if prefix > 0 {
                    d[8..16].fill(0xff);
                }
                d
            })
            .collect();
        for (i, d) in digests.iter().enumerate() {
            keys.insert(hex::encode(d), CompiledKey::on_plan(format!("ns/k{i}"), "p"));
        }
        c.hash = c.content_hash();
        (Arc::new(c), digests)
    }

    #[test]
    fn every_key_is_found_and_no_other_even_when_their_slots_collide_and_wrap() {
        for (n, prefix) in [(3_000, 0), (40, 8), (1, 8)] {
            let (c, digests) = crowded(n, prefix);
            let t = KeyTable::build(c, None, &Metrics::new());
            assert_eq!(t.len(), n);
            assert_eq!(t.entries().count(), n);
            for (i, d) in digests.iter().enumerate() {
                assert_eq!(&*t.get(d).expect("loaded key found").id, format!("ns/k{i}"));
                let mut other = *d;
                other[31] ^= 1;
                assert!(t.get(&other).is_none(), "a digest one bit off is not a key");
            }
        }
        assert!(KeyTable::empty().get(&[0xff; 32]).is_none());
    }

    #[test]
    fn a_table_patched_by_a_delta_is_the_table_a_full_build_gives() {
        let metrics = Metrics::new();
        // Crowded digests: removals in the middle of long runs exercise the backward shift.
        for prefix in [0, 8] {
            let (a, _) = crowded(600, prefix);
            let first = KeyTable::build(Arc::clone(&a), None, &metrics);
            let mut b = (*a).clone();
            let keys = Arc::make_mut(&mut b.keys);
            let digests: Vec<String> = keys.keys().cloned().collect();
            let mut changed = Vec::new();
            for (n, d) in digests.iter().enumerate() {
                match n % 7 {
                    // Removed.
                    0 => {
                        keys.remove(d);
                        changed.push(d.clone());
                    }
                    // Rotated: the same key under a new digest.
                    1 => {
                        let key = keys.remove(d).unwrap();
                        let new = hex::encode(Sha256::digest(format!("rotated-{d}")));
                        keys.insert(new.clone(), key);
                        changed.extend([d.clone(), new]);
                    }
                    // Changed in place.
                    2 => {
                        keys.get_mut(d).unwrap().suspended = true;
                        changed.push(d.clone());
                    }
                    _ => {}
                }
            }
            let added = hex::encode(Sha256::digest(b"added"));
            keys.insert(added.clone(), CompiledKey::on_plan("ns/added", "p"));
            changed.push(added);
            b.hash = b.content_hash();
            let b = Arc::new(b);
            // As an assembly from changed shards gives it: only the keys that changed travel.
            let mut only_changed = b.without_keys();
            let travelling = Arc::make_mut(&mut only_changed.keys);
            for d in &changed {
                if let Some(k) = b.keys.get(d) {
                    travelling.insert(d.clone(), k.clone());
                }
            }
            let delta = KeyDelta {
                base: a.hash.clone(),
                changed,
            };
            let patched = KeyTable::build_from(Arc::new(only_changed), Some(&first), Some(&delta), &metrics);
            let full = KeyTable::build(Arc::clone(&b), Some(&first), &metrics);
            assert_eq!(patched.len(), full.len());
            assert_eq!(patched.entries().count(), full.len());
            assert_eq!(patched.capacity(), full.capacity());
            for f in full.entries() {
                let q = patched
                    .get(&f.digest)
                    .expect("every key of the new configuration");
                assert_eq!((&q.id, &q.plan, &q.limits), (&f.id, &f.plan, &f.limits));
                assert_eq!((q.suspended(), q.expires_at()), (f.suspended(), f.expires_at()));
                if &*f.id != "ns/added" {
                    assert!(Arc::ptr_eq(&q.state, &f.state), "live state follows the key id");
                }
            }
            for d in a.keys.keys().filter(|d| !b.keys.contains_key(*d)) {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(d, &mut digest).unwrap();
                assert!(
                    patched.get(&digest).is_none(),
                    "a removed or rotated-away digest is gone"
                );
            }
        }
    }

    #[test]
    fn the_digest_table_grows_to_stay_at_most_half_full() {
        let (c, digests) = crowded(1_000, 0);
        let built = KeyTable::build(c, None, &Metrics::new());
        let mut t = DigestTable::with_capacity(0);
        for e in built.entries().map(|v| v.entry.clone()) {
            t.insert(e);
            assert!(t.len * 2 <= t.slots.len());
        }
        assert_eq!(t.len, 1_000);
        assert!(digests.iter().all(|d| t.get(d).is_some()));
    }

    #[test]
    fn a_key_state_and_its_arc_counts_fit_one_cache_line() {
        assert!(
            size_of::<KeyState>() + 2 * size_of::<usize>() <= 64,
            "{}",
            size_of::<KeyState>()
        );
    }

    #[test]
    fn a_table_entry_is_one_cache_line_and_keys_of_a_plan_share_one_profile() {
        assert_eq!(size_of::<KeyEntry>(), 64);
        assert_eq!(size_of::<Option<KeyEntry>>(), 64);
        let mut c = (*config(3, BucketScope::Key)).clone();
        let keys = Arc::make_mut(&mut c.keys);
        keys.insert("cd".repeat(32), CompiledKey::on_plan("ns/other", "p"));
        let suspended = CompiledKey {
            suspended: true,
            ..CompiledKey::on_plan("ns/suspended", "p")
        };
        keys.insert("ef".repeat(32), suspended);
        c.hash = c.content_hash();
        let t = KeyTable::build(Arc::new(c), None, &Metrics::new());
        let profile = |b: u8| Arc::as_ptr(&t.get(&[b; 32]).unwrap().entry.profile);
        assert_eq!(profile(0xab), profile(0xcd));
        assert_ne!(profile(0xab), profile(0xef));
        assert!(t.get(&[0xef; 32]).unwrap().suspended());
    }

    #[test]
    fn endpoints_get_their_own_buckets_and_the_map_stays_bounded() {
        let t = KeyTable::build(config(100, BucketScope::Endpoint), None, &Metrics::new());
        let e = t.get(&[0xab; 32]).unwrap();
        assert!(admit(&e, "/v1/a", SEC, None, 1).is_ok());
        assert!(admit(&e, "/v1/a", SEC, None, 1).is_ok());
        assert!(matches!(
            admit(&e, "/v1/a", SEC, None, 1),
            Err(Refusal::Rate { .. })
        ));
        assert!(admit(&e, "/v1/b", SEC, None, 1).is_ok());
        for i in 0..5 * MAX_ENDPOINT_BUCKETS {
            let _ = admit(&e, &format!("/v1/random/{i}"), SEC, None, 1);
        }
        assert!(e.state.endpoint_buckets() <= MAX_ENDPOINT_BUCKETS);
        assert_eq!(e.state.sweep(100 * SEC), MAX_ENDPOINT_BUCKETS);
    }

    #[test]
    fn a_reload_that_changes_the_bucket_scope_starts_the_new_scopes_buckets_full() {
        let drain = |e: KeyView<'_>, path: &str| {
            (0..10)
                .take_while(|_| admit(&e, path, SEC, None, 1).is_ok())
                .count()
        };
        let t1 = KeyTable::build(config(100, BucketScope::Key), None, &Metrics::new());
        let e1 = t1.get(&[0xab; 32]).unwrap();
        assert_eq!(drain(e1, "/v1/a"), 2);
        assert_eq!(e1.state.endpoint_buckets(), 0);

        let t2 = KeyTable::build(config(100, BucketScope::Endpoint), Some(&t1), &Metrics::new());
        let e2 = t2.get(&[0xab; 32]).unwrap();
        assert!(Arc::ptr_eq(&e1.state, &e2.state));
        assert_eq!((drain(e2, "/v1/a"), drain(e2, "/v1/b")), (2, 2));
        assert_eq!(e2.state.endpoint_buckets(), 2);

        let t3 = KeyTable::build(config(100, BucketScope::Key), Some(&t2), &Metrics::new());
        let e3 = t3.get(&[0xab; 32]).unwrap();
        assert_eq!(drain(e3, "/v1/a"), 2);
        assert_eq!((e3.state.endpoint_buckets(), e3.state.sweep(100 * SEC)), (0, 0));
    }

    #[test]
    fn state_survives_a_reload_and_a_slot_refusal_costs_no_quota() {
        let t1 = KeyTable::build(config(1, BucketScope::Key), None, &Metrics::new());
        let e1 = t1.get(&[0xab; 32]).unwrap();
        let held = admit(&e1, "/v1/a", SEC, None, 1).unwrap();
        assert_eq!(
            held.slots,
            Some(SlotView {
                limit: 1,
                current: 1,
                remaining: 0
            })
        );
        let Err(Refusal::Concurrency { rate, .. }) = admit(&e1, "/v1/a", SEC, None, 1) else {
            panic!("expected a concurrency refusal");
        };
        assert_eq!(rate.unwrap().remaining, 1);
        // Upgrade to 3 slots: the held request still counts.
        let t2 = KeyTable::build(config(3, BucketScope::Key), Some(&t1), &Metrics::new());
        let e2 = t2.get(&[0xab; 32]).unwrap();
        let second = admit(&e2, "/v1/a", SEC, None, 1).unwrap();
        assert_eq!(second.slots.unwrap().current, 2);
        drop((held, second));
        assert_eq!(e2.state.in_flight(), 0);
    }

    #[test]
    fn a_panic_while_a_request_is_in_flight_returns_its_slot() {
        let t = KeyTable::build(config(1, BucketScope::Key), None, &Metrics::new());
        let e = t.get(&[0xab; 32]).unwrap();
        let admitted = admit(&e, "/v1/a", SEC, None, 1).unwrap();
        assert_eq!(e.state.in_flight(), 1);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = admitted;
            panic!("handler panicked");
        }));
        assert!(result.is_err());
        assert_eq!(e.state.in_flight(), 0);
        assert!(admit(&e, "/v1/a", SEC, None, 1).is_ok());
    }

    #[test]
    fn paths_outside_the_patterns_are_not_limited() {
        let t = KeyTable::build(config(0, BucketScope::Key), None, &Metrics::new());
        let e = t.get(&[0xab; 32]).unwrap();
        let a = admit(&e, "/health", SEC, None, 1).unwrap();
        assert!(a.slots.is_none() && a.rate.is_none() && a.slot.is_none());
        assert!(matches!(
            admit(&e, "/v1/x", SEC, None, 1),
            Err(Refusal::Concurrency { .. })
        ));
    }
}
