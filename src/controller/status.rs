//! The status writer: applies the statuses the leader decided, through the status subresource
//! with server-side apply, at a bounded rate, in the background. It writes only what differs from
//! what the object shows, and keeps each condition's `lastTransitionTime` unless its status
//! flipped.
//!
//! The decisions live in a [`StatusBook`] that a pass updates for the objects it touched only:
//! at 100,000 keys a change must not cost a pass over every key's status. A key's `Enforced`
//! condition depends on nothing but the configuration version its entry last changed in and the
//! gateways' reports, so the book keeps it once per version; a report that moves a version
//! queues the keys of that version alone. The keys a change decided are queued ahead of the rest.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use tokio::sync::Notify;

use super::{ControllerMetrics, MANAGER, index::Stores};
use crate::{
    api::{ApiKey, ApiPlan, ConditionSpec, merge_conditions},
    config::{KeyReport, incremental::KeyId},
};

/// How often every status is compared again with what the objects show, so that a write lost
/// to an API hiccup (or a status someone edited) is repeated. Failed writes are queued again at
/// once; this is the backstop.
const RECHECK_EVERY: Duration = Duration::from_secs(300);

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

/// A key's status as decided, but for its `Enforced` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyStatus {
    /// `metadata.generation` it was decided from.
    pub generation: Option<i64>,
    /// Limits in force and conditions (`Enforced` aside), as the index decided them: shared
    /// with it, so the book holds no copy of 100,000 keys' conditions.
    pub report: Arc<KeyReport>,
    /// The configuration version since which the gateways' entry for this key is unchanged
    /// (`None`: not admitted, so no `Enforced` condition).
    pub since: Option<u64>,
    /// The last minute's usage the gateways report. Boxed, as `banned`: only the active keys
    /// have one, and the book's map holds the struct inline for each of 100,000 keys.
    pub usage: Option<Box<crate::api::KeyUsageStatus>>,
    /// The `Banned` condition while the gateways ban the key.
    pub banned: Option<Box<ConditionSpec>>,
}

/// Which queue an object waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A change just decided it: whoever made the change sees its status first.
    First,
    /// Catching up (a plan's keys after its limits changed, a report that moved a version).
    Rest,
}

/// What the writer does next.
enum Job {
    Plan(String, PlanStatus),
    Key(KeyId, KeyStatus, Option<ConditionSpec>),
}

/// Every status decided, and the queue of those the writer has still to compare and write.
#[derive(Debug, Default)]
struct Book {
    plans: BTreeMap<String, PlanStatus>,
    /// Plans to compare and write, before any key.
    plans_queue: VecDeque<String>,
    /// By key id, one allocation per key shared by the maps and queues below.
    keys: HashMap<KeyId, KeyStatus>,
    /// Admitted keys by `since`.
    by_since: BTreeMap<u64, BTreeSet<KeyId>>,
    /// The `Enforced` condition of each version in `by_since`.
    enforced: BTreeMap<u64, ConditionSpec>,
    /// How to decide the condition of a version not seen yet (set with the reports).
    enforcement: Option<Enforcing>,
    first: VecDeque<KeyId>,
    rest: VecDeque<KeyId>,
    /// The queue each queued key is in; a key moved to `first` leaves a stale copy in `rest`.
    queued: HashMap<KeyId, Priority>,
}

/// Decides the `Enforced` condition of a configuration version from the reports at hand.
#[derive(Clone)]
pub struct Enforcing(pub Arc<dyn Fn(u64) -> ConditionSpec + Send + Sync>);

impl std::fmt::Debug for Enforcing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enforcing")
    }
}

impl Book {
    fn queue(&mut self, id: &KeyId, priority: Priority) {
        match self.queued.get(id) {
            Some(Priority::First) => return,
            Some(Priority::Rest) if priority == Priority::Rest => return,
            _ => {}
        }
        self.queued.insert(Arc::clone(id), priority);
        match priority {
            Priority::First => self.first.push_back(Arc::clone(id)),
            Priority::Rest => self.rest.push_back(Arc::clone(id)),
        }
    }

    fn unlink(&mut self, id: &str, since: Option<u64>) {
        let Some(v) = since else { return };
        if let Some(ids) = self.by_since.get_mut(&v) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_since.remove(&v);
                self.enforced.remove(&v);
            }
        }
    }

    fn enforced_of(&mut self, since: u64) -> Option<ConditionSpec> {
        if let Some(c) = self.enforced.get(&since) {
            return Some(c.clone());
        }
        let c = (self.enforcement.as_ref()?.0)(since);
        self.enforced.insert(since, c.clone());
        Some(c)
    }

    fn next(&mut self) -> Option<Job> {
        while let Some(name) = self.plans_queue.pop_front() {
            if let Some(want) = self.plans.get(&name) {
                return Some(Job::Plan(name, want.clone()));
            }
        }
        loop {
            let (id, priority) = match self.first.pop_front() {
                Some(id) => (id, Priority::First),
                None => (self.rest.pop_front()?, Priority::Rest),
            };
            if self.queued.get(&id) != Some(&priority) {
                continue;
            }
            self.queued.remove(&id);
            let Some(want) = self.keys.get(&id).cloned() else {
                continue;
            };
            let enforced = want.since.and_then(|v| self.enforced_of(v));
            return Some(Job::Key(id, want, enforced));
        }
    }

    fn pending(&self) -> usize {
        self.queued.len() + self.plans_queue.len()
    }

    fn queue_plans(&mut self) {
        self.plans_queue = self.plans.keys().cloned().collect();
    }
}

/// The statuses the leader decided, shared with the writer.
#[derive(Debug, Default)]
pub struct StatusBook {
    book: Mutex<Book>,
    wake: Notify,
}

impl StatusBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        // The book holds plain data: a panic elsewhere cannot leave it half-updated.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a key's status and queues it; `None` forgets the key (it is gone).
    pub fn set_key(&self, id: &str, want: Option<KeyStatus>, priority: Priority) {
        let mut b = self.lock();
        let (id, old) = match b.keys.remove_entry(id) {
            Some((id, old)) => (id, Some(old)),
            None => (KeyId::from(id), None),
        };
        b.unlink(&id, old.as_ref().and_then(|o| o.since));
        let Some(want) = want else {
            b.queued.remove(&id);
            return;
        };
        if let Some(v) = want.since {
            b.by_since.entry(v).or_default().insert(Arc::clone(&id));
        }
        let same = old.as_ref() == Some(&want);
        b.keys.insert(Arc::clone(&id), want);
        // A change's own keys are compared again even when the decision reads the same: the
        // object may show something else.
        if !same || priority == Priority::First {
            b.queue(&id, priority);
        }
        drop(b);
        self.wake.notify_one();
    }

    /// Sets every plan's status (plans are few) and queues them.
    pub fn set_plans(&self, plans: BTreeMap<String, PlanStatus>) {
        let mut b = self.lock();
        if b.plans != plans {
            b.plans = plans;
            b.queue_plans();
            drop(b);
            self.wake.notify_one();
        }
    }

    /// Decides the `Enforced` condition of every version keys were last changed in with
    /// `condition`, and queues the keys of each version whose condition changed.
    pub fn set_enforcement(&self, condition: Enforcing) {
        let mut b = self.lock();
        let versions: Vec<u64> = b.by_since.keys().copied().collect();
        let mut moved = Vec::new();
        for v in versions {
            let c = (condition.0)(v);
            if b.enforced.get(&v) != Some(&c) {
                b.enforced.insert(v, c);
                moved.push(v);
            }
        }
        b.enforcement = Some(condition);
        for v in moved {
            let ids: Vec<KeyId> = b.by_since.get(&v).into_iter().flatten().cloned().collect();
            for id in ids {
                b.queue(&id, Priority::Rest);
            }
        }
        drop(b);
        self.wake.notify_one();
    }

    /// Forgets everything (leadership lost: the next leader decides again).
    pub fn clear(&self) {
        *self.lock() = Book::default();
    }

    /// Statuses the writer has still to compare with their objects.
    pub fn pending(&self) -> usize {
        self.lock().pending()
    }

    /// Queues every status for comparison again.
    fn recheck_all(&self) {
        let mut b = self.lock();
        b.queue_plans();
        let ids: Vec<KeyId> = b.keys.keys().cloned().collect();
        for id in ids {
            b.queue(&id, Priority::Rest);
        }
    }

    fn next(&self) -> Option<Job> {
        self.lock().next()
    }
}

pub(super) async fn run(
    client: Client,
    stores: Stores,
    book: Arc<StatusBook>,
    per_second: u32,
    metrics: Arc<ControllerMetrics>,
) {
    let mut pace = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let plans: Api<ApiPlan> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.tick().await;
    loop {
        metrics.status_pending.set(book.pending() as i64);
        let Some(job) = book.next() else {
            tokio::select! {
                () = book.wake.notified() => {}
                _ = recheck.tick() => book.recheck_all(),
            }
            continue;
        };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        match job {
            Job::Plan(name, want) => {
                let Some(current) = stores.plans.get(&ObjectRef::new(&name)) else {
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
                let result = plans.patch_status(&name, &params, &Patch::Apply(body)).await;
                metrics.status_write("ApiPlan", result.is_ok());
                if let Err(e) = result {
                    tracing::debug!(plan = name, error = %e, "status write failed; retried later");
                    book.lock().plans_queue.push_back(name);
                }
            }
            Job::Key(id, want, enforced) => {
                let Some((ns, name)) = id.split_once('/') else {
                    continue;
                };
                let Some(current) = stores.keys.get(&id) else {
                    continue;
                };
                let mut desired = want.report.conditions.clone();
                desired.extend(enforced);
                desired.extend(want.banned.as_deref().cloned());
                let cur = &current.status;
                let conditions = merge_slim(cur, &desired, want.generation, &now);
                let usage = want.usage.as_deref().copied();
                if cur.shows(want.generation, &want.report.effective, &usage, &conditions) {
                    continue;
                }
                pace.tick().await;
                let mut status = serde_json::json!({
                    "observedGeneration": want.generation,
                    "effective": want.report.effective,
                    "conditions": conditions,
                });
                if let Some(u) = usage {
                    status["usage"] = serde_json::to_value(u).unwrap_or_default();
                }
                let body = serde_json::json!({
                    "apiVersion": "slotgate.dev/v1alpha1",
                    "kind": "ApiKey",
                    "status": status,
                });
                let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
                let result = keys.patch_status(name, &params, &Patch::Apply(body)).await;
                metrics.status_write("ApiKey", result.is_ok());
                if let Err(e) = result {
                    tracing::debug!(key = &*id, error = %e, "status write failed; retried later");
                    book.lock().queue(&id, Priority::Rest);
                }
            }
        }
    }
}

/// [`merge_conditions`] against the slim status the key cache holds: a condition keeps its
/// transition time while its status does not flip.
fn merge_slim(
    existing: &super::keys::SlimStatus,
    desired: &[ConditionSpec],
    generation: Option<i64>,
    now: &Time,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    desired
        .iter()
        .map(|d| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: d.type_.to_string(),
            status: d.status_str().to_string(),
            reason: d.reason.to_string(),
            message: d.message.to_string(),
            observed_generation: generation,
            last_transition_time: existing
                .kept_time(d.type_, d.status)
                .unwrap_or_else(|| now.clone()),
        })
        .collect()
}
