//! The incremental compile: [`compile`](super::compile) kept up to date by events instead of run
//! over every object.
//!
//! The controller feeds it what its watches see (a plan, a key or a token Secret added, changed
//! or gone) and asks for the next configuration. Only the keys an event can affect are decided
//! again: the key itself, the keys reading a changed Secret, the keys on a changed plan, and the
//! keys that share a token with one of those (who owns a token can move). Only the shards whose
//! keys changed are serialised and hashed again, and the content hash is made of the shard
//! digests ([`super::keys_digest`]), so one key added to 100,000 costs one shard.
//!
//! The output is, byte for byte, what [`compile_with_tasks`](super::compile_with_tasks) gives
//! for the same objects with the last output as `previous` (a property test holds it to that).
//! Pure, like `compile`: no clock, no I/O.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{
    CompiledKey, CompiledPlan, CompiledTaskType, GatewayConfig, KeyReport, PlanReport, SCHEMA_VERSION,
    TokenDigest, TokenHashes, TokenState,
    compile::{Token, compile_plan, decide_key, plan_conditions, plan_state, reason},
    pieces::{self, INDEX_ENTRY, Index, Piece, SHARD_ENTRY},
};
use crate::api::{ApiKey, ApiPlan, ConditionSpec, SecretKeyRef};

/// A key's `namespace/name`, allocated once and shared by every map of the index that names the
/// key (a dozen of them: at 100,000 keys a copy per map cost about half a kilobyte a key).
pub type KeyId = Arc<str>;

/// What compile reads of one ApiKey.
#[derive(Clone, Debug)]
struct KeyIn {
    id: KeyId,
    /// `spec.secretRef`; `None`: the default one ([`ApiKey::default_token_ref`]), built when
    /// read. Nearly every key has the default, and a copy of it and of the namespace (which the
    /// id holds) cost about 150 bytes a key.
    secret: Option<Box<SecretKeyRef>>,
    /// The entry its spec gives (id, plan, overrides, suspension, expiry), shared with the
    /// output and the shard while it is the one admitted: one copy per key, not three.
    entry: Arc<CompiledKey>,
    /// Creation time: of two keys with one token, the older keeps it.
    created: Option<Timestamp>,
}

impl KeyIn {
    fn of(key: &ApiKey) -> Self {
        let id: KeyId = key.id().into();
        Self {
            id: Arc::clone(&id),
            secret: key.spec.secret_ref.clone().map(Box::new),
            entry: Arc::new(CompiledKey {
                id,
                plan: key.spec.plan.clone(),
                overrides: key.spec.overrides.clone(),
                suspended: key.spec.suspended,
                expires_at: key.spec.expires_at.as_ref().map(|t| t.0.as_second()),
            }),
            created: key.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    fn namespace(&self) -> &str {
        self.id.split_once('/').map_or("", |(ns, _)| ns)
    }

    fn secret(&self) -> std::borrow::Cow<'_, SecretKeyRef> {
        match &self.secret {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => {
                let name = self.id.split_once('/').map_or(&*self.id, |(_, n)| n);
                std::borrow::Cow::Owned(ApiKey::default_token_ref(name))
            }
        }
    }

    /// `namespace/name` of the Secret it reads.
    fn secret_id(&self) -> Box<str> {
        secret_id(self.namespace(), &self.secret().name)
    }
}

/// A Secret's `namespace/name`: one allocation, where a pair of strings is two.
fn secret_id(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into()
}

/// What compile reads of one ApiKey, read off the object.
#[derive(Clone, Debug)]
pub struct KeyInput(KeyIn);

impl KeyInput {
    /// Reads `key`.
    pub fn of(key: &ApiKey) -> Self {
        Self(KeyIn::of(key))
    }
}

/// An admitted key: its token digest and its entry.
type Admitted = (TokenDigest, Arc<CompiledKey>);

/// One key as last decided.
#[derive(Clone, Debug)]
struct Out {
    admitted: Option<Admitted>,
    /// Shared with the status book, which writes it: one copy per key.
    report: std::sync::Arc<KeyReport>,
}

/// One shard: its keys by token digest and, once serialised, its JSON and digest.
#[derive(Clone, Debug, Default)]
struct Shard {
    keys: BTreeMap<TokenDigest, Arc<CompiledKey>>,
    json: Arc<str>,
    digest: String,
}

/// The head of the last output: everything but the keys, which live in the shards.
#[derive(Clone, Debug)]
struct Head {
    version: u64,
    hash: String,
    plans: BTreeMap<String, CompiledPlan>,
    keys_digest: String,
}

/// The index compile keeps between events; see the module documentation.
#[derive(Debug, Default)]
pub struct Incremental {
    plans: BTreeMap<String, Result<CompiledPlan, String>>,
    task_types: BTreeMap<String, CompiledTaskType>,
    targets: BTreeMap<String, super::targets::CompiledTarget>,
    keys: HashMap<KeyId, KeyIn>,
    tokens: TokenHashes,
    /// Key ids by the Secret they read, `(namespace, name)`.
    by_secret: HashMap<Box<str>, Few<KeyId>>,
    /// Key ids by the plan their spec names.
    by_plan: HashMap<String, BTreeSet<KeyId>>,
    /// Keys by token digest, oldest first: the first owns the token.
    claims: HashMap<TokenDigest, Few<(Option<Timestamp>, KeyId)>>,
    /// The digest each key claims, to withdraw the claim when its Secret or the key changes.
    claim_of: HashMap<KeyId, (Option<Timestamp>, TokenDigest)>,
    /// Keys kept as last known good on a plan other than the one their spec names, by that plan:
    /// their reports read it.
    kept_on: HashMap<String, BTreeSet<KeyId>>,
    /// Each key as last decided (also a removed key until the next compile, as `previous` has it).
    out: HashMap<KeyId, Out>,
    /// Admitted entries per plan: plans only kept for keys are in the output while this is > 0.
    entry_plans: HashMap<String, usize>,
    shards: Vec<Shard>,
    dirty_shards: BTreeSet<usize>,
    admitted: usize,
    /// Keys to decide again at the next compile.
    dirty: HashSet<KeyId>,
    /// Plans whose limits changed (valid before and after) since the key reports were last
    /// brought up to date ([`Incremental::refresh_reports`]).
    stale_reports: BTreeSet<String>,
    /// Keys of those plans still to decide again, for [`Incremental::refresh_reports_upto`].
    refresh_queue: BTreeSet<KeyId>,
    /// Plan reports, rebuilt at each compile (a few plans).
    plan_reports: BTreeMap<String, PlanReport>,
    head: Option<Head>,
    /// Entries of a configuration published before this index existed (an earlier leader's):
    /// `previous` for the first compile.
    seed: HashMap<String, Arc<CompiledKey>>,
    /// Per admitted key: the version since which its entry and its plan's limits are unchanged
    /// (what a gateway reporting that version or later enforces for it).
    since: HashMap<KeyId, u64>,
    /// Per plan: the version since which its limits are unchanged. A key's enforcement is
    /// unchanged since the later of its own entry's and its plan's, so a plan upgrade writes one
    /// number instead of one per key of the plan.
    plan_since: HashMap<String, u64>,
    /// Keys the last compile decided (their status may have changed).
    decided: Vec<KeyId>,
    /// Keys the last [`Incremental::refresh_reports`] decided.
    refreshed: Vec<KeyId>,
    /// The sentences of the key reports, shared.
    messages: Messages,
}

/// The condition messages of the key reports, one allocation per distinct sentence: `PlanResolved`
/// and `Ready` say the same for every key of a plan ("admitted on plan startup: ..."), and a copy
/// per key cost about 100 bytes at 100,000 keys. `TokenReady` names each key's own Secret and is
/// left as it is.
#[derive(Debug, Default)]
struct Messages {
    set: HashSet<Arc<str>>,
    /// Sentences no report uses any more are dropped when the set reaches this size.
    purge_at: usize,
}

impl Messages {
    fn share(&mut self, mut report: KeyReport) -> Arc<KeyReport> {
        for c in &mut report.conditions {
            if c.type_ == reason::TOKEN_READY {
                continue;
            }
            match self.set.get(&c.message) {
                Some(m) => c.message = Arc::clone(m),
                None => {
                    if self.set.len() >= self.purge_at {
                        self.set.retain(|m| Arc::strong_count(m) > 1);
                        self.purge_at = (self.set.len() * 2).max(1024);
                    }
                    self.set.insert(Arc::clone(&c.message));
                }
            }
        }
        Arc::new(report)
    }
}

impl Incremental {
    /// An empty index whose first compile continues `previous` (the configuration published
    /// already, if any): its version sequence, and its entries as last known good.
    pub fn new(previous: Option<&GatewayConfig>) -> Self {
        let mut s = Self::default();
        if let Some(p) = previous {
            s.seed = p
                .keys
                .values()
                .map(|k| (k.id.to_string(), Arc::new(k.clone())))
                .collect();
            s.head = Some(Head {
                version: p.version,
                hash: p.hash.clone(),
                plans: p.plans.clone(),
                keys_digest: super::keys_digest(&p.keys),
            });
        }
        s
    }

    /// The same objects, compiled next as the continuation of `previous` (a configuration another
    /// leader published meanwhile): its version sequence and its entries as last known good.
    /// Costs one pass over every key; a new leader does it once.
    pub fn restart(mut self, previous: Option<&GatewayConfig>) -> Self {
        let mut next = Self::new(previous);
        next.tokens = std::mem::take(&mut self.tokens);
        next.task_types = std::mem::take(&mut self.task_types);
        next.targets = std::mem::take(&mut self.targets);
        let plans = std::mem::take(&mut self.plans);
        let keys: Vec<KeyIn> = std::mem::take(&mut self.keys).into_values().collect();
        // The rest of the old index goes before the new one is built, not beside it.
        drop(self);
        for (name, plan) in plans {
            next.plan_changed(&name);
            next.plans.insert(name, plan);
        }
        for k in keys {
            next.insert_key(k);
        }
        next
    }

    /// Ids of every key the index holds.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(|k| &**k)
    }

    /// A plan added or changed.
    pub fn apply_plan(&mut self, plan: &ApiPlan) {
        let name = plan.name_any();
        let compiled = compile_plan(plan);
        match self.plans.insert(name.clone(), compiled.clone()) {
            Some(old) if old == compiled => {}
            // Valid before and after: every entry stays as it is (an entry names its plan, it
            // does not copy it); only the statuses of the keys on it read the new limits.
            Some(Ok(_)) if compiled.is_ok() => {
                self.stale_reports.insert(name);
            }
            _ => self.plan_changed(&name),
        }
    }

    /// A plan gone.
    pub fn remove_plan(&mut self, name: &str) {
        if self.plans.remove(name).is_some() {
            self.plan_changed(name);
        }
    }

    /// Replaces every plan with `plans` (a relist), as a change of each that differs.
    pub fn set_plans<P: std::borrow::Borrow<ApiPlan>>(&mut self, plans: &[P]) {
        let names: BTreeSet<String> = plans.iter().map(|p| p.borrow().name_any()).collect();
        let gone: Vec<String> = self
            .plans
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.remove_plan(&name);
        }
        for plan in plans {
            self.apply_plan(plan.borrow());
        }
    }

    fn plan_changed(&mut self, name: &str) {
        let on = self.by_plan.get(name).into_iter().flatten();
        let kept = self.kept_on.get(name).into_iter().flatten();
        self.dirty.extend(on.chain(kept).cloned());
    }

    /// The async task types, already compiled ([`super::tasks::compile_task_types`]).
    pub fn set_task_types(&mut self, task_types: BTreeMap<String, CompiledTaskType>) {
        self.task_types = task_types;
    }

    /// The upstream targets, already compiled ([`super::targets::compile_targets`]).
    pub fn set_targets(&mut self, targets: BTreeMap<String, super::targets::CompiledTarget>) {
        self.targets = targets;
    }

    /// A key added or changed.
    pub fn apply_key(&mut self, key: &ApiKey) {
        self.apply_key_input(KeyInput::of(key));
    }

    /// A key added or changed, as [`KeyInput::of`] read it (where the watch event is, so that a
    /// backlog of events holds what compile reads, not whole objects).
    pub fn apply_key_input(&mut self, KeyInput(new): KeyInput) {
        let id = new.id.clone();
        if let Some(old) = self.keys.get(&id)
            && old.entry == new.entry
            && old.created == new.created
            && old.secret == new.secret
        {
            return;
        }
        self.forget_key(&id);
        self.insert_key(new);
    }

    fn insert_key(&mut self, new: KeyIn) {
        let id = new.id.clone();
        self.by_secret
            .entry(new.secret_id())
            .or_default()
            .insert(id.clone());
        self.by_plan
            .entry(new.entry.plan.clone())
            .or_default()
            .insert(id.clone());
        self.keys.insert(id.clone(), new);
        self.claim(&id);
        self.dirty.insert(id);
    }

    /// A key gone, by `namespace/name`.
    pub fn remove_key(&mut self, id: &str) {
        if self.keys.contains_key(id) {
            self.forget_key(id);
            self.dirty.insert(id.into());
        }
    }

    /// Withdraws a key from the indexes (its last decision stays until the next compile).
    fn forget_key(&mut self, id: &str) {
        let Some(old) = self.keys.remove(id) else { return };
        self.unclaim(id);
        let secret = old.secret_id();
        if let Some(set) = self.by_secret.get_mut(&secret) {
            set.remove(id);
            if set.is_empty() {
                self.by_secret.remove(&secret);
            }
        }
        remove_from(&mut self.by_plan, &old.entry.plan, id);
    }

    /// A token Secret added or changed, as the SHA-256 of each entry (`None`: blank).
    pub fn apply_secret(&mut self, namespace: &str, name: &str, entries: HashMap<String, Option<String>>) {
        self.tokens.set_hashes(namespace, name, entries);
        self.secret_changed(namespace, name);
    }

    /// Every token Secret the index holds, as `(namespace, name)`.
    pub fn secret_ids(&self) -> Vec<(String, String)> {
        self.tokens.names()
    }

    /// A token Secret gone.
    pub fn remove_secret(&mut self, namespace: &str, name: &str) {
        self.tokens.remove_secret(namespace, name);
        self.secret_changed(namespace, name);
    }

    fn secret_changed(&mut self, namespace: &str, name: &str) {
        let readers: Vec<KeyId> = self
            .by_secret
            .get(&secret_id(namespace, name))
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for id in readers {
            self.unclaim(&id);
            self.claim(&id);
            self.dirty.insert(id);
        }
    }

    /// Records the token digest key `id` reads, if any; every key sharing it is decided again.
    fn claim(&mut self, id: &str) {
        let Some((key_id, k)) = self.keys.get_key_value(id) else {
            return;
        };
        let secret = k.secret();
        let TokenState::Hash(hash) = self.tokens.lookup(k.namespace(), &secret.name, &secret.key) else {
            return;
        };
        let hash = Arc::clone(hash);
        let set = self.claims.entry(Arc::clone(&hash)).or_default();
        set.insert((k.created, key_id.clone()));
        self.dirty.extend(set.iter().map(|(_, id)| id.clone()));
        self.claim_of.insert(key_id.clone(), (k.created, hash));
    }

    fn unclaim(&mut self, id: &str) {
        let Some((key_id, (created, hash))) = self.claim_of.remove_entry(id) else {
            return;
        };
        if let Some(set) = self.claims.get_mut(&hash) {
            set.remove(&(created, key_id));
            self.dirty.extend(set.iter().map(|(_, id)| id.clone()));
            if set.is_empty() {
                self.claims.remove(&hash);
            }
        }
    }

    /// Decides the keys events touched, reserialises the shards whose keys changed and makes the
    /// next head. Returns whether the content changed (the version grew).
    pub fn compile(&mut self) -> bool {
        let previous = self.head.clone();
        let valid = self.valid_plans();
        self.plan_reports = self
            .plans
            .iter()
            .map(|(name, p)| {
                let conditions = match p {
                    Ok(p) => plan_conditions(p),
                    Err(why) => vec![ConditionSpec::fail(
                        reason::READY,
                        reason::INVALID_SPEC,
                        why.clone(),
                    )],
                };
                let keys = self.by_plan.get(name).map_or(0, BTreeSet::len) as u32;
                (name.clone(), PlanReport { keys, conditions })
            })
            .collect();
        let previous_plans = previous.as_ref().map(|h| &h.plans);
        let plan_of = |name: &str| {
            valid
                .get(name)
                .or_else(|| previous_plans.and_then(|p| p.get(name)))
        };

        // (id, entry before, entry after) of each key whose entry moved.
        let mut changed: Vec<(KeyId, Option<Admitted>, Option<Admitted>)> = Vec::new();
        let seed = std::mem::take(&mut self.seed);
        self.decided.clear();
        for id in std::mem::take(&mut self.dirty) {
            self.decided.push(id.clone());
            let last_out = self.out.get(&id);
            let last = last_out
                .and_then(|o| o.admitted.as_ref().map(|(_, k)| k))
                .or_else(|| seed.get(&*id));
            let Some(k) = self.keys.get(&id) else {
                if let Some(old) = self.out.remove(&id) {
                    if let Some((_, b)) = &old.admitted {
                        remove_from(&mut self.kept_on, &b.plan, &id);
                    }
                    changed.push((id, old.admitted, None));
                }
                continue;
            };
            let token = self.token_of(&id, k);
            let plan = plan_state(&valid, &self.plans, &k.entry.plan);
            let decided = decide_key(
                k.entry.clone(),
                k.namespace(),
                &k.secret(),
                token,
                plan,
                last,
                &plan_of,
            );
            let before = last_out.and_then(|o| o.admitted.clone());
            let after = decided.admitted.clone();
            // Kept on another plan than its spec names: the spec can move while the entry stays.
            if let Some((_, b)) = &before {
                remove_from(&mut self.kept_on, &b.plan, &id);
            }
            if let Some((_, a)) = &after
                && a.plan != k.entry.plan
            {
                self.kept_on.entry(a.plan.clone()).or_default().insert(id.clone());
            }
            self.out.insert(
                id.clone(),
                Out {
                    admitted: decided.admitted,
                    report: self.messages.share(decided.report),
                },
            );
            if before != after {
                changed.push((id, before, after));
            }
        }
        let moved_entries: Vec<(KeyId, bool)> = changed
            .iter()
            .map(|(id, _, after)| (id.clone(), after.is_some()))
            .collect();
        for (id, before, after) in changed {
            if let Some((hash, entry)) = before {
                self.admitted -= 1;
                if let Some(n) = self.entry_plans.get_mut(&entry.plan) {
                    *n -= 1;
                    if *n == 0 {
                        self.entry_plans.remove(&entry.plan);
                    }
                }
                self.remove_entry(&hash, &id);
            }
            if let Some((hash, entry)) = after {
                self.admitted += 1;
                *self.entry_plans.entry(entry.plan.clone()).or_default() += 1;
                self.insert_entry(hash, entry);
            }
        }

        let count = pieces::shard_count(self.admitted);
        if count != self.shards.len() {
            let all: Vec<Admitted> = self.shards.drain(..).flat_map(|s| s.keys).collect();
            self.shards = vec![Shard::default(); count];
            for (hash, entry) in all {
                self.shards[pieces::shard_of(&hash, count)]
                    .keys
                    .insert(hash, entry);
            }
            self.dirty_shards = (0..count).collect();
        }
        for i in std::mem::take(&mut self.dirty_shards) {
            let shard = &mut self.shards[i];
            shard.json = pieces::shard_json(&shard.keys).into();
            shard.digest = pieces::shard_digest(&shard.json);
        }

        // Plans only kept for keys (last known good) stay, marked, with what was last published.
        let mut plans = valid;
        for name in self.entry_plans.keys() {
            if !plans.contains_key(name)
                && let Some(old) = previous_plans.and_then(|p| p.get(name))
            {
                plans.insert(
                    name.clone(),
                    CompiledPlan {
                        retained: true,
                        ..old.clone()
                    },
                );
            }
        }
        let keys_digest = pieces::combine_digests(self.shards.iter().map(|s| s.digest.as_str()));
        let mut head = GatewayConfig {
            schema: SCHEMA_VERSION,
            version: 0,
            hash: String::new(),
            plans,
            keys: std::sync::Arc::default(),
            task_types: self.task_types.clone(),
            targets: self.targets.clone(),
        };
        let hash = head.content_hash_with(&keys_digest);
        let version = match &previous {
            Some(p) if p.hash == hash => p.version,
            Some(p) => p.version + 1,
            None => 1,
        };
        head.hash = hash;
        // Since when each key's enforcement is unchanged: a new entry, or a plan whose limits
        // changed, starts again at this version.
        for (id, admitted) in &moved_entries {
            if *admitted {
                self.since.insert(id.clone(), version);
            } else {
                self.since.remove(id);
            }
        }
        let moved_plans: Vec<&String> = head
            .plans
            .iter()
            .filter(|(name, p)| previous_plans.and_then(|pp| pp.get(*name)) != Some(*p))
            .map(|(name, _)| name)
            .collect();
        for plan in moved_plans {
            self.plan_since.insert(plan.clone(), version);
        }
        self.head = Some(Head {
            version,
            hash: head.hash,
            plans: head.plans,
            keys_digest,
        });
        previous.is_none_or(|p| p.version != version)
    }

    fn insert_entry(&mut self, hash: TokenDigest, entry: Arc<CompiledKey>) {
        let count = self.shards.len().max(1);
        if self.shards.is_empty() {
            self.shards.push(Shard::default());
        }
        let i = pieces::shard_of(&hash, count);
        self.shards[i].keys.insert(hash, entry);
        self.dirty_shards.insert(i);
    }

    fn remove_entry(&mut self, hash: &str, id: &str) {
        let count = self.shards.len();
        if count == 0 {
            return;
        }
        let i = pieces::shard_of(hash, count);
        // Another key may have taken the digest over in the same compile.
        if self.shards[i].keys.get(hash).is_some_and(|k| &*k.id == id) {
            self.shards[i].keys.remove(hash);
            self.dirty_shards.insert(i);
        }
    }

    /// Decides again the keys on plans whose limits changed, for their statuses: the part of a
    /// plan upgrade that grows with its keys, kept out of [`Incremental::compile`] so that the
    /// gateways get the upgrade first. Their entries come out the same. Returns how many keys
    /// it decided.
    pub fn refresh_reports(&mut self) -> usize {
        self.refresh_reports_upto(usize::MAX)
    }

    /// [`Incremental::refresh_reports`] for at most `limit` keys, the rest left for the next
    /// call ([`Incremental::refresh_pending`]): the controller takes a change that arrives
    /// between two chunks before it finishes the statuses of 100,000 keys.
    pub fn refresh_reports_upto(&mut self, limit: usize) -> usize {
        let plans = std::mem::take(&mut self.stale_reports);
        for p in &plans {
            let on = self.by_plan.get(p).into_iter().flatten();
            let ids: Vec<KeyId> = on
                .chain(self.kept_on.get(p).into_iter().flatten())
                .cloned()
                .collect();
            self.refresh_queue.extend(ids);
        }
        let mut ids = Vec::new();
        while ids.len() < limit {
            let Some(id) = self.refresh_queue.pop_first() else {
                break;
            };
            ids.push(id);
        }
        let valid = self.valid_plans();
        let previous_plans = self.head.as_ref().map(|h| &h.plans);
        let plan_of = |name: &str| {
            valid
                .get(name)
                .or_else(|| previous_plans.and_then(|p| p.get(name)))
        };
        let mut decided_now = Vec::new();
        for id in ids {
            let (Some(k), Some(out)) = (self.keys.get(&id), self.out.get(&id)) else {
                continue;
            };
            let token = self.token_of(&id, k);
            let plan = plan_state(&valid, &self.plans, &k.entry.plan);
            let last = out.admitted.as_ref().map(|(_, k)| k);
            let decided = decide_key(
                k.entry.clone(),
                k.namespace(),
                &k.secret(),
                token,
                plan,
                last,
                &plan_of,
            );
            debug_assert_eq!(
                decided.admitted, out.admitted,
                "a plan's limits do not move entries"
            );
            decided_now.push((id, decided.report));
        }
        let n = decided_now.len();
        self.refreshed.clear();
        for (id, report) in decided_now {
            if let Some(out) = self.out.get_mut(&id) {
                out.report = self.messages.share(report);
            }
            self.refreshed.push(id);
        }
        n
    }

    /// Whether some keys' statuses still wait for [`Incremental::refresh_reports_upto`].
    pub fn refresh_pending(&self) -> bool {
        !self.stale_reports.is_empty() || !self.refresh_queue.is_empty()
    }

    /// The keys the next compile decides again (an event touched them).
    pub fn dirty(&self) -> impl Iterator<Item = &str> {
        self.dirty.iter().map(|k| &**k)
    }

    /// The keys the last [`Incremental::refresh_reports`] decided.
    pub fn refreshed(&self) -> &[KeyId] {
        &self.refreshed
    }

    /// Ids of the keys whose spec names `plan`, in order.
    pub fn keys_on(&self, plan: &str) -> impl Iterator<Item = &str> {
        self.by_plan.get(plan).into_iter().flatten().map(|k| &**k)
    }

    fn valid_plans(&self) -> BTreeMap<String, CompiledPlan> {
        self.plans
            .iter()
            .filter_map(|(n, p)| p.as_ref().ok().map(|p| (n.clone(), p.clone())))
            .collect()
    }

    /// A key's token as compile sees it: duplicates resolved by the claims.
    fn token_of<'a>(&'a self, id: &str, k: &KeyIn) -> Token<'a> {
        match self.claim_of.get(id) {
            None => {
                let secret = k.secret();
                match self.tokens.lookup(k.namespace(), &secret.name, &secret.key) {
                    TokenState::SecretNotFound => Token::SecretNotFound,
                    _ => Token::Empty,
                }
            }
            Some((_, hash)) => {
                let owner = self.claims.get(hash).and_then(|s| s.first()).map(|(_, o)| &**o);
                match owner {
                    Some(o) if o != id => Token::Duplicate(o),
                    _ => Token::Owner(hash),
                }
            }
        }
    }

    /// The namespace and token Secret reference of key `id`; `None`: no such key.
    pub fn token_secret<'a>(&self, id: &'a str) -> Option<(&'a str, SecretKeyRef)> {
        let key = self.keys.get(id)?;
        let (ns, _) = id.split_once('/')?;
        Some((ns, key.secret().into_owned()))
    }

    /// What a token Secret entry holds, as compile reads it.
    pub fn token(&self, namespace: &str, name: &str, entry: &str) -> TokenState<'_> {
        self.tokens.lookup(namespace, name, entry)
    }

    /// The version since which what the gateways enforce for key `id` is unchanged: a gateway
    /// reporting it (or later) enforces this key as compiled. `None`: not admitted.
    pub fn since(&self, id: &str) -> Option<u64> {
        let own = *self.since.get(id)?;
        let plan = self
            .out
            .get(id)
            .and_then(|o| o.admitted.as_ref())
            .and_then(|(_, k)| self.plan_since.get(&k.plan));
        Some(plan.map_or(own, |&p| own.max(p)))
    }

    /// The keys the last compile decided: their statuses and events may have changed.
    pub fn decided(&self) -> &[KeyId] {
        &self.decided
    }

    /// Configuration version of the last compile (0 before the first).
    pub fn version(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.version)
    }

    /// Content hash of the last compile.
    pub fn hash(&self) -> &str {
        self.head.as_ref().map_or("", |h| h.hash.as_str())
    }

    /// Digest of the last compile's keys ([`super::keys_digest`]).
    pub fn keys_digest(&self) -> &str {
        self.head.as_ref().map_or("", |h| h.keys_digest.as_str())
    }

    /// Plans of the last compile, kept ones included.
    pub fn plans(&self) -> &BTreeMap<String, CompiledPlan> {
        static EMPTY: BTreeMap<String, CompiledPlan> = BTreeMap::new();
        self.head.as_ref().map_or(&EMPTY, |h| &h.plans)
    }

    /// Admitted keys of the last compile.
    pub fn admitted(&self) -> usize {
        self.admitted
    }

    /// Status of every plan, as [`super::Compiled::plans`].
    pub fn plan_reports(&self) -> &BTreeMap<String, PlanReport> {
        &self.plan_reports
    }

    /// Status of one key, as [`super::Compiled::keys`] has it.
    pub fn key_report(&self, id: &str) -> Option<&std::sync::Arc<KeyReport>> {
        self.out.get(id).map(|o| &o.report)
    }

    /// Status of every key, in id order (what [`super::Compiled::keys`] holds). Keys on a plan
    /// whose limits changed read the new limits once [`Incremental::refresh_reports`] ran.
    pub fn key_reports(&self) -> BTreeMap<&str, &KeyReport> {
        self.out.iter().map(|(id, o)| (&**id, &*o.report)).collect()
    }

    /// The admitted entry of one key.
    pub fn entry(&self, id: &str) -> Option<&CompiledKey> {
        self.out
            .get(id)
            .and_then(|o| o.admitted.as_ref().map(|(_, k)| &**k))
    }

    /// The objects to write, as [`pieces::split`] cuts the same configuration: shards, then the
    /// index (named `base`). Empty before the first compile.
    pub fn pieces(&self, base: &str) -> Vec<Piece> {
        let count = self.shards.len();
        let mut out: Vec<Piece> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| Piece {
                name: pieces::shard_name(base, i, count),
                entry: SHARD_ENTRY,
                data: Arc::clone(&s.json),
            })
            .collect();
        let index = Index {
            schema: SCHEMA_VERSION,
            version: self.version(),
            hash: self.hash().to_string(),
            plans: self.plans().clone(),
            shards: out
                .iter()
                .zip(&self.shards)
                .map(|(p, s)| (p.name.clone(), s.digest.clone()))
                .collect(),
            task_types: self.task_types.clone(),
            targets: self.targets.clone(),
        };
        out.push(Piece {
            name: base.to_string(),
            entry: INDEX_ENTRY,
            data: serde_json::to_string(&index).expect("index serialises").into(),
        });
        out
    }

    /// The whole configuration of the last compile, keys copied out of the shards: for a caller
    /// that needs it in one piece (a test, the first publish).
    pub fn config(&self) -> GatewayConfig {
        let head = self.head.as_ref();
        GatewayConfig {
            schema: SCHEMA_VERSION,
            version: self.version(),
            hash: self.hash().to_string(),
            plans: head.map(|h| h.plans.clone()).unwrap_or_default(),
            keys: Arc::new(
                self.shards
                    .iter()
                    .flat_map(|s| s.keys.iter().map(|(h, k)| (h.to_string(), CompiledKey::clone(k))))
                    .collect(),
            ),
            task_types: self.task_types.clone(),
            targets: self.targets.clone(),
        }
    }
}

/// A small set as a sorted vector, its first element inline. Nearly every token is claimed by one
/// key and nearly every Secret read by one key; a one-element `BTreeSet` allocates a node for
/// eleven (about 500 bytes per key at 100,000 keys, twice over), a one-element `Vec` an
/// allocation per key.
#[derive(Clone, Debug)]
struct Few<T>(smallvec::SmallVec<[T; 1]>);

impl<T> Default for Few<T> {
    fn default() -> Self {
        Self(smallvec::SmallVec::new())
    }
}

impl<T: Ord> Few<T> {
    fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, v);
                true
            }
        }
    }

    fn remove<Q>(&mut self, v: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.0.binary_search_by(|x| x.borrow().cmp(v)) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn remove_from<K, Q>(map: &mut HashMap<K, BTreeSet<KeyId>>, k: &Q, id: &str)
where
    K: std::hash::Hash + Eq + std::borrow::Borrow<Q>,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(set) = map.get_mut(k) {
        set.remove(id);
        if set.is_empty() {
            map.remove(k);
        }
    }
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
