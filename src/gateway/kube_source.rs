//! The Kubernetes configuration source: watch the configuration objects the controller writes
//! (through the API, not a mounted volume, whose refresh takes the kubelet up to a minute), apply
//! each complete configuration through [`Gateway::apply`], and report the version enforced in a
//! `coordination.k8s.io` Lease per replica, renewed as a heartbeat. The controller derives
//! `Enforced` from those reports alone.
//!
//! A malformed object is refused through [`Gateway::reject`] and the last good configuration keeps
//! serving; so it does while the API server is unreachable (the watch retries with backoff).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::ConfigMap},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};

use super::{Gateway, ReloadReport};
pub use crate::config::pieces::{
    ACTIVITY_ANNOTATION, CONFIG_LABEL, GATEWAY_MANAGER, HASH_ANNOTATION, REPORT_LABEL, REPORT_TTL_SECONDS,
    VERSION_ANNOTATION,
};
use crate::config::pieces::{AssembleError, Assembled, INDEX_ENTRY, SHARD_ENTRY, assemble_from};
use crate::{ApiCall, Reach};

/// Every API call the gateway makes: it reads its configuration objects and writes its own report
/// (by server-side apply, which creates the Lease the first time). No Secrets, nothing outside its
/// namespace. The Helm chart's RBAC is checked against this list.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall::new("", "configmaps", &["list", "watch"], Reach::OwnNamespace),
    ApiCall::new(
        "coordination.k8s.io",
        "leases",
        &["create", "patch"],
        Reach::OwnNamespace,
    ),
];

/// Where the configuration lives and who this replica is.
#[derive(Clone, Debug)]
pub struct KubeSourceOptions {
    /// Namespace of the configuration objects and of the reports.
    pub namespace: String,
    /// Name of the configuration (the index object's name).
    pub name: String,
    /// This replica's name (the pod name), unique among the gateways.
    pub replica: String,
    /// How often the report is renewed.
    pub report_every: Duration,
}

/// Watches the configuration objects and applies them; runs until dropped.
pub async fn run(gateway: Arc<Gateway>, client: Client, opts: KubeSourceOptions) {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &opts.namespace);
    let leases: Api<Lease> = Api::namespaced(client, &opts.namespace);
    let reporter = tokio::spawn(report_loop(Arc::clone(&gateway), leases.clone(), opts.clone()));
    let config = watcher::Config::default().labels(&format!("{CONFIG_LABEL}={}", opts.name));
    let mut events = watcher(maps, config).backoff(crate::watch_backoff()).boxed();
    let origin = format!("configmap {}/{}", opts.namespace, opts.name);
    let mut data: HashMap<String, String> = HashMap::new();
    let mut init: Option<HashMap<String, String>> = None;
    let mut refused_index: Option<String> = None;
    // The last configuration applied: a plan change reuses its keys instead of re-reading shards.
    let mut last: Option<Assembled> = None;
    let mut api_down = false;
    // A relist brought every shard's text again, also of the versions already assembled.
    let mut relisted = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if !api_down {
                    tracing::warn!(error = %e, "kubernetes API unreachable; the last good configuration keeps serving");
                    api_down = true;
                }
                continue;
            }
        };
        if api_down {
            tracing::info!("kubernetes API reachable again");
            api_down = false;
        }
        let entry = |cm: &ConfigMap| {
            let d = cm.data.as_ref()?;
            d.get(INDEX_ENTRY).or_else(|| d.get(SHARD_ENTRY)).cloned()
        };
        match event {
            watcher::Event::Init => init = Some(HashMap::new()),
            watcher::Event::InitApply(cm) => {
                if let (Some(buf), Some(d)) = (init.as_mut(), entry(&cm)) {
                    buf.insert(cm.name_any(), d);
                }
                continue;
            }
            watcher::Event::InitDone => {
                data = init.take().unwrap_or_default();
                relisted = true;
            }
            watcher::Event::Apply(cm) => match entry(&cm) {
                Some(d) => {
                    data.insert(cm.name_any(), d);
                }
                None => {
                    data.remove(&cm.name_any());
                }
            },
            watcher::Event::Delete(cm) => {
                data.remove(&cm.name_any());
            }
        }
        let Some(index) = data.get(&opts.name).cloned() else {
            continue;
        };
        if refused_index.as_deref() == Some(index.as_str()) {
            continue;
        }
        let started = std::time::Instant::now();
        let (gw, name) = (Arc::clone(&gateway), index.clone());
        let load = move || {
            let outcome = load(&gw, &name, &data, &mut last);
            (data, last, outcome)
        };
        let Some((back, last_back, outcome)) = super::off_the_serving_threads(load).await else {
            break;
        };
        (data, last) = (back, last_back);
        if outcome.is_ok()
            && let Some(l) = &last
        {
            // The assembly holds the keys of the shards it read: their text (about 110 bytes a
            // key) is needed again only for another version, which comes with its own text.
            for name in &l.read {
                data.remove(name);
            }
            if std::mem::take(&mut relisted) {
                data.retain(|n, text| *n == opts.name || !l.holds(n, text));
            }
        }
        match outcome {
            Ok(None) => refused_index = None,
            Ok(Some(report)) => {
                refused_index = None;
                gateway
                    .metrics
                    .reload_duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    origin,
                    from = report.from_version,
                    to = report.to_version,
                    keys = report.keys,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "configuration applied"
                );
                if let Err(e) = report_once(&gateway, &leases, &opts).await {
                    tracing::warn!(error = %e, "could not report the configuration enforced");
                }
            }
            Err(AssembleError::Incomplete(shard)) => {
                tracing::debug!(shard, "configuration update in progress; waiting for the rest");
            }
            Err(AssembleError::Invalid(e)) => {
                refused_index = Some(index);
                gateway.reject(&origin, &e);
            }
        }
    }
    reporter.abort();
}

/// Assembles the configuration `index` names and applies it unless it is the one enforced
/// already (`None`). A blocking call: parsing the shards and building the key table.
fn load(
    gateway: &Gateway,
    index: &str,
    data: &HashMap<String, String>,
    last: &mut Option<Assembled>,
) -> Result<Option<ReloadReport>, AssembleError> {
    let assembly = assemble_from(index, |name| data.get(name).map(String::as_str), last.as_ref())?;
    *last = Some(assembly.next);
    if assembly.config.hash == gateway.table().config.hash && gateway.is_ready() {
        return Ok(None);
    }
    Ok(Some(
        gateway.apply_delta(assembly.config, assembly.delta.as_ref()),
    ))
}

/// Writes this replica's report: the version and hash enforced, and a fresh renew time.
async fn report_once(gateway: &Gateway, leases: &Api<Lease>, opts: &KubeSourceOptions) -> kube::Result<()> {
    let table = gateway.table();
    let ready = gateway.is_ready();
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": report_name(&opts.replica),
            "labels": { REPORT_LABEL: opts.name },
            "annotations": {
                VERSION_ANNOTATION: if ready { table.config.version.to_string() } else { String::new() },
                HASH_ANNOTATION: if ready { table.config.hash.clone() } else { String::new() },
                ACTIVITY_ANNOTATION: serde_json::to_string(&gateway.activity(ACTIVITY_KEYS)).unwrap_or_default(),
            },
        },
        "spec": {
            "holderIdentity": opts.replica,
            "leaseDurationSeconds": REPORT_TTL_SECONDS,
            "renewTime": MicroTime(k8s_openapi::jiff::Timestamp::now()),
        },
    });
    leases
        .patch(
            &report_name(&opts.replica),
            &PatchParams::apply(GATEWAY_MANAGER).force(),
            &Patch::Apply(lease),
        )
        .await
        .map(|_| ())
}

/// Keys a report names at most (the most active; about 40 bytes each): an annotation must stay
/// well within the API server's 256 KiB for all of an object's annotations.
const ACTIVITY_KEYS: usize = 2_000;

/// Name of a replica's report Lease.
pub fn report_name(replica: &str) -> String {
    format!("slotgate-gateway-{replica}")
}

async fn report_loop(gateway: Arc<Gateway>, leases: Api<Lease>, opts: KubeSourceOptions) {
    let mut tick = tokio::time::interval(opts.report_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = gateway.report_soon.notified() => {}
        }
        match report_once(&gateway, &leases, &opts).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                tracing::warn!(error = %e, "could not renew the gateway report; retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
