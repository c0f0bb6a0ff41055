//! Prometheus metrics of the gateway. Labels name plans, codes and reasons, never a key or token.

use std::sync::{Arc, OnceLock, atomic::AtomicU64};

use super::Fallback;
use crate::limiter::shared::{SharedError, SharedObserver, SharedOp};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// The machine-readable codes of the gateway's own answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// 401: no key presented.
    MissingApiKey,
    /// 401: unknown key.
    InvalidApiKey,
    /// 403: key suspended.
    KeySuspended,
    /// 401: key past its expiry.
    KeyExpired,
    /// 429: every slot of the key in use.
    ConcurrencyLimitExceeded,
    /// 429: rate bucket empty.
    RateLimit,
    /// 503: gateway-wide upstream cap reached.
    UpstreamConcurrencyLimitExceeded,
    /// 502: upstream unreachable.
    UpstreamUnavailable,
    /// 504: upstream too slow.
    UpstreamTimeout,
    /// 400: request that cannot be forwarded.
    InvalidRequest,
    /// 503: the shared limiter state is unreachable and the policy is to fail closed.
    LimiterUnavailable,
    /// 429: the client (or key) is banned for a while after repeated excess.
    TemporarilyBlocked,
    /// 429: every slot of the request's upstream target is in use (across all keys).
    TargetConcurrencyLimitExceeded,
    /// 429: the upstream target's rate bucket is empty.
    TargetRateLimit,
    /// 503: the upstream target cannot be used (its credential is missing).
    TargetUnavailable,
    /// 502: the upstream target's TLS certificate did not verify, or the handshake failed.
    UpstreamTlsError,
}

impl ErrorCode {
    const COUNT: usize = 16;

    /// The code as clients and metrics see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::KeySuspended => "key_suspended",
            Self::KeyExpired => "key_expired",
            Self::ConcurrencyLimitExceeded => "concurrency_limit_exceeded",
            Self::RateLimit => "rate_limit",
            Self::UpstreamConcurrencyLimitExceeded => "upstream_concurrency_limit_exceeded",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::InvalidRequest => "invalid_request",
            Self::LimiterUnavailable => "limiter_unavailable",
            Self::TemporarilyBlocked => "temporarily_blocked",
            Self::TargetConcurrencyLimitExceeded => "target_concurrency_limit_exceeded",
            Self::TargetRateLimit => "target_rate_limit",
            Self::TargetUnavailable => "target_unavailable",
            Self::UpstreamTlsError => "upstream_tls_error",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::MissingApiKey | Self::InvalidApiKey | Self::KeyExpired => S::UNAUTHORIZED,
            Self::KeySuspended => S::FORBIDDEN,
            Self::ConcurrencyLimitExceeded
            | Self::RateLimit
            | Self::TemporarilyBlocked
            | Self::TargetConcurrencyLimitExceeded
            | Self::TargetRateLimit => S::TOO_MANY_REQUESTS,
            Self::UpstreamConcurrencyLimitExceeded | Self::LimiterUnavailable | Self::TargetUnavailable => {
                S::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnavailable | Self::UpstreamTlsError => S::BAD_GATEWAY,
            Self::UpstreamTimeout => S::GATEWAY_TIMEOUT,
            Self::InvalidRequest => S::BAD_REQUEST,
        }
    }

    /// `refused` for decisions of the gateway, `error` for failures.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::UpstreamUnavailable
            | Self::UpstreamTimeout
            | Self::InvalidRequest
            | Self::LimiterUnavailable
            | Self::TargetUnavailable
            | Self::UpstreamTlsError => "error",
            _ => "refused",
        }
    }
}

/// Per-plan metric handles, resolved once per reload so the request path only touches atomics.
pub struct PlanMetrics {
    plan: String,
    /// Requests of the plan holding a slot.
    pub in_flight: Gauge,
    refusals: [OnceLock<Counter>; ErrorCode::COUNT],
    family: Family<Labels, Counter>,
}

impl std::fmt::Debug for PlanMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanMetrics")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl PlanMetrics {
    /// Counts a refusal of a key on this plan.
    pub fn refusal(&self, code: ErrorCode) {
        self.refusals[code as usize]
            .get_or_init(|| {
                self.family
                    .get_or_create(&vec![
                        ("reason", code.as_str().to_string()),
                        ("plan", self.plan.clone()),
                    ])
                    .clone()
            })
            .inc();
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// The async task subsystem's metrics (registered whether or not tasks are enabled).
    pub tasks: crate::tasks::TaskMetrics,
    requests: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    capacity: Family<Labels, Gauge>,
    /// Slot capacity by plan as of the last reload; the two gauge families are derived from it.
    capacities: std::sync::Mutex<Vec<(String, i64)>>,
    utilisation: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Configuration version enforced.
    pub config_version: Gauge,
    /// Keys admitted by the configuration enforced.
    pub config_keys: Gauge,
    /// Configurations applied.
    pub reloads: Counter,
    reload_failures: Family<Labels, Counter>,
    /// Time to parse, check and swap in a new configuration.
    pub reload_duration: Histogram,
    /// Time from forwarding a request to the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Endpoint buckets dropped because they were idle.
    pub buckets_evicted: Counter,
    forwarded: Box<[OnceLock<Counter>]>,
    coded: [OnceLock<Counter>; ErrorCode::COUNT],
    unknown_plan: Arc<PlanMetrics>,
    /// Metrics of the shared limiter state (Redis).
    pub state: StateMetrics,
    /// Metrics of bans.
    pub abuse: AbuseMetrics,
    /// Access-log lines dropped because the writer was behind (brought up to date on render).
    pub access_log_dropped: Counter,
}

/// Metrics of bans: how many are in force, how many started, and what they refused.
#[derive(Clone, Debug)]
pub struct AbuseMetrics {
    /// Bans in force (as of the last sweep, a few seconds old at most, or the last change).
    pub active: Gauge,
    started: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    /// `refused`'s series, resolved once: the banned path must stay cheaper than a refusal.
    refused_by: [Counter; 4],
    /// Bytes the ban table takes now.
    pub table_bytes: Gauge,
}

impl Default for AbuseMetrics {
    fn default() -> Self {
        let refused: Family<Labels, Counter> = Family::default();
        let refused_by = std::array::from_fn(|i| {
            let (reason, by) = Self::series(i);
            refused.get_or_create(&Self::labels(reason, by)).clone()
        });
        Self {
            active: Gauge::default(),
            started: Family::default(),
            refused,
            refused_by,
            table_bytes: Gauge::default(),
        }
    }
}

impl AbuseMetrics {
    fn series(i: usize) -> (crate::abuse::Reason, &'static str) {
        (crate::abuse::Reason::ALL[i / 2], ["ip", "key"][i % 2])
    }

    fn labels(reason: crate::abuse::Reason, by: &'static str) -> Labels {
        vec![("reason", reason.as_str().to_string()), ("by", by.to_string())]
    }

    /// Counts a ban that started.
    pub fn started(&self, reason: crate::abuse::Reason, by: &'static str) {
        self.started.get_or_create(&Self::labels(reason, by)).inc();
    }

    /// Counts a request refused because of a ban.
    pub fn refused(&self, reason: crate::abuse::Reason, by: &'static str) {
        let i = match reason {
            crate::abuse::Reason::Refusals => 0,
            crate::abuse::Reason::InvalidKeys => 2,
        } + usize::from(by == "key");
        self.refused_by[i].inc();
    }

    fn register(&self, registry: &mut Registry) {
        for i in 0..4 {
            let (reason, by) = Self::series(i);
            drop(self.started.get_or_create(&Self::labels(reason, by)));
        }
        registry.register("bans_active", "Bans in force", self.active.clone());
        registry.register(
            "bans_started",
            "Bans started, by reason (repeated_refusals, invalid_keys) and subject (ip, key)",
            self.started.clone(),
        );
        registry.register(
            "banned_requests",
            "Requests refused with temporarily_blocked, by the ban's reason and subject",
            self.refused.clone(),
        );
        registry.register(
            "ban_table_bytes",
            "Memory of the ban and abuse counter table",
            self.table_bytes.clone(),
        );
    }
}

/// Metrics of the shared limiter state: call latency and errors by operation, and the mode in
/// force. Cheap to clone; the limiter reports into it through [`SharedObserver`].
#[derive(Clone, Debug)]
pub struct StateMetrics {
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    errors: Family<Labels, Counter>,
    /// 1 while limits are shared through Redis, 0 while the fallback policy applies.
    pub shared: Gauge,
    /// Live gateway replicas as Redis last reported them.
    pub replicas: Gauge,
    /// What happens while Redis is unreachable, for the log line of a mode change.
    pub fallback: Fallback,
}

impl StateMetrics {
    /// Creates the series of every op at 0, for a gateway that shares its limits.
    pub fn init_series(&self) {
        for op in crate::limiter::shared::SharedOp::ALL {
            let labels = vec![("op", op.as_str().to_string())];
            drop(self.latency.get_or_create(&labels));
            drop(self.errors.get_or_create(&labels));
        }
    }
}

impl SharedObserver for StateMetrics {
    fn call(&self, op: SharedOp, elapsed: std::time::Duration, error: Option<&SharedError>) {
        let labels = vec![("op", op.as_str().to_string())];
        self.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.errors.get_or_create(&labels).inc();
            tracing::debug!(op = op.as_str(), error = %e, "shared state call failed");
        }
    }

    fn replicas(&self, replicas: u32) {
        self.replicas.set(i64::from(replicas));
        tracing::info!(replicas, "live gateway replicas sharing the limits changed");
    }

    fn mode(&self, shared: bool, replicas: u32) {
        self.shared.set(i64::from(shared));
        self.replicas.set(i64::from(replicas));
        match (shared, self.fallback) {
            (true, _) => tracing::info!(
                replicas,
                "shared state reachable: limits are shared by every replica through redis"
            ),
            (false, Fallback::Local) => tracing::warn!(
                replicas,
                "shared state unreachable: each replica enforces 1/{replicas} of every limit locally until redis answers again"
            ),
            (false, Fallback::FailClosed) => tracing::warn!(
                "shared state unreachable: answering 503 limiter_unavailable until redis answers again (fail-closed)"
            ),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `slotgate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slotgate");
        let refusals: Family<Labels, Counter> = Family::default();
        let m = Self {
            requests: Family::default(),
            in_flight: Family::default(),
            capacity: Family::default(),
            capacities: Default::default(),
            utilisation: Family::default(),
            config_version: Gauge::default(),
            config_keys: Gauge::default(),
            reloads: Counter::default(),
            reload_failures: Family::default(),
            reload_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            buckets_evicted: Counter::default(),
            registry: Registry::default(),
            tasks: Default::default(),
            forwarded: (0..600).map(|_| OnceLock::new()).collect(),
            coded: Default::default(),
            unknown_plan: Arc::new(PlanMetrics {
                plan: "-".into(),
                in_flight: Gauge::default(),
                refusals: Default::default(),
                family: refusals.clone(),
            }),
            refusals,
            state: StateMetrics {
                latency: Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.0001, 2.0, 14))
                }),
                errors: Family::default(),
                shared: Gauge::default(),
                replicas: Gauge::default(),
                fallback: Fallback::Local,
            },
            abuse: AbuseMetrics::default(),
            access_log_dropped: Counter::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by outcome (forwarded, refused, error) and code (HTTP status or error code)",
            m.requests.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused, by reason and plan",
            m.refusals.clone(),
        );
        registry.register(
            "in_flight",
            "Requests in flight holding a slot, by plan",
            m.in_flight.clone(),
        );
        registry.register(
            "slot_capacity",
            "Concurrency slots of all keys on a plan",
            m.capacity.clone(),
        );
        registry.register(
            "slot_utilisation_ratio",
            "Slots in use over slots available, by plan",
            m.utilisation.clone(),
        );
        registry.register(
            "config_version",
            "Configuration version enforced",
            m.config_version.clone(),
        );
        registry.register(
            "config_keys",
            "Keys admitted by the configuration enforced",
            m.config_keys.clone(),
        );
        registry.register("config_reloads", "Configurations applied", m.reloads.clone());
        registry.register(
            "config_reload_failures",
            "Configurations refused (the last good one kept serving), by reason",
            m.reload_failures.clone(),
        );
        for reason in crate::config::ConfigError::METRIC_LABELS {
            drop(
                m.reload_failures
                    .get_or_create(&vec![("reason", reason.to_string())]),
            );
        }
        registry.register(
            "config_reload_duration_seconds",
            "Time to parse, check and swap in a new configuration",
            m.reload_duration.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from forwarding a request to the upstream's response headers",
            m.upstream_latency.clone(),
        );
        registry.register(
            "endpoint_buckets_evicted",
            "Idle per-endpoint rate buckets dropped",
            m.buckets_evicted.clone(),
        );
        registry.register(
            "state_call_seconds",
            "Time of calls to the shared limiter state (redis), by operation",
            m.state.latency.clone(),
        );
        registry.register(
            "state_errors",
            "Failed or timed-out calls to the shared limiter state, by operation",
            m.state.errors.clone(),
        );
        registry.register(
            "state_shared",
            "1 while limits are shared through redis, 0 while the fallback policy applies",
            m.state.shared.clone(),
        );
        registry.register(
            "state_replicas",
            "Live gateway replicas as the shared state last reported them",
            m.state.replicas.clone(),
        );
        m.tasks.register(&mut registry);
        m.abuse.register(&mut registry);
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer was behind (never blocks a request)",
            m.access_log_dropped.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a request forwarded to the upstream, by the status it answered.
    pub fn forwarded(&self, status: u16) {
        let Some(slot) = self.forwarded.get(usize::from(status)) else {
            return;
        };
        slot.get_or_init(|| {
            self.requests
                .get_or_create(&vec![
                    ("outcome", "forwarded".into()),
                    ("code", status.to_string()),
                ])
                .clone()
        })
        .inc();
    }

    /// Counts a request the gateway answered itself.
    pub fn answered(&self, code: ErrorCode) {
        self.coded[code as usize]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&vec![
                        ("outcome", code.outcome().into()),
                        ("code", code.as_str().into()),
                    ])
                    .clone()
            })
            .inc();
    }

    /// Counts a refusal of a request whose key (and so plan) is unknown.
    pub fn refusal_without_plan(&self, code: ErrorCode) {
        self.unknown_plan.refusal(code);
    }

    /// The metric handles of a plan.
    pub fn plan(&self, plan: &str) -> Arc<PlanMetrics> {
        Arc::new(PlanMetrics {
            plan: plan.to_string(),
            in_flight: self
                .in_flight
                .get_or_create(&vec![("plan", plan.to_string())])
                .clone(),
            refusals: Default::default(),
            family: self.refusals.clone(),
        })
    }

    /// Sets the slot capacity of each plan after a reload; plans no longer present read 0.
    pub fn set_capacity<'a>(&self, plans: impl IntoIterator<Item = (&'a str, i64)>) {
        let mut caps = self.capacities.lock().unwrap_or_else(|e| e.into_inner());
        caps.clear();
        caps.extend(plans.into_iter().map(|(plan, slots)| (plan.to_string(), slots)));
    }

    /// Counts a refused configuration.
    pub fn reload_failure(&self, reason: &'static str) {
        self.reload_failures
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// The text exposition format, with capacity and utilisation brought up to date from the
    /// capacities of the last reload (plans that are gone disappear).
    pub fn render(&self) -> String {
        self.capacity.clear();
        self.utilisation.clear();
        let capacities = self.capacities.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (plan, cap) in capacities {
            self.capacity
                .get_or_create(&vec![("plan", plan.clone())])
                .set(cap);
            let used = self.in_flight.get_or_create(&vec![("plan", plan.clone())]).get();
            let ratio = if cap > 0 { used as f64 / cap as f64 } else { 0.0 };
            self.utilisation.get_or_create(&vec![("plan", plan)]).set(ratio);
        }
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}
