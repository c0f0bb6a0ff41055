//! Webhook signing secrets for async tasks: the controller generates one (`whsec_` and 32 random
//! bytes, base64) into the token Secret of each key whose plan allows tasks, when that Secret has
//! none (never overwriting one), and publishes every key's signing secret to the gateways in
//! Secrets of its own namespace, `<config>-webhook-secrets-<n>` (one entry per key,
//! `<namespace>.<name>`), which the chart mounts into the gateway pods. The gateways' RBAC reads
//! no Secret; the token Secrets stay unreadable to them.
//!
//! Keys are spread over [`SHARDS`] Secrets by a hash of their id, so that one Secret stays far
//! below the API server's 1 MiB (about 11,000 keys fit in one) and a change rewrites one shard.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use super::digest64;
use crate::{config::incremental::Incremental, standalone::WEBHOOK_SECRET_ENTRY};

/// Secrets the signing secrets are spread over (the chart mounts this many).
pub const SHARDS: usize = 16;
/// Most token Secrets given a signing secret in one pass: the watch events of those writes bring
/// the next pass, so a first install of 100,000 keys proceeds in steps instead of one burst.
const GENERATE_PER_PASS: usize = 200;
/// Field manager of the generated entries: distinct from the controller's, and applied without
/// force, so that an entry someone else wrote is a conflict, never an overwrite.
const GENERATOR: &str = "slotgate-webhook-secrets";

/// Name of shard `i` of the published signing secrets.
pub fn shard_name(config_name: &str, i: usize) -> String {
    format!("{config_name}-webhook-secrets-{i}")
}

/// The entry of a key's signing secret in a published shard: a key id `namespace/name` as
/// `namespace.name` (a namespace holds no `.`, so the first one splits it back).
pub fn entry_name(key_id: &str) -> String {
    key_id.replacen('/', ".", 1)
}

/// A new signing secret, as the Standard Webhooks spec writes them.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn shard_of(key_id: &str) -> usize {
    (digest64(key_id) % SHARDS as u64) as usize
}

/// Gives a signing secret to the token Secret of each key taken from `pending` whose plan allows
/// tasks and whose Secret exists without one, until [`GENERATE_PER_PASS`] were written; the keys
/// not looked at stay in `pending` for the next pass. Returns how many were written. `known`
/// holds the signing secrets the watch has seen, by Secret.
pub(super) async fn generate_missing(
    client: &Client,
    index: &Incremental,
    pending: &mut std::collections::VecDeque<crate::config::incremental::KeyId>,
    known: &HashMap<(String, String), String>,
) -> kube::Result<usize> {
    let mut written = 0;
    while written < GENERATE_PER_PASS {
        let Some(id) = pending.pop_front() else {
            break;
        };
        let id = &id;
        let Some(entry) = index.entry(id) else {
            continue;
        };
        if index.plans().get(&entry.plan).is_none_or(|p| p.tasks.is_none()) {
            continue;
        }
        let Some((ns, secret)) = index.token_secret(id) else {
            continue;
        };
        if known.contains_key(&(ns.to_string(), secret.name.clone()))
            || index.token(ns, &secret.name, &secret.key) == crate::config::TokenState::SecretNotFound
        {
            continue;
        }
        let patch = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": secret.name, "namespace": ns },
            "data": { WEBHOOK_SECRET_ENTRY: base64::engine::general_purpose::STANDARD.encode(generate_secret()) },
        });
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        match api
            .patch(
                &secret.name,
                &PatchParams::apply(GENERATOR),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                written += 1;
                tracing::info!(key = %id, secret = %format!("{ns}/{}", secret.name), "webhook signing secret generated");
            }
            // Someone else owns the entry, or the Secret went: leave it alone.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The published shards as last written, so that a pass that changes nothing writes nothing.
#[derive(Debug, Default)]
pub(super) struct WebhookWrites {
    shards: HashMap<usize, u64>,
}

impl WebhookWrites {
    /// Writes each shard whose content differs from what was last written. Shards are written
    /// once any key has a signing secret, then kept (emptied when none is left).
    pub(super) async fn publish(
        &mut self,
        client: &Client,
        namespace: &str,
        config_name: &str,
        secrets: &BTreeMap<String, String>,
    ) -> kube::Result<()> {
        if secrets.is_empty() && self.shards.is_empty() {
            return Ok(());
        }
        let mut by_shard: Vec<BTreeMap<String, String>> = vec![BTreeMap::new(); SHARDS];
        for (id, secret) in secrets {
            by_shard[shard_of(id)].insert(entry_name(id), secret.clone());
        }
        for (i, data) in by_shard.into_iter().enumerate() {
            let digest = digest64(&data);
            if self.shards.get(&i) == Some(&digest) {
                continue;
            }
            let name = shard_name(config_name, i);
            super::targets::apply_owned_secret(client, namespace, config_name, &name, &data).await?;
            tracing::debug!(
                secret = name,
                keys = data.len(),
                "webhook signing secrets published"
            );
            self.shards.insert(i, digest);
        }
        Ok(())
    }
}
