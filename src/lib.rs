//! slotgate sells API plans by concurrency slots and rate limits, and enforces them in front of
//! any HTTP upstream.
//!
//! - [`api`]: the `ApiPlan` and `ApiKey` custom resources users write;
//! - [`config`]: the pure `compile` step from those resources to a [`config::GatewayConfig`];
//! - [`limiter`]: slot pools and GCRA rate buckets, free of HTTP and Kubernetes;
//! - [`abuse`]: temporary bans of clients that keep exceeding their limits or guess keys, in
//!   bounded memory, free of HTTP and Kubernetes like the limiter;
//! - [`gateway`]: the reverse proxy that enforces a configuration, and its configuration sources;
//! - [`standalone`]: a folder of manifests read and compiled the way the controller would;
//! - [`usage`]: per-key usage counters and the access log, fed by the gateway;
//! - [`up`] and [`load`]: the laptop experience, everything from a folder, and a load tool;
//!
//! Dependencies point one way: `api` ← `config` ← `gateway`/`controller`; the limiter knows
//! nothing of HTTP or Kubernetes, and neither does `abuse` (the gateway imports it).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod abuse;
pub mod api;
pub mod config;
pub mod controller;
pub mod demo;
pub mod gateway;
pub mod limiter;
pub mod load;
pub mod standalone;
pub mod tasks;
pub mod up;
pub mod usage;

/// How far an API call reaches: decides whether the Helm chart grants it through a ClusterRole or a
/// Role in the release's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Any namespace, or a cluster-scoped resource.
    Cluster,
    /// Only the namespace slotgate runs in (its configuration objects, reports and leader Lease).
    OwnNamespace,
}

/// One kind of Kubernetes API call a slotgate component makes. The component's list is the one
/// place its RBAC is derived from: the chart's rules are tested against it, and the tests'
/// in-memory API server checks that every call made is on it.
#[derive(Clone, Copy, Debug)]
pub struct ApiCall {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource, with `/subresource` when the call is on one.
    pub resource: &'static str,
    /// RBAC verbs. A server-side apply that may create its object needs `create` and `patch`.
    pub verbs: &'static [&'static str],
    /// Where the calls go.
    pub reach: Reach,
}

impl ApiCall {
    /// One line of a component's list.
    pub const fn new(
        group: &'static str,
        resource: &'static str,
        verbs: &'static [&'static str],
        reach: Reach,
    ) -> Self {
        Self {
            group,
            resource,
            verbs,
            reach,
        }
    }
}

/// This machine's (or pod's) name: `$HOSTNAME`, else `/etc/hostname`, else `pid-<pid>`. Names a
/// replica in leases and reports.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()))
}

/// A Kubernetes client for `config` without kube's built-in retry of 429/503/504: that retry
/// doubles from 5 ms up to 15 times inside one call, so during a minute-long API server outage a
/// single watch or Lease call sleeps for over a minute and the first change after the outage
/// waits for it. Every caller here retries on its own, with short, capped delays
/// ([`watch_backoff`], the leader's one-second retry, the reconcile pass's 2 s).
pub fn kube_client(mut config: kube::Config) -> Result<kube::Client, kube::Error> {
    config.default_retry = false;
    kube::Client::try_from(config)
}

/// Backoff of every Kubernetes watch (controller and gateway): from 250 ms, doubling with
/// jitter, capped at 2 s, and reset by the first event that gets through. kube's default grows
/// to 30 s and resets only after two quiet minutes, so after an API server outage the next change
/// could wait half a minute for a watch to wake up.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

/// The first delay and the cap of [`WatchBackoff`].
const WATCH_BACKOFF: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(250),
    std::time::Duration::from_secs(2),
);

/// A fresh [`WatchBackoff`].
pub fn watch_backoff() -> WatchBackoff {
    WatchBackoff {
        next: WATCH_BACKOFF.0,
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(WATCH_BACKOFF.1);
        // Up to a quarter less, so that many replicas do not reconnect in step.
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        let jitter = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.25;
        Some(delay.mul_f64(1.0 - jitter))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF.0;
    }
}
