//! Prometheus metrics of the controller.

use std::time::Duration;

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

/// Every metric the controller exports.
#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    duration: Histogram,
    status_writes: Family<Labels, Counter>,
    /// Statuses left to check or write in the current pass (the work queue's depth).
    pub status_pending: Gauge,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// Configuration version last published.
    pub config_version: Gauge,
    /// Configuration objects written.
    pub objects_written: Counter,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    /// Registers every metric under `slotgate_controller_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slotgate_controller");
        let m = Self {
            registry: Registry::default(),
            reconciles: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            status_writes: Family::default(),
            status_pending: Gauge::default(),
            leader: Gauge::default(),
            config_version: Gauge::default(),
            objects_written: Counter::default(),
        };
        registry.register(
            "reconciles",
            "Reconcile passes, by kind and result",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass (compile, publish, finalizers)",
            m.duration.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes, by kind and result",
            m.status_writes.clone(),
        );
        registry.register(
            "queue_depth",
            "Statuses left to check or write in the current pass",
            m.status_pending.clone(),
        );
        registry.register("leader", "1 while this replica leads", m.leader.clone());
        registry.register(
            "config_version",
            "Configuration version last published",
            m.config_version.clone(),
        );
        registry.register(
            "config_objects_written",
            "Configuration objects written",
            m.objects_written.clone(),
        );
        Self { registry, ..m }
    }

    pub(super) fn reconciled(&self, kind: &str, result: &str, elapsed: Duration) {
        self.reconciles
            .get_or_create(&vec![("kind", kind.to_string()), ("result", result.to_string())])
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub(super) fn status_write(&self, kind: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.status_writes
            .get_or_create(&vec![("kind", kind.to_string()), ("result", result.to_string())])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}
