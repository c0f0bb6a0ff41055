//! A [`GatewayConfig`] as Kubernetes objects: one index (plans, version, content hash, and the
//! name and digest of each key shard) and the key shards, each well under the 1 MiB limit of a
//! ConfigMap. Keys go to a shard by their token digest, and a key names its plan rather than
//! carrying its limits, so a plan upgrade rewrites the index alone and a key change rewrites the
//! index and one shard, however many keys there are.
//!
//! The gateway assembles a configuration only when every shard the index names is present with
//! the digest the index gives it; until then it keeps enforcing the last complete one. Pure: no
//! I/O.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{CompiledKey, CompiledPlan, ConfigError, GatewayConfig, SCHEMA_VERSION};

/// Label on every configuration object; its value is the configuration's name.
pub const CONFIG_LABEL: &str = "slotgate.dev/config";
/// Label on every gateway report Lease; its value is the configuration's name.
pub const REPORT_LABEL: &str = "slotgate.dev/gateway-report";
/// Annotation of a report: the configuration version enforced.
pub const VERSION_ANNOTATION: &str = "slotgate.dev/version";
/// Annotation of a gateway's report: what keys did (the last minute's requests and refusals of the
/// most active keys, refreshed at most every 30 s) and the key bans in force, as JSON
/// ([`crate::config::pieces::Activity`]).
pub const ACTIVITY_ANNOTATION: &str = "slotgate.dev/activity";

/// What one gateway replica reports keys did, in its report's [`ACTIVITY_ANNOTATION`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activity {
    /// Key id to `[requests, refused]` in the last minute (keys that sent something).
    #[serde(default)]
    pub usage: std::collections::BTreeMap<String, [u64; 2]>,
    /// Key id to `[ends (Unix seconds), strike]` of the key bans in force.
    #[serde(default)]
    pub bans: std::collections::BTreeMap<String, [u64; 2]>,
    /// Key id to `[queued, running]` async tasks, for the keys that have any.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tasks: std::collections::BTreeMap<String, [u64; 2]>,
    /// Upstream target name to the last TLS failure with it (unknown CA, wrong host name), for
    /// the targets whose last handshake failed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub target_tls: std::collections::BTreeMap<String, String>,
    /// Key id to its unfinished (queued or running) async tasks across the fleet, when tasks
    /// live in the shared store: every replica on it sees the same figure, so the controller
    /// takes the largest, and counts as queued what no replica reports running.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub open_tasks: std::collections::BTreeMap<String, u64>,
}
/// Annotation of a report: the content hash enforced.
pub const HASH_ANNOTATION: &str = "slotgate.dev/hash";
/// Field manager of the gateways' writes.
pub const GATEWAY_MANAGER: &str = "slotgate-gateway";
/// A report not renewed for this long means the replica is gone.
pub const REPORT_TTL_SECONDS: i32 = 15;

/// Data entry of the index object.
pub const INDEX_ENTRY: &str = "index.json";
/// Data entry of a shard object.
pub const SHARD_ENTRY: &str = "keys.json";
/// Keys per shard the split aims at: about 300 bytes each, so a shard stays near 600 KB.
pub const KEYS_PER_SHARD: usize = 2000;

/// The index object's content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Index {
    /// Format version, [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Configuration version.
    pub version: u64,
    /// Content hash of the whole configuration.
    pub hash: String,
    /// Plans by name.
    pub plans: BTreeMap<String, CompiledPlan>,
    /// Shard object names and the SHA-256 of each one's data.
    pub shards: BTreeMap<String, String>,
    /// Async task types by `taskType`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_types: BTreeMap<String, super::CompiledTaskType>,
    /// Upstream targets by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, super::targets::CompiledTarget>,
}

/// One object to write: its name and its single data entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Object name.
    pub name: String,
    /// Data entry ([`INDEX_ENTRY`] or [`SHARD_ENTRY`]).
    pub entry: &'static str,
    /// The entry's content (JSON), shared with whoever keeps it (the incremental index keeps
    /// each shard's text once for every publish).
    pub data: Arc<str>,
}

/// Why pieces do not make a configuration (yet).
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A shard the index names is missing or not the version the index expects: an update is
    /// half-way through; wait for the rest.
    #[error("shard {0} is missing or not the one the index names (an update is in progress)")]
    Incomplete(String),
    /// An object does not parse or the result does not check: refuse it.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Shards for `keys` keys: a power of two, so that growing the fleet moves keys rarely.
pub fn shard_count(keys: usize) -> usize {
    keys.div_ceil(KEYS_PER_SHARD).max(1).next_power_of_two()
}

fn sha256_hex(data: &str) -> String {
    hex::encode(Sha256::digest(data.as_bytes()))
}

/// Splits a configuration into the index (named `base`) and shards (`base-keys-I-of-N`), the
/// index last: writing them in order leaves the gateways a consistent view at every step.
pub fn split(config: &GatewayConfig, base: &str) -> Vec<Piece> {
    let mut pieces = shards(config, base);
    let index = index(config, base, &pieces);
    pieces.push(index);
    pieces
}

/// The key shards of a configuration. They depend on its keys only, so a caller whose keys did
/// not change (a plan upgrade) can keep the shards it has and build a new [`index`].
pub fn shards(config: &GatewayConfig, base: &str) -> Vec<Piece> {
    let data = shard_data(&config.keys);
    let count = data.len();
    data.into_iter()
        .enumerate()
        .map(|(i, data)| Piece {
            name: shard_name(base, i, count),
            entry: SHARD_ENTRY,
            data: data.into(),
        })
        .collect()
}

/// The JSON of each key shard, in shard order: what [`shards`] writes and what
/// [`super::keys_digest`] hashes.
pub fn shard_data(keys: &super::KeyMap) -> Vec<String> {
    let count = shard_count(keys.len());
    let mut parts: Vec<BTreeMap<&String, &CompiledKey>> = vec![BTreeMap::new(); count];
    for (digest, key) in keys {
        parts[shard_of(digest, count)].insert(digest, key);
    }
    parts.iter().map(shard_json).collect()
}

/// One shard's JSON: its keys by token digest, in digest order.
pub fn shard_json<K: Serialize>(keys: &K) -> String {
    serde_json::to_string(keys).expect("keys serialise")
}

/// Object name of shard `i` of `count`.
pub fn shard_name(base: &str, i: usize, count: usize) -> String {
    format!("{base}-keys-{i}-of-{count}")
}

/// Which shard of `count` a key with this token digest goes to.
pub fn shard_of(digest: &str, count: usize) -> usize {
    let prefix = u32::from_str_radix(digest.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    prefix as usize % count
}

/// SHA-256 (hex) of a shard's JSON: the digest the index gives it.
pub fn shard_digest(data: &str) -> String {
    sha256_hex(data)
}

/// The digest of a key set from its shards' digests (in any order): whoever has the shard
/// digests, as an index names them, has the keys' digest without reading a key.
pub fn combine_digests<'a>(digests: impl IntoIterator<Item = &'a str>) -> String {
    let mut all: Vec<&str> = digests.into_iter().collect();
    all.sort_unstable();
    let mut hasher = Sha256::new();
    for d in all {
        hasher.update(d.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// `(i, count)` of a shard object's name, [`shard_name`]'s inverse.
fn shard_number(name: &str) -> Option<(usize, usize)> {
    let (rest, count) = name.rsplit_once("-of-")?;
    let (_, i) = rest.rsplit_once("-keys-")?;
    Some((i.parse().ok()?, count.parse().ok()?))
}

/// The index object of a configuration whose keys are in `shards`.
pub fn index(config: &GatewayConfig, base: &str, shards: &[Piece]) -> Piece {
    let index = Index {
        schema: config.schema,
        version: config.version,
        hash: config.hash.clone(),
        plans: config.plans.clone(),
        task_types: config.task_types.clone(),
        targets: config.targets.clone(),
        shards: shards
            .iter()
            .map(|p| (p.name.clone(), sha256_hex(&p.data)))
            .collect(),
    };
    Piece {
        name: base.to_string(),
        entry: INDEX_ENTRY,
        data: serde_json::to_string(&index).expect("index serialises").into(),
    }
}

/// Builds the configuration an index describes from the shard data at hand (object name to data).
pub fn assemble<'a>(
    index: &str,
    shard: impl Fn(&str) -> Option<&'a str>,
) -> Result<GatewayConfig, AssembleError> {
    assemble_from(index, shard, None).map(|a| a.config)
}

/// What one assembly gives: the configuration to apply, how it differs from the last one, and
/// what the next assembly reuses.
#[derive(Debug)]
pub struct Assembly {
    /// The configuration. Its keys are all of them after a full assembly; after one from changed
    /// shards ([`Assembly::delta`] is `Some`), only the keys those shards brought that are new or
    /// changed: the rest are the last assembly's, which whoever applied it holds already.
    pub config: GatewayConfig,
    /// What changed against the last assembly, when it was reused.
    pub delta: Option<KeyDelta>,
    /// What the next assembly reuses.
    pub next: Assembled,
}

/// What an assembly keeps for the next one: the shards it was made from and, per shard, each
/// key's digest, a fingerprint of its entry and its plan, so that the next assembly finds what
/// a changed shard added, removed or changed without a map of every key (the gateway's key
/// table is its one copy of the keys).
#[derive(Clone, Debug)]
pub struct Assembled {
    /// Content hash of the configuration assembled.
    hash: String,
    /// Shard names and digests it was assembled from.
    shards: BTreeMap<String, String>,
    /// [`super::keys_digest`] of its keys.
    keys_digest: String,
    /// Keys per plan name: which plans the keys need, without a pass over them.
    plans_used: BTreeMap<String, usize>,
    /// Plan names by the number a [`Member`] gives.
    plan_names: Vec<String>,
    /// Per shard number, its keys sorted by digest.
    members: Vec<Arc<[Member]>>,
    /// Shards this assembly read (their text matched the index's digest): their keys are here
    /// now, and a later assembly needs their text only for another version of them.
    pub read: Vec<String>,
}

/// A key as an assembly remembers it: 48 bytes instead of its entry.
#[derive(Clone, Copy, Debug)]
struct Member {
    digest: [u8; 32],
    /// [`fingerprint`] of its entry: a changed entry has another one.
    fingerprint: u64,
    /// Its plan, in [`Assembled::plan_names`].
    plan: u32,
}

impl Assembled {
    /// Whether `text` is the version of shard `name` this assembly holds the keys of.
    pub fn holds(&self, name: &str, text: &str) -> bool {
        self.shards.get(name).is_some_and(|d| *d == sha256_hex(text))
    }

    /// Content hash of the configuration assembled.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    fn plan_number(&mut self, name: &str) -> u32 {
        match self.plan_names.iter().position(|n| n == name) {
            Some(i) => i as u32,
            None => {
                self.plan_names.push(name.to_string());
                (self.plan_names.len() - 1) as u32
            }
        }
    }

    /// Remembers shard `i`'s keys (`part`), counting each in its plan.
    fn remember(&mut self, i: usize, part: &BTreeMap<String, CompiledKey>) -> Result<(), ConfigError> {
        let mut members = Vec::with_capacity(part.len());
        for (hex_digest, key) in part {
            *self.plans_used.entry(key.plan.clone()).or_default() += 1;
            members.push(Member {
                digest: decode_digest(hex_digest, key)?,
                fingerprint: fingerprint(key),
                plan: self.plan_number(&key.plan),
            });
        }
        members.sort_unstable_by_key(|m| m.digest);
        if let Some(m) = self.members.get_mut(i) {
            *m = members.into();
        }
        Ok(())
    }

    /// What shard `i` changed: its new `part` against what it held. Pushes the digests of the keys
    /// added, removed or changed to `changed`, moves the added and changed keys to `keys`, and
    /// remembers the shard's new keys.
    fn diff(
        &mut self,
        i: usize,
        part: BTreeMap<String, CompiledKey>,
        changed: &mut Vec<String>,
        keys: &mut super::KeyMap,
    ) -> Result<(), ConfigError> {
        let old = self.members.get(i).cloned().unwrap_or_else(|| Arc::from([]));
        let mut kept = vec![false; old.len()];
        let mut members = Vec::with_capacity(part.len());
        for (hex_digest, key) in part {
            let member = Member {
                digest: decode_digest(&hex_digest, &key)?,
                fingerprint: fingerprint(&key),
                plan: self.plan_number(&key.plan),
            };
            members.push(member);
            let before = old.binary_search_by_key(&member.digest, |m| m.digest).ok();
            if let Some(j) = before {
                kept[j] = true;
                if old[j].fingerprint == member.fingerprint {
                    continue;
                }
                self.uncount(old[j].plan);
            }
            *self.plans_used.entry(key.plan.clone()).or_default() += 1;
            changed.push(hex_digest.clone());
            keys.insert(hex_digest, key);
        }
        for (m, _) in old.iter().zip(&kept).filter(|(_, kept)| !**kept) {
            self.uncount(m.plan);
            changed.push(hex::encode(m.digest));
        }
        members.sort_unstable_by_key(|m| m.digest);
        if let Some(m) = self.members.get_mut(i) {
            *m = members.into();
        }
        Ok(())
    }

    fn uncount(&mut self, plan: u32) {
        if let Some(n) = self
            .plan_names
            .get(plan as usize)
            .and_then(|name| self.plans_used.get_mut(name))
        {
            *n -= 1;
        }
    }
}

fn decode_digest(hex_digest: &str, key: &CompiledKey) -> Result<[u8; 32], ConfigError> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest)
        .map_err(|_| ConfigError::Invalid(format!("key {}: index must be a SHA-256 hex digest", key.id)))?;
    Ok(digest)
}

/// A 64-bit hash of a key's entry, to tell a changed entry from an unchanged one (a miss takes
/// odds of one in 2^64). `DefaultHasher::new` has fixed keys: the same in every assembly.
fn fingerprint(key: &CompiledKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// The keys one assembly changed against the one before it.
#[derive(Clone, Debug)]
pub struct KeyDelta {
    /// Content hash of the configuration before: the delta is only meaningful against it.
    pub base: String,
    /// Token digests whose entry was added, removed or changed; the configuration's keys hold
    /// those still present.
    pub changed: Vec<String>,
}

/// [`assemble`], reusing what `last` kept: when the index names the same shards with the same
/// digests (a plan change) no shard is read, parsed or hashed again; when some changed (a key
/// added, removed or rotated) only those are, so the cost no longer grows with the number of keys.
pub fn assemble_from<'a>(
    index: &str,
    shard: impl Fn(&str) -> Option<&'a str>,
    last: Option<&Assembled>,
) -> Result<Assembly, AssembleError> {
    let index: Index = serde_json::from_str(index).map_err(ConfigError::Parse)?;
    if index.schema != SCHEMA_VERSION {
        return Err(ConfigError::Schema(index.schema).into());
    }
    let mut keys = super::KeyMap::new();
    let (next, delta) = match last {
        // The same shards, some of them (or none: a plan change) changed: only those are read and
        // parsed; the other keys are the last assembly's.
        Some(last) if last.shards.keys().eq(index.shards.keys()) => {
            let mut next = last.clone();
            next.read.clear();
            let mut changed = Vec::new();
            for (name, digest) in &index.shards {
                if last.shards.get(name) == Some(digest) {
                    continue;
                }
                let part = read_shard(&shard, name, digest)?;
                next.read.push(name.clone());
                let (i, _) = shard_number(name).ok_or_else(|| AssembleError::Incomplete(name.clone()))?;
                next.diff(i, part, &mut changed, &mut keys)?;
            }
            next.plans_used.retain(|_, n| *n > 0);
            next.keys_digest = combine_digests(index.shards.values().map(String::as_str));
            let delta = KeyDelta {
                base: last.hash.clone(),
                changed,
            };
            (next, Some(delta))
        }
        _ => {
            let mut next = Assembled {
                hash: String::new(),
                shards: BTreeMap::new(),
                keys_digest: combine_digests(index.shards.values().map(String::as_str)),
                plans_used: BTreeMap::new(),
                plan_names: Vec::new(),
                members: vec![Arc::from([]); index.shards.len()],
                read: Vec::new(),
            };
            for (name, digest) in &index.shards {
                let part = read_shard(&shard, name, digest)?;
                next.read.push(name.clone());
                if let Some((i, _)) = shard_number(name) {
                    next.remember(i, &part)?;
                }
                keys.extend(part);
            }
            (next, None)
        }
    };
    let config = GatewayConfig {
        schema: index.schema,
        version: index.version,
        hash: index.hash,
        plans: index.plans,
        keys: Arc::new(keys),
        task_types: index.task_types,
        targets: index.targets,
    };
    match &delta {
        None => config.check_with(&next.keys_digest)?,
        Some(_) => {
            // Keys kept from the last assembly were checked then; what they need now is their
            // plans. The keys here are the ones the changed shards brought.
            config.check_head(&next.keys_digest)?;
            for (digest, key) in config.keys.iter() {
                config.check_key(digest, key)?;
            }
            if let Some(plan) = next.plans_used.keys().find(|p| !config.plans.contains_key(*p)) {
                let n = next.plans_used[plan];
                return Err(ConfigError::Invalid(format!(
                    "{n} keys are on plan {plan}, which is not defined"
                ))
                .into());
            }
        }
    }
    let next = Assembled {
        hash: config.hash.clone(),
        shards: index.shards,
        ..next
    };
    Ok(Assembly { config, delta, next })
}

/// One shard's keys, if the data at hand is the version the index names.
fn read_shard<'a>(
    shard: &impl Fn(&str) -> Option<&'a str>,
    name: &str,
    digest: &str,
) -> Result<BTreeMap<String, CompiledKey>, AssembleError> {
    let data = shard(name)
        .filter(|d| sha256_hex(d) == digest)
        .ok_or_else(|| AssembleError::Incomplete(name.to_string()))?;
    Ok(serde_json::from_str(data).map_err(ConfigError::Parse)?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::SlotLimit;

    fn config(keys: usize, slots: u32) -> GatewayConfig {
        let mut c = GatewayConfig::empty();
        c.plans.insert(
            "p".into(),
            CompiledPlan {
                display_name: None,
                concurrency: Some(SlotLimit {
                    max: slots,
                    paths: vec!["/*".into()],
                }),
                rate_limit: None,
                retained: false,
                tasks: None,
                abuse: None,
            },
        );
        for i in 0..keys {
            std::sync::Arc::make_mut(&mut c.keys).insert(
                sha256_hex(&i.to_string()),
                CompiledKey::on_plan(format!("ns/k{i}"), "p"),
            );
        }
        c.version = 7;
        c.hash = c.content_hash();
        c
    }

    fn by_name(pieces: &[Piece]) -> HashMap<String, String> {
        pieces
            .iter()
            .map(|p| (p.name.clone(), p.data.to_string()))
            .collect()
    }

    #[test]
    fn split_and_assemble_round_trip_with_every_object_under_a_mebibyte() {
        let c = config(10_000, 25);
        let pieces = split(&c, "cfg");
        assert_eq!(pieces.len(), 8 + 1);
        assert!(pieces.iter().all(|p| p.data.len() < 1024 * 1024 * 3 / 4));
        assert_eq!(pieces.last().unwrap().name, "cfg");
        let map = by_name(&pieces);
        let back = assemble(&map["cfg"], |n| map.get(n).map(String::as_str)).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_plan_upgrade_rewrites_the_index_only() {
        let before = split(&config(10_000, 25), "cfg");
        let after = split(&config(10_000, 50), "cfg");
        let changed: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.name.as_str())
            .collect();
        assert_eq!(changed, ["cfg"]);
    }

    #[test]
    fn a_missing_or_stale_shard_is_incomplete_and_garbage_is_invalid() {
        let pieces = split(&config(3000, 25), "cfg");
        let mut map = by_name(&pieces);
        map.remove("cfg-keys-1-of-2");
        assert!(matches!(
            assemble(&map["cfg"], |n| map.get(n).map(String::as_str)),
            Err(AssembleError::Incomplete(n)) if n == "cfg-keys-1-of-2"
        ));
        map.insert("cfg-keys-1-of-2".into(), "{}".into());
        assert!(matches!(
            assemble(&map["cfg"], |n| map.get(n).map(String::as_str)),
            Err(AssembleError::Incomplete(_))
        ));
        assert!(matches!(
            assemble("{not json", |_| None),
            Err(AssembleError::Invalid(_))
        ));
    }

    #[test]
    fn a_plan_upgrade_reassembles_without_reading_a_shard() {
        let before = config(10_000, 25);
        let map = by_name(&split(&before, "cfg"));
        let first = assemble_from(&map["cfg"], |n| map.get(n).map(String::as_str), None).unwrap();
        assert!(first.delta.is_none());
        assert_eq!(first.config, before);
        let mut upgraded = before.clone();
        upgraded
            .plans
            .get_mut("p")
            .unwrap()
            .concurrency
            .as_mut()
            .unwrap()
            .max = 50;
        upgraded.version = 8;
        upgraded.hash = upgraded.content_hash();
        let map2 = by_name(&split(&upgraded, "cfg"));
        // Only the index is at hand: the keys come from the last assembly.
        let second = assemble_from(&map2["cfg"], |_| None, Some(&first.next)).unwrap();
        assert_eq!(applied(&first.config.keys, &second), upgraded);
        let delta = second.delta.as_ref().expect("a delta against the last assembly");
        assert!(delta.changed.is_empty() && second.config.keys.is_empty());
        assert_eq!(delta.base, before.hash);
        // What each assembly read, which a gateway need not keep the text of.
        assert_eq!(first.next.read.len(), first.next.shards.len());
        assert!(second.next.read.is_empty());
        assert!(
            map.iter()
                .filter(|(n, _)| *n != "cfg")
                .all(|(n, t)| second.next.holds(n, t))
        );
        // A tampered plan in the index is still caught by the content hash.
        let tampered = map2["cfg"].replace("\"max\":50", "\"max\":5000");
        assert!(matches!(
            assemble_from(&tampered, |_| None, Some(&first.next)),
            Err(AssembleError::Invalid(ConfigError::HashMismatch { .. }))
        ));
        // Keys kept from the last assembly still need their plan.
        let mut orphaned = upgraded.clone();
        orphaned.plans.clear();
        orphaned.hash = orphaned.content_hash();
        let map_o = by_name(&split(&orphaned, "cfg"));
        assert!(matches!(
            assemble_from(&map_o["cfg"], |_| None, Some(&first.next)),
            Err(AssembleError::Invalid(ConfigError::Invalid(m))) if m.contains("plan p")
        ));
        // Changed keys mean changed shard digests: the shards are read again.
        let mut more = upgraded.clone();
        let key = more.keys.values().next().unwrap().clone();
        Arc::make_mut(&mut more.keys).insert(
            sha256_hex("new"),
            CompiledKey {
                id: "ns/new".into(),
                ..key
            },
        );
        more.version = 9;
        more.hash = more.content_hash();
        let map3 = by_name(&split(&more, "cfg"));
        assert!(matches!(
            assemble_from(&map3["cfg"], |_| None, Some(&second.next)),
            Err(AssembleError::Incomplete(_))
        ));
        let third = assemble_from(
            &map3["cfg"],
            |n| map3.get(n).map(String::as_str),
            Some(&second.next),
        )
        .unwrap();
        assert_eq!(applied(&upgraded.keys, &third), more);
        // What changed is named, against the configuration it changed from, and only the new
        // key travels.
        let read = &third.next.read;
        assert_eq!(read.len(), 1, "only the shard the new key went to");
        assert!(third.next.holds(&read[0], &map3[&read[0]]));
        assert!(!second.next.holds(&read[0], &map3[&read[0]]));
        let delta = third.delta.as_ref().expect("assembled from changed shards");
        assert_eq!(delta.changed, [sha256_hex("new")]);
        assert_eq!(delta.base, upgraded.hash);
        assert_eq!(third.config.keys.keys().collect::<Vec<_>>(), [&sha256_hex("new")]);
    }

    /// The configuration a holder of `base`'s keys has after applying `assembly`.
    fn applied(base: &crate::config::KeyMap, assembly: &Assembly) -> GatewayConfig {
        let mut config = assembly.config.clone();
        if let Some(delta) = &assembly.delta {
            let mut keys = base.clone();
            for digest in &delta.changed {
                keys.remove(digest);
            }
            keys.extend(assembly.config.keys.iter().map(|(d, k)| (d.clone(), k.clone())));
            config.keys = Arc::new(keys);
        }
        config
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// A chain of assemblies, each from the last and the shards that changed, gives the
        /// configuration a full assembly gives, and names exactly the digests that differ.
        #[test]
        fn assembling_from_changed_shards_is_a_full_assembly(
            steps in proptest::collection::vec(proptest::collection::vec((0u8..4, 0usize..3000), 1..6), 1..8)
        ) {
            let mut current = config(3000, 25);
            current.plans.insert("q".into(), current.plans["p"].clone());
            current.hash = current.content_hash();
            let map = by_name(&split(&current, "cfg"));
            let mut last = assemble_from(&map["cfg"], |n| map.get(n).map(String::as_str), None).unwrap().next;
            for (round, ops) in steps.into_iter().enumerate() {
                let mut next = current.clone();
                let keys = Arc::make_mut(&mut next.keys);
                for (op, i) in ops {
                    let digest = sha256_hex(&i.to_string());
                    match op {
                        0 => { keys.remove(&digest); }
                        1 => { keys.insert(sha256_hex(&format!("new-{round}-{i}")), CompiledKey::on_plan(format!("ns/n{round}-{i}"), "q")); }
                        2 => {
                            // A rotation: the same key under a new token.
                            if let Some(k) = keys.remove(&digest) {
                                keys.insert(sha256_hex(&format!("rot-{round}-{i}")), k);
                            }
                        }
                        _ => {
                            if let Some(k) = keys.get_mut(&digest) {
                                k.plan = "q".into();
                                k.suspended = !k.suspended;
                            }
                        }
                    }
                }
                next.version += 1;
                next.hash = next.content_hash();
                let map = by_name(&split(&next, "cfg"));
                let full = assemble(&map["cfg"], |n| map.get(n).map(String::as_str)).unwrap();
                let got = assemble_from(&map["cfg"], |n| map.get(n).map(String::as_str), Some(&last)).unwrap();
                let config = applied(&current.keys, &got);
                proptest::prop_assert_eq!(&config, &full);
                proptest::prop_assert_eq!(&config, &next);
                let mut want: Vec<&String> = current.keys.iter()
                    .filter(|(d, k)| next.keys.get(*d) != Some(*k)).map(|(d, _)| d)
                    .chain(next.keys.keys().filter(|d| !current.keys.contains_key(*d)))
                    .collect();
                want.sort();
                if let Some(delta) = &got.delta {
                    let mut changed: Vec<&String> = delta.changed.iter().collect();
                    changed.sort();
                    proptest::prop_assert_eq!(changed, want);
                } else {
                    proptest::prop_assert!(want.is_empty() || current.keys.len() != next.keys.len());
                }
                current = next;
                last = got.next;
            }
        }
    }
}
