//! The async task part of a [`super::GatewayConfig`]: each plan's task policy and the task types
//! keys may submit, compiled from `ApiPlan.spec.tasks` and `ApiTaskType` objects. Pure, like the
//! rest of `config`.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::api::{ApiTaskType, TaskMethod, TasksSpec};

/// Tasks one key may have queued unless the plan says otherwise.
pub const DEFAULT_MAX_QUEUED: u32 = 10_000;
/// How long a finished task stays readable unless the plan says otherwise.
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 3600;
/// Upstream attempts of one task unless the plan says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A plan's task policy as the gateway enforces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskPolicy {
    /// Unfinished tasks one key may have.
    pub max_queued: u32,
    /// Slots tasks of one key may hold at once; `None`: all of the key's slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Seconds a finished task's result stays readable.
    pub retention_secs: u64,
    /// Upstream attempts before a task fails.
    pub max_attempts: u32,
}

/// A task type as the gateway runs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTaskType {
    /// Upstream method.
    pub method: TaskMethod,
    /// Upstream path.
    pub path: String,
    /// Longest wait for one attempt's answer, in milliseconds; `None`: the gateway's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Parses a duration such as `500ms`, `60s`, `5m`, `24h` or `7d` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 60s, 5m, 24h or 7d"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: the unit must be one of ms, s, m, h, d")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too long"))
}

/// Compiles a plan's `spec.tasks`.
pub fn compile_policy(spec: &TasksSpec) -> Result<TaskPolicy, String> {
    let retention_secs = match &spec.retention {
        Some(r) => parse_duration_ms(r).map_err(|e| format!("tasks.retention: {e}"))? / 1000,
        None => DEFAULT_RETENTION_SECS,
    };
    if retention_secs == 0 {
        return Err("tasks.retention must be at least 1s".into());
    }
    Ok(TaskPolicy {
        max_queued: spec.max_queued.unwrap_or(DEFAULT_MAX_QUEUED).max(1),
        max_concurrent: spec.max_concurrent,
        retention_secs,
        max_attempts: spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1),
    })
}

/// One task type that could not be compiled, with the reason, for a warning or a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskTypeIssue {
    /// Name of the ApiTaskType object.
    pub object: String,
    /// What is wrong.
    pub reason: String,
}

/// Compiles the task types by `spec.taskType`. Of two objects declaring the same type, the one
/// whose name sorts first keeps it (deterministic whatever the order they were read in); the
/// other is reported.
pub fn compile_task_types<T: std::borrow::Borrow<ApiTaskType>>(
    types: &[T],
) -> (BTreeMap<String, CompiledTaskType>, Vec<TaskTypeIssue>) {
    let mut sorted: Vec<&ApiTaskType> = types.iter().map(std::borrow::Borrow::borrow).collect();
    sorted.sort_by_key(|t| t.name_any());
    let mut out = BTreeMap::new();
    let mut issues = Vec::new();
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for t in sorted {
        let name = t.name_any();
        let spec = &t.spec;
        let compiled = (|| {
            if !spec.request.path.starts_with('/') || spec.request.path.contains(['?', '#', '*']) {
                return Err(format!(
                    "request.path {:?} must start with / and hold no query, fragment or *",
                    spec.request.path
                ));
            }
            let timeout_ms = spec
                .timeout
                .as_deref()
                .map(|t| parse_duration_ms(t).map_err(|e| format!("timeout: {e}")))
                .transpose()?;
            Ok(CompiledTaskType {
                method: spec.request.method,
                path: spec.request.path.clone(),
                timeout_ms,
            })
        })();
        match compiled {
            Err(reason) => issues.push(TaskTypeIssue { object: name, reason }),
            Ok(c) => match owners.get(&spec.task_type) {
                Some(owner) => issues.push(TaskTypeIssue {
                    object: name,
                    reason: format!(
                        "taskType {} is already declared by ApiTaskType {owner}",
                        spec.task_type
                    ),
                }),
                None => {
                    owners.insert(spec.task_type.clone(), name);
                    out.insert(spec.task_type.clone(), c);
                }
            },
        }
    }
    (out, issues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiTaskTypeSpec, TaskRequestSpec};

    fn task_type(name: &str, task_type: &str, path: &str) -> ApiTaskType {
        ApiTaskType::new(
            name,
            ApiTaskTypeSpec {
                task_type: task_type.into(),
                request: TaskRequestSpec {
                    method: TaskMethod::Post,
                    path: path.into(),
                },
                timeout: Some("90s".into()),
            },
        )
    }

    #[test]
    fn durations_parse_with_their_units_and_refuse_anything_else() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert!(parse_duration_ms("5 minutes").is_err());
        assert!(parse_duration_ms("h").is_err());
    }

    #[test]
    fn a_plan_without_fields_gets_the_defaults() {
        let p = compile_policy(&TasksSpec::default()).unwrap();
        assert_eq!(p.max_queued, DEFAULT_MAX_QUEUED);
        assert_eq!(p.retention_secs, DEFAULT_RETENTION_SECS);
        assert_eq!(p.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(p.max_concurrent, None);
    }

    #[test]
    fn a_duplicate_task_type_is_kept_by_the_first_name_and_the_other_reported() {
        let (types, issues) = compile_task_types(&[
            task_type("zz-chat", "CHATGPT", "/v2/chat"),
            task_type("chat", "CHATGPT", "/v1/monitor/chatgpt"),
            task_type("bad", "BAD", "/v1/x?y=1"),
        ]);
        assert_eq!(types.len(), 1);
        assert_eq!(types["CHATGPT"].path, "/v1/monitor/chatgpt");
        assert_eq!(types["CHATGPT"].timeout_ms, Some(90_000));
        assert_eq!(issues.len(), 2);
        assert!(
            issues
                .iter()
                .any(|i| i.object == "zz-chat" && i.reason.contains("already declared"))
        );
        assert!(
            issues
                .iter()
                .any(|i| i.object == "bad" && i.reason.contains("request.path"))
        );
    }
}
