//! The control plane: `slotgate controller`.
//!
//! A thin shell around the pure [`compile`]: reflectors keep ApiPlans, ApiKeys, token Secrets and
//! the gateways' report Leases in memory; on any change the leader compiles everything, writes the
//! configuration objects that changed (server-side apply, own field manager; a plan upgrade
//! rewrites the index object only), and hands the statuses to a rate-limited writer in the
//! background, so enforcement never waits on per-key status writes. `Enforced` comes only from the
//! gateways' reports ([`enforced`]).

pub mod enforced;
pub mod leader;
mod metrics;
mod status;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Secret},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Mutex, Notify, watch};

pub use metrics::ControllerMetrics;

use crate::{
    ApiCall, Reach,
    api::{ApiKey, ApiPlan, ConditionSpec},
    config::{
        Compiled, CompiledKey, GatewayConfig, KeyLimits, TokenHashes, TokenState, compile,
        compile_plans_only,
        pieces::{self, CONFIG_LABEL, Piece, REPORT_LABEL, VERSION_ANNOTATION},
    },
};
use enforced::{Enforcement, Report};

/// Field manager of every controller write.
pub const MANAGER: &str = "slotgate-controller";
/// Finalizer that keeps a plan while keys use it.
pub const PLAN_FINALIZER: &str = "slotgate.dev/plan-in-use";
/// Label that marks a Secret as holding an ApiKey's token (the controller watches only those).
pub const TOKEN_LABEL: &str = "slotgate.dev/token";
/// Prefix of generated tokens: recognisable in a leak scan.
pub const TOKEN_PREFIX: &str = "sg_live_";

/// Every API call the controller makes: the Helm chart's RBAC is checked against this list.
pub const API_CALLS: &[ApiCall] = {
    use ApiCall as C;
    &[
        // The in-use finalizer is kept by a patch; everything else is read from watches.
        C::new(
            "slotgate.dev",
            "apiplans",
            &["list", "watch", "patch"],
            Reach::Cluster,
        ),
        C::new("slotgate.dev", "apiplans/status", &["patch"], Reach::Cluster),
        C::new("slotgate.dev", "apikeys", &["list", "watch"], Reach::Cluster),
        C::new("slotgate.dev", "apikeys/status", &["patch"], Reach::Cluster),
        // Not a call: a generated Secret is owned by its key with `blockOwnerDeletion`, which the
        // OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allows only to whoever
        // may update the owner's finalizers.
        C::new("slotgate.dev", "apikeys/finalizers", &["update"], Reach::Cluster),
        // Token Secrets are read where the keys are; generated ones are created there.
        C::new("", "secrets", &["list", "watch", "create"], Reach::Cluster),
        // Events go to the namespace of the object they are about.
        C::new("events.k8s.io", "events", &["create", "patch"], Reach::Cluster),
        // Configuration objects are written by server-side apply, which creates them the first time;
        // stale shards are deleted.
        C::new(
            "",
            "configmaps",
            &["list", "watch", "create", "patch", "delete"],
            Reach::OwnNamespace,
        ),
        // The gateways' reports (list, watch) and the leader Lease (get, create, update).
        C::new(
            "coordination.k8s.io",
            "leases",
            &["get", "list", "watch", "create", "update"],
            Reach::OwnNamespace,
        ),
    ]
};

/// What the controller manages and who it is.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Namespace of the configuration objects, the gateways' reports and the leader Lease.
    pub namespace: String,
    /// Name of the configuration (index object).
    pub config_name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Status writes per second at most (the API server's budget for this controller).
    pub status_writes_per_second: u32,
    /// How long a leader stays leader without renewing.
    pub lease_duration: Duration,
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The API server refused or failed a call that cannot be retried.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The live view of the cluster the controller works from.
#[derive(Clone)]
struct Stores {
    plans: Store<ApiPlan>,
    keys: Store<ApiKey>,
    secrets: Store<Secret>,
    /// Bumped after each change of what compile reads from keys and from token Secrets: equal
    /// generations mean the same key set, so a plan change can skip the key compile.
    key_generation: Arc<AtomicU64>,
    secret_generation: Arc<AtomicU64>,
    reports: Store<Lease>,
    /// The configuration objects as they are, to repair one that was edited or deleted.
    configs: Store<ConfigMap>,
}

/// The spec and the metadata compile reads (creation time, deletion, finalizers), hashed: status
/// writes do not change it.
fn spec_fingerprint<S: serde::Serialize>(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &S,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(spec).unwrap_or_default().hash(&mut h);
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.finalizers.hash(&mut h);
    h.finish()
}

/// Starts reflectors for everything the controller reads; each change wakes `notify` (plans also
/// `plans_changed`; reports only `reports_changed`).
fn reflect(
    client: &Client,
    ns: &str,
    name: &str,
    notify: Arc<Notify>,
    plans_changed: Arc<Notify>,
    reports_changed: Arc<Notify>,
    tasks: &mut Tasks,
) -> Stores {
    /// What of an object the compile depends on: a change elsewhere (a status written by this
    /// controller, a heartbeat) wakes nobody. `None`: every change matters.
    type Relevant<K> = Option<fn(&K) -> u64>;

    fn spawn<K>(
        tasks: &mut Tasks,
        api: Api<K>,
        cfg: watcher::Config,
        wake: Vec<Arc<Notify>>,
        generation: Option<Arc<AtomicU64>>,
        relevant: Relevant<K>,
        keep: fn(&mut K),
    ) -> Store<K>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let (reader, writer) = reflector::store();
        let stream =
            reflector::reflector(writer, watcher(api, cfg).modify(keep)).backoff(crate::watch_backoff());
        tasks.0.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut down = false;
            let mut seen: HashMap<String, u64> = HashMap::new();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        down = false;
                        let changed = match (&ev, relevant) {
                            (watcher::Event::Apply(o) | watcher::Event::InitApply(o), Some(f)) => {
                                let uid = o.meta().uid.clone().unwrap_or_default();
                                seen.insert(uid, f(o)) != Some(f(o))
                            }
                            (watcher::Event::Delete(o), Some(_)) => {
                                seen.remove(o.meta().uid.as_deref().unwrap_or_default());
                                true
                            }
                            (watcher::Event::Init | watcher::Event::InitApply(_), None) => false,
                            _ => true,
                        };
                        if changed {
                            // The store already holds the change: bump, then wake.
                            if let Some(g) = &generation {
                                g.fetch_add(1, Ordering::AcqRel);
                            }
                            for w in &wake {
                                w.notify_one();
                            }
                        }
                    }
                    Err(e) if !down => {
                        tracing::warn!(error = %e, "watch failed; retrying with backoff");
                        down = true;
                    }
                    Err(_) => {}
                }
            }
        }));
        reader
    }
    let key_generation = Arc::new(AtomicU64::new(0));
    let secret_generation = Arc::new(AtomicU64::new(0));
    Stores {
        plans: spawn(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default(),
            vec![Arc::clone(&notify), plans_changed],
            None,
            Some(|p: &ApiPlan| spec_fingerprint(p.meta(), &p.spec)),
            strip::<ApiPlan>,
        ),
        keys: spawn(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default(),
            vec![Arc::clone(&notify)],
            Some(Arc::clone(&key_generation)),
            Some(|k: &ApiKey| spec_fingerprint(k.meta(), &k.spec)),
            strip::<ApiKey>,
        ),
        secrets: spawn(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default().labels(TOKEN_LABEL),
            vec![Arc::clone(&notify)],
            Some(Arc::clone(&secret_generation)),
            None,
            hash_tokens,
        ),
        reports: spawn(
            tasks,
            Api::namespaced(client.clone(), ns),
            watcher::Config::default().labels(&format!("{REPORT_LABEL}={name}")),
            vec![reports_changed],
            None,
            None,
            strip::<Lease>,
        ),
        configs: spawn(
            tasks,
            Api::namespaced(client.clone(), ns),
            watcher::Config::default().labels(&format!("{CONFIG_LABEL}={name}")),
            vec![notify],
            None,
            None,
            strip::<ConfigMap>,
        ),
        key_generation,
        secret_generation,
    }
}

impl Stores {
    /// Generations of the keys and of the token Secrets; read before the stores themselves.
    fn generations(&self) -> (u64, u64) {
        (
            self.key_generation.load(Ordering::Acquire),
            self.secret_generation.load(Ordering::Acquire),
        )
    }
}

/// Drops what the controller never reads from a watched object before the store keeps it:
/// managed fields and `kubectl apply`'s copy of the object (at 100,000 keys, hundreds of MiB).
fn strip<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Keeps a token Secret as the SHA-256 of each entry (empty: blank entry): the raw tokens are read
/// from the watch and never held, and each is hashed once per Secret version.
fn hash_tokens(s: &mut Secret) {
    strip(s);
    s.string_data = None;
    for v in s.data.iter_mut().flat_map(|d| d.values_mut()) {
        v.0 = if v.0.trim_ascii().is_empty() {
            Vec::new()
        } else {
            crate::config::hash_token(&v.0).into_bytes()
        };
    }
}

/// Background tasks of one controller run, stopped when it ends or is dropped (a dropped run is
/// a dead replica: it must stop renewing its leadership at once).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    opts: ControllerOptions,
    metrics: Arc<ControllerMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let notify = Arc::new(Notify::new());
    let plans_changed = Arc::new(Notify::new());
    let reports_changed = Arc::new(Notify::new());
    let mut tasks = Tasks(Vec::new());
    let stores = reflect(
        &client,
        &opts.namespace,
        &opts.config_name,
        Arc::clone(&notify),
        Arc::clone(&plans_changed),
        Arc::clone(&reports_changed),
        &mut tasks,
    );
    let (lead_tx, mut leading) = watch::channel(false);
    tasks.0.push(tokio::spawn(leader::run(
        Api::namespaced(client.clone(), &opts.namespace),
        leader::Election {
            lease: format!("{}-controller-leader", opts.config_name),
            identity: opts.identity.clone(),
            duration: opts.lease_duration,
        },
        lead_tx,
    )));
    let (status_tx, status_rx) = watch::channel(Arc::new(status::Desired::default()));
    tasks.0.push(tokio::spawn(status::run(
        client.clone(),
        stores.clone(),
        status_rx,
        opts.status_writes_per_second,
        Arc::clone(&metrics),
    )));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let publisher = Arc::new(Mutex::new(Publisher {
        api: Api::namespaced(client.clone(), &opts.namespace),
        namespace: opts.namespace.clone(),
        config_name: opts.config_name.clone(),
        configs: stores.configs.clone(),
        metrics: Arc::clone(&metrics),
        previous: None,
        written: BTreeMap::new(),
        shards: None,
        keys_digest: None,
        compiled_from: None,
    }));
    tasks.0.push(tokio::spawn(fast_path(
        Arc::clone(&publisher),
        stores.clone(),
        plans_changed,
        leading.clone(),
    )));
    let mut shell = Shell {
        client,
        opts,
        stores,
        publisher,
        accounted: None,
        tokens: None,
        again: false,
        since: HashMap::new(),
        recorder,
        metrics,
        status: status_tx,
        last_admitted: HashMap::new(),
        generated: HashMap::new(),
        last: None,
        last_reports: Vec::new(),
    };
    let work = async {
        loop {
            // Followers keep their caches warm and wait.
            while !*leading.borrow() {
                shell.metrics.leader.set(0);
                if leading.changed().await.is_err() {
                    return;
                }
            }
            shell.metrics.leader.set(1);
            tracing::info!(identity = shell.opts.identity, "leading: reconciling");
            let _ = shell.stores.plans.wait_until_ready().await;
            let _ = shell.stores.keys.wait_until_ready().await;
            let _ = shell.stores.secrets.wait_until_ready().await;
            // The first pass adopts what an earlier leader wrote instead of rewriting it.
            shell.publisher.lock().await.adopt().await;
            let mut full = true;
            let mut backoff = Duration::from_millis(500);
            while *leading.borrow() {
                let started = Instant::now();
                if full {
                    match shell.sync().await {
                        Ok(()) => {
                            backoff = Duration::from_millis(500);
                            shell.metrics.reconciled("all", "ok", started.elapsed());
                            tracing::debug!(
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "reconcile pass"
                            );
                        }
                        Err(e) => {
                            shell.metrics.reconciled("all", "error", started.elapsed());
                            tracing::warn!(error = %e, retry_in = ?backoff, "reconcile failed");
                            tokio::time::sleep(backoff).await;
                            // Capped low: a pass that failed during an API outage must not
                            // keep the first change after it waiting.
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    }
                } else {
                    // Only the gateways' reports moved: statuses, no compile, no writes.
                    shell.refresh_enforced();
                    shell.metrics.reconciled("report", "ok", started.elapsed());
                }
                // A pass whose compile went stale runs again at once: the change that made it
                // stale may have been the one that woke it.
                if std::mem::take(&mut shell.again) {
                    full = true;
                    continue;
                }
                full = tokio::select! {
                    () = notify.notified() => true,
                    () = reports_changed.notified() => false,
                    // A periodic pass also catches what a lost watch event would have missed.
                    () = tokio::time::sleep(Duration::from_secs(300)) => true,
                    changed = leading.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        true
                    }
                };
                // Coalesce a burst of events (a `kubectl apply -f` of many objects) into one pass.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::info!("no longer leading");
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => {}
    }
    drop(tasks);
    Ok(())
}

/// What this replica last wrote to one configuration object.
struct Written {
    data: String,
    /// Resource versions its own writes produced: a watch that lags still shows one of them, so
    /// only a version not in here is someone else's edit.
    versions: Vec<String>,
    at: Instant,
}

impl Written {
    fn new(data: String, version: String) -> Self {
        Self {
            data,
            versions: vec![version],
            at: Instant::now(),
        }
    }
}

/// Writes configurations and remembers what it wrote. Shared by the full passes and the plan
/// shortcut ([`fast_path`]), which publish one after the other under its lock.
struct Publisher {
    api: Api<ConfigMap>,
    namespace: String,
    config_name: String,
    configs: Store<ConfigMap>,
    metrics: Arc<ControllerMetrics>,
    /// The configuration last published (or found by [`Publisher::adopt`]).
    previous: Option<GatewayConfig>,
    /// Each configuration object as last written (or found), to write only what changed.
    written: BTreeMap<String, Written>,
    /// Key shards, with the keys they were cut from (those of the last publish, which may have
    /// failed half-way).
    shards: Option<(crate::config::SharedKeys, Vec<Piece>)>,
    /// Digest of `previous`' keys, once a full compile of this replica has produced them.
    keys_digest: Option<String>,
    /// Key and Secret generations the last full compile read: while they hold, a plan change
    /// keeps the keys.
    compiled_from: Option<(u64, u64)>,
}

impl Publisher {
    /// Reads the configuration objects already there, so a new leader continues the version
    /// sequence and rewrites nothing that is already right.
    async fn adopt(&mut self) {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{CONFIG_LABEL}={}", self.config_name)))
            .await;
        let Ok(list) = list else { return };
        self.written.clear();
        for cm in list {
            if let Some(d) = cm.data.as_ref().and_then(|d| d.values().next()) {
                self.written.insert(
                    cm.name_any(),
                    Written::new(d.clone(), cm.resource_version().unwrap_or_default()),
                );
            }
        }
        if let Some(index) = self.written.get(&self.config_name) {
            let found = pieces::assemble(&index.data, |n| self.written.get(n).map(|w| w.data.as_str()));
            if let Ok(config) = found {
                self.previous = Some(config);
            }
        }
        // Whatever the last leader compiled from, this replica has not: no shortcut until it has.
        self.compiled_from = None;
        self.keys_digest = None;
    }

    /// Writes the configuration objects whose data changed (shards first, the index last), then
    /// removes objects no longer part of it.
    async fn publish(&mut self, config: &GatewayConfig) -> kube::Result<()> {
        let api = self.api.clone();
        let base = &self.config_name;
        // Keys unchanged (a plan upgrade): keep the shards, serialise the index alone.
        let shards = match self.shards.take() {
            Some((keys, shards)) if Arc::ptr_eq(&keys, &config.keys) || *keys == *config.keys => shards,
            _ => pieces::shards(config, base),
        };
        let mut all = shards.clone();
        all.push(pieces::index(config, base, &shards));
        self.shards = Some((Arc::clone(&config.keys), shards));
        let mut writes = 0;
        for Piece { name, entry, data } in &all {
            if !self.needs_write(name, data) {
                continue;
            }
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": name, "labels": { CONFIG_LABEL: self.config_name } },
                "data": { *entry: data },
            });
            let done = api
                .patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(cm))
                .await?;
            let version = done.resource_version().unwrap_or_default();
            // Versions of earlier data are kept: until the watch catches up it shows one of them,
            // which is this replica's own write and no reason to write again.
            match self.written.get_mut(name) {
                Some(w) => {
                    w.data.clone_from(data);
                    w.versions.push(version);
                    w.at = Instant::now();
                    if w.versions.len() > 16 {
                        w.versions.remove(0);
                    }
                }
                None => {
                    self.written
                        .insert(name.clone(), Written::new(data.clone(), version));
                }
            }
            writes += 1;
        }
        let stale: Vec<String> = self
            .written
            .keys()
            .filter(|n| !all.iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        for name in stale {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
            self.written.remove(&name);
        }
        self.metrics.config_version.set(config.version as i64);
        self.previous = Some(config.clone());
        if writes == 0 {
            return Ok(());
        }
        self.metrics.objects_written.inc_by(writes);
        tracing::info!(
            version = config.version,
            keys = config.keys.len(),
            objects_written = writes,
            "configuration published"
        );
        Ok(())
    }

    /// Whether an object must be written: its data changed, or someone else edited or deleted it
    /// since this controller wrote it.
    fn needs_write(&self, name: &str, data: &str) -> bool {
        let Some(ours) = self.written.get(name) else {
            return true;
        };
        if ours.data != data {
            return true;
        }
        let seen = self
            .configs
            .get(&reflector::ObjectRef::new(name).within(&self.namespace));
        match seen {
            Some(cm) => {
                let version = cm.resource_version().unwrap_or_default();
                let theirs = cm.data.as_ref().and_then(|d| d.values().next());
                !ours.versions.contains(&version) && theirs.map(String::as_str) != Some(data)
            }
            // Gone from a watch that has had time to see it: deleted by someone.
            None => ours.at.elapsed() > Duration::from_secs(2),
        }
    }
}

/// Publishes plan changes without compiling the keys again, while the keys and token Secrets are
/// those of the last full compile: at 100,000 keys that takes milliseconds instead of seconds.
/// The full pass the same change wakes writes the statuses and events afterwards.
async fn fast_path(
    publisher: Arc<Mutex<Publisher>>,
    stores: Stores,
    plans_changed: Arc<Notify>,
    leading: watch::Receiver<bool>,
) {
    loop {
        plans_changed.notified().await;
        if !*leading.borrow() {
            continue;
        }
        let started = Instant::now();
        // Plans are read under the lock: a full pass publishing meanwhile may have used plans
        // newer than any read before it, and must not be overwritten with older ones.
        let mut p = publisher.lock().await;
        let generations = stores.generations();
        let plans = stores.plans.state();
        if p.compiled_from != Some(generations) {
            continue;
        }
        let (Some(previous), Some(digest)) = (&p.previous, &p.keys_digest) else {
            continue;
        };
        let Some(config) = compile_plans_only(&plans, previous, digest) else {
            continue;
        };
        if config.hash == previous.hash {
            continue;
        }
        let version = config.version;
        match p.publish(&config).await {
            Ok(()) => tracing::debug!(
                version,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "plan change published without compiling the keys"
            ),
            // The full pass the change also woke retries.
            Err(e) => tracing::warn!(error = %e, "could not publish a plan change"),
        }
    }
}

struct Shell {
    client: Client,
    opts: ControllerOptions,
    stores: Stores,
    publisher: Arc<Mutex<Publisher>>,
    /// The configuration statuses and events were last derived from.
    accounted: Option<GatewayConfig>,
    /// Token hashes as of a Secret generation.
    tokens: Option<(u64, Arc<TokenHashes>)>,
    /// The last pass's compile was stale: run another pass without waiting for a change.
    again: bool,
    /// Per key id: the configuration version since which its compiled entry is unchanged.
    since: HashMap<String, u64>,
    recorder: Recorder,
    metrics: Arc<ControllerMetrics>,
    status: watch::Sender<Arc<status::Desired>>,
    /// Per key id: whether it was admitted at the last pass (for transition events).
    last_admitted: HashMap<String, bool>,
    /// The last pass's compile output, for status refreshes when only reports change.
    last: Option<Compiled>,
    /// What the reports said at the last status decision: (replica, version, live).
    last_reports: Vec<(String, Option<u64>, bool)>,
    /// Hashes of tokens this replica generated, by (namespace, Secret, entry), until the Secret
    /// shows up in the watch: without them the next pass would briefly see no Secret.
    generated: HashMap<(String, String, String), String>,
}

impl Shell {
    fn tokens(&mut self) -> TokenHashes {
        let mut tokens = TokenHashes::default();
        for s in self.stores.secrets.state() {
            let (ns, name) = (s.namespace().unwrap_or_default(), s.name_any());
            // The store holds hashes already ([`hash_tokens`]); an empty entry is a blank one.
            let entries = s.data.iter().flatten();
            let blanks = entries
                .clone()
                .filter(|(_, v)| v.0.is_empty())
                .map(|(k, _)| (k.as_str(), &b""[..]));
            tokens.insert_secret(&ns, &name, blanks);
            for (entry, hash) in entries.filter(|(_, v)| !v.0.is_empty()) {
                tokens.insert_hash(&ns, &name, entry, &String::from_utf8_lossy(&hash.0));
            }
        }
        self.generated.retain(|(ns, name, entry), hash| {
            let seen = tokens.lookup(ns, name, entry) != TokenState::SecretNotFound;
            if !seen {
                tokens.insert_hash(ns, name, entry, hash);
            }
            !seen
        });
        tokens
    }

    /// Creates a token Secret for each key that has no Secret reference and no Secret yet. An
    /// existing Secret is never overwritten (create fails with a conflict instead).
    async fn generate_tokens(&mut self, keys: &[Arc<ApiKey>], tokens: &mut TokenHashes) -> kube::Result<()> {
        for key in keys {
            if key.spec.secret_ref.is_some() || key.meta().deletion_timestamp.is_some() {
                continue;
            }
            let ns = key.namespace().unwrap_or_default();
            let r = key.token_ref();
            if tokens.lookup(&ns, &r.name, &r.key) != TokenState::SecretNotFound {
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
                    "ownerReferences": [key.controller_owner_ref(&()).expect("an ApiKey read from the API has a uid")],
                },
                "type": "Opaque",
                "stringData": { r.key.clone(): token },
            }))
            .expect("a Secret");
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tokens.insert_secret(&ns, &r.name, [(r.key.as_str(), token.as_bytes())]);
                    self.generated.insert(
                        (ns.clone(), r.name.clone(), r.key.clone()),
                        crate::config::hash_token(token.as_bytes()),
                    );
                    self.event(
                        &**key,
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
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "could not publish an event");
        }
    }

    /// One pass: tokens, compile, publish, finalizers, statuses.
    async fn sync(&mut self) -> kube::Result<()> {
        let t0 = Instant::now();
        // What was published before anything is read: if the plan shortcut publishes after this,
        // this pass's output is stale and is dropped below; if it published before, the plans
        // read next already hold its change.
        let previous = self.publisher.lock().await.previous.clone();
        let generations = self.stores.generations();
        let plans = self.stores.plans.state();
        let keys = self.stores.keys.state();
        // Token hashes are recomputed only when a Secret changed (taken out, so that adding a
        // generated token does not copy them).
        let mut tokens = match self.tokens.take() {
            Some((g, t)) if g == generations.1 => t,
            _ => Arc::new(self.tokens()),
        };
        self.generate_tokens(&keys, Arc::make_mut(&mut tokens)).await?;
        self.tokens = Some((generations.1, Arc::clone(&tokens)));
        let t_tokens = t0.elapsed();
        // The last pass's reports are replaced by this one's: not two sets of 100,000 at once.
        self.last = None;
        // Off the async workers: at 100,000 keys this takes a second, while the plan shortcut,
        // the watches and the status writer keep going.
        let compiled = {
            let (plans, keys, previous) = (plans.clone(), keys.clone(), previous.clone());
            tokio::task::spawn_blocking(move || compile(&plans, &keys, &tokens, previous.as_ref()))
                .await
                .expect("compile does not panic")
        };
        let t_compile = t0.elapsed();
        {
            let mut p = self.publisher.lock().await;
            if p.previous.as_ref().map(|c| &c.hash) != previous.as_ref().map(|c| &c.hash) {
                // The plan shortcut published while this compile ran on older plans: its output is
                // stale. The change that triggered the shortcut has woken the next pass already.
                tracing::debug!("a plan change was published during the compile; compiling again");
                self.again = true;
                return Ok(());
            }
            // Writes only objects whose data differs from what is there (none on most passes).
            p.publish(&compiled.config).await?;
            p.keys_digest = Some(compiled.keys_digest.clone());
            p.compiled_from = Some(generations);
        }
        let t_publish = t0.elapsed();
        if self.accounted.as_ref().map(|c| &c.hash) != Some(&compiled.config.hash) {
            self.track_changes(&compiled);
            self.plan_events(&plans, &compiled).await;
            self.accounted = Some(compiled.config.clone());
        }
        self.finalizers(&plans, &compiled).await?;
        self.key_events(&keys, &compiled).await;
        self.last = Some(compiled);
        self.last_reports.clear();
        self.refresh_enforced();
        tracing::debug!(
            tokens_ms = t_tokens.as_millis() as u64,
            compile_ms = (t_compile - t_tokens).as_millis() as u64,
            publish_ms = (t_publish - t_compile).as_millis() as u64,
            after_ms = (t0.elapsed() - t_publish).as_millis() as u64,
            "pass phases"
        );
        Ok(())
    }

    /// Decides statuses again from the last compile output and the current reports, when the
    /// reports say something new (a heartbeat that changes nothing costs nothing).
    fn refresh_enforced(&mut self) {
        let now = Timestamp::now();
        let mut seen: Vec<(String, Option<u64>, bool)> = self
            .reports()
            .into_iter()
            .map(|r| {
                let live = r.is_live(now);
                (r.replica, r.version, live)
            })
            .collect();
        seen.sort();
        if seen == self.last_reports && !seen.is_empty() {
            return;
        }
        self.last_reports = seen;
        let Some(compiled) = &self.last else { return };
        let plans = self.stores.plans.state();
        let keys = self.stores.keys.state();
        self.desire_statuses(&plans, &keys, compiled);
    }

    /// Remembers, per key, the version since which what the gateways enforce for it is unchanged.
    fn track_changes(&mut self, compiled: &Compiled) {
        let new = &compiled.config;
        let old_by_id: HashMap<&str, (&CompiledKey, Option<KeyLimits>)> = self
            .accounted
            .as_ref()
            .map(|c| {
                c.keys
                    .values()
                    .map(|k| (k.id.as_str(), (k, c.limits_for(k))))
                    .collect()
            })
            .unwrap_or_default();
        let mut since = HashMap::with_capacity(new.keys.len());
        for k in new.keys.values() {
            let unchanged = old_by_id
                .get(k.id.as_str())
                .is_some_and(|(ok, ol)| *ok == k && *ol == new.limits_for(k));
            let v = match self.since.get(&k.id) {
                Some(v) if unchanged => *v,
                _ => new.version,
            };
            since.insert(k.id.clone(), v);
        }
        self.since = since;
    }

    async fn plan_events(&self, plans: &[Arc<ApiPlan>], compiled: &Compiled) {
        let Some(old) = &self.accounted else { return };
        for plan in plans {
            let name = plan.name_any();
            let (Some(a), Some(b)) = (old.plans.get(&name), compiled.config.plans.get(&name)) else {
                continue;
            };
            if a != b {
                let slots = |p: &crate::config::CompiledPlan| {
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
                        compiled.config.version
                    ),
                )
                .await;
            }
        }
    }

    async fn key_events(&mut self, keys: &[Arc<ApiKey>], compiled: &Compiled) {
        for key in keys {
            let id = key.id();
            let Some(report) = compiled.keys.get(&id) else {
                continue;
            };
            let before = self.last_admitted.insert(id, report.admitted);
            if before != Some(report.admitted)
                && !report.admitted
                && let Some(c) = report.conditions.iter().find(|c| !c.status)
            {
                self.event(&**key, EventType::Warning, c.reason, c.message.clone())
                    .await;
            }
        }
    }

    /// Keeps the in-use finalizer on every plan; a plan being deleted keeps it while keys use it.
    async fn finalizers(&self, plans: &[Arc<ApiPlan>], compiled: &Compiled) -> kube::Result<()> {
        let api: Api<ApiPlan> = Api::all(self.client.clone());
        for plan in plans {
            let name = plan.name_any();
            let has = plan.finalizers().iter().any(|f| f == PLAN_FINALIZER);
            let deleting = plan.meta().deletion_timestamp.is_some();
            let in_use = compiled.plans.get(&name).map_or(0, |r| r.keys);
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

    fn desire_statuses(&self, plans: &[Arc<ApiPlan>], keys: &[Arc<ApiKey>], compiled: &Compiled) {
        let reports = self.reports();
        let now = Timestamp::now();
        let version = compiled.config.version;
        let plan_enforced = Enforcement::of(&reports, version, now);
        let mut desired = status::Desired::default();
        let keys_by_plan: HashMap<&str, Vec<&str>> = keys.iter().fold(HashMap::new(), |mut m, k| {
            m.entry(k.spec.plan.as_str())
                .or_default()
                .push(k.meta().name.as_deref().unwrap_or(""));
            m
        });
        for plan in plans {
            let name = plan.name_any();
            let Some(report) = compiled.plans.get(&name) else {
                continue;
            };
            let mut conditions = report.conditions.clone();
            if plan.meta().deletion_timestamp.is_some() && report.keys > 0 {
                let users = keys_by_plan.get(name.as_str()).cloned().unwrap_or_default();
                conditions = vec![ConditionSpec::fail(
                    "Ready",
                    "InUse",
                    format!(
                        "Deletion waits until no key uses this plan; still used by {} key(s): {}. Move them to another plan.",
                        report.keys,
                        users.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                    ),
                )];
            }
            conditions.push(plan_enforced.condition(version));
            desired.plans.insert(
                name,
                status::PlanStatus {
                    generation: plan.meta().generation,
                    keys: report.keys,
                    conditions,
                },
            );
        }
        let generations: HashMap<String, Option<i64>> =
            keys.iter().map(|k| (k.id(), k.meta().generation)).collect();
        let mut memo: HashMap<u64, ConditionSpec> = HashMap::new();
        for (id, report) in &compiled.keys {
            let mut conditions = report.conditions.clone();
            if report.admitted {
                let since = self.since.get(id).copied().unwrap_or(version);
                let c = memo
                    .entry(since)
                    .or_insert_with(|| Enforcement::of(&reports, since, now).condition(since))
                    .clone();
                conditions.push(c);
            }
            let generation = generations.get(id).copied().flatten();
            desired.keys.insert(
                id.clone(),
                status::KeyStatus {
                    generation,
                    effective: report.effective.clone(),
                    conditions,
                },
            );
        }
        self.metrics
            .status_pending
            .set(desired.keys.len() as i64 + desired.plans.len() as i64);
        self.status.send_replace(Arc::new(desired));
    }
}

/// A token with a recognisable prefix and 190 bits of randomness (32 base62 characters).
pub fn generate_token() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::from(TOKEN_PREFIX);
    let mut buf = [0u8; 64];
    while out.len() < TOKEN_PREFIX.len() + 32 {
        getrandom::fill(&mut buf).expect("the OS random source is available");
        // Rejection sampling keeps every character equally likely.
        for b in buf {
            if (b as usize) < ALPHABET.len() * 4 && out.len() < TOKEN_PREFIX.len() + 32 {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    out
}
