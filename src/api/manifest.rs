//! Reading the manifests `kubectl apply` takes (multi-document YAML) without an API server, with
//! errors that name the file, the line and the field.

use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde_json::Value;

use super::{ApiKey, ApiPlan, ApiTaskType, ApiUpstream, validate};

/// One object read from a manifest file.
#[derive(Clone, Debug)]
pub enum Manifest {
    /// An `ApiPlan`.
    Plan(ApiPlan),
    /// An `ApiKey`.
    Key(ApiKey),
    /// An `ApiTaskType`.
    TaskType(ApiTaskType),
    /// An `ApiUpstream`.
    Upstream(ApiUpstream),
    /// A `Secret` (a key's token, or a target's credential).
    Secret(Secret),
    /// A `ConfigMap` (a target's CA bundle).
    ConfigMap(ConfigMap),
    /// Any other kind: named in a warning and skipped.
    Skipped {
        /// `apiVersion/kind` of the object.
        kind: String,
        /// Line where its document starts.
        line: usize,
    },
}

/// Why a manifest file was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// File the error is in.
    pub file: String,
    /// 1-based line of the offending document or field.
    pub line: usize,
    /// What is wrong, in the API server's words where it has words for it.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// Parses and validates every document of one file. All-or-nothing: any error refuses the file,
/// so a half-edited file never half-applies.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (start, doc) in split_documents(text) {
        let err = |line: usize, message: String| ManifestError {
            file: file.to_string(),
            line,
            message,
        };
        let value: Value = match serde_yaml::from_str::<Option<Value>>(doc) {
            Ok(Some(v)) => v,
            Ok(None) => continue, // an empty document, such as a trailing `---`
            Err(e) => {
                let line = start + e.location().map(|l| l.line()).unwrap_or(1) - 1;
                return Err(err(line, format!("YAML does not parse: {e}")));
            }
        };
        if value.is_null() {
            continue;
        }
        let text_of = |p: &str| {
            value
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (api_version, kind, name) = (
            text_of("/apiVersion"),
            text_of("/kind"),
            text_of("/metadata/name"),
        );
        match (api_version.as_str(), kind.as_str()) {
            ("slotgate.dev/v1alpha1", "ApiPlan" | "ApiKey" | "ApiTaskType" | "ApiUpstream") => {
                if let Some(first) = validate::validate_object(&value).into_iter().next() {
                    let line = start + find_field_line(doc, &first.field);
                    return Err(err(line, format!("The {kind} {name:?} is invalid: {first}")));
                }
                let parsed = if kind == "ApiPlan" {
                    serde_json::from_value(value).map(Manifest::Plan)
                } else if kind == "ApiTaskType" {
                    serde_json::from_value(value).map(Manifest::TaskType)
                } else if kind == "ApiUpstream" {
                    serde_json::from_value(value).map(Manifest::Upstream)
                } else {
                    serde_json::from_value::<ApiKey>(value).map(|mut k| {
                        k.metadata.namespace.get_or_insert_with(|| "default".into());
                        Manifest::Key(k)
                    })
                };
                out.push(parsed.map_err(|e| err(start, format!("The {kind} {name:?} is invalid: {e}")))?);
            }
            ("v1", "Secret") => {
                let mut secret: Secret = serde_json::from_value(value)
                    .map_err(|e| err(start, format!("The Secret {name:?} is invalid: {e}")))?;
                // stringData is write-only in the API: the server folds it into data.
                if let Some(string_data) = secret.string_data.take() {
                    let data = secret.data.get_or_insert_with(Default::default);
                    for (k, v) in string_data {
                        data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                    }
                }
                secret.metadata.namespace.get_or_insert_with(|| "default".into());
                out.push(Manifest::Secret(secret));
            }
            ("v1", "ConfigMap") => {
                let mut map: ConfigMap = serde_json::from_value(value)
                    .map_err(|e| err(start, format!("The ConfigMap {name:?} is invalid: {e}")))?;
                map.metadata.namespace.get_or_insert_with(|| "default".into());
                out.push(Manifest::ConfigMap(map));
            }
            ("", _) | (_, "") => {
                return Err(err(start, "document has no apiVersion or kind".into()));
            }
            (v, k) => out.push(Manifest::Skipped {
                kind: format!("{v}/{k}"),
                line: start,
            }),
        }
    }
    Ok(out)
}

/// Splits a YAML stream on `---` lines, returning each document with its 1-based first line.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

/// 0-based line within `doc` where the last segment of a dotted field path is written, found by
/// following the path's segments down the document; the document's first line otherwise.
fn find_field_line(doc: &str, field: &str) -> usize {
    let lines: Vec<&str> = doc.lines().collect();
    let mut from = 0;
    let mut found = 0;
    for segment in field.split('.') {
        let name = segment.split('[').next().unwrap_or(segment);
        if let Some(i) = (from..lines.len()).find(|&i| {
            let l = lines[i].trim_start().trim_start_matches("- ");
            l.starts_with(&format!("{name}:"))
        }) {
            found = i;
            from = i + 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_kind_and_skips_others() {
        let text = "apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata: {name: p}\nspec: {}\n---\n\
                    apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: abc}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: c}\n---\n";
        let out = parse_manifests("x.yaml", text).unwrap();
        assert!(matches!(out[0], Manifest::Plan(_)));
        match &out[1] {
            Manifest::Secret(s) => assert_eq!(s.data.as_ref().unwrap()["token"].0, b"abc"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[2], Manifest::Skipped { kind, line: 11 } if kind == "v1/Service"));
    }

    #[test]
    fn names_file_line_and_field() {
        let text = "apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata: {name: ok}\nspec: {}\n---\n\
                    apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata:\n  name: bad\nspec:\n  rateLimit:\n    requestsPerSecond: 10\n    burst: 0\n";
        let e = parse_manifests("plans.yaml", text).unwrap_err();
        assert_eq!(e.line, 13, "{e}");
        assert!(
            e.to_string()
                .starts_with("plans.yaml:13: The ApiPlan \"bad\" is invalid: spec.rateLimit.burst"),
            "{e}"
        );

        let e = parse_manifests("broken.yaml", "kind: ApiPlan\nspec: [\n").unwrap_err();
        assert!(e.message.contains("YAML does not parse"), "{e}");
    }
}
