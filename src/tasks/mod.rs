//! Async tasks: customers submit every task at once (`POST /v1/tasks`), the gateway keeps them
//! durably, runs them against the upstream within the key's concurrency slots and rate limits,
//! and POSTs each result to the task's webhook, signed per the Standard Webhooks specification.
//!
//! - [`store`]: where tasks live ([`store::TaskStore`]; embedded [`store::RedbStore`], or
//!   [`redis_store::RedisStore`] shared by several replicas);
//! - [`fleet`]: how the replicas of a fleet share the work of the shared store;
//! - [`scheduler`]: FIFO within a key, round robin across keys, a slot from the same pool as the
//!   key's synchronous requests (through [`Limits`], which the gateway implements), and the
//!   request to the upstream, or to the `ApiUpstream` target the gateway routes its path to;
//! - [`webhook`]: signing, SSRF-safe connections, the retry schedule;
//! - [`api`]: the HTTP endpoints, answered as [`api::Reply`] values the gateway sends.
//!
//! Imports point one way: this module uses `config` (and `abuse::Cidrs`); the gateway uses this
//! module and hands it the requests of its task routes. Nothing here knows the gateway's types.

pub mod api;
pub mod fleet;
mod metrics;
pub mod model;
pub mod redis_store;
pub mod scheduler;
pub mod store;
pub mod webhook;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

pub use metrics::TaskMetrics;
pub use model::{Task, TaskId, TaskStatus};
pub use store::{RedbStore, StoreError, TaskStore};

use crate::config::GatewayConfig;

/// The key a task belongs to, as the limiter knows it.
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    /// `namespace/name` of the ApiKey.
    pub id: &'a str,
    /// SHA-256 of its token.
    pub digest: &'a [u8; 32],
}

/// What the limiter says to a task that wants to start now.
pub enum Admit {
    /// Admitted: the value holds the slot (and anything else admission took) until dropped.
    Go(Box<dyn std::any::Any + Send + Sync>),
    /// Every slot of the key is taken: try again when one frees.
    Full,
    /// The rate bucket is empty: try again after this long.
    Wait(Duration),
    /// The key's token was rotated: its tasks follow it to this digest.
    Rekey([u8; 32]),
    /// The key is not admitted now (deleted, suspended, expired): its tasks wait.
    Gone,
}

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Go(_) => f.write_str("Go"),
            Self::Full => f.write_str("Full"),
            Self::Wait(d) => write!(f, "Wait({d:?})"),
            Self::Rekey(_) => f.write_str("Rekey"),
            Self::Gone => f.write_str("Gone"),
        }
    }
}

/// A task's request to the upstream, as the gateway sends it to a target (see [`Limits::send`]).
#[derive(Debug)]
pub struct UpstreamCall<'a> {
    /// The task type's method.
    pub method: &'a http::Method,
    /// The task type's path.
    pub path: &'a str,
    /// The key's id and plan, which the gateway writes as it does for synchronous requests.
    pub key: (&'a str, &'a str),
    /// The task's own fields (`Content-Type`, `Idempotency-Key`, `X-Slotgate-Task-Id`).
    pub headers: http::HeaderMap,
    /// The payload, as JSON.
    pub body: bytes::Bytes,
    /// Largest answer kept as the result, in bytes.
    pub max_bytes: usize,
}

/// The answer to one attempt: status, `Retry-After` seconds and the body (or why it was not
/// kept); or why there was no answer.
pub type Answer = Result<(http::StatusCode, Option<u64>, Result<bytes::Bytes, String>), String>;

/// Reads an upstream's response as an attempt's [`Answer`]: its status, its `Retry-After` (in
/// seconds) and its body, kept up to `max_bytes`.
pub async fn answer_of<B>(res: http::Response<B>, max_bytes: usize) -> Answer
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let status = res.status();
    let retry_after = res
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = http_body_util::Limited::new(res.into_body(), max_bytes)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    Ok((status, retry_after, body))
}

/// The limiter as tasks see it: the gateway's slots and rate buckets, shared with synchronous
/// requests, so invariant 1 holds for their sum.
pub trait Limits: Send + Sync + 'static {
    /// Takes a slot and a rate token for a task of `key` on the upstream `path`, never waiting.
    fn try_admit(&self, key: KeyRef<'_>, path: &str) -> Admit;

    /// Takes a slot and a rate token as [`Limits::try_admit`] does, but may ask the shared state
    /// (several replicas): what a fleet's dispatcher calls. Without shared state it is
    /// `try_admit`.
    fn admit<'a>(&'a self, key: KeyRef<'a>, path: &'a str) -> BoxFuture<'a, Admit> {
        Box::pin(std::future::ready(self.try_admit(key, path)))
    }

    /// The plan the key with this token digest is on now; `None`: no such key. The gateway's
    /// key table answers: the configuration the tasks see has no keys of its own.
    fn plan_of(&self, digest: &[u8; 32]) -> Option<Arc<str>>;

    /// Sends a task's request where the gateway routes its path when that is not the default
    /// upstream: an `ApiUpstream` target, with its TLS, its `Host` and its provider credential.
    /// `held` is what [`Admit::Go`] carried, which names the target the admission took a slot
    /// of. `None`: the default upstream, which the task subsystem's own client sends it to.
    fn send<'a>(
        &'a self,
        held: &'a (dyn std::any::Any + Send + Sync),
        call: &'a UpstreamCall<'a>,
    ) -> Option<BoxFuture<'a, Answer>> {
        let _ = (held, call);
        None
    }
}

/// How the task subsystem runs.
#[derive(Clone, Debug)]
pub struct TasksOptions {
    /// Folder of the embedded store.
    pub data_dir: PathBuf,
    /// The upstream base URL (`http://host:port[/base]`) tasks' requests go to.
    pub upstream: String,
    /// Longest wait for one attempt when the task type sets no timeout.
    pub upstream_timeout: Duration,
    /// The private, loopback and link-local addresses webhooks may reach (none by default).
    pub webhook_reach: webhook::Reach,
    /// Largest `payload` accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Largest upstream answer kept as a result, in bytes.
    pub max_result_bytes: usize,
    /// A PEM bundle of CAs https webhook receivers may be signed by, beside the system's.
    pub webhook_ca: Option<PathBuf>,
    /// How long a key's previous signing secret still signs after it was replaced.
    pub webhook_rotation_overlap: Duration,
}

impl TasksOptions {
    /// Options with the defaults: 1 MiB payloads, 10 MiB results, public webhooks only.
    pub fn new(data_dir: PathBuf, upstream: String, upstream_timeout: Duration) -> Self {
        Self {
            data_dir,
            upstream,
            upstream_timeout,
            webhook_reach: webhook::Reach::default(),
            max_payload_bytes: 1 << 20,
            max_result_bytes: 10 << 20,
            webhook_ca: None,
            webhook_rotation_overlap: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why the task subsystem could not start.
#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The upstream URL is not usable.
    #[error("task upstream {0:?} is not an http:// URL")]
    Upstream(String),
    /// The webhook CA bundle could not be read.
    #[error(transparent)]
    WebhookCa(#[from] webhook::WebhookError),
}

/// The task subsystem of one gateway.
pub struct Tasks {
    options: TasksOptions,
    store: Arc<dyn TaskStore>,
    config: ArcSwap<GatewayConfig>,
    secrets: ArcSwap<HashMap<String, webhook::Signing>>,
    queues: Mutex<scheduler::Queues>,
    wake: tokio::sync::Notify,
    limits: OnceLock<Arc<dyn Limits>>,
    upstream: scheduler::UpstreamClient,
    hooks: scheduler::HookClient,
    /// The fleet's side when the store is shared by several replicas.
    fleet: Option<Arc<fleet::Fleet>>,
    /// The subsystem's metrics.
    pub metrics: TaskMetrics,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("data_dir", &self.options.data_dir)
            .finish_non_exhaustive()
    }
}

impl Tasks {
    /// Opens the store under `options.data_dir`. Nothing runs until [`Tasks::start`].
    pub fn open(options: TasksOptions, metrics: TaskMetrics) -> Result<Arc<Self>, TasksError> {
        let store: Arc<dyn TaskStore> = Arc::new(RedbStore::open(&options.data_dir)?);
        Self::with_store(options, store, metrics)
    }

    /// The subsystem on the Redis at `url`, its keys under `prefix` (the shared limiter's), with
    /// this process as one consumer of the fleet.
    pub fn open_shared(
        options: TasksOptions,
        url: &str,
        prefix: &str,
        claim_timeout: Duration,
        metrics: TaskMetrics,
    ) -> Result<Arc<Self>, TasksError> {
        let store = redis_store::RedisStore::connect(url, prefix, Duration::from_secs(2))?;
        let fleet = fleet::FleetOptions {
            consumer: fleet::consumer_name(),
            claim_timeout,
        };
        Self::shared(options, store, fleet, metrics)
    }

    /// The subsystem on the shared store in Redis: every replica of a fleet serves, runs and
    /// delivers any task (see [`fleet`]).
    pub fn shared(
        options: TasksOptions,
        store: redis_store::RedisStore,
        fleet: fleet::FleetOptions,
        metrics: TaskMetrics,
    ) -> Result<Arc<Self>, TasksError> {
        let fleet = Arc::new(fleet::Fleet::new(store.clone(), fleet));
        Self::build(options, Arc::new(store), Some(fleet), metrics)
    }

    /// The subsystem over any store run by this process alone, counting into `metrics`.
    pub fn with_store(
        options: TasksOptions,
        store: Arc<dyn TaskStore>,
        metrics: TaskMetrics,
    ) -> Result<Arc<Self>, TasksError> {
        Self::build(options, store, None, metrics)
    }

    fn build(
        options: TasksOptions,
        store: Arc<dyn TaskStore>,
        fleet: Option<Arc<fleet::Fleet>>,
        metrics: TaskMetrics,
    ) -> Result<Arc<Self>, TasksError> {
        let upstream = scheduler::UpstreamClient::new(&options.upstream)
            .ok_or_else(|| TasksError::Upstream(options.upstream.clone()))?;
        let roots = match &options.webhook_ca {
            Some(path) => webhook::load_ca(path)?,
            None => Vec::new(),
        };
        let hooks = scheduler::HookClient::new(options.webhook_reach.clone(), &roots);
        Ok(Arc::new(Self {
            store,
            config: ArcSwap::from_pointee(GatewayConfig::empty()),
            secrets: ArcSwap::from_pointee(HashMap::new()),
            queues: Mutex::new(scheduler::Queues::default()),
            wake: tokio::sync::Notify::new(),
            limits: OnceLock::new(),
            upstream,
            hooks,
            fleet,
            metrics,
            options,
        }))
    }

    /// Loads every unfinished task from the store (a restart picks up where the last process
    /// stopped: a task that was running is queued again, at the front of its key's queue) and
    /// starts the dispatcher, the retention sweep and the pending webhook deliveries. Returns how
    /// many tasks were picked up.
    pub fn start(self: &Arc<Self>, limits: Arc<dyn Limits>) -> Result<usize, TasksError> {
        let _ = self.limits.set(limits);
        if let Some(fleet) = &self.fleet {
            // A fleet picks up unfinished tasks by claims, not by loading them.
            tokio::spawn(Arc::clone(self).fleet_loop(Arc::clone(fleet)));
            tokio::spawn(Self::fleet_heartbeat(Arc::clone(fleet)));
            tokio::spawn(Arc::clone(self).expiry_loop());
            return Ok(0);
        }
        let (n, deliveries) = self.recover()?;
        for (key, id) in deliveries {
            tokio::spawn(Arc::clone(self).deliver(key, id));
        }
        tokio::spawn(Arc::clone(self).dispatch_loop());
        tokio::spawn(Arc::clone(self).expiry_loop());
        Ok(n)
    }

    /// The replica is shutting down: in a fleet, the tasks it claimed and has not started go
    /// back to the other replicas at once (the dispatcher claims no more).
    pub async fn leave(&self) {
        if let Some(fleet) = &self.fleet {
            fleet.stop();
            fleet.leave().await;
        }
    }

    /// Takes a new configuration: plan policies and task types. Queued tasks see a plan upgrade
    /// at the next dispatch round, which this starts at once.
    pub fn configure(&self, config: Arc<GatewayConfig>) {
        self.config.store(config);
        self.wake.notify_one();
    }

    /// The plan of the key with token digest `hex_digest` now (`None` before [`Tasks::start`]).
    fn plan_of(&self, hex_digest: &str) -> Option<Arc<str>> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest).ok()?;
        self.limits.get()?.plan_of(&digest)
    }

    /// Takes the webhook signing secrets by key id (`whsec_...`); returns the ids whose secret
    /// does not parse, which sign nothing until fixed.
    /// A secret that replaces a key's previous one signs with it for
    /// [`TasksOptions::webhook_rotation_overlap`].
    pub fn set_webhook_secrets(&self, secrets: &std::collections::BTreeMap<String, String>) -> Vec<String> {
        let old = self.secrets.load();
        let mut ok = HashMap::new();
        let mut bad = Vec::new();
        for (id, text) in secrets {
            match webhook::Secret::parse(text) {
                Ok(s) => {
                    let signing = match old.get(id) {
                        Some(before) => before.rotate(s, self.options.webhook_rotation_overlap),
                        None => webhook::Signing::new(s),
                    };
                    ok.insert(id.clone(), signing);
                }
                Err(_) => bad.push(id.clone()),
            }
        }
        self.secrets.store(Arc::new(ok));
        bad
    }

    /// Deletes finished tasks past their retention every minute.
    async fn expiry_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            match self.store.expire(model::unix_ms_now()).await {
                Ok(n) if n > 0 => tracing::debug!(deleted = n, "expired finished tasks"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "task retention sweep failed"),
            }
        }
    }
}
