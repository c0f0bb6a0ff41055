//! The Helm chart `charts/slotgate`, rendered by the real Helm engine (Helm v4 as a library,
//! through `tests/chart/helm.py`) and checked against the Kubernetes schemas, the CRDs in
//! `crds/`, and the API calls the code declares. `scripts/test.sh` creates the Python environment
//! (`target/chart-venv`); `SLOTGATE_CHART_PYTHON` points at another one.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use slotgate::{ApiCall, Reach};

const NS: &str = "slotgate-system";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/slotgate")
}

fn python() -> PathBuf {
    let p = std::env::var_os("SLOTGATE_CHART_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/chart-venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/test.sh` (it creates target/chart-venv with helm-python-sdk and \
         kubernetes-validate) or set SLOTGATE_CHART_PYTHON",
        p.display()
    );
    p
}

fn helm(args: &[&str], stdin: Option<&str>) -> Value {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(root().join("tests/chart/helm.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "helm.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Rendered objects, or the error Helm gave (schema or template `fail`).
fn render(values: Value) -> Result<Vec<Value>, String> {
    let out = helm(&["render", chart().to_str().unwrap(), &values.to_string()], None);
    if let Some(e) = out.get("error") {
        return Err(e.as_str().unwrap().to_string());
    }
    let mut objects = Vec::new();
    for (template, text) in out["manifests"].as_object().unwrap() {
        if !template.ends_with(".yaml") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(text.as_str().unwrap()) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{template} renders invalid YAML: {e}"));
            if !v.is_null() {
                objects.push(v);
            }
        }
    }
    Ok(objects)
}

fn rendered(values: Value) -> Vec<Value> {
    render(values).unwrap_or_else(|e| panic!("the chart did not render: {e}"))
}

/// Lint (strict: warnings fail) and every object against the Kubernetes 1.30 schemas (strict:
/// unknown fields fail). Objects of kinds outside Kubernetes (ServiceMonitor) are returned.
fn lint_and_validate(values: &Value, objects: &[Value]) -> Vec<String> {
    let report = helm(&["lint", chart().to_str().unwrap(), &values.to_string()], None);
    let bad: Vec<&Value> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["severity"].as_u64().unwrap() >= 2)
        .collect();
    assert!(bad.is_empty(), "helm lint: {bad:?}");
    assert_eq!(report["errors"], json!([]), "helm lint: {report}");
    let docs: Vec<String> = objects
        .iter()
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect();
    let problems = helm(&["validate", "1.30.0"], Some(&docs.join("---\n")));
    let mut unknown = Vec::new();
    for p in problems.as_array().unwrap() {
        if p["schema_missing"] == true {
            unknown.push(p["object"].as_str().unwrap().to_string());
        } else {
            panic!("{} does not validate: {}", p["object"], p["error"]);
        }
    }
    unknown
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn env(deployment: &Value, name: &str) -> Option<Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    let generated = std::fs::read_to_string(root().join("crds/slotgate.dev.yaml")).unwrap();
    let copy = std::fs::read_to_string(chart().join("files/crds.yaml")).unwrap();
    assert!(
        generated == copy,
        "charts/slotgate/files/crds.yaml differs from crds/slotgate.dev.yaml: \
         cp crds/slotgate.dev.yaml charts/slotgate/files/crds.yaml"
    );
    // What the templates install is that file, plus labels and the keep policy.
    let objects = rendered(json!({}));
    for doc in serde_yaml::Deserializer::from_str(&generated) {
        let crd: Value = serde::Deserialize::deserialize(doc).unwrap();
        let name = crd["metadata"]["name"].as_str().unwrap();
        let r = find(&objects, "CustomResourceDefinition", name);
        assert_eq!(r["spec"], crd["spec"], "{name}");
        assert_eq!(r["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    }
    let objects = rendered(json!({"crds": {"install": false}}));
    assert!(!objects.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
}

#[test]
fn default_values_install_a_locked_down_controller_and_gateway() {
    let objects = rendered(json!({}));
    let unknown = lint_and_validate(&json!({}), &objects);
    assert!(
        unknown.is_empty(),
        "objects without a Kubernetes schema: {unknown:?}"
    );
    let names = kinds(&objects);
    for want in [
        "Deployment/slotgate-controller",
        "Deployment/slotgate-gateway",
        "Deployment/slotgate-demo-upstream",
        "Service/slotgate-gateway",
        "Service/slotgate-gateway-metrics",
        "Service/slotgate-controller-metrics",
        "PodDisruptionBudget/slotgate-gateway",
        "PodDisruptionBudget/slotgate-controller",
        "ServiceAccount/slotgate-controller",
        "ServiceAccount/slotgate-gateway",
        "ConfigMap/slotgate-dashboard",
        "NetworkPolicy/slotgate-gateway",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("HorizontalPodAutoscaler/")));
    assert!(!names.iter().any(|n| n.starts_with("ServiceMonitor/")));

    let controller = find(&objects, "Deployment", "slotgate-controller");
    assert_eq!(controller["spec"]["replicas"], 2, "two controllers, one leading");
    assert!(args(controller).contains(&"--config-name=slotgate-config".to_string()));
    let gateway = find(&objects, "Deployment", "slotgate-gateway");
    let gargs = args(gateway);
    for want in [
        "gateway",
        "--config-source=kubernetes",
        "--config-name=slotgate-config",
        "--upstream=http://slotgate-demo-upstream.slotgate-system.svc:8000",
        "--shutdown-delay=5s",
        // The chart turns the access log on (`slotgate up` leaves it off).
        "--access-log=stdout",
        "--invalid-key-limit=20",
    ] {
        assert!(gargs.contains(&want.to_string()), "{want} missing from {gargs:?}");
    }
    assert!(!gargs.iter().any(|a| a.starts_with("--state")), "{gargs:?}");
    assert!(env(gateway, "SLOTGATE_STATE").is_none());
    assert_eq!(
        env(gateway, "POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    // Shutdown delay and grace for requests in flight both fit in the termination grace period.
    assert_eq!(
        gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        35
    );

    for o in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let name = o["metadata"]["name"].as_str().unwrap();
        let pod = &o["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for c in pod["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
            assert!(
                c["resources"]["requests"].is_object(),
                "{name} has no resource requests"
            );
            if name != "slotgate-demo-upstream" {
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert_eq!(c[probe]["httpGet"]["port"], "admin", "{name} {probe}");
                }
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
            }
        }
    }
    // The API port is what the gateway Service exposes; the admin port only on the metrics one.
    let svc = find(&objects, "Service", "slotgate-gateway");
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}])
    );
}

#[test]
fn value_sets_for_autoscaling_monitoring_and_a_real_upstream_render_and_validate() {
    // HPA with shared state from a Secret.
    let hpa = json!({
        "gateway": {"autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 12}},
        "state": {"existingSecret": {"name": "redis-url"}, "fallback": "fail-closed"},
    });
    let objects = rendered(hpa.clone());
    assert!(lint_and_validate(&hpa, &objects).is_empty());
    let a = find(&objects, "HorizontalPodAutoscaler", "slotgate-gateway");
    assert_eq!(a["spec"]["minReplicas"], 3);
    assert_eq!(a["spec"]["maxReplicas"], 12);
    assert_eq!(a["spec"]["scaleTargetRef"]["name"], "slotgate-gateway");
    let gateway = find(&objects, "Deployment", "slotgate-gateway");
    assert!(
        gateway["spec"].get("replicas").is_none(),
        "the HPA owns the replica count"
    );
    let state = env(gateway, "SLOTGATE_STATE").expect("the Redis URL comes from the Secret");
    assert_eq!(
        state["valueFrom"]["secretKeyRef"],
        json!({"name": "redis-url", "key": "url"})
    );
    let gargs = args(gateway);
    for want in ["--state-fallback=fail-closed", "--replicas=3"] {
        assert!(gargs.contains(&want.to_string()), "{want} missing from {gargs:?}");
    }
    assert!(
        !gargs.iter().any(|a| a.contains("redis://")),
        "no URL in the pod spec: {gargs:?}"
    );

    // ServiceMonitor on, with the labels a Prometheus selects on.
    let sm =
        json!({"metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "kube-prometheus"}}}});
    let objects = rendered(sm.clone());
    let unknown = lint_and_validate(&sm, &objects);
    assert_eq!(
        unknown,
        ["ServiceMonitor/slotgate"],
        "only the ServiceMonitor lacks a built-in schema"
    );
    let monitor = find(&objects, "ServiceMonitor", "slotgate");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    // It selects exactly the two metrics Services, whose admin port it scrapes.
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selected: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter(|o| selector.iter().all(|(k, v)| &o["metadata"]["labels"][k] == v))
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        selected,
        BTreeSet::from(["slotgate-controller-metrics", "slotgate-gateway-metrics"])
    );
    for name in &selected {
        let ports = &find(&objects, "Service", name)["spec"]["ports"];
        assert!(ports.as_array().unwrap().iter().any(|p| p["name"] == "admin"));
    }

    // A real upstream, Redis by URL, three replicas: no demo upstream.
    let custom = json!({
        "gateway": {"upstream": "http://api.prod.svc:8000", "replicas": 3, "maxUpstreamInFlight": 500},
        "state": {"url": "redis://redis-master.redis:6379/0"},
        "image": {"tag": "0.1.1"},
    });
    let objects = rendered(custom.clone());
    assert!(lint_and_validate(&custom, &objects).is_empty());
    assert!(!kinds(&objects).iter().any(|n| n.contains("demo-upstream")));
    let gateway = find(&objects, "Deployment", "slotgate-gateway");
    assert_eq!(gateway["spec"]["replicas"], 3);
    let gargs = args(gateway);
    for want in [
        "--upstream=http://api.prod.svc:8000",
        "--max-upstream-in-flight=500",
        "--replicas=3",
    ] {
        assert!(gargs.contains(&want.to_string()), "{want} missing from {gargs:?}");
    }
    assert_eq!(
        env(gateway, "SLOTGATE_STATE").unwrap()["value"],
        "redis://redis-master.redis:6379/0"
    );
    assert_eq!(
        gateway["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/slotgate/slotgate:0.1.1"
    );
}

/// `(group, resource, verb, reach)` for every verb of every rule.
type Grants = BTreeSet<(String, String, String, &'static str)>;

fn reach_name(r: Reach) -> &'static str {
    match r {
        Reach::Cluster => "cluster",
        Reach::OwnNamespace => "namespace",
    }
}

fn declared(calls: &[ApiCall]) -> Grants {
    calls
        .iter()
        .flat_map(|c| {
            c.verbs.iter().map(move |v| {
                (
                    c.group.to_string(),
                    c.resource.to_string(),
                    v.to_string(),
                    reach_name(c.reach),
                )
            })
        })
        .collect()
}

/// What the chart grants a ServiceAccount, through the bindings that name it.
fn granted(objects: &[Value], service_account: &str) -> Grants {
    let mut out = Grants::new();
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let subjects = binding["subjects"].as_array().unwrap();
        if !subjects
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == service_account && s["namespace"] == NS)
        {
            continue;
        }
        let role = find(
            objects,
            binding["roleRef"]["kind"].as_str().unwrap(),
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        let reach = if role["kind"] == "ClusterRole" && binding["kind"] == "ClusterRoleBinding" {
            "cluster"
        } else {
            assert_eq!(
                role["metadata"]["namespace"], NS,
                "a Role outside the release namespace"
            );
            "namespace"
        };
        for rule in role["rules"].as_array().unwrap() {
            assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        let (g, r, v) = (g.as_str().unwrap(), r.as_str().unwrap(), v.as_str().unwrap());
                        assert!(
                            g != "*" && r != "*" && v != "*",
                            "a wildcard in {}",
                            role["metadata"]["name"]
                        );
                        out.insert((g.into(), r.into(), v.into(), reach));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_code_declares() {
    let objects = rendered(json!({}));
    let sa = |deployment: &str| {
        find(&objects, "Deployment", deployment)["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let same = |who: &str, chart: &Grants, code: Grants| {
        let extra: Vec<_> = chart.difference(&code).collect();
        let missing: Vec<_> = code.difference(chart).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{who} RBAC: the chart grants more than the code declares: {extra:?}; \
             the code declares what the chart does not grant: {missing:?}"
        );
    };
    let controller = granted(&objects, &sa("slotgate-controller"));
    same(
        "controller",
        &controller,
        declared(slotgate::controller::API_CALLS),
    );
    let gateway = granted(&objects, &sa("slotgate-gateway"));
    same(
        "gateway",
        &gateway,
        declared(slotgate::gateway::kube_source::API_CALLS),
    );
    assert!(
        !gateway.iter().any(|g| g.1 == "secrets"),
        "the gateway never reads a Secret"
    );
    assert!(
        gateway.iter().all(|g| g.3 == "namespace"),
        "the gateway reads nothing cluster-wide"
    );
    // The demo upstream gets no API token at all.
    let demo = find(&objects, "Deployment", "slotgate-demo-upstream");
    assert_eq!(
        demo["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
}

#[test]
fn wrong_values_are_refused_with_a_message_naming_them() {
    let cases = [
        (json!({"gateway": {"replicas": "three"}}), "gateway/replicas"),
        (json!({"gateway": {"replicas": 0}}), "gateway/replicas"),
        (json!({"gatway": {"replicas": 2}}), "gatway"),
        (json!({"gateway": {"upstream": "api:8000"}}), "gateway/upstream"),
        (
            json!({"gateway": {"upstreamTimeout": "30 seconds"}}),
            "gateway/upstreamTimeout",
        ),
        (json!({"state": {"fallback": "open"}}), "state/fallback"),
        (json!({"state": {"url": "memcached://x"}}), "state/url"),
        // Valid types, wrong combination: more replicas than one without shared state.
        (json!({"gateway": {"replicas": 3}}), "state.url"),
        (
            json!({"gateway": {"autoscaling": {"enabled": true}}}),
            "state.url",
        ),
    ];
    for (values, named) in cases {
        let err = render(values.clone()).expect_err(&format!("{values} was accepted"));
        assert!(
            err.contains(named),
            "the error for {values} does not name {named}: {err}"
        );
    }
}

#[test]
fn values_yaml_documents_every_value() {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    // A value is documented by a comment right above it or above one of its parents.
    let mut stack: Vec<(usize, bool)> = Vec::new();
    let mut comment = false;
    let lines: Vec<&str> = text.lines().collect();
    let mut undocumented = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() {
            comment = false;
            continue;
        }
        if t.starts_with('#') {
            comment = true;
            continue;
        }
        let indent = line.len() - t.len();
        let Some((key, rest)) = t.split_once(':') else {
            continue;
        };
        if t.starts_with('-') || key.contains(' ') {
            continue;
        }
        while stack.last().is_some_and(|(d, _)| *d >= indent) {
            stack.pop();
        }
        let documented = comment || stack.iter().any(|(_, c)| *c);
        let is_parent = rest.trim().is_empty()
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .is_some_and(|l| l.len() - l.trim_start().len() > indent && !l.trim_start().starts_with('-'));
        if !is_parent && !documented {
            undocumented.push(key.to_string());
        }
        stack.push((indent, comment));
        comment = false;
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment: {undocumented:?}"
    );
    // And the schema knows every value the file sets (so a typo is refused, not ignored).
    let values: Value = serde_yaml::from_str(&text).unwrap();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap()).unwrap();
    fn walk(v: &Value, s: &Value, path: &str, missing: &mut Vec<String>) {
        let (Some(map), Some(props)) = (v.as_object(), s["properties"].as_object()) else {
            return;
        };
        for (k, child) in map {
            match props.get(k) {
                Some(cs) => walk(child, cs, &format!("{path}{k}."), missing),
                None => missing.push(format!("{path}{k}")),
            }
        }
    }
    let mut missing = Vec::new();
    walk(&values, &schema, "", &mut missing);
    assert!(
        missing.is_empty(),
        "values the schema does not describe: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_metrics_slotgate_exports() {
    let objects = rendered(json!({}));
    let cm = find(&objects, "ConfigMap", "slotgate-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value = serde_json::from_str(cm["data"]["slotgate.json"].as_str().unwrap()).unwrap();

    // What a real gateway sharing its limits through Redis exports, after traffic with refusals
    // and a refused configuration; and the controller's registry.
    let redis = common::Redis::start();
    let stub = common::Stub::start().await;
    let cfg = common::ConfigDir::new(&(common::slots_plan("p", 1) + &common::key_yaml("k", "p", "")));
    let gw = common::Proc::gateway(&cfg.config, &stub.url(), &["--state", &redis.url()]);
    let held = tokio::spawn({
        let url = gw.url("/v1/held?delay_ms=1000");
        async move { common::get(&url, &[("x-api-key", "tok-k")]).await }
    });
    stub.wait_in_flight(1).await;
    let refused = common::get(&gw.url("/v1/x"), &[("x-api-key", "tok-k")]).await;
    assert_eq!(refused.code(), "concurrency_limit_exceeded");
    assert_eq!(held.await.unwrap().status, http::StatusCode::OK);
    let mut exported = BTreeSet::new();
    let text = gw.metrics().await + &slotgate::controller::ControllerMetrics::new().render();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exported.insert(rest.split(' ').next().unwrap().to_string());
        }
    }
    let mut queried: BTreeMap<String, String> = BTreeMap::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("slotgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name, panel["title"].as_str().unwrap().to_string());
            }
        }
    }
    for want in [
        "slotgate_in_flight",
        "slotgate_slot_capacity",
        "slotgate_refusals_total",
    ] {
        assert!(queried.contains_key(want), "the dashboard does not show {want}");
    }
    assert!(queried.contains_key("slotgate_config_reload_duration_seconds_bucket"));
    for (name, panel) in &queried {
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "panel {panel:?} queries {name}, which no slotgate process exports ({exported:?})"
        );
    }
}

#[test]
fn the_binary_accepts_the_arguments_the_chart_gives_it() {
    for values in [
        json!({}),
        json!({"gateway": {"upstream": "http://api.prod.svc:8000", "replicas": 3, "maxUpstreamInFlight": 500,
                           "workerThreads": 2},
               "state": {"url": "redis://redis:6379/0", "fallback": "fail-closed"}}),
    ] {
        let objects = rendered(values.clone());
        for name in ["slotgate-controller", "slotgate-gateway"] {
            let deployment = find(&objects, "Deployment", name);
            // No cluster here: with valid arguments the process gets as far as looking for the
            // Kubernetes API; a flag it does not know would stop it at parsing (exit 2).
            let out = Command::new(common::SLOTGATE)
                .args(args(deployment))
                .env("KUBECONFIG", "/nonexistent/kubeconfig")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env("POD_NAME", "pod-0")
                .env("POD_NAMESPACE", NS)
                .env("SLOTGATE_LOG", "error")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_ne!(out.status.code(), Some(2), "{name} with {values}: {stderr}");
            assert!(
                stderr.contains("cannot reach the Kubernetes API"),
                "{name} with {values} stopped before looking for the API: {stderr}"
            );
        }
    }
}

#[test]
fn tasks_run_on_one_gateway_with_a_claim_or_on_many_with_redis_and_the_invalid_mixes_are_refused() {
    let objects = rendered(json!({"tasks": {"enabled": true, "storage": {"size": "5Gi"}}}));
    let gw = find(&objects, "Deployment", "slotgate-gateway");
    assert_eq!(gw["spec"]["replicas"], 1);
    // One pod at a time can open the store: the old one goes before the new one starts.
    assert_eq!(gw["spec"]["strategy"]["type"], "Recreate");
    let a = args(gw);
    for want in [
        "--data-dir=/var/lib/slotgate/tasks",
        "--webhook-secrets=/etc/slotgate/webhook-secrets",
    ] {
        assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
    }
    assert!(!a.iter().any(|x| x == "--allow-private-webhooks"));
    assert!(!a.iter().any(|x| x.starts_with("--webhook-allow-cidrs")));
    let objects = rendered(json!({"tasks": {"enabled": true, "webhookAllowCidrs": "10.96.0.0/12"}}));
    let a = args(find(&objects, "Deployment", "slotgate-gateway"));
    assert!(
        a.iter().any(|x| x == "--webhook-allow-cidrs=10.96.0.0/12"),
        "{a:?}"
    );
    let objects = rendered(json!({"tasks": {"enabled": true, "storage": {"size": "5Gi"}}}));
    let gw = find(&objects, "Deployment", "slotgate-gateway");
    let pvc = find(&objects, "PersistentVolumeClaim", "slotgate-gateway-tasks");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(pvc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    let volumes = gw["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap().clone();
    assert_eq!(
        volume("tasks")["persistentVolumeClaim"]["claimName"],
        "slotgate-gateway-tasks"
    );
    // Every shard the controller writes, optional (absent until a key has a signing secret).
    let config_name = args(find(&objects, "Deployment", "slotgate-controller"))
        .iter()
        .find_map(|a| a.strip_prefix("--config-name=").map(str::to_string))
        .unwrap();
    let sources: Vec<(String, bool)> = volume("webhook-secrets")["projected"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["secret"]["name"].as_str().unwrap().to_string(),
                s["secret"]["optional"] == true,
            )
        })
        .collect();
    let expected: Vec<(String, bool)> = (0..slotgate::controller::webhooks::SHARDS)
        .map(|i| (slotgate::controller::webhooks::shard_name(&config_name, i), true))
        .collect();
    assert_eq!(sources, expected);
    assert_eq!(
        gw["spec"]["template"]["spec"]["securityContext"]["fsGroup"], 65532,
        "the claim is writable by the gateway"
    );

    // Without tasks: no claim, rolling updates, no task flags.
    let plain = rendered(json!({}));
    assert!(!plain.iter().any(|o| o["kind"] == "PersistentVolumeClaim"));
    let gw = find(&plain, "Deployment", "slotgate-gateway");
    assert_eq!(gw["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(!args(gw).iter().any(|a| a.starts_with("--data-dir")));

    // Tasks in Redis: any number of replicas, rolling updates, no claim; the signing secrets
    // are mounted as before.
    for values in [
        json!({"tasks": {"enabled": true, "store": "redis", "claimTimeout": "45s"},
               "gateway": {"replicas": 3}, "state": {"url": "redis://redis:6379"}}),
        json!({"tasks": {"enabled": true, "store": "redis", "claimTimeout": "45s"},
               "gateway": {"autoscaling": {"enabled": true}}, "state": {"url": "redis://redis:6379"}}),
    ] {
        let objects = rendered(values.clone());
        assert!(
            !objects.iter().any(|o| o["kind"] == "PersistentVolumeClaim"),
            "{values}"
        );
        let gw = find(&objects, "Deployment", "slotgate-gateway");
        assert_eq!(gw["spec"]["strategy"]["type"], "RollingUpdate");
        if values["gateway"]["replicas"] == 3 {
            assert_eq!(gw["spec"]["replicas"], 3);
        }
        let a = args(gw);
        for want in [
            "--task-store=redis",
            "--task-claim-timeout=45s",
            "--webhook-secrets=/etc/slotgate/webhook-secrets",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--data-dir")), "{a:?}");
        let volumes = gw["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert!(volumes.iter().any(|v| v["name"] == "webhook-secrets"));
        assert!(!volumes.iter().any(|v| v["name"] == "tasks"));
    }
    // The mixes that cannot work are refused, naming what to change.
    for values in [
        json!({"tasks": {"enabled": true}, "gateway": {"replicas": 3}, "state": {"url": "redis://redis:6379"}}),
        json!({"tasks": {"enabled": true}, "gateway": {"autoscaling": {"enabled": true}},
               "state": {"url": "redis://redis:6379"}}),
    ] {
        let err = render(values.clone()).expect_err(&format!("{values} was accepted"));
        assert!(
            err.contains("tasks.store: embedded needs gateway.replicas: 1")
                && err.contains("tasks.store: redis"),
            "{values}: {err}"
        );
    }
    let err = render(json!({"tasks": {"enabled": true, "store": "redis"}})).unwrap_err();
    assert!(
        err.contains("set state.url or state.existingSecret.name"),
        "{err}"
    );
    let err = render(json!({"tasks": {"store": "disk"}})).unwrap_err();
    assert!(err.contains("tasks/store"), "{err}");
    let err = render(json!({"tasks": {"storage": {"size": "lots"}}})).unwrap_err();
    assert!(err.contains("tasks/storage/size"), "{err}");
}

#[test]
fn the_webhook_egress_example_is_a_valid_network_policy() {
    let text =
        std::fs::read_to_string(root().join("docs/examples/webhook-egress-networkpolicy.yaml")).unwrap();
    let problems = helm(&["validate", "1.30.0"], Some(&text));
    assert_eq!(problems, json!([]), "{problems}");
    let policy: Value = serde_yaml::from_str(&text).unwrap();
    let webhooks = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let except = webhooks["to"][0]["ipBlock"]["except"].as_array().unwrap();
    // The ranges the gateway itself refuses for webhooks (link-local holds cloud metadata).
    for cidr in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"] {
        assert!(except.iter().any(|c| c == cidr), "{cidr} not excepted");
    }
}
