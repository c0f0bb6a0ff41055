//! Client-side validation of a manifest against the CRD schema, in the API server's words.
//!
//! `kubectl apply` is checked by the API server; `slotgate up` reads the same manifests from a
//! folder with no API server, so it runs the same checks here: the OpenAPI schema (types,
//! required fields, bounds, enums, unknown fields as strict field validation reports them) and
//! then the CEL rules (`x-kubernetes-validations`) through kube's CEL evaluator.

use std::{fmt, sync::OnceLock};

use serde_json::Value;

/// One reason the API server would refuse an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending field, such as `spec.rateLimit.burst`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The `openAPIV3Schema` of the CRD serving `kind`, as JSON; `None` for kinds slotgate does not
/// define.
pub fn schema_for_kind(kind: &str) -> Option<&'static Value> {
    static SCHEMAS: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        super::crds()
            .into_iter()
            .map(|crd| {
                let schema = crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(|s| serde_json::to_value(s).expect("schema serialises"))
                    .expect("derived CRDs carry a schema");
                (crd.spec.names.kind, schema)
            })
            .collect()
    });
    schemas.iter().find(|(k, _)| k == kind).map(|(_, s)| s)
}

/// Checks an `ApiPlan` or `ApiKey` object (as parsed from YAML or JSON) the way the API server
/// does on create. An empty result means it would be accepted.
pub fn validate_object(obj: &Value) -> Vec<FieldError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let Some(schema) = schema_for_kind(kind) else {
        return vec![FieldError {
            field: "kind".into(),
            message: format!("Unsupported value: {kind:?}"),
        }];
    };
    let mut errors = Vec::new();
    if obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    }
    check_node(schema, obj, "", true, &mut errors);
    // CEL rules assume a structurally valid object; the API server also skips them otherwise.
    if errors.is_empty()
        && let Err(cel) = kube::core::cel::Validator::new().validate(schema, obj, None)
    {
        errors.extend(cel.into_vec().into_iter().map(|e| FieldError {
            field: if e.field_path.is_empty() {
                "<root>".into()
            } else {
                e.field_path.clone()
            },
            message: format!("Invalid value: {}", e.message),
        }));
    }
    errors
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn check_node(schema: &Value, value: &Value, path: &str, root: bool, errors: &mut Vec<FieldError>) {
    let mut err = |message: String| {
        errors.push(FieldError {
            field: path.to_string(),
            message,
        })
    };
    if value.is_null() {
        if !schema.get("nullable").and_then(Value::as_bool).unwrap_or(false) {
            err(format!(
                "Invalid value: \"null\": {path} in body must be of type {}",
                type_of(schema)
            ));
        }
        return;
    }
    let expected = type_of(schema);
    let actual = json_type(value);
    let type_ok = match expected {
        "" => true,
        "number" => matches!(actual, "number" | "integer"),
        e => e == actual,
    };
    if !type_ok {
        err(format!(
            "Invalid value: \"{actual}\": {path} in body must be of type {expected}: {}",
            show(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        err(format!(
            "Unsupported value: {value}: supported values: {}",
            list.join(", ")
        ));
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                err(format!(
                    "Invalid value: {n}: {path} in body should be greater than or equal to {min}"
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                err(format!(
                    "Invalid value: {n}: {path} in body should be less than or equal to {max}"
                ));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                err(format!(
                    "Invalid value: {value}: {path} in body should be at least {min} chars long"
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                err(format!("Too long: may not be more than {max} bytes"));
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && s.parse::<k8s_openapi::jiff::Timestamp>().is_err()
            {
                err(format!(
                    "Invalid value: {value}: {path} in body must be of type date-time"
                ));
            }
        }
        Value::Array(items) => {
            let len = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && len < min
            {
                err(format!(
                    "Invalid value: {len}: {path} in body should have at least {min} items"
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && len > max
            {
                err(format!("Too many: {len}: must have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_node(item_schema, item, &format!("{path}[{i}]"), false, errors);
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(name) = req.as_str()
                    && !map.contains_key(name)
                {
                    errors.push(FieldError {
                        field: join(path, name),
                        message: "Required value".into(),
                    });
                }
            }
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let additional = schema.get("additionalProperties");
            for (name, child) in map {
                let child_path = join(path, name);
                // The API server validates metadata itself; only the name matters here.
                if root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match (props.and_then(|p| p.get(name)), additional) {
                    (Some(child_schema), _) => check_node(child_schema, child, &child_path, false, errors),
                    (None, Some(extra)) if extra.is_object() => {
                        check_node(extra, child, &child_path, false, errors)
                    }
                    (None, _) if preserve => {}
                    (None, _) => errors.push(FieldError {
                        field: child_path.clone(),
                        message: format!("unknown field \"{child_path}\""),
                    }),
                }
            }
        }
        _ => {}
    }
}

fn type_of(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(spec: Value) -> Value {
        json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiPlan", "metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn accepts_a_good_plan() {
        let ok = plan(json!({
            "concurrency": {"maxConcurrentRequests": 25, "paths": ["/v1/monitor/*"]},
            "rateLimit": {"requestsPerSecond": 1000, "burst": 1000, "per": "Endpoint", "paths": ["/v1/*"]}
        }));
        assert_eq!(validate_object(&ok), vec![]);
    }

    #[test]
    fn names_the_field_of_each_schema_violation() {
        let cases = [
            (
                json!({"concurrency": {"maxConcurrentRequests": -1}}),
                "spec.concurrency.maxConcurrentRequests",
                "greater than or equal to 0",
            ),
            (
                json!({"rateLimit": {"requestsPerSecond": 5, "burst": 0}}),
                "spec.rateLimit.burst",
                "greater than or equal to 1",
            ),
            (json!({"slots": 3}), "spec.slots", "unknown field \"spec.slots\""),
            (
                json!({"rateLimit": {"requestsPerSecond": 5, "per": "Tenant"}}),
                "spec.rateLimit.per",
                "Unsupported value",
            ),
            (
                json!({"concurrency": {}}),
                "spec.concurrency.maxConcurrentRequests",
                "Required value",
            ),
            (
                json!({"concurrency": {"maxConcurrentRequests": "ten"}}),
                "spec.concurrency.maxConcurrentRequests",
                "must be of type integer",
            ),
        ];
        for (spec, field, message) in cases {
            let errors = validate_object(&plan(spec.clone()));
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == field && e.message.contains(message)),
                "{spec}: expected {field}: {message}, got {errors:?}"
            );
        }
    }

    #[test]
    fn cel_rules_run_after_the_schema() {
        let errors = validate_object(&plan(
            json!({"concurrency": {"maxConcurrentRequests": 5, "paths": ["v1/*"]}}),
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.concurrency.paths");
        assert!(errors[0].message.contains("must start with /"), "{errors:?}");

        let errors = validate_object(&plan(
            json!({"rateLimit": {"requestsPerSecond": 1, "burst": 100000}}),
        ));
        assert!(
            errors.iter().any(|e| e.message.contains("one hour")),
            "{errors:?}"
        );
    }

    #[test]
    fn checks_keys_too() {
        let key = json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "k", "namespace": "default"},
            "spec": {"plan": "", "expiresAt": "tomorrow"}});
        let errors = validate_object(&key);
        assert!(errors.iter().any(|e| e.field == "spec.plan"), "{errors:?}");
        assert!(errors.iter().any(|e| e.field == "spec.expiresAt"), "{errors:?}");
    }
}
