//! The CRDs: generated output is committed, structural, and refuses bad manifests with messages
//! that name the field. Runs the real binary.

use std::process::Command;

use serde_json::Value;

fn slotgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slotgate"))
}

fn crd_docs() -> Vec<Value> {
    let out = slotgate().arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect()
}

#[test]
fn committed_crds_match_the_generated_ones() {
    let out = slotgate().arg("crds").output().unwrap();
    let generated = String::from_utf8(out.stdout).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let committed: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        generated == committed,
        "crds/ is stale: run `cargo run -- crds > crds/slotgate.dev.yaml` and commit the result"
    );
}

/// The API server's rules for structural schemas (apiextensions-apiserver `ValidateStructural`),
/// as far as they can apply to what kube-derive emits.
fn structural_violations(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else { return };
    let exempt = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if !exempt && obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
        out.push(format!("{path}: type must not be empty"));
    }
    for forbidden in [
        "$ref",
        "definitions",
        "uniqueItems",
        "patternProperties",
        "dependencies",
        "id",
    ] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: {forbidden} is forbidden"));
        }
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: properties and additionalProperties are mutually exclusive"
        ));
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        out.push(format!("{path}: additionalProperties: false is forbidden"));
    }
    for junction in ["allOf", "anyOf", "oneOf", "not"] {
        for sub in obj.get(junction).and_then(Value::as_array).into_iter().flatten() {
            for meta in [
                "type",
                "description",
                "default",
                "nullable",
                "additionalProperties",
            ] {
                if sub.get(meta).is_some() {
                    out.push(format!(
                        "{path}.{junction}: {meta} is forbidden inside a value validation"
                    ));
                }
            }
        }
    }
    if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys = obj.get("x-kubernetes-list-map-keys").and_then(Value::as_array);
        let required = node.pointer("/items/required").and_then(Value::as_array);
        match (keys, required) {
            (Some(keys), Some(required)) if keys.iter().all(|k| required.contains(k)) => {}
            _ => out.push(format!(
                "{path}: list-type map needs list-map-keys that items require"
            )),
        }
    }
    for (name, child) in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        structural_violations(child, &format!("{path}.{name}"), out);
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}[*]"), out);
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_violations(extra, &format!("{path}{{*}}"), out);
    }
}

fn collect_rules(node: &Value, out: &mut Vec<(Value, String)>) {
    for rule in node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push((node.clone(), rule["rule"].as_str().unwrap().to_string()));
    }
    for child in node
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.values())
    {
        collect_rules(child, out);
    }
    if let Some(items) = node.get("items") {
        collect_rules(items, out);
    }
}

#[test]
fn crds_are_structural_with_cel_printer_columns_and_status() {
    let docs = crd_docs();
    assert_eq!(docs.len(), 4);
    let mut total_rules = 0;
    for crd in docs {
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        // Every kind carries the conditions the controller writes.
        let reported = true;
        assert_eq!(
            crd["spec"]["names"]["categories"][0], "slotgate",
            "{name}: category"
        );
        assert!(
            crd["spec"]["names"]["shortNames"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        );
        let versions = crd["spec"]["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1);
        let v = &versions[0];
        if reported {
            assert_eq!(
                v["subresources"]["status"],
                serde_json::json!({}),
                "{name}: status subresource"
            );
        }
        let columns: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        let expected_columns: &[&str] = match name.as_str() {
            "apitasktypes.slotgate.dev" => &["TaskType", "Method", "Path", "Ready", "Age"],
            "apiupstreams.slotgate.dev" => &["URL", "Slots", "Ready", "Age"],
            _ => &["Concurrency", "Ready", "Age"],
        };
        for &expected in expected_columns {
            assert!(
                columns.contains(&expected),
                "{name}: printer column {expected} in {columns:?}"
            );
        }
        let schema = &v["schema"]["openAPIV3Schema"];
        let mut violations = Vec::new();
        structural_violations(schema, "", &mut violations);
        assert!(violations.is_empty(), "{name} is not structural: {violations:#?}");
        let mut rules = Vec::new();
        collect_rules(schema, &mut rules);
        for (node, rule) in &rules {
            let compiled = kube::core::cel::compile_schema(node);
            let warnings = kube::core::cel::estimate_rule_cost(rule, &compiled);
            assert!(
                warnings.is_empty(),
                "{name}: rule {rule} may exceed the API server's cost budget: {warnings:?}"
            );
        }
        total_rules += rules.len();
    }
    assert_eq!(
        columns_of("apiplans.slotgate.dev"),
        [
            "Display",
            "Concurrency",
            "Req/s",
            "Burst",
            "Per",
            "Keys",
            "Tasks",
            "Ready",
            "Age"
        ]
    );
    assert!(total_rules >= 4, "CEL rules for cross-field checks");
}

fn columns_of(crd_name: &str) -> Vec<String> {
    let crd = crd_docs()
        .into_iter()
        .find(|c| c["metadata"]["name"] == crd_name)
        .unwrap();
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn compile_folder(files: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    slotgate().arg("compile").arg(dir.path()).output().unwrap()
}

#[test]
fn bad_manifests_are_refused_naming_file_line_and_field() {
    let cases = [
        (
            "spec:\n  concurrency:\n    maxConcurrentRequests: -1\n",
            11,
            "spec.concurrency.maxConcurrentRequests: Invalid value: -1",
        ),
        (
            "spec:\n  rateLimit:\n    requestsPerSecond: 5\n    burst: 0\n",
            12,
            "spec.rateLimit.burst: Invalid value: 0",
        ),
        ("spec:\n  slots: 5\n", 10, "unknown field \"spec.slots\""),
        (
            "spec:\n  concurrency:\n    maxConcurrentRequests: 5\n    paths: [\"v1/*\"]\n",
            12,
            "must start with /",
        ),
    ];
    for (spec, line, message) in cases {
        let good = "apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata: {name: ok}\nspec: {}\n---\n";
        let bad = format!(
            "{good}apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata: {{name: bad}}\n{spec}"
        );
        let out = compile_folder(&[("plans.yaml", &bad)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(
            stderr.contains(&format!("plans.yaml:{line}: The ApiPlan \"bad\" is invalid")),
            "{spec}: {stderr}"
        );
        assert!(
            stderr.contains(message),
            "{spec}: expected {message:?} in {stderr}"
        );
    }
}

#[test]
fn every_example_parses_and_compiles_with_every_key_ready() {
    let out = slotgate()
        .args(["compile", concat!(env!("CARGO_MANIFEST_DIR"), "/examples")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "examples compile without warnings: {stderr}");
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans: Vec<&String> = config["plans"].as_object().unwrap().keys().collect();
    assert_eq!(plans, ["business", "developer", "startup", "trial"]);
    let slots: Vec<u64> = ["trial", "developer", "startup", "business"]
        .iter()
        .map(|p| config["plans"][p]["concurrency"]["max"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [1, 10, 25, 50]);
    let keys = config["keys"].as_object().unwrap();
    assert_eq!(keys.len(), 3);
    let enterprise = keys
        .values()
        .find(|k| k["id"] == "default/acme-enterprise")
        .unwrap();
    assert_eq!(enterprise["overrides"]["maxConcurrentRequests"], 200);
    // Tokens appear only hashed.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("sg_demo"), "a raw token reached the configuration");
}
