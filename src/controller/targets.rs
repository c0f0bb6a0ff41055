//! The controller's side of upstream targets (`ApiUpstream`): reads the Secret entries and
//! ConfigMap entries the targets refer to, hands what compile needs to
//! [`compile_targets`](crate::config::targets::compile_targets), publishes the provider
//! credentials to the gateways in one Secret of the controller's namespace
//! (`<config>-target-credentials`, one entry per target, mounted into the gateway pods: the
//! gateways never call the API for it and cannot read any other Secret), and writes each
//! target's status conditions.
//!
//! There are few targets, so their references are read with one GET each rather than watched:
//! again when an ApiUpstream changes, and otherwise at most every 30 s (the periodic pass that
//! runs while targets exist), which catches a credential rotated in place.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};

use super::{MANAGER, digest64};
use crate::{
    api::{ApiUpstream, CaBundleRef, CredentialRef, merge_conditions},
    config::targets::{TargetRefs, TargetReport},
};

/// Name of the Secret the gateways mount the target credentials from.
pub fn credentials_secret(config_name: &str) -> String {
    format!("{config_name}-target-credentials")
}

/// Writes a Secret of the controller's own namespace that the gateways mount (server-side apply,
/// the controller's field manager, labelled with the configuration it belongs to), with
/// `entries` as its data.
pub(super) async fn apply_owned_secret(
    client: &Client,
    namespace: &str,
    config_name: &str,
    name: &str,
    entries: &BTreeMap<String, String>,
) -> kube::Result<()> {
    let data: BTreeMap<&String, String> = entries
        .iter()
        .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect();
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { "app.kubernetes.io/managed-by": MANAGER, crate::config::pieces::CONFIG_LABEL: config_name },
        },
        "type": "Opaque",
        "data": data,
    });
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&secret))
        .await
        .map(|_| ())
}

/// What the targets refer to, as read this pass. Credential values stay in memory only.
#[derive(Default)]
pub(super) struct Resolved {
    /// By `(namespace, name, key)`: the trimmed value, when the entry is there and not empty.
    credentials: HashMap<(String, String, String), String>,
    /// By `(namespace, name, key)`: the PEM text, or why it is not there.
    bundles: HashMap<(String, String, String), Result<String, String>>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("credentials", &self.credentials.len())
            .finish_non_exhaustive()
    }
}

fn cred_id(r: &CredentialRef) -> (String, String, String) {
    (r.namespace.clone(), r.name.clone(), r.key.clone())
}

fn bundle_id(r: &CaBundleRef) -> (String, String, String) {
    (r.namespace.clone(), r.name.clone(), r.key.clone())
}

impl TargetRefs for Resolved {
    fn ca_bundle(&self, r: &CaBundleRef) -> Result<String, String> {
        self.bundles
            .get(&bundle_id(r))
            .cloned()
            .unwrap_or_else(|| Err(format!("ConfigMap {}/{} not read", r.namespace, r.name)))
    }

    fn has_credential(&self, r: &CredentialRef) -> bool {
        self.credentials.contains_key(&cred_id(r))
    }
}

impl Resolved {
    /// Reads every Secret and ConfigMap entry the targets refer to. A missing object or entry is
    /// an answer (the target's condition says so); any other failure fails the pass, so that an
    /// API hiccup never publishes a target as if its credential were gone.
    pub(super) async fn read(
        client: &Client,
        upstreams: &[std::sync::Arc<ApiUpstream>],
    ) -> kube::Result<Self> {
        let mut out = Self::default();
        for u in upstreams {
            if let Some(r) = &u.spec.credential_ref
                && !out.credentials.contains_key(&cred_id(r))
            {
                let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
                let value = api.get_opt(&r.name).await?.and_then(|s| {
                    let bytes = s.data?.remove(&r.key)?;
                    let text = String::from_utf8(bytes.0).ok()?.trim().to_string();
                    (!text.is_empty()).then_some(text)
                });
                if let Some(v) = value {
                    out.credentials.insert(cred_id(r), v);
                }
            }
            if let Some(r) = u.spec.tls.as_ref().and_then(|t| t.ca_bundle_ref.as_ref())
                && !out.bundles.contains_key(&bundle_id(r))
            {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &r.namespace);
                let found = match api.get_opt(&r.name).await? {
                    None => Err(format!("ConfigMap {}/{} not found", r.namespace, r.name)),
                    Some(m) => m.data.and_then(|mut d| d.remove(&r.key)).ok_or_else(|| {
                        format!("ConfigMap {}/{} has no entry {:?}", r.namespace, r.name, r.key)
                    }),
                };
                out.bundles.insert(bundle_id(r), found);
            }
        }
        Ok(out)
    }

    /// The credential of each target that has one, by target name.
    pub(super) fn by_target(&self, upstreams: &[std::sync::Arc<ApiUpstream>]) -> BTreeMap<String, String> {
        upstreams
            .iter()
            .filter_map(|u| {
                let r = u.spec.credential_ref.as_ref()?;
                Some((u.name_any(), self.credentials.get(&cred_id(r))?.clone()))
            })
            .collect()
    }
}

/// What the controller last wrote for the targets, so that a pass that changes nothing writes
/// nothing.
#[derive(Debug, Default)]
pub(super) struct TargetWrites {
    /// What the targets' references held when last read: the fingerprint of the ApiUpstreams it
    /// was read for, when, and the values.
    read: Option<(u64, std::time::Instant, Resolved)>,
    credentials: Option<u64>,
    statuses: HashMap<String, u64>,
    /// The ApiTaskTypes' conditions last written, by name.
    pub(super) task_types: HashMap<String, u64>,
}

/// How long what the targets refer to is reused by passes that no ApiUpstream change brought:
/// the periodic pass that runs while targets exist comes as often.
const READ_AGAIN: std::time::Duration = std::time::Duration::from_secs(30);

impl TargetWrites {
    /// What the targets refer to: read again when an ApiUpstream changed or the last read is
    /// older than [`READ_AGAIN`], so that the passes key events bring (many, at 100,000 keys)
    /// make no calls for the targets.
    pub(super) async fn resolve(
        &mut self,
        client: &Client,
        upstreams: &[std::sync::Arc<ApiUpstream>],
    ) -> kube::Result<&Resolved> {
        let fingerprint = digest64(
            &upstreams
                .iter()
                .map(|u| (u.name_any(), serde_json::to_string(&u.spec).unwrap_or_default()))
                .collect::<Vec<_>>(),
        );
        let fresh = self
            .read
            .as_ref()
            .is_some_and(|(f, at, _)| *f == fingerprint && at.elapsed() < READ_AGAIN);
        if !fresh {
            let resolved = Resolved::read(client, upstreams).await?;
            self.read = Some((fingerprint, std::time::Instant::now(), resolved));
        }
        Ok(&self.read.as_ref().expect("read just now").2)
    }

    /// Writes the credentials Secret (server-side apply, own field manager) when its content
    /// changed. Written only once some target exists, then kept (emptied when none is left).
    pub(super) async fn credentials(
        &mut self,
        client: &Client,
        namespace: &str,
        config_name: &str,
        credentials: &BTreeMap<String, String>,
    ) -> kube::Result<()> {
        let digest = digest64(credentials);
        if self.credentials == Some(digest) || (self.credentials.is_none() && credentials.is_empty()) {
            return Ok(());
        }
        let name = credentials_secret(config_name);
        apply_owned_secret(client, namespace, config_name, &name, credentials).await?;
        // Names only: the values are credentials.
        tracing::info!(secret = name, targets = ?credentials.keys().collect::<Vec<_>>(), "target credentials published");
        self.credentials = Some(digest);
        Ok(())
    }

    /// Writes the conditions of every target whose desired status differs from what was last
    /// written, through the status subresource.
    pub(super) async fn statuses(
        &mut self,
        client: &Client,
        upstreams: &[std::sync::Arc<ApiUpstream>],
        reports: &BTreeMap<String, TargetReport>,
    ) -> kube::Result<()> {
        let api: Api<ApiUpstream> = Api::all(client.clone());
        self.statuses.retain(|name, _| reports.contains_key(name));
        for u in upstreams {
            let Some(report) = reports.get(&u.name_any()) else {
                continue;
            };
            let desired = report.conditions(u.spec.credential_ref.is_some());
            let existing = u
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            write_conditions(&api, &mut self.statuses, &**u, existing, &desired).await?;
        }
        Ok(())
    }
}

/// Writes `desired` as the conditions of `obj` (a cluster-scoped object of ours) through its
/// status subresource, server-side apply with the controller's field manager, unless `written`
/// says the same was written last for this generation. A `lastTransitionTime` moves only when a
/// condition's status flips.
pub(super) async fn write_conditions<K>(
    api: &Api<K>,
    written: &mut HashMap<String, u64>,
    obj: &K,
    existing: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    desired: &[crate::api::ConditionSpec],
) -> kube::Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.name_any();
    let generation = obj.meta().generation;
    let digest = digest64(&(format!("{desired:?}"), generation));
    if written.get(&name) == Some(&digest) {
        return Ok(());
    }
    let conditions = merge_conditions(existing, desired, generation, &Time(Timestamp::now()));
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": { "observedGeneration": generation, "conditions": conditions },
    });
    match api
        .patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
    {
        Ok(_) => {
            written.insert(name, digest);
            Ok(())
        }
        // Deleted meanwhile.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The Ready condition of each ApiTaskType: declared, or why the gateways do not take it.
pub(super) fn task_type_conditions(
    types: &[std::sync::Arc<crate::api::ApiTaskType>],
    issues: &[crate::config::tasks::TaskTypeIssue],
) -> Vec<(std::sync::Arc<crate::api::ApiTaskType>, crate::api::ConditionSpec)> {
    use crate::api::ConditionSpec;
    types
        .iter()
        .map(|t| {
            let name = t.name_any();
            let c = match issues.iter().find(|i| i.object == name) {
                Some(i) if i.reason.contains("already declared") => {
                    ConditionSpec::fail("Ready", "Duplicate", i.reason.clone())
                }
                Some(i) => ConditionSpec::fail("Ready", "Invalid", i.reason.clone()),
                None => ConditionSpec::ok(
                    "Ready",
                    "Declared",
                    format!(
                        "Keys whose plan allows tasks may submit taskType {}.",
                        t.spec.task_type
                    ),
                ),
            };
            (std::sync::Arc::clone(t), c)
        })
        .collect()
}
