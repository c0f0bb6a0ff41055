//! The status writer: applies the statuses the last pass decided, through the status subresource
//! with server-side apply, at a bounded rate, in the background. It always works on the newest
//! decision (a newer one restarts the pass), writes only what differs from what the object shows,
//! and keeps each condition's `lastTransitionTime` unless its status flipped.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use tokio::sync::watch;

use super::{ControllerMetrics, MANAGER, index::Stores};
use crate::api::{ApiKey, ApiPlan, ConditionSpec, EffectiveLimits, merge_conditions};

/// A plan's status as decided.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanStatus {
    /// `metadata.generation` it was decided from.
    pub generation: Option<i64>,
    /// Keys on the plan.
    pub keys: u32,
    /// Conditions.
    pub conditions: Vec<ConditionSpec>,
}

/// A key's status as decided.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyStatus {
    /// `metadata.generation` it was decided from.
    pub generation: Option<i64>,
    /// Limits in force.
    pub effective: Option<EffectiveLimits>,
    /// Conditions.
    pub conditions: Vec<ConditionSpec>,
}

/// Everything one pass decided.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// By plan name.
    pub plans: BTreeMap<String, PlanStatus>,
    /// By key id (`namespace/name`).
    pub keys: BTreeMap<String, KeyStatus>,
    /// Keys a change just decided, written before the others: whoever made the change sees its
    /// status first, and the rest of 100,000 catch up at the configured rate.
    pub first: Vec<String>,
}

pub(super) async fn run(
    client: Client,
    stores: Stores,
    mut rx: watch::Receiver<Arc<Desired>>,
    per_second: u32,
    metrics: Arc<ControllerMetrics>,
) {
    let mut pace = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let plans: Api<ApiPlan> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    loop {
        // The sender is gone: the controller run ended.
        if rx.has_changed().is_err() {
            return;
        }
        let desired = rx.borrow_and_update().clone();
        let mut pending = desired.plans.len() + desired.keys.len();
        'pass: {
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            for (name, want) in &desired.plans {
                pending = pending.saturating_sub(1);
                if rx.has_changed().unwrap_or(true) {
                    break 'pass;
                }
                let Some(current) = stores.plans.get(&ObjectRef::new(name)) else {
                    continue;
                };
                let cur = current.status.clone().unwrap_or_default();
                let conditions = merge_conditions(&cur.conditions, &want.conditions, want.generation, &now);
                if cur.observed_generation == want.generation
                    && cur.keys == want.keys
                    && cur.conditions == conditions
                {
                    continue;
                }
                pace.tick().await;
                let body = serde_json::json!({
                    "apiVersion": "slotgate.dev/v1alpha1",
                    "kind": "ApiPlan",
                    "status": { "observedGeneration": want.generation, "keys": want.keys, "conditions": conditions },
                });
                let result = plans.patch_status(name, &params, &Patch::Apply(body)).await;
                metrics.status_write("ApiPlan", result.is_ok());
                if let Err(e) = result {
                    tracing::debug!(plan = name, error = %e, "status write failed; retried on the next pass");
                }
                metrics.status_pending.set(pending as i64);
            }
            let first: std::collections::HashSet<&str> = desired.first.iter().map(String::as_str).collect();
            let rest = desired.keys.keys().filter(|id| !first.contains(id.as_str()));
            for id in desired.first.iter().chain(rest) {
                let Some(want) = desired.keys.get(id) else {
                    continue;
                };
                pending = pending.saturating_sub(1);
                if rx.has_changed().unwrap_or(true) {
                    break 'pass;
                }
                let Some((ns, name)) = id.split_once('/') else {
                    continue;
                };
                let Some(current) = stores.keys.get(&ObjectRef::new(name).within(ns)) else {
                    continue;
                };
                let cur = current.status.clone().unwrap_or_default();
                let conditions = merge_conditions(&cur.conditions, &want.conditions, want.generation, &now);
                if cur.observed_generation == want.generation
                    && cur.effective == want.effective
                    && cur.conditions == conditions
                {
                    continue;
                }
                pace.tick().await;
                let body = serde_json::json!({
                    "apiVersion": "slotgate.dev/v1alpha1",
                    "kind": "ApiKey",
                    "status": { "observedGeneration": want.generation, "effective": want.effective, "conditions": conditions },
                });
                let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
                let result = keys.patch_status(name, &params, &Patch::Apply(body)).await;
                metrics.status_write("ApiKey", result.is_ok());
                if let Err(e) = result {
                    tracing::debug!(key = id, error = %e, "status write failed; retried on the next pass");
                }
                metrics.status_pending.set(pending as i64);
            }
            metrics.status_pending.set(0);
            // A full pass done: wait for the next decision, or recheck now and then so a write
            // lost to an API hiccup is repeated.
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }
}
