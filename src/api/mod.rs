//! Custom resource types users write: [`ApiPlan`] (a catalogue entry), [`ApiKey`] (one customer
//! credential), [`ApiTaskType`] (the upstream request an async task runs) and [`ApiUpstream`] (a
//! target some paths go to), their status conditions, and the client-side schema check that
//! `slotgate up` shares with the API server's own validation.
//!
//! This module does no I/O.

mod conditions;
mod key;
pub mod manifest;
mod plan;
mod task_type;
mod upstream;
pub mod validate;

pub use conditions::{ConditionSpec, merge_conditions};
pub use key::{
    ApiKey, ApiKeySpec, ApiKeyStatus, EffectiveLimits, KeyUsageStatus, LimitOverrides, SecretKeyRef,
};
pub use plan::{
    AbuseSpec, ApiPlan, ApiPlanSpec, ApiPlanStatus, BanScope, BucketScope, ConcurrencySpec, RateLimitSpec,
    TasksSpec, default_paths,
};
pub use task_type::{ApiTaskType, ApiTaskTypeSpec, ApiTaskTypeStatus, TaskMethod, TaskRequestSpec};
pub use upstream::{
    ApiUpstream, ApiUpstreamSpec, ApiUpstreamStatus, CaBundleRef, CredentialRef, TargetConcurrency,
    TargetRateLimit, TargetTls,
};

/// API group of every slotgate custom resource.
pub const GROUP: &str = "slotgate.dev";
/// API version of the custom resources this build serves.
pub const VERSION: &str = "v1alpha1";

/// Every CRD this build defines, in the order `slotgate crds` prints them.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![
        ApiPlan::crd(),
        ApiKey::crd(),
        ApiTaskType::crd(),
        ApiUpstream::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly as `crds/` holds them.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD always serialises"));
    }
    out
}

/// Schema of `status.conditions`: a list map keyed by `type`, so server-side apply merges one
/// condition per type instead of replacing the whole list.
pub(crate) fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Latest observations of the object's state, one per condition type.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "properties": {
                "lastTransitionTime": { "type": "string", "format": "date-time" },
                "message": { "type": "string", "maxLength": 32768 },
                "observedGeneration": { "type": "integer", "format": "int64", "minimum": 0 },
                "reason": { "type": "string", "maxLength": 1024, "minLength": 1 },
                "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                "type": { "type": "string", "maxLength": 316 }
            },
            "required": ["lastTransitionTime", "message", "reason", "status", "type"]
        }
    })
}
