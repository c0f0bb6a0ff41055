//! The control plane: `slotgate controller`.
//!
//! Watches feed an index ([`index`]) and the incremental compile
//! ([`crate::config::incremental`]): on a change the leader decides again only the keys it can
//! touch, writes the configuration objects whose data changed ([`publish`]; server-side apply,
//! own field manager; a plan upgrade rewrites the index object only, one key one shard), and
//! hands the statuses to a rate-limited writer in the background ([`status`]), the changed
//! objects first, so enforcement never waits on per-key status writes. `Enforced` comes only from
//! the gateways' reports ([`enforced`]). [`reconcile`] is one pass.

pub mod enforced;
mod index;
mod keys;
pub mod leader;
mod metrics;
mod publish;
mod reconcile;
mod status;
mod targets;
pub mod webhooks;

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    runtime::events::{Recorder, Reporter},
};
use tokio::sync::{Notify, watch};

pub use metrics::ControllerMetrics;
pub use targets::credentials_secret;

use crate::{ApiCall, Reach, config::incremental::Incremental};

/// A 64-bit digest (SipHash, fixed keys) of what the controller compares or remembers instead of
/// keeping it: configuration text, statuses, object identities. Two of 100,000 values share one
/// with a probability of about 10^-9.
fn digest64<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

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
        C::new("slotgate.dev", "apiupstreams", &["list", "watch"], Reach::Cluster),
        C::new("slotgate.dev", "apiupstreams/status", &["patch"], Reach::Cluster),
        C::new("slotgate.dev", "apitasktypes", &["list", "watch"], Reach::Cluster),
        C::new("slotgate.dev", "apitasktypes/status", &["patch"], Reach::Cluster),
        // Not a call: a generated Secret is owned by its key with `blockOwnerDeletion`, which the
        // OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allows only to whoever
        // may update the owner's finalizers.
        C::new("slotgate.dev", "apikeys/finalizers", &["update"], Reach::Cluster),
        // Token Secrets are read where the keys are; generated ones are created there, and a
        // webhook signing secret is added to one that has none (patch). A target's credential
        // Secret is read by name, wherever its ApiUpstream points. The target credentials and
        // the signing secrets the gateways mount are written by server-side apply (patch) in the
        // own namespace.
        C::new(
            "",
            "secrets",
            &["get", "list", "watch", "create", "patch"],
            Reach::Cluster,
        ),
        // A target's CA bundle is read by name, wherever its ApiUpstream points.
        C::new("", "configmaps", &["get"], Reach::Cluster),
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
    let reports_changed = Arc::new(Notify::new());
    let mut tasks = Tasks(Vec::new());
    let (stores, feed) = index::reflect(
        &client,
        &opts.namespace,
        &opts.config_name,
        Arc::clone(&notify),
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
    let book = Arc::new(status::StatusBook::default());
    tasks.0.push(tokio::spawn(status::run(
        client.clone(),
        stores.clone(),
        Arc::clone(&book),
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
    let publisher = publish::Publisher::new(
        Api::namespaced(client.clone(), &opts.namespace),
        opts.config_name.clone(),
        stores.configs.clone(),
        Arc::clone(&metrics),
    );
    let mut shell = reconcile::Shell {
        client,
        opts,
        stores,
        publisher,
        index: Incremental::default(),
        feed,
        listed: (false, false),
        accounted: None,
        recorder,
        metrics,
        status: book,
        last_admitted: HashMap::new(),
        last_reports: Vec::new(),
        activity: Default::default(),
        targets: Default::default(),
        target_reports: Default::default(),
        webhooks: Default::default(),
    };
    let work = async {
        loop {
            // Followers keep their index warm and wait.
            while !*leading.borrow() {
                shell.metrics.leader.set(0);
                tokio::select! {
                    changed = leading.changed() => if changed.is_err() { return },
                    () = notify.notified() => { shell.drain(); }
                }
            }
            shell.metrics.leader.set(1);
            tracing::info!(identity = shell.opts.identity, "leading: reconciling");
            let _ = shell.stores.plans.wait_until_ready().await;
            let _ = shell.stores.keys.wait_until_ready().await;
            shell.wait_listed(&notify).await;
            // The first pass continues what an earlier leader wrote instead of rewriting it.
            let adopted = shell.publisher.adopt().await;
            shell.index = std::mem::take(&mut shell.index).restart(adopted.as_ref());
            shell.accounted = None;
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
                    shell.refresh_activity().await;
                    if let Err(e) = shell.refresh_targets().await {
                        tracing::debug!(error = %e, "target statuses not written; the next pass retries");
                    }
                    shell.metrics.reconciled("report", "ok", started.elapsed());
                }
                let catching_up;
                (full, catching_up) = tokio::select! {
                    biased;
                    () = notify.notified() => (true, false),
                    // Statuses of a plan change still to catch up, and nothing newer waiting.
                    () = std::future::ready(()), if shell.index.refresh_pending() => (true, true),
                    () = reports_changed.notified() => (false, false),
                    // A periodic pass also catches what a lost watch event would have missed, and
                    // (more often while targets exist) a target's credential rotated in place.
                    () = tokio::time::sleep(shell.periodic()) => (true, false),
                    changed = leading.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        (true, false)
                    }
                };
                if !catching_up {
                    // Coalesce a burst of events (a `kubectl apply -f` of many objects) into one pass.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tracing::info!("no longer leading");
            shell.status.clear();
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => {}
    }
    drop(tasks);
    Ok(())
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
