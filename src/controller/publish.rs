//! Writes the configuration objects: server-side apply with the controller's field manager, only
//! the objects whose data changed (shards first, the index last, so that a gateway never sees an
//! index naming shards that are not there yet), and deletes the shards a configuration no longer
//! has. An object someone else edited or deleted is written again.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::reflector::{self, Store},
};

use super::{ControllerMetrics, MANAGER};
use crate::config::{
    GatewayConfig,
    pieces::{self, CONFIG_LABEL, Piece},
};

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

/// Writes configurations and remembers what it wrote.
pub(super) struct Publisher {
    pub(super) api: Api<ConfigMap>,
    pub(super) namespace: String,
    pub(super) config_name: String,
    pub(super) configs: Store<ConfigMap>,
    pub(super) metrics: Arc<ControllerMetrics>,
    /// Each configuration object as last written (or found), to write only what changed.
    written: BTreeMap<String, Written>,
}

impl Publisher {
    pub(super) fn new(
        api: Api<ConfigMap>,
        namespace: String,
        config_name: String,
        configs: Store<ConfigMap>,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        Self {
            api,
            namespace,
            config_name,
            configs,
            metrics,
            written: BTreeMap::new(),
        }
    }

    /// Reads the configuration objects already there and returns the configuration they make,
    /// so that a new leader continues the version sequence and rewrites nothing already right.
    pub(super) async fn adopt(&mut self) -> Option<GatewayConfig> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{CONFIG_LABEL}={}", self.config_name)))
            .await
            .ok()?;
        self.written.clear();
        for cm in list {
            if let Some(d) = cm.data.as_ref().and_then(|d| d.values().next()) {
                self.written.insert(
                    cm.name_any(),
                    Written::new(d.clone(), cm.resource_version().unwrap_or_default()),
                );
            }
        }
        let index = self.written.get(&self.config_name)?;
        pieces::assemble(&index.data, |n| self.written.get(n).map(|w| w.data.as_str())).ok()
    }

    /// Remembers a write of ours. Versions of earlier data are kept: until the watch catches up
    /// it shows one of them, which is this replica's own write and no reason to write again.
    fn record(&mut self, piece: &Piece, version: String) {
        match self.written.get_mut(&piece.name) {
            Some(w) => {
                w.data.clone_from(&piece.data);
                w.versions.push(version);
                w.at = Instant::now();
                if w.versions.len() > 16 {
                    w.versions.remove(0);
                }
            }
            None => {
                self.written
                    .insert(piece.name.clone(), Written::new(piece.data.clone(), version));
            }
        }
    }

    /// Writes the objects whose data changed (the shards, then the index), then removes
    /// objects no longer part of the configuration.
    pub(super) async fn publish(&mut self, all: &[Piece], version: u64, keys: usize) -> kube::Result<()> {
        use futures::StreamExt;
        let mut writes = 0;
        // Shards first, several at a time (a rotation touches two, a cold start all of them);
        // the index only once they are all in, so a gateway never sees an index naming a shard
        // version that is not there yet.
        let (index, shards): (Vec<&Piece>, Vec<&Piece>) =
            all.iter().partition(|p| p.name == self.config_name);
        for batch in [shards, index] {
            let pending: Vec<&Piece> = batch
                .into_iter()
                .filter(|p| self.needs_write(&p.name, &p.data))
                .collect();
            // Owned requests: a stream of futures that borrow `self` is not `Send` (rustc #102211).
            let requests: Vec<(usize, String, serde_json::Value)> = pending
                .iter()
                .enumerate()
                .map(|(i, piece)| {
                    let cm = serde_json::json!({
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": { "name": piece.name, "labels": { CONFIG_LABEL: self.config_name } },
                        "data": { piece.entry: piece.data },
                    });
                    (i, piece.name.clone(), cm)
                })
                .collect();
            let api = self.api.clone();
            let results: Vec<(usize, kube::Result<ConfigMap>)> = futures::stream::iter(requests)
                .map(move |(i, name, cm)| {
                    let api = api.clone();
                    async move {
                        let params = PatchParams::apply(MANAGER).force();
                        (i, api.patch(&name, &params, &Patch::Apply(cm)).await)
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
            let mut failed = None;
            for (i, result) in results {
                match result {
                    Ok(done) => {
                        self.record(pending[i], done.resource_version().unwrap_or_default());
                        writes += 1;
                    }
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        let stale: Vec<String> = self
            .written
            .keys()
            .filter(|n| !all.iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        for name in stale {
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
            self.written.remove(&name);
        }
        self.metrics.config_version.set(version as i64);
        if writes == 0 {
            return Ok(());
        }
        self.metrics.objects_written.inc_by(writes);
        tracing::info!(version, keys, objects_written = writes, "configuration published");
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
