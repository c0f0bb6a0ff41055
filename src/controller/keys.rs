//! The controller's cache of ApiKeys: only what events, token generation and the status writer
//! read, not the objects. At 100,000 keys a reflector store of whole ApiKeys (metadata, spec,
//! status with every condition's message) took about 1.7 KB a key, most of the controller's
//! memory beside the compile index, which reads keys from the watch events themselves.
//!
//! A status is kept as what the writer compares: each condition's type, status and transition
//! time, and a digest of its reason, message and observed generation.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, RwLock},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::api::{ApiKey, EffectiveLimits, KeyUsageStatus};

/// What the controller keeps of one ApiKey.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyMeta {
    /// `metadata.uid`.
    pub uid: Box<str>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<Box<str>>,
    /// Being deleted.
    pub deleting: bool,
    /// Whether a token Secret is generated when none exists ([`ApiKey::default_token_ref`]);
    /// `false`: the key names its own Secret (`spec.secretRef`), which is never generated.
    pub generates: bool,
    /// The status as the object shows it.
    pub status: SlimStatus,
}

/// An ApiKey's status as the writer compares it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimStatus {
    /// `observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `effective`.
    pub effective: Option<EffectiveLimits>,
    /// `usage`.
    pub usage: Option<KeyUsageStatus>,
    /// `conditions`, in order.
    pub conditions: Vec<SlimCondition>,
}

/// A condition as the writer compares it.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimCondition {
    /// Type, one allocation per type shared by every key ([`condition_type`]).
    pub type_: Arc<str>,
    /// `True` or `False`.
    pub status: bool,
    /// When the status last flipped.
    pub last_transition_time: Time,
    /// [`condition_digest`] of reason, message and observed generation.
    pub digest: u64,
}

/// `type_` as one shared allocation: there are a handful of condition types and 100,000 keys
/// with four conditions each.
pub fn condition_type(type_: &str) -> Arc<str> {
    static TYPES: std::sync::Mutex<Vec<Arc<str>>> = std::sync::Mutex::new(Vec::new());
    let mut types = TYPES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = types.iter().find(|t| &***t == type_) {
        return Arc::clone(t);
    }
    let t: Arc<str> = type_.into();
    // Bounded: a status someone else wrote could carry any number of types.
    if types.len() < 64 {
        types.push(Arc::clone(&t));
    }
    t
}

/// A digest of what a condition says besides its type, status and time.
pub fn condition_digest(c: &Condition) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&c.reason, &c.message, c.observed_generation).hash(&mut h);
    h.finish()
}

impl SlimStatus {
    /// Whether the object shows exactly `conditions` (as merged for writing) and the rest.
    pub fn shows(
        &self,
        generation: Option<i64>,
        effective: &Option<EffectiveLimits>,
        usage: &Option<KeyUsageStatus>,
        conditions: &[Condition],
    ) -> bool {
        self.observed_generation == generation
            && self.effective == *effective
            && self.usage == *usage
            && self.conditions.len() == conditions.len()
            && self.conditions.iter().zip(conditions).all(|(s, c)| {
                *s.type_ == *c.type_
                    && s.status == (c.status == "True")
                    && s.last_transition_time == c.last_transition_time
                    && s.digest == condition_digest(c)
            })
    }

    /// The transition time of the condition `type_` if its status is `status`: the time a
    /// condition keeps while its status does not flip.
    pub fn kept_time(&self, type_: &str, status: bool) -> Option<&Time> {
        self.conditions
            .iter()
            .find(|c| &*c.type_ == type_ && c.status == status)
            .map(|c| &c.last_transition_time)
    }
}

impl KeyMeta {
    /// What the controller keeps of `key`.
    pub fn of(key: &ApiKey) -> Self {
        let status = key
            .status
            .as_ref()
            .map_or_else(SlimStatus::default, |s| SlimStatus {
                observed_generation: s.observed_generation,
                effective: s.effective.clone(),
                usage: s.usage,
                conditions: s
                    .conditions
                    .iter()
                    .map(|c| SlimCondition {
                        type_: condition_type(&c.type_),
                        status: c.status == "True",
                        last_transition_time: c.last_transition_time.clone(),
                        digest: condition_digest(c),
                    })
                    .collect(),
            });
        Self {
            uid: key.uid().unwrap_or_default().into(),
            generation: key.meta().generation,
            resource_version: key.resource_version().map(Into::into),
            deleting: key.meta().deletion_timestamp.is_some(),
            generates: key.spec.secret_ref.is_none(),
            status,
        }
    }

    /// The reference events about the key name.
    pub fn object_ref(&self, namespace: &str, name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(ApiKey::api_version(&()).into_owned()),
            kind: Some(ApiKey::kind(&()).into_owned()),
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            uid: Some(self.uid.to_string()),
            resource_version: self.resource_version.as_deref().map(str::to_string),
            ..Default::default()
        }
    }

    /// The owner reference of a Secret generated for the key: deleted with it.
    pub fn owner_ref(&self, name: &str) -> OwnerReference {
        OwnerReference {
            api_version: ApiKey::api_version(&()).into_owned(),
            kind: ApiKey::kind(&()).into_owned(),
            name: name.to_string(),
            uid: self.uid.to_string(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }
}

/// The cache, shared by the reconciler and the status writer; filled by the keys' watch.
#[derive(Clone, Debug)]
pub struct KeyStore {
    map: Arc<RwLock<HashMap<Box<str>, Arc<KeyMeta>>>>,
    ready: watch::Receiver<bool>,
}

/// The watch's side of a [`KeyStore`].
#[derive(Debug)]
pub struct KeyStoreWriter {
    map: Arc<RwLock<HashMap<Box<str>, Arc<KeyMeta>>>>,
    ready: watch::Sender<bool>,
    /// Keys seen since a relist began: the store keeps serving the old set until it ends.
    listing: Option<HashMap<Box<str>, Arc<KeyMeta>>>,
}

/// An empty store and its writer.
pub fn key_store() -> (KeyStore, KeyStoreWriter) {
    let map = Arc::default();
    let (tx, rx) = watch::channel(false);
    (
        KeyStore {
            map: Arc::clone(&map),
            ready: rx,
        },
        KeyStoreWriter {
            map,
            ready: tx,
            listing: None,
        },
    )
}

impl KeyStore {
    /// The key of id `namespace/name`, if it exists.
    pub fn get(&self, id: &str) -> Option<Arc<KeyMeta>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Waits until the first list of the keys has ended.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }
}

impl KeyStoreWriter {
    /// Applies one watch event.
    pub fn apply(&mut self, ev: &kube::runtime::watcher::Event<ApiKey>) {
        use kube::runtime::watcher::Event;
        let map = || self.map.write().unwrap_or_else(|e| e.into_inner());
        match ev {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(k) => {
                let meta = Arc::new(KeyMeta::of(k));
                match self.listing.as_mut() {
                    Some(l) => {
                        l.insert(k.id().into(), meta);
                    }
                    None => {
                        map().insert(k.id().into(), meta);
                    }
                }
            }
            Event::InitDone => {
                if let Some(l) = self.listing.take() {
                    *map() = l;
                }
                self.ready.send_replace(true);
            }
            Event::Apply(k) => {
                map().insert(k.id().into(), Arc::new(KeyMeta::of(k)));
            }
            Event::Delete(k) => {
                map().remove(k.id().as_str());
            }
        }
    }
}
