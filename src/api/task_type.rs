//! `ApiTaskType`: the upstream request an async task runs ("a `CHATGPT` task is a POST to
//! `/v1/monitor/chatgpt` with the task's payload as its body").

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A kind of async task customers may submit to `POST /v1/tasks`: the name they give as
/// `taskType`, and the request the gateway sends upstream on their behalf. Cluster-scoped, like
/// the plans whose limits cover its path.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "slotgate.dev",
    version = "v1alpha1",
    kind = "ApiTaskType",
    plural = "apitasktypes",
    shortname = "tasktype",
    category = "slotgate",
    status = "ApiTaskTypeStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    printcolumn = r#"{"name":"TaskType", "type":"string", "jsonPath":".spec.taskType"}"#,
    printcolumn = r#"{"name":"Method", "type":"string", "jsonPath":".spec.request.method"}"#,
    printcolumn = r#"{"name":"Path", "type":"string", "jsonPath":".spec.request.path"}"#,
    printcolumn = r#"{"name":"Timeout", "type":"string", "jsonPath":".spec.timeout"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiTaskTypeSpec {
    /// What customers write as `taskType`, such as `CHATGPT`: capitals, digits and underscores.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Z][A-Z0-9_]*$"))]
    pub task_type: String,

    /// The upstream request a task of this type runs, with the task's payload as its JSON body.
    pub request: TaskRequestSpec,

    /// Longest wait for the upstream's answer to one attempt, such as `60s` or `5m`. Default: the
    /// gateway's `--upstream-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|h)$')").message("timeout must be a duration such as 500ms, 60s, 5m or 1h"))]
    pub timeout: Option<String>,
}

/// The upstream request of a task type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TaskRequestSpec {
    /// HTTP method.
    #[serde(default)]
    pub method: TaskMethod,
    /// Path on the upstream, such as `/v1/monitor/chatgpt`: the plans' limits that cover this path
    /// apply to the task as to a synchronous request on it.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^/[^?#*]*$')").message("path must start with / and hold no query, fragment or *"))]
    pub path: String,
}

/// HTTP methods a task may use.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskMethod {
    /// `POST` (the default: the payload is the body).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `GET` (the payload is still sent as a JSON body).
    Get,
    /// `DELETE`.
    Delete,
}

impl TaskMethod {
    /// The method as HTTP writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Get => "GET",
            Self::Delete => "DELETE",
        }
    }
}

/// Observed state of an ApiTaskType.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiTaskTypeStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the gateways accept tasks of this type (`Declared`), or why not (`Invalid`,
    /// `Duplicate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}
