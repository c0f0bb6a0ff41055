//! The data plane: a hyper/tower reverse proxy that enforces a [`GatewayConfig`].
//!
//! Per request: extract the key, look up its SHA-256 in the current [`KeyTable`], take a rate
//! token and a concurrency slot (never waiting), forward, and release the slot when the response
//! body ends or the client goes away. The table is swapped atomically by [`Gateway::apply`], the
//! one seam every configuration source (file, folder, Kubernetes) feeds.
//!
//! Layers on the request path, imports pointing one way: `proxy` (the steps) uses `headers`
//! (what is read from and written to messages) and `upstream` (the HTTP/1 client); both of those
//! write or send a `head::RequestHead` and answer with a `body::ProxyBody`, leaves that import
//! neither of them.

mod admin;
mod bans;
mod body;
mod head;
mod headers;
pub mod kube_source;
pub mod metrics;
mod proxy;
mod server;
pub mod source;
pub mod table;
mod targets;
mod task_route;
mod upstream;
mod visibility;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

pub use admin::admin_service;
pub use bans::{AbuseOptions, DEFAULT_TRACKED, client_address};
pub use body::ProxyBody;
pub use metrics::{ErrorCode, Metrics, PlanMetrics, StateMetrics};
pub use proxy::{GatewayService, Upstream, UpstreamError};
pub use server::{Listening, run, serve};
pub use table::{KeyTable, UpstreamCap};

use crate::{
    config::{ConfigError, GatewayConfig, pieces::KeyDelta},
    limiter::{SharedLimiter, SharedOptions, shared::SharedError},
};

/// How a gateway reaches and protects its upstream.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Where requests go.
    pub upstream: Upstream,
    /// How long to wait for the upstream's response headers before answering 504.
    pub upstream_timeout: Duration,
    /// Gateway-wide cap on requests in flight to the upstream, whatever the key.
    pub max_upstream_in_flight: Option<u32>,
    /// Where slots and rate buckets live.
    pub state: StateOptions,
    /// Bans, trusted proxies and the ban allowlist.
    pub abuse: AbuseOptions,
    /// Where the access log goes; `None`: no access log.
    pub access_log: Option<crate::usage::LogTarget>,
}

/// Where slots and rate buckets live, and what happens when the shared state is unreachable.
#[derive(Clone, Debug, Default)]
pub struct StateOptions {
    /// Redis shared by every replica; `None` keeps the state in process memory (one replica).
    pub shared: Option<SharedOptions>,
    /// What to do while Redis is unreachable or slower than its timeout.
    pub fallback: Fallback,
}

/// What a gateway does while its shared state (Redis) is unreachable or too slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Each replica enforces its share of every limit in memory: the limit divided by the live
    /// replicas last seen (rounded up, never more than the limit). Traffic keeps flowing; the total
    /// can exceed a limit by the rounding (at most one request per replica), and, for as long as
    /// the requests admitted through Redis before the switch take to finish, by their uneven
    /// spread over the replicas.
    #[default]
    Local,
    /// Answer 503 `limiter_unavailable`: never exceed a limit, at the cost of availability.
    FailClosed,
}

impl std::str::FromStr for Fallback {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "fail-closed" => Ok(Self::FailClosed),
            _ => Err(format!("{s:?}: expected `local` or `fail-closed`")),
        }
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::FailClosed => "fail-closed",
        })
    }
}

/// Runs long work on a blocking thread: a reload (parse, key table build, release of the old
/// table: a few hundred milliseconds at 100,000 keys) or a sweep over every key. On a thread
/// that serves requests, every request queued behind it would wait that long. `None` when the
/// runtime is shutting down; a panic in `work` stays a panic of the caller.
pub(crate) async fn off_the_serving_threads<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The shared state's URL is not usable.
    #[error(transparent)]
    Shared(#[from] SharedError),
    /// The access log could not be opened.
    #[error("--access-log {target:?}: {source}")]
    AccessLog {
        /// Where it was to go.
        target: crate::usage::LogTarget,
        /// Why it could not.
        #[source]
        source: std::io::Error,
    },
}

/// What a reload changed, for the one-line report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadReport {
    /// Version enforced before.
    pub from_version: u64,
    /// Version enforced now.
    pub to_version: u64,
    /// Keys admitted now.
    pub keys: usize,
    /// Whether the content differed from what was enforced.
    pub changed: bool,
}

/// One upstream target as the gateway sees it now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetState {
    /// ApiUpstream name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Requests in flight to it.
    pub in_flight: u32,
    /// Its slots, if capped.
    pub limit: Option<u32>,
    /// Why its paths answer 503.
    pub unavailable: Option<String>,
    /// The last TLS failure with it (unknown CA, wrong host name).
    pub last_tls_error: Option<String>,
}

/// A running gateway's shared state.
pub struct Gateway {
    table: ArcSwap<KeyTable>,
    ready: AtomicBool,
    draining: AtomicBool,
    options: GatewayOptions,
    cap: Option<UpstreamCap>,
    pool: Arc<upstream::Pool>,
    upstream_host: http::HeaderValue,
    /// The gateway's metrics.
    pub metrics: Metrics,
    epoch: Instant,
    shared: Option<Arc<SharedLimiter>>,
    tasks: std::sync::OnceLock<Arc<crate::tasks::Tasks>>,
    guard: crate::abuse::Guard,
    usage: crate::usage::Usage,
    /// Wakes the report to the controller before its next tick (a key ban started).
    report_soon: tokio::sync::Notify,
    /// The last usage snapshot reported, and when it was taken.
    usage_report: std::sync::Mutex<visibility::UsageSnapshot>,
    access_log: Option<Arc<crate::usage::AccessLog>>,
    /// The upstream targets of the configuration enforced, and the credentials they inject.
    targets: ArcSwap<targets::TargetSet>,
    target_credentials: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("version", &self.table.load().config.version)
            .field("upstream", &self.options.upstream)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with no configuration yet: every key is unknown and `/readyz` answers 503 until
    /// the first [`Gateway::apply`]. With shared state, connects to Redis (an unreachable Redis is
    /// not an error: the fallback policy applies until it answers).
    pub async fn new(options: GatewayOptions) -> Result<Arc<Self>, GatewayError> {
        let mut metrics = Metrics::new();
        metrics.state.fallback = options.state.fallback;
        let shared = match &options.state.shared {
            Some(o) => {
                tracing::info!(
                    url = %crate::limiter::shared::redact_url(&o.url),
                    fallback = %options.state.fallback,
                    lease_ttl = ?o.lease_ttl,
                    "limits shared through redis"
                );
                metrics.state.init_series();
                Some(Arc::new(
                    SharedLimiter::start(o.clone(), Arc::new(metrics.state.clone())).await?,
                ))
            }
            None => None,
        };
        let gateway = Arc::new(Self {
            table: ArcSwap::from_pointee(KeyTable::empty()),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            cap: options.max_upstream_in_flight.map(|limit| UpstreamCap {
                pool: Arc::default(),
                limit,
            }),
            pool: upstream::Pool::new(options.upstream.authority().clone()),
            upstream_host: http::HeaderValue::from_str(options.upstream.authority().as_str())
                .expect("an authority is a valid header value"),
            guard: crate::abuse::Guard::new(options.abuse.tracked),
            usage: crate::usage::Usage::default(),
            usage_report: Default::default(),
            report_soon: tokio::sync::Notify::new(),
            access_log: match &options.access_log {
                Some(target) => Some(Arc::new(crate::usage::AccessLog::start(target).map_err(
                    |source| GatewayError::AccessLog {
                        target: target.clone(),
                        source,
                    },
                )?)),
                None => None,
            },
            options,
            metrics,
            epoch: Instant::now(),
            shared,
            tasks: std::sync::OnceLock::new(),
            targets: ArcSwap::from_pointee(targets::TargetSet::default()),
            target_credentials: Default::default(),
        });
        if gateway.shared.is_some() {
            tokio::spawn(bans::share_bans(Arc::downgrade(&gateway)));
        }
        Ok(gateway)
    }

    /// The shared limiter, when limits are shared through Redis.
    pub fn shared(&self) -> Option<&SharedLimiter> {
        self.shared.as_deref()
    }

    /// Swaps in a new configuration. Requests in flight keep their slots; each key's live state is
    /// carried over by key id, so the new limits apply to the same pools at once.
    pub fn apply(&self, config: GatewayConfig) -> ReloadReport {
        self.apply_delta(config, None)
    }

    /// [`Gateway::apply`] of a configuration assembled from changed shards, whose `delta` names
    /// the keys that changed: the key table is patched rather than rebuilt.
    pub fn apply_delta(&self, config: GatewayConfig, delta: Option<&KeyDelta>) -> ReloadReport {
        let old = self.table.load_full();
        let changed = old.config.hash != config.hash || !self.is_ready();
        let table = KeyTable::build_from(Arc::new(config), Some(&old), delta, &self.metrics);
        let report = ReloadReport {
            from_version: old.config.version,
            to_version: table.config.version,
            keys: table.len(),
            changed,
        };
        self.metrics.set_capacity(table.capacity());
        self.rebuild_targets(&table.config);
        if let Some(tasks) = self.tasks.get() {
            tasks.configure(Arc::clone(&table.config));
        }
        self.metrics.config_version.set(report.to_version as i64);
        self.metrics.config_keys.set(report.keys as i64);
        if changed {
            self.metrics.reloads.inc();
        }
        self.table.store(Arc::new(table));
        self.ready.store(true, Ordering::Release);
        report
    }

    /// Sets the provider credentials of the targets, by target name (from the Secret the
    /// controller writes, or the folder `slotgate up` reads); a target whose credential is
    /// missing answers 503 `target_unavailable` on its paths.
    pub fn set_target_credentials(&self, credentials: std::collections::BTreeMap<String, String>) {
        let config = Arc::clone(&self.table.load().config);
        *self.target_credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials;
        self.rebuild_targets(&config);
    }

    fn rebuild_targets(&self, config: &GatewayConfig) {
        let credentials = self.target_credentials.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.targets.load();
        if config.targets.is_empty() && previous.iter().next().is_none() {
            return;
        }
        let set = targets::TargetSet::build(config, &previous, &credentials);
        for t in set.iter() {
            if let Some(why) = &t.unavailable {
                tracing::warn!(target = %t.name, reason = %why, "upstream target unavailable; its paths answer 503");
            }
        }
        self.targets.store(Arc::new(set));
    }

    /// The upstream targets as enforced: name, URL, slots in flight, and why one is unavailable
    /// or last failed TLS. For the admin endpoint and `slotgate up`.
    pub fn target_states(&self) -> Vec<TargetState> {
        self.targets
            .load()
            .iter()
            .map(|t| TargetState {
                name: t.name.to_string(),
                url: t.compiled.url(),
                in_flight: t.in_flight(),
                limit: t.compiled.concurrency,
                unavailable: t.unavailable.clone(),
                last_tls_error: t.tls_error(),
            })
            .collect()
    }

    /// Records a configuration that was refused; the last good one keeps serving.
    pub fn reject(&self, origin: &str, error: &ConfigError) {
        self.metrics.reload_failure(error.metric_label());
        tracing::error!(
            origin,
            error = %error,
            version = self.table.load().config.version,
            "configuration refused; the last good configuration keeps serving"
        );
    }

    /// The table enforced now.
    pub fn table(&self) -> Arc<KeyTable> {
        self.table.load_full()
    }

    /// Whether a configuration has been loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the gateway as leaving: `/readyz` answers 503 so that load balancers stop sending
    /// new connections, while requests keep being served until the listeners close.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Gateway::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Monotonic nanoseconds since the gateway started: the limiter's clock.
    pub(super) fn now(&self) -> u64 {
        self.nanos(Instant::now())
    }

    /// [`Self::now`] of an instant already read.
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Drops idle endpoint buckets of every key; run now and then so memory follows the traffic.
    pub fn sweep(&self) {
        let now = self.now();
        // Owned, not a borrowed guard: the pass is long.
        let table = self.table.load_full();
        let dropped: usize = table.entries().map(|e| e.state.sweep(now)).sum();
        self.metrics.buckets_evicted.inc_by(dropped as u64);
        // Usage of keys that are gone.
        let ids: std::collections::HashSet<&str> = table.entries().map(|e| &**e.entry_id()).collect();
        self.usage.retain(|id| ids.contains(id));
    }
}
