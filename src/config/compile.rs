//! `compile`: ApiPlans + ApiKeys + token hashes + the previous configuration → the next
//! [`GatewayConfig`] and the status every object should show. Pure: no clock, no I/O, no
//! randomness, so the controller, `slotgate up` and the tests all call the same function.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashMap},
};

use kube::ResourceExt;

use super::{CompiledKey, CompiledPlan, GatewayConfig, KeyLimits, RateLimit, SCHEMA_VERSION, SlotLimit};
use crate::api::{ApiKey, ApiPlan, ConditionSpec, EffectiveLimits};

use super::tokens::{TokenHashes, TokenState};

/// Condition types and reasons, in one place so docs, tests and dashboards agree.
pub mod reason {
    /// Condition type: the object is fully in force.
    pub const READY: &str = "Ready";
    /// Condition type (ApiKey): its plan exists.
    pub const PLAN_RESOLVED: &str = "PlanResolved";
    /// Condition type (ApiKey): its token Secret holds a usable, unique token.
    pub const TOKEN_READY: &str = "TokenReady";

    /// The plan compiled and its keys can use it.
    pub const COMPILED: &str = "Compiled";
    /// The plan sets neither concurrency nor a rate limit.
    pub const UNLIMITED: &str = "Unlimited";
    /// The plan (or key override) sets zero slots: every covered request is refused.
    pub const ZERO_CONCURRENCY: &str = "ZeroConcurrency";
    /// The plan spec cannot be enforced.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The key is admitted with its limits.
    pub const ADMITTED: &str = "Admitted";
    /// The key's plan exists.
    pub const RESOLVED: &str = "Resolved";
    /// The key names a plan that does not exist.
    pub const PLAN_NOT_FOUND: &str = "PlanNotFound";
    /// The key's token was found.
    pub const TOKEN_FOUND: &str = "TokenFound";
    /// The key's Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// The key's Secret has no such entry, or it is blank.
    pub const TOKEN_EMPTY: &str = "TokenEmpty";
    /// Another, older key already uses the same token.
    pub const DUPLICATE_TOKEN: &str = "DuplicateToken";
    /// The key is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// Condition type (ApiPlan with `spec.tasks`): its keys may submit async tasks.
    pub const TASKS: &str = "Tasks";
    /// The plan's task policy is in force.
    pub const ENABLED: &str = "Enabled";
}

/// Status of one ApiPlan as compile sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlanReport {
    /// ApiKeys whose spec names the plan.
    pub keys: u32,
    /// `Ready`, and `Tasks` when the plan has a task policy.
    pub conditions: Vec<ConditionSpec>,
}

/// Status of one ApiKey as compile sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyReport {
    /// Whether the gateways will admit requests with this key's token.
    pub admitted: bool,
    /// Limits in force, when admitted.
    pub effective: Option<EffectiveLimits>,
    /// `PlanResolved`, `TokenReady`, `Ready`.
    pub conditions: Vec<ConditionSpec>,
}

/// The output of [`compile`].
#[derive(Clone, Debug)]
pub struct Compiled {
    /// What the gateways must enforce next.
    pub config: GatewayConfig,
    /// Status of every ApiPlan, by name.
    pub plans: BTreeMap<String, PlanReport>,
    /// Status of every ApiKey, by `namespace/name`.
    pub keys: BTreeMap<String, KeyReport>,
    /// [`super::keys_digest`] of the configuration's keys, for [`compile_plans_only`].
    pub keys_digest: String,
}

/// Compiles plans and keys into the next gateway configuration.
///
/// - A key on a missing plan that was already serving keeps its last compiled limits (the old
///   plan entry is retained); a new key on a missing plan is not admitted.
/// - A key whose Secret is missing or blank is not admitted.
/// - Two keys with one token: the older (by creation time, then `namespace/name`) keeps it.
/// - `version` grows by one exactly when the content differs from `previous`.
///
/// Takes the objects owned or shared (`Arc`, as a reflector's store holds them), so a controller
/// with 100,000 keys does not copy them for every pass.
pub fn compile<P: Borrow<ApiPlan>, K: Borrow<ApiKey>>(
    plans: &[P],
    keys: &[K],
    tokens: &TokenHashes,
    previous: Option<&GatewayConfig>,
) -> Compiled {
    compile_with_tasks(plans, keys, tokens, BTreeMap::new(), previous)
}

/// [`compile`] with the async task types already compiled
/// ([`super::tasks::compile_task_types`]): they are part of the content, so `version` grows when
/// they change.
pub fn compile_with_tasks<P: Borrow<ApiPlan>, K: Borrow<ApiKey>>(
    plans: &[P],
    keys: &[K],
    tokens: &TokenHashes,
    task_types: BTreeMap<String, super::CompiledTaskType>,
    previous: Option<&GatewayConfig>,
) -> Compiled {
    compile_all(plans, keys, tokens, task_types, BTreeMap::new(), previous)
}

/// [`compile_with_tasks`] with the upstream targets already compiled
/// ([`super::targets::compile_targets`]), part of the content like the task types.
pub fn compile_all<P: Borrow<ApiPlan>, K: Borrow<ApiKey>>(
    plans: &[P],
    keys: &[K],
    tokens: &TokenHashes,
    task_types: BTreeMap<String, super::CompiledTaskType>,
    targets: BTreeMap<String, super::targets::CompiledTarget>,
    previous: Option<&GatewayConfig>,
) -> Compiled {
    use reason::*;

    let mut out_plans = BTreeMap::new();
    let mut plan_reports = BTreeMap::new();
    let mut key_counts: HashMap<&str, u32> = HashMap::new();
    for key in keys {
        *key_counts.entry(key.borrow().spec.plan.as_str()).or_default() += 1;
    }

    let mut sorted_plans: Vec<&ApiPlan> = plans.iter().map(Borrow::borrow).collect();
    sorted_plans.sort_by_key(|p| p.name_any());
    for plan in sorted_plans {
        let name = plan.name_any();
        let count = key_counts.get(name.as_str()).copied().unwrap_or(0);
        let conditions = match compile_plan(plan) {
            Ok(compiled) => {
                let conditions = plan_conditions(&compiled);
                out_plans.insert(name.clone(), compiled);
                conditions
            }
            Err(why) => vec![ConditionSpec::fail(READY, INVALID_SPEC, why)],
        };
        plan_reports.insert(
            name,
            PlanReport {
                keys: count,
                conditions,
            },
        );
    }

    // Older keys first, so the older of two keys sharing a token keeps it whatever the input order.
    let mut sorted_keys: Vec<(&ApiKey, String)> = keys
        .iter()
        .map(|k| {
            let k: &ApiKey = k.borrow();
            (k, k.id())
        })
        .collect();
    sorted_keys.sort_by(|(a, aid), (b, bid)| {
        let at = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let bt = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at.cmp(&bt).then_with(|| aid.cmp(bid))
    });

    let previous_by_id: HashMap<&str, &CompiledKey> = previous
        .map(|p| p.keys.values().map(|k| (&*k.id, k)).collect())
        .unwrap_or_default();
    let mut token_owner: HashMap<String, String> = HashMap::new();
    let mut out_keys = BTreeMap::new();
    let mut key_reports = BTreeMap::new();
    // Only the plans the objects define: a plan kept for some key (last known good) admits no
    // other key, whatever order they are compiled in.
    let valid: BTreeMap<String, CompiledPlan> = out_plans.clone();
    let plan_of = |name: &str| {
        valid
            .get(name)
            .or_else(|| previous.and_then(|p| p.plans.get(name)))
    };

    for (key, id) in sorted_keys {
        let namespace = key.namespace().unwrap_or_default();
        let secret = key.token_ref();
        let token = match tokens.lookup(&namespace, &secret.name, &secret.key) {
            TokenState::SecretNotFound => Token::SecretNotFound,
            TokenState::Empty => Token::Empty,
            TokenState::Hash(hash) => match token_owner.get(&**hash) {
                Some(owner) => Token::Duplicate(owner),
                None => {
                    token_owner.insert(hash.to_string(), id.clone());
                    Token::Owner(hash)
                }
            },
        };
        let plan = plan_state(&valid, &plan_reports, &key.spec.plan);
        let last = previous_by_id.get(id.as_str()).copied();
        let decided = decide_key(
            CompiledKey {
                id: id.as_str().into(),
                plan: key.spec.plan.clone(),
                overrides: key.spec.overrides.clone(),
                suspended: key.spec.suspended,
                expires_at: key.spec.expires_at.as_ref().map(|t| t.0.as_second()),
            },
            &namespace,
            &secret,
            token,
            plan,
            last,
            &plan_of,
        );
        if let Some((hash, k)) = decided.admitted {
            if !out_plans.contains_key(&k.plan)
                && let Some(old) = previous.and_then(|p| p.plans.get(&k.plan))
            {
                out_plans.insert(
                    k.plan.clone(),
                    CompiledPlan {
                        retained: true,
                        ..old.clone()
                    },
                );
            }
            out_keys.insert(hash.to_string(), k);
        }
        key_reports.insert(id, decided.report);
    }

    let mut config = GatewayConfig {
        schema: SCHEMA_VERSION,
        version: 0,
        hash: String::new(),
        plans: out_plans,
        // Unchanged keys stay shared with the previous configuration: one copy in memory, and
        // whoever compares them finds the same pointer.
        keys: match previous {
            Some(p) if p.keys.len() == out_keys.len() && p.keys.iter().eq(out_keys.iter()) => {
                std::sync::Arc::clone(&p.keys)
            }
            _ => std::sync::Arc::new(out_keys.into_iter().collect()),
        },
        task_types,
        targets,
    };
    let keys_digest = super::keys_digest(&config.keys);
    config.hash = config.content_hash_with(&keys_digest);
    config.version = match previous {
        Some(p) if p.hash == config.hash => p.version,
        Some(p) => p.version + 1,
        None => 1,
    };
    Compiled {
        config,
        plans: plan_reports,
        keys: key_reports,
        keys_digest,
    }
}

/// A key's token as compile sees it, duplicates resolved.
#[derive(Clone, Copy, Debug)]
pub(super) enum Token<'a> {
    SecretNotFound,
    Empty,
    /// An older key (this id) has the same token.
    Duplicate(&'a str),
    /// The key's token digest, which no older key has.
    Owner(&'a crate::config::TokenDigest),
}

/// The plan a key names, as compile sees it.
#[derive(Clone, Copy, Debug)]
pub(super) enum PlanState<'a> {
    Valid(&'a CompiledPlan),
    Invalid,
    Missing,
}

pub(super) fn plan_state<'a, R>(
    valid: &'a BTreeMap<String, CompiledPlan>,
    defined: &BTreeMap<String, R>,
    name: &str,
) -> PlanState<'a> {
    match valid.get(name) {
        Some(p) => PlanState::Valid(p),
        None if defined.contains_key(name) => PlanState::Invalid,
        None => PlanState::Missing,
    }
}

/// One key's outcome: admitted (token digest and entry) or not, and its status.
pub(super) struct Decided<E = CompiledKey> {
    pub(super) admitted: Option<(crate::config::TokenDigest, E)>,
    pub(super) report: KeyReport,
}

/// Decides one key from its spec, its token, its plan and the entry it was last compiled with
/// (`last`). `plan_of` finds the plan a kept entry is on (a defined one, or the one last
/// published). `key` is the entry its spec gives.
/// The entry type `E` is a `CompiledKey`, or an `Arc` of one that the incremental index shares
/// between its key, its output and its shard.
pub(super) fn decide_key<'p, E: Borrow<CompiledKey> + Clone>(
    key: E,
    namespace: &str,
    secret: &crate::api::SecretKeyRef,
    token: Token<'_>,
    plan: PlanState<'_>,
    last: Option<&E>,
    plan_of: &dyn Fn(&str) -> Option<&'p CompiledPlan>,
) -> Decided<E> {
    use reason::*;
    let token = match token {
        Token::SecretNotFound => Err(ConditionSpec::fail(
            TOKEN_READY,
            SECRET_NOT_FOUND,
            format!(
                "Secret {namespace}/{} does not exist; create it with the token in entry {:?}",
                secret.name, secret.key
            ),
        )),
        Token::Empty => Err(ConditionSpec::fail(
            TOKEN_READY,
            TOKEN_EMPTY,
            format!(
                "Secret {namespace}/{} has no token in entry {:?}; put the token there",
                secret.name, secret.key
            ),
        )),
        Token::Duplicate(owner) => Err(ConditionSpec::fail(
            TOKEN_READY,
            DUPLICATE_TOKEN,
            format!(
                "the token is already used by ApiKey {owner}, which is older; give this key its own token"
            ),
        )),
        Token::Owner(hash) => Ok(std::sync::Arc::clone(hash)),
    };
    let token_condition = match &token {
        Ok(_) => ConditionSpec::ok(
            TOKEN_READY,
            TOKEN_FOUND,
            format!("token read from Secret {}", secret.name),
        ),
        Err(c) => c.clone(),
    };

    let plan_name = key.borrow().plan.clone();
    let plan_condition = match plan {
        PlanState::Valid(_) => ConditionSpec::ok(PLAN_RESOLVED, RESOLVED, format!("on plan {plan_name}")),
        PlanState::Invalid => ConditionSpec::fail(
            PLAN_RESOLVED,
            PLAN_NOT_FOUND,
            format!("plan {plan_name} exists but is invalid; fix the ApiPlan"),
        ),
        PlanState::Missing => ConditionSpec::fail(
            PLAN_RESOLVED,
            PLAN_NOT_FOUND,
            format!("ApiPlan {plan_name} does not exist; create it or move the key to an existing plan"),
        ),
    };

    let (admitted, ready) = match (token, plan) {
        (Err(c), _) => (
            None,
            ConditionSpec::fail(READY, c.reason, format!("not admitted: {}", c.message)),
        ),
        (Ok(hash), PlanState::Valid(p)) => {
            let ready = key_ready(key.borrow(), p);
            (Some((hash, key)), ready)
        }
        (Ok(hash), _) => match last {
            // Last known good: the key keeps serving on the plan it was last compiled with.
            Some(last) => {
                let message = format!(
                    "{}; still admitted with the limits of plan {} it was last compiled with",
                    plan_condition.message,
                    last.borrow().plan
                );
                (
                    Some((hash, last.clone())),
                    ConditionSpec::fail(READY, PLAN_NOT_FOUND, message),
                )
            }
            None => (
                None,
                ConditionSpec::fail(
                    READY,
                    PLAN_NOT_FOUND,
                    format!("not admitted: {}", plan_condition.message),
                ),
            ),
        },
    };

    let effective = admitted
        .as_ref()
        .map(|(_, k)| k.borrow())
        .and_then(|k| plan_of(&k.plan).map(|p| KeyLimits::resolve(p, k.overrides.as_ref()).effective()));
    Decided {
        report: KeyReport {
            admitted: admitted.is_some(),
            effective,
            conditions: vec![plan_condition, token_condition, ready],
        },
        admitted,
    }
}

/// The configuration [`compile`] would give when only the plans' limits changed since `previous`
/// was compiled from the same keys and tokens: the same keys (shared, not copied) under the new
/// plans, hashed with the keys' digest already known. `None` when the shortcut does not hold (a
/// plan added, removed or invalid, or a plan kept as last known good); then run [`compile`].
///
/// This is what takes a plan upgrade to the gateways in milliseconds at 100,000 keys; the key
/// reports (statuses) come from a full [`compile`] afterwards.
pub fn compile_plans_only<P: Borrow<ApiPlan>>(
    plans: &[P],
    previous: &GatewayConfig,
    keys_digest: &str,
) -> Option<GatewayConfig> {
    if previous.plans.values().any(|p| p.retained) || plans.len() != previous.plans.len() {
        return None;
    }
    let mut out = BTreeMap::new();
    for plan in plans {
        let plan: &ApiPlan = plan.borrow();
        let name = plan.name_any();
        if !previous.plans.contains_key(&name) {
            return None;
        }
        out.insert(name, compile_plan(plan).ok()?);
    }
    let mut config = GatewayConfig {
        schema: SCHEMA_VERSION,
        version: previous.version,
        hash: String::new(),
        plans: out,
        keys: std::sync::Arc::clone(&previous.keys),
        task_types: previous.task_types.clone(),
        targets: previous.targets.clone(),
    };
    config.hash = config.content_hash_with(keys_digest);
    if config.hash != previous.hash {
        config.version += 1;
    }
    Some(config)
}

pub(super) fn compile_plan(plan: &ApiPlan) -> Result<CompiledPlan, String> {
    let spec = &plan.spec;
    let concurrency = spec.concurrency.as_ref().map(|c| SlotLimit {
        max: c.max_concurrent_requests,
        paths: c.paths.clone(),
    });
    let rate_limit = match &spec.rate_limit {
        Some(r) if r.requests_per_second == 0 => {
            return Err("rateLimit.requestsPerSecond must be at least 1".into());
        }
        Some(r) if r.burst == Some(0) => return Err("rateLimit.burst must be at least 1".into()),
        Some(r) => Some(RateLimit {
            per_second: r.requests_per_second,
            burst: r.effective_burst(),
            per: r.per,
            paths: r.paths.clone(),
        }),
        None => None,
    };
    let paths = concurrency
        .iter()
        .flat_map(|c| &c.paths)
        .chain(rate_limit.iter().flat_map(|r| &r.paths));
    for p in paths {
        super::check_pattern(p)?;
    }
    let tasks = spec
        .tasks
        .as_ref()
        .map(super::tasks::compile_policy)
        .transpose()?;
    let abuse = spec.abuse.as_ref().map(compile_abuse).transpose()?;
    Ok(CompiledPlan {
        display_name: spec.display_name.clone(),
        concurrency,
        rate_limit,
        retained: false,
        tasks,
        abuse,
    })
}

/// Compiles `spec.abuse`: defaults filled in, durations in milliseconds.
fn compile_abuse(spec: &crate::api::AbuseSpec) -> Result<super::AbusePolicy, String> {
    let ms = |field: &str, value: &Option<String>, default: u64, min: u64| -> Result<u64, String> {
        let ms = match value {
            Some(v) => super::tasks::parse_duration_ms(v).map_err(|e| format!("abuse.{field}: {e}"))?,
            None => default,
        };
        if ms < min {
            return Err(format!("abuse.{field} must be at least {min} ms"));
        }
        Ok(ms)
    };
    let ban_ms = ms("banDuration", &spec.ban_duration, 120_000, 1_000)?;
    let max_ban_ms = ms(
        "maxBanDuration",
        &spec.max_ban_duration,
        3_600_000.max(ban_ms),
        1_000,
    )?;
    if max_ban_ms < ban_ms {
        return Err("abuse.maxBanDuration must be at least banDuration".into());
    }
    Ok(super::AbusePolicy {
        refusals: spec.refusals.max(1),
        window_ms: ms("window", &spec.window, 10_000, 100)?,
        ban_ms,
        escalation_window_ms: ms("escalationWindow", &spec.escalation_window, 3_600_000, 0)?,
        escalation_factor: spec.escalation_factor.unwrap_or(2).max(1),
        max_ban_ms,
        by: spec.by,
    })
}

/// A compiled plan's conditions: `Ready`, and `Tasks` when it has a task policy.
pub(super) fn plan_conditions(plan: &CompiledPlan) -> Vec<ConditionSpec> {
    let mut out = vec![plan_ready(plan)];
    if let Some(t) = &plan.tasks {
        let slots = t.max_concurrent.map_or_else(
            || "all of the key's slots".to_string(),
            |n| format!("at most {n} of the key's slots"),
        );
        out.push(ConditionSpec::ok(
            reason::TASKS,
            reason::ENABLED,
            format!(
                "async tasks: up to {} unfinished per key, running in {slots}, {} attempts, results kept {} s",
                t.max_queued, t.max_attempts, t.retention_secs
            ),
        ));
    }
    out
}

fn plan_ready(plan: &CompiledPlan) -> ConditionSpec {
    use reason::*;
    match (&plan.concurrency, &plan.rate_limit) {
        (Some(c), _) if c.max == 0 => ConditionSpec::ok(
            READY,
            ZERO_CONCURRENCY,
            format!(
                "maxConcurrentRequests is 0: every request on {} is refused with 429",
                c.paths.join(", ")
            ),
        ),
        (None, None) => ConditionSpec::ok(
            READY,
            UNLIMITED,
            "no concurrency or rate limit: keys on this plan are authenticated but not limited",
        ),
        (c, r) => {
            let mut text = describe(c.as_ref(), r.as_ref());
            if let Some(a) = &plan.abuse {
                let by = match a.by {
                    crate::api::BanScope::ClientIp => "client address",
                    crate::api::BanScope::Key => "key",
                };
                text.push_str(&format!(
                    "; {} refusals in {} ms ban the {by} for {} ms (repeats x{} up to {} ms)",
                    a.refusals, a.window_ms, a.ban_ms, a.escalation_factor, a.max_ban_ms
                ));
            }
            ConditionSpec::ok(READY, COMPILED, text)
        }
    }
}

fn key_ready(key: &CompiledKey, plan: &CompiledPlan) -> ConditionSpec {
    use reason::*;
    let limits = KeyLimits::resolve(plan, key.overrides.as_ref());
    if key.suspended {
        return ConditionSpec::fail(
            READY,
            SUSPENDED,
            "the key is suspended: requests get 403 key_suspended",
        );
    }
    match &limits.slots {
        Some(s) if s.max == 0 => ConditionSpec::ok(
            READY,
            ZERO_CONCURRENCY,
            format!(
                "admitted with 0 slots: every request on {} is refused with 429",
                s.paths.join(", ")
            ),
        ),
        _ => ConditionSpec::ok(
            READY,
            ADMITTED,
            format!(
                "admitted on plan {}: {}",
                key.plan,
                describe(limits.slots.as_ref(), limits.rate.as_ref())
            ),
        ),
    }
}

fn describe(slots: Option<&SlotLimit>, rate: Option<&RateLimit>) -> String {
    let slots = match slots {
        Some(s) => format!("{} concurrent requests", s.max),
        None => "unlimited concurrency".into(),
    };
    let rate = match rate {
        Some(r) => format!("{}/s burst {} per {:?}", r.per_second, r.burst, r.per),
        None => "no rate limit".into(),
    };
    format!("{slots}, {rate}")
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
