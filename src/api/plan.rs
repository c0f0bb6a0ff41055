//! `ApiPlan`: one entry of the price list ("Startup: 25 requests in flight, 1,000 requests per
//! second per endpoint").

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A plan that API keys subscribe to: how many requests a key may have in flight and how fast it
/// may send them. Cluster-scoped, because a price list is shared by every team's keys.
///
/// An absent limit means unlimited. `tasks` opts the plan's keys into the async task API.
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
    printcolumn = r#"{"name":"Tasks", "type":"string", "priority":1, "description":"Whether keys may submit async tasks", "jsonPath":".status.conditions[?(@.type==\"Tasks\")].status"}"#,
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

    /// Async tasks (`POST /v1/tasks`): absent, the plan's keys cannot submit tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<TasksSpec>,

    /// Temporary bans of clients that keep exceeding this plan's limits. Absent: a refusal is
    /// only a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abuse: Option<AbuseSpec>,
}

/// When a client that keeps hitting its limits is banned: `refusals` 429s within `window` ban it
/// for `banDuration`; each repeat within `escalationWindow` of the last ban's end lasts
/// `escalationFactor` times longer, up to `maxBanDuration`. A banned client gets 429
/// `temporarily_blocked` with `Retry-After` until the ban ends, without reaching the upstream.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AbuseSpec {
    /// Refusals for concurrency or rate (429) within `window` that start a ban.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub refusals: u32,
    /// The sliding window refusals are counted in, such as `10s`. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h|d)$')").message("window must be a duration such as 500ms, 10s or 1m"))]
    pub window: Option<String>,
    /// The first ban's length, such as `2m`. Default `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h|d)$')").message("banDuration must be a duration such as 30s, 2m or 1h"))]
    pub ban_duration: Option<String>,
    /// A ban starting within this long of the previous one's end is a repeat. Default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h|d)$')").message("escalationWindow must be a duration such as 30m, 1h or 1d"))]
    pub escalation_window: Option<String>,
    /// How many times longer each repeat lasts than the ban before it. Default 2; 1 never
    /// escalates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub escalation_factor: Option<u32>,
    /// The longest ban (the long-lasting block of repeat offenders), such as `24h`. Default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h|d)$')").message("maxBanDuration must be a duration such as 1h or 1d"))]
    pub max_ban_duration: Option<String>,
    /// Who is counted and banned: `ClientIP` (the client's address, whatever key it sends) or
    /// `Key` (the key, from any address). Default `ClientIP`.
    #[serde(default)]
    pub by: BanScope,
}

/// Who an abuse policy counts and bans.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BanScope {
    /// The client's address (behind trusted proxies, the one they report).
    #[default]
    #[serde(rename = "ClientIP")]
    ClientIp,
    /// The key, from whatever address.
    Key,
}

/// How a plan's keys may use the async task API. Every field has a default, so `tasks: {}` opts
/// in with them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TasksSpec {
    /// Tasks one key may have queued (not yet finished); the next submission gets 429
    /// `task_queue_full`. Default 10,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_queued: Option<u32>,
    /// Of the key's concurrency slots, how many tasks may hold at once, so synchronous requests
    /// keep some. Default: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_concurrent: Option<u32>,
    /// How long a finished task's result stays readable, such as `24h` or `7d`. Default `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(s|m|h|d)$')").message("retention must be a duration such as 90m, 24h or 7d"))]
    pub retention: Option<String>,
    /// Upstream attempts of one task before it fails (5xx, timeouts and 429 are retried). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: Option<u32>,
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
