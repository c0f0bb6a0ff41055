//! The controller's cache of ApiKeys: only what events, token generation and the status writer
//! read, not the objects. At 100,000 keys a reflector store of whole ApiKeys (metadata, spec,
//! status with every condition's message) took about 1.7 KB a key, most of the controller's
//! memory beside the compile index, which reads keys from the watch events themselves.
//!
//! A status is kept as what the writer compares: each condition's type, status and transition
//! time, and a digest of its reason, message and observed generation.

use std::{
    collections::HashMap,
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

/// An ApiKey's status as the writer compares it: 24 bytes a condition and 8 for the rest, where
/// the fields themselves (and a shared type name per condition) took about 250 bytes a key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlimStatus {
    /// [`rest_digest`] of `observedGeneration`, `effective` and `usage`.
    rest: u64,
    /// `conditions`, in order.
    conditions: Box<[SlimCondition]>,
}

/// A condition as the writer compares it.
#[derive(Clone, Debug, PartialEq)]
struct SlimCondition {
    /// [`condition_type`] of its type.
    type_: u8,
    /// `True` or `False`.
    status: bool,
    /// When the status last flipped, in Unix seconds (what a condition's time says).
    last_transition: i64,
    /// [`condition_digest`] of reason, message and observed generation.
    digest: u64,
}

/// Condition types seen, by number: a handful of them for 100,000 keys with four conditions
/// each. Past 254 types (written by someone else) a type is [`OTHER_TYPE`], which matches none.
fn condition_type(type_: &str) -> u8 {
    static TYPES: std::sync::Mutex<Vec<Box<str>>> = std::sync::Mutex::new(Vec::new());
    let mut types = TYPES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = types.iter().position(|t| &**t == type_) {
        return i as u8;
    }
    if types.len() >= OTHER_TYPE as usize {
        return OTHER_TYPE;
    }
    types.push(type_.into());
    (types.len() - 1) as u8
}

/// The number of a condition type beyond the bound of [`condition_type`].
const OTHER_TYPE: u8 = u8::MAX;

/// A digest of what a condition says besides its type, status and time.
pub fn condition_digest(c: &Condition) -> u64 {
    super::digest64(&(&c.reason, &c.message, c.observed_generation))
}

/// A digest of the status fields beside the conditions.
fn rest_digest(
    generation: Option<i64>,
    effective: &Option<EffectiveLimits>,
    usage: &Option<KeyUsageStatus>,
) -> u64 {
    super::digest64(&(
        generation,
        effective
            .as_ref()
            .map(|e| (e.max_concurrent_requests, e.requests_per_second, e.burst, e.per)),
        usage.map(|u| {
            (
                u.requests_last_minute,
                u.refused_last_minute,
                u.tasks_queued,
                u.tasks_running,
            )
        }),
    ))
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
        self.rest == rest_digest(generation, effective, usage)
            && self.conditions.len() == conditions.len()
            && self.conditions.iter().zip(conditions).all(|(s, c)| {
                s.type_ != OTHER_TYPE
                    && s.type_ == condition_type(&c.type_)
                    && s.status == (c.status == "True")
                    && s.last_transition == c.last_transition_time.0.as_second()
                    && s.digest == condition_digest(c)
            })
    }

    /// The transition time of the condition `type_` if its status is `status`: the time a
    /// condition keeps while its status does not flip.
    pub fn kept_time(&self, type_: &str, status: bool) -> Option<Time> {
        let t = condition_type(type_);
        self.conditions
            .iter()
            .find(|c| c.type_ != OTHER_TYPE && c.type_ == t && c.status == status)
            .and_then(|c| k8s_openapi::jiff::Timestamp::from_second(c.last_transition).ok())
            .map(Time)
    }
}

impl KeyMeta {
    /// What the controller keeps of `key`.
    pub fn of(key: &ApiKey) -> Self {
        let status = key
            .status
            .as_ref()
            .map_or_else(SlimStatus::default, |s| SlimStatus {
                rest: rest_digest(s.observed_generation, &s.effective, &s.usage),
                conditions: s
                    .conditions
                    .iter()
                    .map(|c| SlimCondition {
                        type_: condition_type(&c.type_),
                        status: c.status == "True",
                        last_transition: c.last_transition_time.0.as_second(),
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
