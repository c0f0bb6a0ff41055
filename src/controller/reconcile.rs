//! One reconcile pass of the leader: the watch events since the last pass go into the
//! incremental compile, the objects whose data changed are published, and then the slower part
//! that follows a change (events, finalizers, the statuses of every key a plan change touched)
//! runs, with the statuses handed to the rate-limited writer ([`super::status`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder},
};
use tokio::sync::{Notify, mpsc};

use super::{
    ControllerMetrics, ControllerOptions, PLAN_FINALIZER, TOKEN_LABEL,
    enforced::{Enforcement, Report},
    generate_token,
    index::{self, Change, Stores},
    keys::KeyMeta,
    publish::Publisher,
    status,
};
use crate::{
    api::{ApiPlan, ConditionSpec},
    config::{
        CompiledPlan, TokenState,
        incremental::Incremental,
        pieces::{ACTIVITY_ANNOTATION, Activity, VERSION_ANNOTATION},
    },
};

/// Keys whose statuses one step of a plan change's catch-up decides again.
const REFRESH_CHUNK: usize = 4096;

pub(super) struct Shell {
    pub(super) client: Client,
    pub(super) opts: ControllerOptions,
    pub(super) stores: Stores,
    pub(super) publisher: Publisher,
    pub(super) index: Incremental,
    pub(super) feed: mpsc::UnboundedReceiver<Change>,
    /// Whether the keys and the token Secrets have been listed once: before that, a compile would
    /// see keys without their tokens and publish a configuration without them.
    pub(super) listed: (bool, bool),
    /// Plans as last accounted for in events.
    pub(super) accounted: Option<BTreeMap<String, CompiledPlan>>,
    pub(super) recorder: Recorder,
    pub(super) metrics: Arc<ControllerMetrics>,
    pub(super) status: Arc<status::StatusBook>,
    /// Per key id: whether it was admitted at the last pass (for transition events).
    pub(super) last_admitted: HashMap<crate::config::incremental::KeyId, bool>,
    /// What the reports said at the last status decision: (replica, version, live).
    pub(super) last_reports: Vec<(String, Option<u64>, bool)>,
    /// What the gateways last reported keys did.
    pub(super) activity: KeyActivity,
    /// What was last written for the upstream targets.
    pub(super) targets: super::targets::TargetWrites,
    /// What the last compile found about each target, before the gateways' reports are added.
    pub(super) target_reports: BTreeMap<String, crate::config::targets::TargetReport>,
    /// Webhook signing secrets seen in token Secrets, by Secret; whether they changed since
    /// they were last published; keys still to be given one; what was published.
    pub(super) webhooks: Webhooks,
}

/// The controller's book of webhook signing secrets (see [`super::webhooks`]).
#[derive(Debug, Default)]
pub(super) struct Webhooks {
    pub(super) known: HashMap<(String, String), String>,
    pub(super) dirty: bool,
    pub(super) pending: std::collections::VecDeque<crate::config::incremental::KeyId>,
    pub(super) writes: super::webhooks::WebhookWrites,
}

impl Shell {
    /// How long the run loop waits for an event before a pass of its own.
    pub(super) fn periodic(&self) -> std::time::Duration {
        match self.stores.upstreams.state().is_empty() {
            true => std::time::Duration::from_secs(300),
            false => std::time::Duration::from_secs(30),
        }
    }

    /// Applies every event the watches fed since the last call.
    pub(super) fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Ok(change) = self.feed.try_recv() {
            match &change {
                Change::KeysListed(_) => self.listed.0 = true,
                Change::SecretsListed(ids) => {
                    self.listed.1 = true;
                    let before = self.webhooks.known.len();
                    self.webhooks
                        .known
                        .retain(|(ns, name), _| ids.contains(&super::digest64(&(ns, name))));
                    self.webhooks.dirty |= before != self.webhooks.known.len();
                }
                Change::Secret {
                    namespace,
                    name,
                    webhook,
                    ..
                } => {
                    let id = (namespace.clone(), name.clone());
                    let changed = match webhook {
                        Some(w) => self.webhooks.known.insert(id, w.clone()).as_ref() != Some(w),
                        None => self.webhooks.known.remove(&id).is_some(),
                    };
                    self.webhooks.dirty |= changed;
                }
                Change::SecretGone { namespace, name } => {
                    self.webhooks.dirty |= self
                        .webhooks
                        .known
                        .remove(&(namespace.clone(), name.clone()))
                        .is_some();
                }
                _ => {}
            }
            index::apply(&mut self.index, change);
            n += 1;
        }
        n
    }

    /// Waits until the keys and the token Secrets have been listed once.
    pub(super) async fn wait_listed(&mut self, notify: &Notify) {
        loop {
            self.drain();
            if self.listed == (true, true) {
                return;
            }
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
    }

    /// Creates a token Secret for each key that has no Secret reference and no Secret yet. An
    /// existing Secret is never overwritten (create fails with a conflict instead).
    async fn generate_tokens(&mut self, keys: &[(String, Arc<KeyMeta>)]) -> kube::Result<()> {
        for (id, key) in keys {
            if !key.generates || key.deleting {
                continue;
            }
            let Some((ns, name)) = id.split_once('/') else {
                continue;
            };
            let r = &crate::api::ApiKey::default_token_ref(name);
            if self.index.token(ns, &r.name, &r.key) != TokenState::SecretNotFound {
                continue;
            }
            let token = generate_token();
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": r.name,
                    "namespace": ns,
                    "labels": { TOKEN_LABEL: "generated" },
                    "ownerReferences": [key.owner_ref(name)],
                },
                "type": "Opaque",
                "stringData": { r.key.clone(): token },
            }))
            .expect("a Secret");
            let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    // Known at once, not when the watch shows it: the next compile admits the key.
                    self.index
                        .apply_secret(ns, &r.name, index::token_digests(&secret));
                    self.event_on(
                        &key.object_ref(ns, name),
                        EventType::Normal,
                        "TokenGenerated",
                        format!("Generated a token in Secret {}/{} (entry {}).", ns, r.name, r.key),
                    )
                    .await;
                }
                // There is a Secret by that name without the token label: leave it alone.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.event_on(&obj.object_ref(&()), type_, reason, note).await;
    }

    async fn event_on(
        &self,
        regarding: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, regarding).await {
            tracing::debug!(error = %e, "could not publish an event");
        }
    }

    /// Runs `f` on the index off the async workers (the first compile at 100,000 keys takes a
    /// second, while the watches and the status writer keep going).
    async fn on_index<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Incremental) -> T + Send + 'static,
    ) -> T {
        let mut index = std::mem::take(&mut self.index);
        let (index, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut index);
            (index, out)
        })
        .await
        .expect("the compile does not panic");
        self.index = index;
        out
    }

    /// One pass: events in, compile, publish, then events, finalizers and statuses.
    pub(super) async fn sync(&mut self) -> kube::Result<()> {
        let t0 = Instant::now();
        let events = self.drain();
        let plans = self.stores.plans.state();
        self.index.set_plans(&plans);
        // Only keys an event touched can have lost their token Secret (or never had one).
        let keys: Vec<(String, Arc<KeyMeta>)> = self
            .index
            .dirty()
            .filter_map(|id| Some((id.to_string(), self.stores.keys.get(id)?)))
            .collect();
        self.generate_tokens(&keys).await?;
        let upstreams = self.stores.upstreams.state();
        let resolved = self.targets.resolve(&self.client, &upstreams).await?;
        let (targets, target_reports) = crate::config::targets::compile_targets(&upstreams, resolved);
        let credentials = resolved.by_target(&upstreams);
        self.index.set_targets(targets);
        let task_types = self.stores.task_types.state();
        let (compiled_types, type_issues) = crate::config::tasks::compile_task_types(&task_types);
        self.index.set_task_types(compiled_types);
        // Before the configuration that names them: a gateway that learns of a target also
        // finds its credential as soon as the kubelet refreshes the mounted Secret.
        self.targets
            .credentials(
                &self.client,
                &self.opts.namespace,
                &self.opts.config_name,
                &credentials,
            )
            .await?;
        drop(credentials);
        let t_tokens = t0.elapsed();
        self.on_index(Incremental::compile).await;
        let t_compile = t0.elapsed();
        let pieces = self.index.pieces(&self.opts.config_name);
        // Writes only the objects whose data differs from what is there (none on most passes).
        self.publisher
            .publish(&pieces, self.index.version(), self.index.admitted())
            .await?;
        drop(pieces);
        let t_publish = t0.elapsed();
        // Before anything that can fail: the next pass decides none of these keys again.
        self.last_reports.clear();
        self.refresh_enforced();
        self.refresh_activity().await;
        self.desire_keys(self.index.decided(), status::Priority::First);
        self.target_reports = target_reports;
        self.refresh_targets().await?;
        let api: Api<crate::api::ApiTaskType> = Api::all(self.client.clone());
        self.targets
            .task_types
            .retain(|name, _| task_types.iter().any(|t| &t.name_any() == name));
        for (t, ready) in super::targets::task_type_conditions(&task_types, &type_issues) {
            let existing = t
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            super::targets::write_conditions(&api, &mut self.targets.task_types, &*t, existing, &[ready])
                .await?;
        }

        if self.accounted.as_ref() != Some(self.index.plans()) {
            self.plan_events(&plans).await;
            self.accounted = Some(self.index.plans().clone());
        }
        self.finalizers(&plans).await?;
        let decided: Vec<crate::config::incremental::KeyId> = self.index.decided().to_vec();
        self.key_events(&decided).await;
        // A plan's keys' statuses, one chunk per pass: a change that arrives meanwhile goes
        // first (the run loop comes back at once while some are pending).
        let refreshed = self.on_index(|i| i.refresh_reports_upto(REFRESH_CHUNK)).await;
        self.desire_keys(self.index.refreshed(), status::Priority::Rest);
        self.webhooks(&decided).await?;
        tracing::debug!(
            events,
            tokens_ms = t_tokens.as_millis() as u64,
            compile_ms = (t_compile - t_tokens).as_millis() as u64,
            publish_ms = (t_publish - t_compile).as_millis() as u64,
            after_ms = (t0.elapsed() - t_publish).as_millis() as u64,
            refreshed,
            "pass phases"
        );
        Ok(())
    }

    /// Gives a webhook signing secret to the keys decided (or refreshed) that can submit tasks and
    /// have none, and publishes the signing secrets to the gateways when one changed.
    async fn webhooks(&mut self, decided: &[crate::config::incremental::KeyId]) -> kube::Result<()> {
        let w = &mut self.webhooks;
        w.pending
            .extend(decided.iter().chain(self.index.refreshed()).cloned());
        super::webhooks::generate_missing(&self.client, &self.index, &mut w.pending, &w.known).await?;
        if !w.dirty {
            return Ok(());
        }
        let secrets: BTreeMap<String, String> = self
            .index
            .key_ids()
            .filter_map(|id| {
                let (ns, secret) = self.index.token_secret(id)?;
                let value = w.known.get(&(ns.to_string(), secret.name))?;
                Some((id.to_string(), value.clone()))
            })
            .collect();
        w.writes
            .publish(
                &self.client,
                &self.opts.namespace,
                &self.opts.config_name,
                &secrets,
            )
            .await?;
        w.dirty = false;
        Ok(())
    }

    /// What each live gateway replica last reported of its activity, with the replica's name.
    fn live_activity(&self) -> Vec<(String, Activity)> {
        let now = Timestamp::now();
        self.stores
            .reports
            .state()
            .iter()
            .filter_map(|lease| {
                let spec = lease.spec.clone().unwrap_or_default();
                let live = spec.renew_time.as_ref().is_some_and(|t| {
                    now.as_second() - t.0.as_second() <= i64::from(spec.lease_duration_seconds.unwrap_or(15))
                });
                let text = lease.annotations().get(ACTIVITY_ANNOTATION).filter(|_| live)?;
                let a = serde_json::from_str::<Activity>(text).ok()?;
                Some((spec.holder_identity.unwrap_or_default(), a))
            })
            .collect()
    }

    /// Writes the targets' conditions from the last compile and what the live gateways report of
    /// their TLS handshakes (a target whose certificate does not verify says so in `TLSValid`).
    pub(super) async fn refresh_targets(&mut self) -> kube::Result<()> {
        let mut reports = self.target_reports.clone();
        for (replica, a) in self.live_activity() {
            for (name, why) in a.target_tls {
                if let Some(r) = reports.get_mut(&name) {
                    r.handshake
                        .get_or_insert_with(|| format!("gateway {replica}: {why}"));
                }
            }
        }
        let upstreams = self.stores.upstreams.state();
        self.targets.statuses(&self.client, &upstreams, &reports).await
    }

    /// Reads what the live gateways report keys did (usage, key bans): a key whose ban starts
    /// gets a Warning event and its `Banned` condition first; a key whose usage moved gets its
    /// summary with the statuses catching up. Costs nothing when no report changed it.
    pub(super) async fn refresh_activity(&mut self) {
        let now = Timestamp::now();
        let mut next = KeyActivity::default();
        let mut open: HashMap<String, u64> = HashMap::new();
        for (_, a) in self.live_activity() {
            for (id, [req, refused]) in a.usage {
                let u = next.usage.entry(id).or_default();
                u.requests_last_minute += req;
                u.refused_last_minute += refused;
            }
            for (id, [queued, running]) in a.tasks {
                let u = next.usage.entry(id).or_default();
                u.tasks_queued += queued;
                u.tasks_running += running;
            }
            for (id, [until, strike]) in a.bans {
                let b = next.bans.entry(id).or_insert([0, 0]);
                *b = [b[0].max(until), b[1].max(strike)];
            }
            for (id, n) in a.open_tasks {
                let o = open.entry(id).or_insert(0u64);
                *o = (*o).max(n);
            }
        }
        // Tasks in the shared store: unfinished across the fleet, less those reported running.
        for (id, n) in open {
            let u = next.usage.entry(id).or_default();
            u.tasks_queued += n.saturating_sub(u.tasks_running);
        }
        let unix = now.as_second().max(0) as u64;
        next.bans.retain(|_, b| b[0] > unix);
        if next == self.activity {
            return;
        }
        let started: Vec<String> = next
            .bans
            .iter()
            .filter(|(id, b)| self.activity.bans.get(*id).is_none_or(|old| old[1] < b[1]))
            .map(|(id, _)| id.clone())
            .collect();
        let ended: Vec<String> = self
            .activity
            .bans
            .keys()
            .filter(|id| !next.bans.contains_key(*id))
            .cloned()
            .collect();
        let moved: Vec<String> = next
            .usage
            .iter()
            .filter(|(id, u)| self.activity.usage.get(*id) != Some(u))
            .map(|(id, _)| id.clone())
            .chain(
                self.activity
                    .usage
                    .keys()
                    .filter(|id| !next.usage.contains_key(*id))
                    .cloned(),
            )
            .filter(|id| !started.contains(id) && !ended.contains(id))
            .collect();
        self.activity = next;
        for id in &started {
            let Some((ns, name)) = id.split_once('/') else {
                continue;
            };
            if let (Some(key), Some(c)) = (self.stores.keys.get(id), self.activity.banned_condition(id)) {
                self.event_on(
                    &key.object_ref(ns, name),
                    EventType::Warning,
                    "TemporarilyBlocked",
                    c.message.to_string(),
                )
                .await;
            }
        }
        let first: Vec<String> = started.into_iter().chain(ended).collect();
        self.desire_keys(&first, status::Priority::First);
        self.desire_keys(&moved, status::Priority::Rest);
    }

    /// Decides the `Enforced` conditions and the plans' statuses again from the current
    /// reports, when the reports say something new (a heartbeat that changes nothing costs
    /// nothing). Keys are queued only for the versions whose condition moved.
    pub(super) fn refresh_enforced(&mut self) {
        let now = Timestamp::now();
        let reports = self.reports();
        let mut seen: Vec<(String, Option<u64>, bool)> = reports
            .iter()
            .map(|r| (r.replica.clone(), r.version, r.is_live(now)))
            .collect();
        seen.sort();
        if seen == self.last_reports && !seen.is_empty() {
            return;
        }
        self.last_reports = seen;
        if self.index.version() == 0 {
            return;
        }
        let version = self.index.version();
        let plan_enforced = Enforcement::of(&reports, version, now).condition(version);
        let reports = Arc::new(reports);
        self.status
            .set_enforcement(status::Enforcing(Arc::new(move |since| {
                Enforcement::of(&reports, since, now).condition(since)
            })));
        self.desire_plans(plan_enforced);
    }

    async fn plan_events(&self, plans: &[Arc<ApiPlan>]) {
        let Some(old) = &self.accounted else { return };
        let new = self.index.plans();
        for plan in plans {
            let name = plan.name_any();
            let (Some(a), Some(b)) = (old.get(&name), new.get(&name)) else {
                continue;
            };
            if a != b {
                let slots = |p: &CompiledPlan| {
                    p.concurrency
                        .as_ref()
                        .map_or("unlimited".to_string(), |s| s.max.to_string())
                };
                self.event(
                    &**plan,
                    EventType::Normal,
                    "PlanChanged",
                    format!(
                        "Limits changed ({} -> {} slots); configuration {} published to the gateways.",
                        slots(a),
                        slots(b),
                        self.index.version()
                    ),
                )
                .await;
            }
        }
    }

    /// A Warning event for each key that stopped being admitted (of the keys just decided).
    async fn key_events(&mut self, decided: &[crate::config::incremental::KeyId]) {
        for key_id in decided {
            let id: &str = key_id;
            let Some(report) = self.index.key_report(id) else {
                self.last_admitted.remove(id);
                continue;
            };
            let admitted = report.admitted;
            let before = self.last_admitted.insert(key_id.clone(), admitted);
            if before == Some(admitted) || admitted {
                continue;
            }
            let Some(c) = report.conditions.iter().find(|c| !c.status).cloned() else {
                continue;
            };
            let Some((ns, name)) = id.split_once('/') else {
                continue;
            };
            if let Some(key) = self.stores.keys.get(id) {
                self.event_on(
                    &key.object_ref(ns, name),
                    EventType::Warning,
                    c.reason,
                    c.message.to_string(),
                )
                .await;
            }
        }
    }

    /// Keeps the in-use finalizer on every plan; a plan being deleted keeps it while keys use it.
    async fn finalizers(&self, plans: &[Arc<ApiPlan>]) -> kube::Result<()> {
        let api: Api<ApiPlan> = Api::all(self.client.clone());
        let reports = self.index.plan_reports();
        for plan in plans {
            let name = plan.name_any();
            let has = plan.finalizers().iter().any(|f| f == PLAN_FINALIZER);
            let deleting = plan.meta().deletion_timestamp.is_some();
            let in_use = reports.get(&name).map_or(0, |r| r.keys);
            let want = !deleting || in_use > 0;
            if has == want {
                continue;
            }
            let mut list: Vec<String> = plan.finalizers().to_vec();
            if want {
                list.push(PLAN_FINALIZER.into());
            } else {
                list.retain(|f| f != PLAN_FINALIZER);
            }
            // Conditional on the version read: a concurrent change makes this a conflict, retried
            // on the next pass, rather than a lost finalizer.
            let patch = serde_json::json!({
                "metadata": { "finalizers": list, "resourceVersion": plan.resource_version() }
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reports(&self) -> Vec<Report> {
        self.stores
            .reports
            .state()
            .iter()
            .map(|l| {
                let spec = l.spec.clone().unwrap_or_default();
                Report {
                    replica: spec.holder_identity.unwrap_or_else(|| l.name_any()),
                    version: l
                        .annotations()
                        .get(VERSION_ANNOTATION)
                        .and_then(|v| v.parse().ok()),
                    renewed: spec.renew_time.map(|t| t.0),
                    ttl_seconds: i64::from(spec.lease_duration_seconds.unwrap_or(15)),
                }
            })
            .collect()
    }

    /// Every plan's status: its report, and the `Enforced` condition of the current version.
    fn desire_plans(&self, enforced: ConditionSpec) {
        let plan_reports = self.index.plan_reports();
        let mut plans = BTreeMap::new();
        for plan in self.stores.plans.state() {
            let name = plan.name_any();
            let Some(report) = plan_reports.get(&name) else {
                continue;
            };
            let mut conditions = report.conditions.clone();
            if plan.meta().deletion_timestamp.is_some() && report.keys > 0 {
                let users: Vec<&str> = self
                    .index
                    .keys_on(&name)
                    .take(10)
                    .map(|id| id.split_once('/').map_or(id, |(_, n)| n))
                    .collect();
                conditions = vec![ConditionSpec::fail(
                    "Ready",
                    "InUse",
                    format!(
                        "Deletion waits until no key uses this plan; still used by {} key(s): {}. Move them to another plan.",
                        report.keys,
                        users.join(", ")
                    ),
                )];
            }
            conditions.push(enforced.clone());
            plans.insert(
                name,
                status::PlanStatus {
                    generation: plan.meta().generation,
                    keys: report.keys,
                    conditions,
                },
            );
        }
        self.status.set_plans(plans);
    }

    /// Hands the statuses of keys `ids` (as the index now decides them) to the writer.
    fn desire_keys<S: AsRef<str>>(&self, ids: &[S], priority: status::Priority) {
        let version = self.index.version();
        for id in ids {
            let id = id.as_ref();
            let want = self.index.key_report(id).and_then(|report| {
                let key = self.stores.keys.get(id)?;
                Some(status::KeyStatus {
                    generation: key.generation,
                    report: std::sync::Arc::clone(report),
                    since: report.admitted.then(|| self.index.since(id).unwrap_or(version)),
                    usage: self.activity.usage_of(id).map(Box::new),
                    banned: self.activity.banned_condition(id).map(Box::new),
                })
            });
            self.status.set_key(id, want, priority);
        }
    }
}

/// What the gateways report keys did, summed over the live replicas.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct KeyActivity {
    usage: HashMap<String, crate::api::KeyUsageStatus>,
    /// Key id to `[ends (Unix seconds), strike]`.
    bans: HashMap<String, [u64; 2]>,
}

impl KeyActivity {
    /// `None` once the key went quiet: the summary leaves the status rather than show its last
    /// busy minute forever.
    fn usage_of(&self, id: &str) -> Option<crate::api::KeyUsageStatus> {
        self.usage.get(id).copied()
    }

    fn banned_condition(&self, id: &str) -> Option<ConditionSpec> {
        let [until, strike] = *self.bans.get(id)?;
        let until =
            Timestamp::from_second(until as i64).map_or_else(|_| until.to_string(), |t| t.to_string());
        Some(ConditionSpec::ok(
            "Banned",
            "TemporarilyBlocked",
            format!(
                "The gateways refuse this key with 429 temporarily_blocked until {until} after repeated requests over its plan's limits (ban {strike} in a row; repeats last longer)."
            ),
        ))
    }
}
