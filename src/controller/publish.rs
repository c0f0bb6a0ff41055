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

    /// Writes the objects whose data changed (in order: shards, then the index), then removes
    /// objects no longer part of the configuration.
    pub(super) async fn publish(&mut self, all: &[Piece], version: u64, keys: usize) -> kube::Result<()> {
        let mut writes = 0;
        for Piece { name, entry, data } in all {
            if !self.needs_write(name, data) {
                continue;
            }
            let cm = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": name, "labels": { CONFIG_LABEL: self.config_name } },
                "data": { *entry: data },
            });
            let done = self
                .api
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
