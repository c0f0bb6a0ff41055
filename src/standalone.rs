//! Standalone use without a cluster: a folder of the manifests `kubectl apply` takes, read and
//! compiled the way the controller would.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use kube::ResourceExt;

use crate::{
    api::{
        ApiKey, ApiPlan, ApiTaskType, ApiUpstream, CaBundleRef, CredentialRef,
        manifest::{Manifest, ManifestError, parse_manifests},
    },
    config::{
        Compiled, GatewayConfig, TokenHashes, compile_all,
        targets::{TargetRefs, compile_targets},
        tasks::compile_task_types,
    },
};

/// Everything read from a folder of manifests. Raw tokens are hashed as they are read.
#[derive(Debug, Default)]
pub struct Folder {
    /// ApiPlans found.
    pub plans: Vec<ApiPlan>,
    /// ApiKeys found.
    pub keys: Vec<ApiKey>,
    /// Hashes of the tokens in the Secrets found.
    pub tokens: TokenHashes,
    /// Raw-token prefixes by key id, for display only (`sg_demo_t…`).
    pub token_hints: Vec<(String, String)>,
    /// Objects of other kinds, as `file:line: kind`.
    pub skipped: Vec<String>,
    /// ApiTaskTypes found.
    pub task_types: Vec<ApiTaskType>,
    /// Webhook signing secrets (`whsec_...`) by key id, from the `webhook-secret` entry of each
    /// key's token Secret. Never written into the compiled configuration.
    pub webhook_secrets: BTreeMap<String, String>,
    /// ApiUpstreams found.
    pub upstreams: Vec<ApiUpstream>,
    /// ConfigMaps' data by `(namespace, name)`: where targets' CA bundles come from.
    pub config_maps: HashMap<(String, String), BTreeMap<String, String>>,
    /// Secrets that ApiUpstreams take credentials from, by `(namespace, name)`. Never compiled
    /// into the configuration and never printed.
    credentials: HashMap<(String, String), BTreeMap<String, String>>,
}

impl Folder {
    /// Compiles what was read, as the controller would.
    pub fn compile(&self, previous: Option<&GatewayConfig>) -> Compiled {
        let (task_types, _) = compile_task_types(&self.task_types);
        let (targets, _) = compile_targets(&self.upstreams, self);
        compile_all(
            &self.plans,
            &self.keys,
            &self.tokens,
            task_types,
            targets,
            previous,
        )
    }

    /// What is wrong with the task types read, one line each (`ApiTaskType NAME: reason`).
    pub fn task_type_warnings(&self) -> Vec<String> {
        compile_task_types(&self.task_types)
            .1
            .into_iter()
            .map(|i| format!("ApiTaskType {}: {}", i.object, i.reason))
            .collect()
    }
}

/// The entry of a key's token Secret that holds its webhook signing secret.
pub const WEBHOOK_SECRET_ENTRY: &str = "webhook-secret";

/// Why a folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The folder or a file in it could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// The YAML files of a folder (not recursive), sorted, so reading is deterministic.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let io = |source| FolderError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every YAML file of `dir`. Any invalid manifest refuses the whole folder, naming the file
/// and line, so the caller keeps its last good state.
pub fn load_dir(dir: &Path) -> Result<Folder, FolderError> {
    let mut folder = Folder::default();
    let mut webhook_secrets: HashMap<(String, String), String> = HashMap::new();
    let mut secrets = Vec::new();
    for path in yaml_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| FolderError::Io {
            path: path.clone(),
            source,
        })?;
        let label = path.display().to_string();
        for manifest in parse_manifests(&label, &text)? {
            match manifest {
                Manifest::Plan(p) => folder.plans.push(p),
                Manifest::Key(k) => folder.keys.push(k),
                Manifest::TaskType(t) => folder.task_types.push(t),
                Manifest::Upstream(u) => folder.upstreams.push(u),
                Manifest::ConfigMap(m) => {
                    let id = (m.namespace().unwrap_or_default(), m.name_any());
                    folder.config_maps.insert(id, m.data.unwrap_or_default());
                }
                Manifest::Secret(s) => secrets.push(s),
                Manifest::Skipped { kind, line } => {
                    folder.skipped.push(format!("{label}:{line}: {kind}"));
                }
            }
        }
    }
    // Read once every upstream is known: a Secret holding a provider credential is no token
    // (it must not admit requests), and its value is never shown, not even as a hint.
    let credential_secrets: std::collections::HashSet<(String, String)> = folder
        .upstreams
        .iter()
        .filter_map(|u| u.spec.credential_ref.as_ref())
        .map(|c| (c.namespace.clone(), c.name.clone()))
        .collect();
    for s in secrets {
        let ns = s.namespace().unwrap_or_default();
        let name = s.name_any();
        let mut data = s.data.unwrap_or_default();
        if credential_secrets.contains(&(ns.clone(), name.clone())) {
            folder.credentials.insert(
                (ns, name),
                data.into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim().to_string()))
                    .collect(),
            );
            continue;
        }
        // The signing secret is no token: it must not admit requests.
        if let Some(secret) = data.remove(WEBHOOK_SECRET_ENTRY) {
            let text = String::from_utf8_lossy(&secret.0).trim().to_string();
            webhook_secrets.insert((ns.clone(), name.clone()), text);
        }
        for (entry, bytes) in &data {
            let hint: String = String::from_utf8_lossy(&bytes.0).trim().chars().take(9).collect();
            folder
                .token_hints
                .push((format!("{ns}/{name}/{entry}"), format!("{hint}…")));
        }
        folder
            .tokens
            .insert_secret(&ns, &name, data.iter().map(|(k, v)| (k.as_str(), v.0.as_slice())));
    }
    for key in &folder.keys {
        let ns = key.namespace().unwrap_or_default();
        let secret = key.token_ref();
        if let Some(s) = webhook_secrets.get(&(ns.clone(), secret.name.clone())) {
            folder
                .webhook_secrets
                .insert(format!("{ns}/{}", key.name_any()), s.clone());
        }
    }
    Ok(folder)
}

impl TargetRefs for Folder {
    fn ca_bundle(&self, r: &CaBundleRef) -> Result<String, String> {
        let map = self
            .config_maps
            .get(&(r.namespace.clone(), r.name.clone()))
            .ok_or_else(|| format!("ConfigMap {}/{} not found", r.namespace, r.name))?;
        map.get(&r.key)
            .cloned()
            .ok_or_else(|| format!("ConfigMap {}/{} has no entry {:?}", r.namespace, r.name, r.key))
    }

    fn has_credential(&self, r: &CredentialRef) -> bool {
        self.credential(r).is_some()
    }
}

impl Folder {
    fn credential(&self, r: &CredentialRef) -> Option<&str> {
        self.credentials
            .get(&(r.namespace.clone(), r.name.clone()))
            .and_then(|d| d.get(&r.key))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The provider credentials of the targets that have one, by target name: what the
    /// controller would publish to the gateways in its credentials Secret.
    pub fn target_credentials(&self) -> BTreeMap<String, String> {
        self.upstreams
            .iter()
            .filter_map(|u| {
                let c = self.credential(u.spec.credential_ref.as_ref()?)?;
                Some((u.name_any(), c.to_string()))
            })
            .collect()
    }

    /// What is wrong with the upstream targets read, one line each (`ApiUpstream NAME: reason`).
    pub fn target_warnings(&self) -> Vec<String> {
        let (_, reports) = compile_targets(&self.upstreams, self);
        let mut out = Vec::new();
        for (name, r) in reports {
            let reasons = r
                .invalid
                .into_iter()
                .chain(
                    r.credential_missing
                        .map(|m| format!("credential: {m}; its paths answer 503")),
                )
                .chain(match r.tls {
                    Ok(warning) => warning,
                    Err(e) => Some(format!("tls: {e}")),
                });
            out.extend(reasons.map(|m| format!("ApiUpstream {name}: {m}")));
        }
        out
    }
}

fn limits_text(
    slots: Option<u32>,
    rps: Option<u32>,
    burst: Option<u32>,
    per: Option<crate::api::BucketScope>,
) -> String {
    let slots = slots.map_or("unlimited slots".to_string(), |s| format!("{s} slots"));
    let rate = match (rps, burst) {
        (Some(r), Some(b)) => {
            let per = match per {
                Some(crate::api::BucketScope::Endpoint) => " per endpoint",
                _ => "",
            };
            format!("{r} req/s (burst {b}){per}")
        }
        _ => "no rate limit".to_string(),
    };
    format!("{slots}, {rate}")
}

impl Folder {
    /// The table `slotgate up` prints at start: plans, keys with their effective limits and a
    /// masked token, and the conditions the controller would write, so a bad manifest shows at once.
    pub fn report(&self, compiled: &Compiled) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "PLANS");
        let _ = writeln!(
            out,
            "  {:<14} {:<18} {:>5}  {:<44} READY",
            "NAME", "DISPLAY", "KEYS", "LIMITS"
        );
        for plan in &self.plans {
            let name = plan.name_any();
            let s = &plan.spec;
            let limits = limits_text(
                s.concurrency.as_ref().map(|c| c.max_concurrent_requests),
                s.rate_limit.as_ref().map(|r| r.requests_per_second),
                s.rate_limit.as_ref().map(|r| r.effective_burst()),
                s.rate_limit.as_ref().map(|r| r.per),
            );
            let report = compiled.plans.get(&name);
            let ready = report
                .and_then(|r| r.conditions.iter().find(|c| c.type_ == "Ready"))
                .map_or("-".to_string(), |c| {
                    if c.status {
                        "True".to_string()
                    } else {
                        format!("False {}: {}", c.reason, c.message)
                    }
                });
            let _ = writeln!(
                out,
                "  {:<14} {:<18} {:>5}  {:<44} {ready}",
                name,
                s.display_name.as_deref().unwrap_or("-"),
                report.map_or(0, |r| r.keys),
                limits
            );
        }
        let _ = writeln!(out, "KEYS");
        let _ = writeln!(
            out,
            "  {:<26} {:<12} {:<13} {:<44} READY",
            "KEY", "PLAN", "TOKEN", "EFFECTIVE LIMITS"
        );
        for key in &self.keys {
            let id = key.id();
            let secret = key.token_ref();
            let hint = self
                .token_hints
                .iter()
                .find(|(k, _)| {
                    *k == format!(
                        "{}/{}/{}",
                        key.namespace().unwrap_or_default(),
                        secret.name,
                        secret.key
                    )
                })
                .map_or("(none)", |(_, h)| h.as_str());
            let report = compiled.keys.get(&id);
            let limits = report
                .and_then(|r| r.effective.as_ref())
                .map_or("-".to_string(), |e| {
                    limits_text(e.max_concurrent_requests, e.requests_per_second, e.burst, e.per)
                });
            let mut ready = "-".to_string();
            if let Some(r) = report {
                ready = match r.conditions.iter().find(|c| !c.status) {
                    None => "True".to_string(),
                    Some(c) => format!("False {}={}: {}", c.type_, c.reason, c.message),
                };
            }
            let _ = writeln!(
                out,
                "  {:<26} {:<12} {:<13} {:<44} {ready}",
                id, key.spec.plan, hint, limits
            );
        }
        if !self.upstreams.is_empty() {
            let (targets, reports) = compile_targets(&self.upstreams, self);
            let _ = writeln!(out, "TARGETS");
            let _ = writeln!(
                out,
                "  {:<18} {:<36} {:<24} {:>5}  READY",
                "NAME", "URL", "PATHS", "SLOTS"
            );
            for (name, report) in &reports {
                let t = targets.get(name);
                let conditions = report.conditions(t.is_some_and(|t| t.credential.is_some()));
                let ready = match conditions.iter().find(|c| !c.status) {
                    Some(c) => format!("False {}: {}", c.reason, c.message),
                    None => match &report.tls {
                        Ok(Some(warning)) => format!("True ({warning})"),
                        _ => "True".to_string(),
                    },
                };
                let _ = writeln!(
                    out,
                    "  {:<18} {:<36} {:<24} {:>5}  {ready}",
                    name,
                    t.map_or("-".to_string(), |t| t.url()),
                    t.map_or("-".to_string(), |t| t.paths.join(",")),
                    t.and_then(|t| t.concurrency)
                        .map_or("-".to_string(), |c| c.to_string()),
                );
            }
        }
        out
    }
}

/// One line per change between two configurations, as `slotgate up` reports an edit
/// (`plan startup: 25 -> 50 slots`).
pub fn describe_changes(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let mut lines = Vec::new();
    let slots = |p: &crate::config::CompiledPlan| {
        p.concurrency
            .as_ref()
            .map_or("unlimited".to_string(), |c| c.max.to_string())
    };
    let rate = |p: &crate::config::CompiledPlan| {
        p.rate_limit.as_ref().map_or("unlimited".to_string(), |r| {
            format!("{} req/s burst {}", r.per_second, r.burst)
        })
    };
    for (name, plan) in &new.plans {
        match old.plans.get(name) {
            None => lines.push(format!(
                "plan {name}: added ({} slots, {})",
                slots(plan),
                rate(plan)
            )),
            Some(before) if before != plan => {
                let mut parts = Vec::new();
                if slots(before) != slots(plan) {
                    parts.push(format!("{} -> {} slots", slots(before), slots(plan)));
                }
                if rate(before) != rate(plan) {
                    parts.push(format!("{} -> {}", rate(before), rate(plan)));
                }
                if parts.is_empty() {
                    parts.push("paths changed".into());
                }
                lines.push(format!("plan {name}: {}", parts.join(", ")));
            }
            Some(_) => {}
        }
    }
    for name in old.plans.keys().filter(|n| !new.plans.contains_key(*n)) {
        lines.push(format!("plan {name}: removed"));
    }
    let ids = |c: &GatewayConfig| -> std::collections::BTreeMap<String, crate::config::CompiledKey> {
        c.keys.values().map(|k| (k.id.to_string(), k.clone())).collect()
    };
    let (before, after) = (ids(old), ids(new));
    for (id, key) in &after {
        match before.get(id) {
            None => lines.push(format!("key {id}: admitted on plan {}", key.plan)),
            Some(b) if b.plan != key.plan => lines.push(format!("key {id}: plan {} -> {}", b.plan, key.plan)),
            Some(b) if b != key => lines.push(format!("key {id}: updated")),
            Some(_) => {}
        }
    }
    for id in before.keys().filter(|id| !after.contains_key(*id)) {
        lines.push(format!("key {id}: no longer admitted"));
    }
    lines
}
