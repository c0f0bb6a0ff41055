//! The compiled gateway configuration, the only contract between control plane and data plane,
//! and [`compile`], the pure function that produces it.
//!
//! A [`GatewayConfig`] holds plans and keys apart: a key names its plan and carries only its own
//! overrides, so a plan upgrade rewrites one plan entry however many keys are on it. Keys are
//! indexed by the SHA-256 of their token; raw tokens never enter this module.

mod compile;
pub mod incremental;
pub mod pieces;
pub mod targets;
pub mod tasks;
mod tokens;

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use compile::{
    Compiled, KeyReport, PlanReport, compile, compile_all, compile_plans_only, compile_with_tasks,
};
pub use tasks::{CompiledTaskType, TaskPolicy};
pub use tokens::{TokenDigest, TokenHashes, TokenState, hash_token};

use crate::api::{BanScope, BucketScope, EffectiveLimits, LimitOverrides};

/// Format version of [`GatewayConfig`] documents this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What every gateway enforces: the plans and the admitted keys.
///
/// Deterministic: the same inputs give the same bytes, and [`GatewayConfig::hash`] names the
/// content, so a gateway can tell whether anything changed and report which version it enforces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Format version, [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Configuration number: grows by one each time the content changes.
    pub version: u64,
    /// SHA-256 (hex) of the content (plans and keys).
    pub hash: String,
    /// Plans by name.
    pub plans: BTreeMap<String, CompiledPlan>,
    /// Admitted keys by the SHA-256 (hex) of their token. Shared: a plan change makes a new
    /// configuration around the same keys without copying 100,000 of them.
    pub keys: SharedKeys,
    /// Async task types by `taskType` (`ApiTaskType` objects).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub task_types: BTreeMap<String, CompiledTaskType>,
    /// Upstream targets by `ApiUpstream` name; paths none of them serves go to `--upstream`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, targets::CompiledTarget>,
}

/// Admitted keys by token digest, in digest order. A persistent map: a copy shares every node
/// with the original and an insert copies only the path to one leaf, so a gateway that takes
/// one key added at 100,000 keys copies a few nodes rather than the whole map.
pub type KeyMap = imbl::OrdMap<String, CompiledKey>;

/// Admitted keys by token digest, shared between configurations that have the same keys.
pub type SharedKeys = Arc<KeyMap>;

/// A plan as the gateway enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledPlan {
    /// Name shown to customers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Concurrency slots; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<SlotLimit>,
    /// Rate limit; `None` is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The ApiPlan is gone but keys that were serving on it keep these limits (last known good).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retained: bool,
    /// Async task policy; `None`: the plan's keys cannot submit tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<TaskPolicy>,
    /// When clients that keep exceeding the plan's limits are banned; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abuse: Option<AbusePolicy>,
}

/// A plan's abuse policy as the gateway enforces it (`ApiPlan.spec.abuse`, durations in ms).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbusePolicy {
    /// Refusals within `window_ms` that start a ban.
    pub refusals: u32,
    /// Sliding window the refusals are counted in.
    pub window_ms: u64,
    /// The first ban's length.
    pub ban_ms: u64,
    /// A ban within this long of the previous one's end is a repeat.
    pub escalation_window_ms: u64,
    /// Each repeat lasts this many times longer.
    pub escalation_factor: u32,
    /// The longest ban.
    pub max_ban_ms: u64,
    /// Client address or key.
    pub by: BanScope,
}

/// Concurrency slots over a set of paths.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlotLimit {
    /// Requests in flight at once.
    pub max: u32,
    /// Path patterns covered.
    pub paths: Vec<String>,
}

/// A GCRA rate limit over a set of paths.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second (at least 1).
    pub per_second: u32,
    /// Requests a full bucket admits at once (at least 1).
    pub burst: u32,
    /// One bucket per key or per key and endpoint.
    pub per: BucketScope,
    /// Path patterns covered.
    pub paths: Vec<String>,
}

/// An admitted key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledKey {
    /// `namespace/name` of the ApiKey: what logs and metrics may name. Shared with the
    /// controller's index, which names the key by the same allocation.
    pub id: std::sync::Arc<str>,
    /// Name of the plan in [`GatewayConfig::plans`].
    pub plan: String,
    /// Per-key replacements of plan limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<LimitOverrides>,
    /// Refused with 403 `key_suspended`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// Unix seconds after which the key is refused with 401 `key_expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl CompiledKey {
    /// A key on `plan` as the plan defines it: no overrides, not suspended, never expiring.
    pub fn on_plan(id: impl Into<std::sync::Arc<str>>, plan: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            plan: plan.into(),
            overrides: None,
            suspended: false,
            expires_at: None,
        }
    }
}

/// The limits one key gets: its plan with its overrides applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Concurrency slots; `None` is unlimited.
    pub slots: Option<SlotLimit>,
    /// Rate limit; `None` is unlimited.
    pub rate: Option<RateLimit>,
}

impl KeyLimits {
    /// Merges overrides over a plan, field by field. An override of a limit the plan leaves
    /// unlimited applies to every path.
    pub fn resolve(plan: &CompiledPlan, overrides: Option<&LimitOverrides>) -> Self {
        let Some(o) = overrides else {
            return Self {
                slots: plan.concurrency.clone(),
                rate: plan.rate_limit.clone(),
            };
        };
        let slots = match (&plan.concurrency, o.max_concurrent_requests) {
            (Some(s), Some(max)) => Some(SlotLimit {
                max,
                paths: s.paths.clone(),
            }),
            (None, Some(max)) => Some(SlotLimit {
                max,
                paths: crate::api::default_paths(),
            }),
            (s, None) => s.clone(),
        };
        let rate = match (&plan.rate_limit, o.requests_per_second) {
            (Some(r), rps) => Some(RateLimit {
                per_second: rps.unwrap_or(r.per_second),
                // A new rate without a new burst gets one second of that rate, like a plan's default.
                burst: o.burst.unwrap_or(rps.unwrap_or(r.burst)),
                per: o.per.unwrap_or(r.per),
                paths: r.paths.clone(),
            }),
            (None, Some(rps)) => Some(RateLimit {
                per_second: rps,
                burst: o.burst.unwrap_or(rps),
                per: o.per.unwrap_or_default(),
                paths: crate::api::default_paths(),
            }),
            (None, None) => None,
        };
        Self { slots, rate }
    }

    /// The limits as `ApiKey.status.effective` shows them.
    pub fn effective(&self) -> EffectiveLimits {
        EffectiveLimits {
            max_concurrent_requests: self.slots.as_ref().map(|s| s.max),
            requests_per_second: self.rate.as_ref().map(|r| r.per_second),
            burst: self.rate.as_ref().map(|r| r.burst),
            per: self.rate.as_ref().map(|r| r.per),
        }
    }
}

/// Digest of a key set: the part of [`GatewayConfig::content_hash`] that a plan change leaves
/// alone. Made of the digests of its shards ([`pieces::combine_digests`]), so that whoever
/// changed one shard (the incremental compile) or read one (a gateway) hashes that shard alone.
pub fn keys_digest(keys: &KeyMap) -> String {
    let data = pieces::shard_data(keys);
    let digests: Vec<String> = data.iter().map(|d| pieces::shard_digest(d)).collect();
    pieces::combine_digests(digests.iter().map(String::as_str))
}

impl GatewayConfig {
    /// This configuration without its keys: what a holder of them elsewhere (the gateway's key
    /// table) keeps of it. Its hash still names the whole content.
    pub fn without_keys(&self) -> Self {
        Self {
            schema: self.schema,
            version: self.version,
            hash: self.hash.clone(),
            plans: self.plans.clone(),
            keys: Arc::default(),
            task_types: self.task_types.clone(),
            targets: self.targets.clone(),
        }
    }

    /// An empty configuration: no plans, no keys, version 0.
    pub fn empty() -> Self {
        let mut config = Self {
            schema: SCHEMA_VERSION,
            version: 0,
            hash: String::new(),
            plans: BTreeMap::new(),
            keys: Arc::default(),
            task_types: BTreeMap::new(),
            targets: BTreeMap::new(),
        };
        config.hash = config.content_hash();
        config
    }

    /// SHA-256 of the plans, keys and task types, independent of version and hash fields: the plans' JSON
    /// followed by [`keys_digest`], so that whoever kept the keys of an earlier configuration
    /// (a plan change) hashes the plans alone.
    pub fn content_hash(&self) -> String {
        self.content_hash_with(&keys_digest(&self.keys))
    }

    /// [`GatewayConfig::content_hash`] with the [`keys_digest`] of these keys already known.
    pub fn content_hash_with(&self, keys_digest: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(serde_json::to_vec(&self.plans).expect("plans serialise"));
        hasher.update(b"\n");
        hasher.update(keys_digest.as_bytes());
        // Absent task types hash as before they existed, so older configurations keep their hash.
        if !self.task_types.is_empty() {
            hasher.update(b"\n");
            hasher.update(serde_json::to_vec(&self.task_types).expect("task types serialise"));
        }
        if !self.targets.is_empty() {
            hasher.update(b"\ntargets\n");
            hasher.update(serde_json::to_vec(&self.targets).expect("targets serialise"));
        }
        hex::encode(hasher.finalize())
    }

    /// The limits of an admitted key, or `None` when its plan is not in this configuration.
    pub fn limits_for(&self, key: &CompiledKey) -> Option<KeyLimits> {
        self.plans
            .get(&key.plan)
            .map(|p| KeyLimits::resolve(p, key.overrides.as_ref()))
    }

    /// Parses and checks a configuration document (JSON). Refuses anything a gateway could not
    /// enforce, naming what is wrong, so a broken document never replaces a good one.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes).map_err(ConfigError::Parse)?;
        config.check()?;
        Ok(config)
    }

    /// Serialises the configuration as the canonical JSON document.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("config serialises")
    }

    /// Checks the invariants the gateway relies on.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.check_with(&keys_digest(&self.keys))
    }

    /// [`GatewayConfig::check`] with the [`keys_digest`] of these keys already known.
    pub fn check_with(&self, keys_digest: &str) -> Result<(), ConfigError> {
        self.check_head(keys_digest)?;
        self.keys
            .iter()
            .try_for_each(|(hash, key)| self.check_key(hash, key))
    }

    /// What [`GatewayConfig::check`] checks but the keys one by one: whoever checked most keys
    /// against the same plans before (an assembly from a few changed shards) checks the rest.
    pub fn check_head(&self, keys_digest: &str) -> Result<(), ConfigError> {
        if self.schema != SCHEMA_VERSION {
            return Err(ConfigError::Schema(self.schema));
        }
        let actual = self.content_hash_with(keys_digest);
        if actual != self.hash {
            return Err(ConfigError::HashMismatch {
                declared: self.hash.clone(),
                actual,
            });
        }
        for (name, plan) in &self.plans {
            if let Some(r) = &plan.rate_limit
                && (r.per_second == 0 || r.burst == 0)
            {
                return Err(ConfigError::Invalid(format!(
                    "plan {name}: rateLimit perSecond and burst must be at least 1"
                )));
            }
            let paths = plan.concurrency.iter().flat_map(|s| &s.paths);
            for p in paths.chain(plan.rate_limit.iter().flat_map(|r| &r.paths)) {
                check_pattern(p).map_err(|e| ConfigError::Invalid(format!("plan {name}: {e}")))?;
            }
        }
        for (name, t) in &self.targets {
            let bad = |what: String| ConfigError::Invalid(format!("target {name}: {what}"));
            if t.scheme != "http" && t.scheme != "https" {
                return Err(bad(format!("scheme {:?} is neither http nor https", t.scheme)));
            }
            if t.authority.parse::<http::uri::Authority>().is_err() {
                return Err(bad(format!("authority {:?} is not host[:port]", t.authority)));
            }
            if t.paths.is_empty() {
                return Err(bad("paths is empty".into()));
            }
            for p in &t.paths {
                check_pattern(p).map_err(bad)?;
            }
            if t.rate_limit.is_some_and(|r| r.per_second == 0 || r.burst == 0) {
                return Err(bad("rateLimit perSecond and burst must be at least 1".into()));
            }
            if let Some(c) = &t.credential
                && (http::HeaderName::from_bytes(c.header.as_bytes()).is_err() || !c.format.contains("{}"))
            {
                return Err(bad("credential header or format is not usable".into()));
            }
        }
        Ok(())
    }

    /// One key's part of [`GatewayConfig::check`]: its index is a digest, its plan is defined.
    pub fn check_key(&self, hash: &str, key: &CompiledKey) -> Result<(), ConfigError> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::Invalid(format!(
                "key {}: index must be a SHA-256 hex digest",
                key.id
            )));
        }
        if !self.plans.contains_key(&key.plan) {
            return Err(ConfigError::Invalid(format!(
                "key {}: plan {} is not defined",
                key.id, key.plan
            )));
        }
        // The gateway writes both into the upstream's request head as they are.
        if let Some(bad) = [&*key.id, &key.plan]
            .into_iter()
            .find(|s| s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::Invalid(format!(
                "key {:?}: {bad:?} is not a name (printable ASCII without spaces)",
                key.id
            )));
        }
        Ok(())
    }
}

/// Why a configuration document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the expected shape.
    #[error("configuration does not parse: {0}")]
    Parse(#[source] serde_json::Error),
    /// Written by a build with another format.
    #[error("configuration schema {0} is not supported (this build reads {SCHEMA_VERSION})")]
    Schema(u32),
    /// Edited by hand or truncated.
    #[error("configuration hash {declared} does not match its content ({actual})")]
    HashMismatch {
        /// The hash the document declares.
        declared: String,
        /// The hash of what it holds.
        actual: String,
    },
    /// Well-formed but not enforceable.
    #[error("configuration is invalid: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// Every [`ConfigError::metric_label`], so that each series exists (at 0) before the first
    /// failure: an alert on its increase needs the series to be there.
    pub const METRIC_LABELS: [&'static str; 4] = ["parse", "schema", "hash_mismatch", "invalid"];

    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        // Keep in step with METRIC_LABELS.
        match self {
            Self::Parse(_) => "parse",
            Self::Schema(_) => "schema",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// Checks a path pattern: `/exact/path` or `/prefix*`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let star = p.find('*');
    if !p.starts_with('/') || star.is_some_and(|i| i != p.len() - 1) {
        return Err(format!(
            "path pattern {p:?} must start with / and may only end with a single *"
        ));
    }
    Ok(())
}

/// Whether `path` falls under any of the patterns.
pub fn matches_any(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => p == path,
    })
}
