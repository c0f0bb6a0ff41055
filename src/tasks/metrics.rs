//! The task subsystem's metrics, registered into the gateway's registry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::TaskStatus;

/// A final status (`completed`, `failed`, `canceled`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status.
    pub status: String,
}

/// The result of a webhook attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `delivered`, `retry`, `gone` or `failed`.
    pub result: String,
}

/// A plan (empty for tasks whose key is not in the configuration now).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlanLabel {
    /// The plan's name.
    pub plan: String,
}

/// The task subsystem's metrics.
#[derive(Clone, Debug)]
pub struct TaskMetrics {
    /// Tasks accepted (202).
    pub submitted: Counter,
    /// Tasks queued now (waiting for a slot or a retry), by plan.
    pub queued: Family<PlanLabel, Gauge>,
    /// Tasks running now, by plan.
    pub running: Family<PlanLabel, Gauge>,
    /// Tasks finished, by final status.
    pub finished: Family<StatusLabel, Counter>,
    /// Webhook attempts, by result (`delivered`, `retry`, `gone`, `failed`).
    pub deliveries: Family<ResultLabel, Counter>,
    /// Seconds from submission to start.
    pub queue_wait: Histogram,
    /// Seconds of upstream exchange per attempt.
    pub run_time: Histogram,
    /// Seconds from a task's end to its webhook's delivery.
    pub webhook_latency: Histogram,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
    ]
    .into_iter()
}

impl Default for TaskMetrics {
    fn default() -> Self {
        let m = Self {
            submitted: Counter::default(),
            queued: Family::default(),
            running: Family::default(),
            finished: Family::default(),
            deliveries: Family::default(),
            queue_wait: Histogram::new(buckets()),
            run_time: Histogram::new(buckets()),
            webhook_latency: Histogram::new(buckets()),
        };
        for s in ["completed", "failed", "canceled"] {
            let _ = m.finished.get_or_create(&StatusLabel { status: s.into() });
        }
        for r in ["delivered", "retry", "gone", "failed"] {
            let _ = m.deliveries.get_or_create(&ResultLabel { result: r.into() });
        }
        m
    }
}

impl TaskMetrics {
    /// Adds the metrics to `registry` (names prefixed `slotgate_tasks_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tasks");
        r.register("submitted", "Tasks accepted", self.submitted.clone());
        r.register(
            "queued",
            "Tasks waiting for a slot or a retry, by plan",
            self.queued.clone(),
        );
        r.register(
            "running",
            "Tasks whose upstream request is in flight, by plan",
            self.running.clone(),
        );
        r.register(
            "finished",
            "Tasks finished, by final status",
            self.finished.clone(),
        );
        r.register(
            "deliveries",
            "Webhook delivery attempts, by result",
            self.deliveries.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Seconds from submission to start",
            self.queue_wait.clone(),
        );
        r.register(
            "run_seconds",
            "Seconds of one upstream attempt",
            self.run_time.clone(),
        );
        r.register(
            "webhook_latency_seconds",
            "Seconds from a task's end to its webhook's delivery",
            self.webhook_latency.clone(),
        );
    }

    pub(super) fn finished(&self, status: TaskStatus) {
        self.finished
            .get_or_create(&StatusLabel {
                status: status.as_str().into(),
            })
            .inc();
    }

    pub(super) fn delivery(&self, result: &str) {
        self.deliveries
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub(super) fn set_plan(&self, plan: &str, queued: i64, running: i64) {
        let label = PlanLabel { plan: plan.into() };
        self.queued.get_or_create(&label).set(queued);
        self.running.get_or_create(&label).set(running);
    }
}
