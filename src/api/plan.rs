//! `ApiPlan`: one entry of the price list ("Startup: 25 requests in flight, 1,000 requests per
//! second per endpoint").

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A plan that API keys subscribe to: how many requests a key may have in flight and how fast it
/// may send them. Cluster-scoped, because a price list is shared by every team's keys.
///
/// An absent limit means unlimited. Room is left in this spec for an async queue and an abuse
/// policy; neither exists yet, so neither field is declared.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "slotgate.dev",
    version = "v1alpha1",
    kind = "ApiPlan",
    plural = "apiplans",
    shortname = "plan",
    category = "slotgate",
    status = "ApiPlanStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    printcolumn = r#"{"name":"Display", "type":"string", "jsonPath":".spec.displayName"}"#,
    printcolumn = r#"{"name":"Concurrency", "type":"integer", "description":"Requests in flight per key", "jsonPath":".spec.concurrency.maxConcurrentRequests"}"#,
    printcolumn = r#"{"name":"Req/s", "type":"integer", "description":"Requests per second per bucket", "jsonPath":".spec.rateLimit.requestsPerSecond"}"#,
    printcolumn = r#"{"name":"Burst", "type":"integer", "jsonPath":".spec.rateLimit.burst"}"#,
    printcolumn = r#"{"name":"Per", "type":"string", "priority":1, "jsonPath":".spec.rateLimit.per"}"#,
    printcolumn = r#"{"name":"Keys", "type":"integer", "description":"ApiKeys on this plan", "jsonPath":".status.keys"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiPlanSpec {
    /// Name shown to customers, such as "Startup".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub display_name: Option<String>,

    /// Concurrency slots: how many requests one key may have in flight at once. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencySpec>,

    /// Rate limit: requests per second with a burst, per key or per endpoint. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

/// Concurrency slots of a plan.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencySpec {
    /// Requests a key may have in flight at once on `paths`; the next one is refused with 429 at
    /// once. 0 refuses every request on `paths`.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_concurrent_requests: u32,

    /// Path patterns the slots cover: an exact path (`/v1/search`) or a prefix ending in `*`
    /// (`/v1/monitor/*`). Default: every path.
    #[serde(default = "default_paths")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^/[^*]*[*]?$'))").message("every path pattern must start with / and may only end with a single *"))]
    pub paths: Vec<String>,
}

/// Rate limit of a plan, enforced with GCRA (an exact token bucket).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.burst) || self.burst <= self.requestsPerSecond * 3600").message("burst cannot exceed one hour of requestsPerSecond"))]
pub struct RateLimitSpec {
    /// Sustained requests per second of one bucket.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,

    /// Requests a full bucket admits at once. Default: `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub burst: Option<u32>,

    /// `Endpoint`: every path under `paths` gets its own bucket (`/v1/a` and `/v1/b` each get the
    /// full rate). `Key`: one bucket for all of the key's requests on `paths`.
    #[serde(default)]
    pub per: BucketScope,

    /// Path patterns the rate limit covers, as for concurrency. Default: every path.
    #[serde(default = "default_paths")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^/[^*]*[*]?$'))").message("every path pattern must start with / and may only end with a single *"))]
    pub paths: Vec<String>,
}

impl RateLimitSpec {
    /// The burst in force: the declared one, or one second of traffic.
    pub fn effective_burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}

/// Which requests share one rate bucket.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BucketScope {
    /// One bucket per key and endpoint (request path).
    Endpoint,
    /// One bucket per key.
    #[default]
    Key,
}

/// Observed state of an ApiPlan.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiPlanStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// ApiKeys whose spec names this plan.
    #[serde(default)]
    pub keys: u32,
    /// `Ready`, `Enforced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The default path patterns: every path.
pub fn default_paths() -> Vec<String> {
    vec!["/*".to_string()]
}
