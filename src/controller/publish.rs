//! Writes the configuration objects: server-side apply with the controller's field manager, only
//! the objects whose data changed (shards first, the index last, so that a gateway never sees an
//! index naming shards that are not there yet), and deletes the shards a configuration no longer
//! has. An object someone else edited or deleted is written again.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::watcher,
};

use super::{ControllerMetrics, MANAGER};
use crate::config::{
    GatewayConfig,
    pieces::{self, CONFIG_LABEL, Piece},
};

/// A digest of an object's data: what this replica compares, so that it holds no copy of the
/// configuration text beside the index's (at 100,000 keys each copy is about 12 MB).
fn data_digest(data: &str) -> u64 {
    super::digest64(data)
}

/// What this replica last wrote to one configuration object.
struct Written {
    /// [`data_digest`] of its data.
    digest: u64,
    /// Resource versions its own writes produced: a watch that lags still shows one of them, so
    /// only a version not in here is someone else's edit.
    versions: Vec<String>,
    at: Instant,
}

impl Written {
    fn new(data: &str, version: String) -> Self {
        Self {
            digest: data_digest(data),
            versions: vec![version],
            at: Instant::now(),
        }
    }
}

/// The configuration objects as the watch shows them: resource version and [`data_digest`] of
/// each by name, to repair one someone else edited or deleted. Not a reflector store, which would
/// keep a third copy of every shard's text.
#[derive(Clone, Default)]
pub(super) struct ConfigSeen {
    objects: Arc<RwLock<HashMap<String, (String, u64)>>>,
    /// Objects of a relist under way, swapped in when it ends.
    listing: Option<HashMap<String, (String, u64)>>,
}

impl ConfigSeen {
    fn seen(cm: &ConfigMap) -> (String, (String, u64)) {
        let data = cm.data.as_ref().and_then(|d| d.values().next());
        (
            cm.name_any(),
            (
                cm.resource_version().unwrap_or_default(),
                data.map_or(0, |d| data_digest(d)),
            ),
        )
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, (String, u64)>> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.objects.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one event of the configuration objects' watch.
    pub(super) fn apply(&mut self, ev: &watcher::Event<ConfigMap>) {
        match ev {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(cm) => {
                let (name, seen) = Self::seen(cm);
                self.listing.get_or_insert_default().insert(name, seen);
            }
            watcher::Event::InitDone => *self.write() = self.listing.take().unwrap_or_default(),
            watcher::Event::Apply(cm) => {
                let (name, seen) = Self::seen(cm);
                self.write().insert(name, seen);
            }
            watcher::Event::Delete(cm) => {
                self.write().remove(&cm.name_any());
            }
        }
    }

    fn get(&self, name: &str) -> Option<(String, u64)> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// Writes configurations and remembers what it wrote.
pub(super) struct Publisher {
    pub(super) api: Api<ConfigMap>,
    pub(super) config_name: String,
    pub(super) configs: ConfigSeen,
    pub(super) metrics: Arc<ControllerMetrics>,
    /// Each configuration object as last written (or found), to write only what changed.
    written: BTreeMap<String, Written>,
}

impl Publisher {
    pub(super) fn new(
        api: Api<ConfigMap>,
        config_name: String,
        configs: ConfigSeen,
        metrics: Arc<ControllerMetrics>,
    ) -> Self {
        Self {
            api,
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
        let mut found: HashMap<String, String> = HashMap::new();
        for mut cm in list {
            let name = cm.name_any();
            let version = cm.resource_version().unwrap_or_default();
            if let Some(d) = cm.data.take().and_then(|d| d.into_values().next()) {
                self.written.insert(name.clone(), Written::new(&d, version));
                found.insert(name, d);
            }
        }
        let index = found.get(&self.config_name)?;
        pieces::assemble(index, |n| found.get(n).map(String::as_str)).ok()
    }

    /// Remembers a write of ours. Versions of earlier data are kept: until the watch catches up
    /// it shows one of them, which is this replica's own write and no reason to write again.
    fn record(&mut self, piece: &Piece, version: String) {
        match self.written.get_mut(&piece.name) {
            Some(w) => {
                w.digest = data_digest(&piece.data);
                w.versions.push(version);
                w.at = Instant::now();
                if w.versions.len() > 16 {
                    w.versions.remove(0);
                }
            }
            None => {
                self.written
                    .insert(piece.name.clone(), Written::new(&piece.data, version));
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
        let digest = data_digest(data);
        if ours.digest != digest {
            return true;
        }
        match self.configs.get(name) {
            Some((version, theirs)) => !ours.versions.contains(&version) && theirs != digest,
            // Gone from a watch that has had time to see it: deleted by someone.
            None => ours.at.elapsed() > Duration::from_secs(2),
        }
    }
}
