//! What the controller knows of the cluster, kept by watches: reflector stores for what statuses,
//! events and finalizers read (plans, keys, the gateways' reports, the configuration objects),
//! and a feed of key and token Secret events into the incremental compile
//! ([`Incremental`](crate::config::incremental::Incremental)), which is where compile reads them.
//! Token Secrets are not stored at all: the feed carries the SHA-256 of each entry.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Notify, mpsc};

use super::{TOKEN_LABEL, Tasks};
use crate::{
    api::ApiKey,
    config::{
        incremental::{Incremental, KeyInput},
        pieces::{CONFIG_LABEL, REPORT_LABEL},
    },
};

/// The live view of the cluster statuses, events and finalizers are decided from.
#[derive(Clone)]
pub(super) struct Stores {
    pub(super) plans: Store<crate::api::ApiPlan>,
    /// Upstream targets: few objects, kept whole.
    pub(super) upstreams: Store<crate::api::ApiUpstream>,
    /// Async task types: few objects, kept whole.
    pub(super) task_types: Store<crate::api::ApiTaskType>,
    /// What events, token generation and the status writer read of each key (not the objects).
    pub(super) keys: super::keys::KeyStore,
    pub(super) reports: Store<Lease>,
    /// The configuration objects as they are, to repair one that was edited or deleted.
    pub(super) configs: super::publish::ConfigSeen,
}

/// One event of the keys or token Secrets, as the incremental compile takes it.
#[derive(Debug)]
pub(super) enum Change {
    Key(crate::config::incremental::KeyInput),
    KeyGone(String),
    /// A (re)list of the keys ended: no other key exists.
    /// Keys by [`id_hash`] of their id: a relist of 100,000 keys holds no second copy of the ids.
    KeysListed(HashSet<u64>),
    Secret {
        namespace: String,
        name: String,
        /// SHA-256 (hex) of each entry; `None`: blank.
        entries: HashMap<String, Option<String>>,
        /// The `webhook-secret` entry, the one raw value kept: the gateways need it to sign.
        webhook: Option<String>,
    },
    SecretGone {
        namespace: String,
        name: String,
    },
    /// A (re)list of the token Secrets ended: no other one exists.
    /// By [`id_hash`] of `(namespace, name)`.
    SecretsListed(HashSet<u64>),
}

/// Applies one event to the index.
pub(super) fn apply(index: &mut Incremental, change: Change) {
    match change {
        Change::Key(k) => index.apply_key_input(k),
        Change::KeyGone(id) => index.remove_key(&id),
        Change::KeysListed(ids) => {
            let gone: Vec<String> = index
                .key_ids()
                .filter(|id| !ids.contains(&id_hash(*id)))
                .map(str::to_string)
                .collect();
            for id in gone {
                index.remove_key(&id);
            }
        }
        Change::Secret {
            namespace,
            name,
            entries,
            ..
        } => index.apply_secret(&namespace, &name, entries),
        Change::SecretGone { namespace, name } => index.remove_secret(&namespace, &name),
        Change::SecretsListed(ids) => {
            for (ns, name) in index.secret_ids() {
                if !ids.contains(&id_hash(&(&ns, &name))) {
                    index.remove_secret(&ns, &name);
                }
            }
        }
    }
}

/// Starts the watches; each change of what compile or the statuses read wakes `notify` (reports
/// only `reports_changed`). Key and Secret events go to the returned feed.
pub(super) fn reflect(
    client: &Client,
    ns: &str,
    name: &str,
    notify: Arc<Notify>,
    reports_changed: Arc<Notify>,
    tasks: &mut Tasks,
) -> (Stores, mpsc::UnboundedReceiver<Change>) {
    let (feed, changes) = mpsc::unbounded_channel();
    let key_feed = feed.clone();
    let (keys, mut key_writer) = super::keys::key_store();
    let mut configs = super::publish::ConfigSeen::default();
    let stores = Stores {
        plans: reflected(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default(),
            vec![Arc::clone(&notify)],
            Some(|p: &crate::api::ApiPlan| spec_fingerprint(p.meta(), &p.spec)),
        ),
        upstreams: reflected(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default(),
            vec![Arc::clone(&notify)],
            Some(|u: &crate::api::ApiUpstream| spec_fingerprint(u.meta(), &u.spec)),
        ),
        task_types: reflected(
            tasks,
            Api::all(client.clone()),
            watcher::Config::default(),
            vec![Arc::clone(&notify)],
            Some(|t: &crate::api::ApiTaskType| spec_fingerprint(t.meta(), &t.spec)),
        ),
        keys,
        reports: reflected(
            tasks,
            Api::namespaced(client.clone(), ns),
            watcher::Config::default().labels(&format!("{REPORT_LABEL}={name}")),
            vec![reports_changed],
            None,
        ),
        configs: configs.clone(),
    };
    spawn(
        tasks,
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        watcher::Config::default().labels(&format!("{CONFIG_LABEL}={name}")),
        vec![Arc::clone(&notify)],
        None,
        move |ev| configs.apply(ev),
        None,
    );
    spawn(
        tasks,
        Api::<ApiKey>::all(client.clone()),
        watcher::Config::default(),
        vec![Arc::clone(&notify)],
        Some(|k: &ApiKey| spec_fingerprint(k.meta(), &k.spec)),
        move |ev| key_writer.apply(ev),
        Some(Box::new(KeyFeed {
            feed: key_feed,
            listing: None,
        })),
    );
    tasks.0.push(tokio::spawn(watch_secrets(
        Api::all(client.clone()),
        feed,
        notify,
    )));
    (stores, changes)
}

/// Forwards a reflector's events somewhere else too (the keys' to the compile feed).
trait Forward<K>: Send {
    /// `changed`: what compile reads of the object differs from the last event about it.
    fn forward(&mut self, ev: &watcher::Event<K>, changed: bool);
}

struct KeyFeed {
    feed: mpsc::UnboundedSender<Change>,
    /// Ids seen since a relist began.
    listing: Option<HashSet<u64>>,
}

impl Forward<ApiKey> for KeyFeed {
    fn forward(&mut self, ev: &watcher::Event<ApiKey>, changed: bool) {
        let change = match ev {
            watcher::Event::Init => {
                self.listing = Some(HashSet::new());
                return;
            }
            watcher::Event::InitApply(k) => {
                if let Some(l) = self.listing.as_mut() {
                    l.insert(id_hash(k.id().as_str()));
                }
                if !changed {
                    return;
                }
                Change::Key(KeyInput::of(k))
            }
            watcher::Event::InitDone => Change::KeysListed(self.listing.take().unwrap_or_default()),
            watcher::Event::Apply(k) if changed => Change::Key(KeyInput::of(k)),
            watcher::Event::Apply(_) => return,
            watcher::Event::Delete(k) => Change::KeyGone(k.id()),
        };
        let _ = self.feed.send(change);
    }
}

/// What of an object the compile or the statuses depend on: a change elsewhere (a status written
/// by this controller, a heartbeat) wakes nobody. `None`: every change matters.
type Relevant<K> = Option<fn(&K) -> u64>;

/// What a watched kind is.
trait Watched:
    Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// [`spawn`] into a reflector store of the objects (managed fields and kubectl's copy stripped).
fn reflected<K>(
    tasks: &mut Tasks,
    api: Api<K>,
    cfg: watcher::Config,
    wake: Vec<Arc<Notify>>,
    relevant: Relevant<K>,
) -> Store<K>
where
    K: Watched,
{
    let (reader, mut writer) = reflector::store();
    spawn(
        tasks,
        api,
        cfg,
        wake,
        relevant,
        move |ev| writer.apply_watcher_event(ev),
        None,
    );
    reader
}

/// Watches `api` (with the shared bounded backoff), hands every event to `store`, then to
/// `forward`, and wakes `wake` when what `relevant` reads changed.
fn spawn<K>(
    tasks: &mut Tasks,
    api: Api<K>,
    cfg: watcher::Config,
    wake: Vec<Arc<Notify>>,
    relevant: Relevant<K>,
    mut store: impl FnMut(&watcher::Event<K>) + Send + 'static,
    mut forward: Option<Box<dyn Forward<K>>>,
) where
    K: Watched,
{
    let stream = watcher(api, cfg).modify(strip).backoff(crate::watch_backoff());
    tasks.0.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut down = false;
        // By a hash of the uid, not the uid: 16 bytes a key instead of about 90.
        let mut seen: HashMap<u64, u64> = HashMap::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    down = false;
                    store(&ev);
                    let changed = match (&ev, relevant) {
                        (watcher::Event::Apply(o) | watcher::Event::InitApply(o), Some(f)) => {
                            let uid = id_hash(o.meta().uid.as_deref().unwrap_or_default());
                            seen.insert(uid, f(o)) != Some(f(o))
                        }
                        (watcher::Event::Delete(o), Some(_)) => {
                            seen.remove(&id_hash(o.meta().uid.as_deref().unwrap_or_default()));
                            true
                        }
                        (watcher::Event::Init | watcher::Event::InitApply(_), None) => false,
                        _ => true,
                    };
                    if let Some(f) = forward.as_mut() {
                        f.forward(&ev, changed);
                    }
                    if changed {
                        for w in &wake {
                            w.notify_one();
                        }
                    }
                }
                Err(e) if !down => {
                    tracing::warn!(error = %e, "watch failed; retrying with backoff");
                    down = true;
                }
                Err(_) => {}
            }
        }
    }));
}

/// Watches the token Secrets into the feed, as digests: the raw tokens are read from the watch,
/// hashed once per Secret version, and never held.
async fn watch_secrets(api: Api<Secret>, feed: mpsc::UnboundedSender<Change>, notify: Arc<Notify>) {
    let cfg = watcher::Config::default().labels(TOKEN_LABEL);
    let mut stream = std::pin::pin!(watcher(api, cfg).backoff(crate::watch_backoff()));
    let mut listing: Option<HashSet<u64>> = None;
    // The digests last sent per Secret: a relist or a metadata change sends nothing new.
    // Keyed by a hash of namespace and name, like `seen` in `spawn`.
    let mut sent: HashMap<u64, u64> = HashMap::new();
    let mut down = false;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if !down {
                    tracing::warn!(error = %e, "watch failed; retrying with backoff");
                    down = true;
                }
                continue;
            }
        };
        down = false;
        let change = match ev {
            watcher::Event::Init => {
                listing = Some(HashSet::new());
                continue;
            }
            watcher::Event::InitDone => Change::SecretsListed(listing.take().unwrap_or_default()),
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let id = (s.namespace().unwrap_or_default(), s.name_any());
                let hashed = id_hash(&(&id.0, &id.1));
                if let Some(l) = listing.as_mut() {
                    l.insert(hashed);
                }
                let entries = token_digests(&s);
                let webhook = webhook_secret(&s);
                let fingerprint = {
                    let mut sorted: Vec<_> = entries.iter().collect();
                    sorted.sort();
                    super::digest64(&(sorted, &webhook))
                };
                if sent.insert(hashed, fingerprint) == Some(fingerprint) {
                    continue;
                }
                Change::Secret {
                    namespace: id.0,
                    name: id.1,
                    entries,
                    webhook,
                }
            }
            watcher::Event::Delete(s) => {
                let (namespace, name) = (s.namespace().unwrap_or_default(), s.name_any());
                sent.remove(&id_hash(&(&namespace, &name)));
                Change::SecretGone { namespace, name }
            }
        };
        if feed.send(change).is_err() {
            return;
        }
        notify.notify_one();
    }
}

/// The SHA-256 of each entry of a token Secret (`None`: blank), from `data` and, for an object
/// that was never read back, `stringData`.
pub(super) fn token_digests(s: &Secret) -> HashMap<String, Option<String>> {
    let data = s.data.iter().flatten().map(|(k, v)| (k, v.0.as_slice()));
    let strings = s.string_data.iter().flatten().map(|(k, v)| (k, v.as_bytes()));
    // The signing secret is no token: it must not admit requests.
    data.chain(strings)
        .filter(|(k, _)| k.as_str() != crate::standalone::WEBHOOK_SECRET_ENTRY)
        .map(|(k, v)| {
            let hash = (!v.trim_ascii().is_empty()).then(|| crate::config::hash_token(v));
            (k.clone(), hash)
        })
        .collect()
}

/// The spec and the metadata compile reads (creation time, deletion, finalizers), hashed: status
/// writes do not change it.
fn spec_fingerprint<S: serde::Serialize>(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &S,
) -> u64 {
    super::digest64(&(
        serde_json::to_string(spec).unwrap_or_default(),
        meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        meta.deletion_timestamp.is_some(),
        &meta.finalizers,
    ))
}

/// An object's identity as the watches' per-object memory keeps it.
use super::digest64 as id_hash;

/// Drops what the controller never reads from a watched object before the store keeps it:
/// managed fields and `kubectl apply`'s copy of the object (at 100,000 keys, hundreds of MiB).
fn strip<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The `webhook-secret` entry of a token Secret, trimmed; `None` when absent or blank.
pub(super) fn webhook_secret(s: &Secret) -> Option<String> {
    let entry = crate::standalone::WEBHOOK_SECRET_ENTRY;
    let data = s.data.as_ref().and_then(|d| d.get(entry)).map(|v| v.0.as_slice());
    let strings = s
        .string_data
        .as_ref()
        .and_then(|d| d.get(entry))
        .map(|v| v.as_bytes());
    let text = String::from_utf8_lossy(data.or(strings)?).trim().to_string();
    (!text.is_empty()).then_some(text)
}
