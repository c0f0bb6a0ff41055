//! `ApiUpstream`: a target the gateway forwards some paths to ("`/v1/images/*` goes to
//! `https://api.provider.com` with our provider key, at most 5 requests at once").

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An upstream target: where requests on some paths go, the provider credential the gateway adds
/// to them, and limits for the target as a whole, across all keys. Paths no target claims go to
/// the gateway's `--upstream`. Cluster-scoped, like the plans whose limits stack with its own.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "slotgate.dev",
    version = "v1alpha1",
    kind = "ApiUpstream",
    plural = "apiupstreams",
    shortname = "upstream",
    category = "slotgate",
    status = "ApiUpstreamStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    printcolumn = r#"{"name":"URL", "type":"string", "jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Slots", "type":"integer", "jsonPath":".spec.concurrency.maxConcurrentRequests"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiUpstreamSpec {
    /// Where requests go: `http://` or `https://`, a host, an optional port and an optional base
    /// path the request's path is appended to (`https://api.provider.com/v2`).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#@]+(/[^?#]*)?$')").message("url must be http:// or https:// followed by a host, with no query, fragment or user info"))]
    pub url: String,

    /// Path patterns this target serves: an exact path (`/v1/search`) or a prefix ending in `*`
    /// (`/v1/images/*`). When several targets match a request, the longest pattern wins.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^/[^*]*[*]?$'))").message("every path pattern must start with / and may only end with a single *"))]
    pub paths: Vec<String>,

    /// The provider credential the gateway adds to every request it forwards to this target.
    /// The customer's own key is never forwarded to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_ref: Option<CredentialRef>,

    /// Requests in flight to this target at once, across every key; the next one is refused with
    /// 429 `target_concurrency_limit_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<TargetConcurrency>,

    /// Requests per second to this target, across every key; beyond it, 429 `target_rate_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<TargetRateLimit>,

    /// How an `https://` target's certificate is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TargetTls>,

    /// Longest wait for a connection to open, such as `5s`. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m)$')").message("connectTimeout must be a duration such as 500ms, 5s or 1m"))]
    pub connect_timeout: Option<String>,

    /// Longest wait for the response head, such as `60s`. Default: the gateway's
    /// `--upstream-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("responseTimeout must be a duration such as 500ms, 60s, 5m or 1h"))]
    pub response_timeout: Option<String>,
}

/// Where the provider credential lives and how it is written into the request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRef {
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Entry of the Secret's `data` that holds the credential.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Request header the credential goes in. Default `Authorization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9-]+$')").message("header must be a field name of letters, digits and -"))]
    pub header: Option<String>,
    /// The header's value, with `{}` where the credential goes. Default `Bearer {}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 256))]
    #[x_kube(validation = Rule::new("self.contains('{}')").message("format must contain {} where the credential goes"))]
    pub format: Option<String>,
}

impl CredentialRef {
    /// The header the credential goes in, lower-cased as HTTP/2 and the gateway write it.
    pub fn header_name(&self) -> String {
        self.header
            .as_deref()
            .unwrap_or("authorization")
            .to_ascii_lowercase()
    }

    /// The header's value template.
    pub fn value_format(&self) -> &str {
        self.format.as_deref().unwrap_or("Bearer {}")
    }
}

/// Concurrency cap of a target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetConcurrency {
    /// Requests in flight to the target at once, whatever the key.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_concurrent_requests: u32,
}

/// Rate limit of a target (one GCRA bucket for the whole target).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    /// Requests a full bucket admits at once. Default: `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub burst: Option<u32>,
}

/// TLS settings of an `https://` target. The host name checked is the URL's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetTls {
    /// A PEM bundle of CA certificates the target's certificate may chain to, in addition to
    /// the public roots: an entry of a ConfigMap (CA certificates are not secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_ref: Option<CaBundleRef>,
    /// Accept any certificate. Only for tests against a target you control; the Ready condition
    /// says it is set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// A ConfigMap entry holding PEM certificates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleRef {
    /// Namespace of the ConfigMap.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Entry of its `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state of an ApiUpstream.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiUpstreamStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CredentialResolved`, `TLSValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
}
