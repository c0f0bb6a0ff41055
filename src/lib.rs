//! slotgate sells API plans by concurrency slots and rate limits, and enforces them in front of
//! any HTTP upstream.
//!
//! - [`api`]: the `ApiPlan` and `ApiKey` custom resources users write;
//! - [`config`]: the pure `compile` step from those resources to a [`config::GatewayConfig`];
//! - [`limiter`]: slot pools and GCRA rate buckets, free of HTTP and Kubernetes;
//! - [`gateway`]: the reverse proxy that enforces a configuration, and its configuration sources;
//! - [`standalone`]: a folder of manifests read and compiled the way the controller would;
//! - [`up`] and [`load`]: the laptop experience, everything from a folder, and a load tool;
//!
//! Dependencies point one way: `api` ← `config` ← `gateway`/`controller`; the limiter knows
//! nothing of HTTP or Kubernetes.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod controller;
pub mod demo;
pub mod gateway;
pub mod limiter;
pub mod load;
pub mod standalone;
pub mod up;

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
