//! The operator against an in-memory Kubernetes API server on loopback (`common::fakeapi`): the
//! real controller code through the real `kube` client, and the real gateway binary watching the
//! configuration objects through the same API.

mod common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{fakeapi::FakeApi, *};
use http::StatusCode;
use serde_json::{Value, json};
use slotgate::controller::{self, ControllerMetrics, ControllerOptions};

const NS: &str = "slotgate-system";

fn plan(name: &str, slots: u32) -> Value {
    json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiPlan",
           "metadata": {"name": name},
           "spec": {"concurrency": {"maxConcurrentRequests": slots, "paths": ["/v1/*"]}}})
}

fn key(name: &str, plan: &str, secret: Option<&str>) -> Value {
    let mut spec = json!({"plan": plan});
    if let Some(s) = secret {
        spec["secretRef"] = json!({"name": s});
    }
    json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiKey",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

fn secret(name: &str, token: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "default", "labels": {"slotgate.dev/token": "true"}},
           "stringData": {"token": token}})
}

struct Controller(tokio::task::JoinHandle<()>, pub Arc<ControllerMetrics>);

impl Drop for Controller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn start_controller(api: &FakeApi, identity: &str) -> Controller {
    // Logs of the in-process controller show with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or("slotgate=debug".into()))
        .with_test_writer()
        .try_init();
    let metrics = Arc::new(ControllerMetrics::new());
    let opts = ControllerOptions {
        namespace: NS.into(),
        config_name: "slotgate-config".into(),
        identity: identity.into(),
        status_writes_per_second: 200,
        lease_duration: Duration::from_secs(2),
    };
    let client = api.client();
    let m = Arc::clone(&metrics);
    Controller(
        tokio::spawn(async move {
            let _ = controller::run(client, opts, m, std::future::pending()).await;
        }),
        metrics,
    )
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every call the controller and the gateway made is one their `API_CALLS` lists declare (the Helm
/// chart's RBAC is generated from and tested against those lists), and a call outside the own
/// namespace is declared as cluster-wide.
fn assert_calls_declared(api: &FakeApi) {
    let calls = api.calls.lock().unwrap().clone();
    for c in &calls {
        let declared = match c.who.as_str() {
            "controller" => slotgate::controller::API_CALLS,
            "gateway" => slotgate::gateway::kube_source::API_CALLS,
            other => panic!("a call by an unknown client {other}: {c:?}"),
        };
        let ok = declared.iter().any(|d| {
            d.group == c.group
                && d.resource == c.resource
                && d.verbs.contains(&c.verb)
                && (d.reach == slotgate::Reach::Cluster || c.namespace.as_deref() == Some(NS))
        });
        assert!(ok, "{} made a call its API_CALLS does not declare: {c:?}", c.who);
    }
    assert!(
        calls.iter().any(|c| c.who == "controller"),
        "no controller call was seen"
    );
}

/// Events (events.k8s.io) about one object, as `(reason, note)`.
fn events_about(api: &FakeApi, kind: &str, name: &str) -> Vec<(String, String)> {
    api.list("events")
        .iter()
        .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn condition(obj: &Option<Value>, type_: &str) -> Option<(String, String, String)> {
    let conds = obj.as_ref()?["status"]["conditions"].as_array()?.clone();
    let c = conds.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

fn config_version(api: &FakeApi) -> u64 {
    api.get("configmaps", NS, "slotgate-config")
        .and_then(|c| {
            let index: Value = serde_json::from_str(c["data"]["index.json"].as_str()?).ok()?;
            index["version"].as_u64()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_and_keys_reach_the_gateway_and_upgrades_propagate_with_one_object_written() {
    let api = FakeApi::start().await;
    let stub = Stub::start().await;
    api.apply("apiplans", plan("startup", 2));
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "startup", Some("acme-token")));
    api.apply("apikeys", key("generated", "startup", None));
    let _ctl = start_controller(&api, "ctl-0");
    wait_for("the configuration index", || config_version(&api) > 0).await;
    let gw = api.start_gateway(NS, "gw-0", &stub.url());
    wait_for("the gateway's report", || {
        api.reported_version(NS, "gw-0") >= config_version(&api)
    })
    .await;

    let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{} {:?} {:?} {}",
        r.body,
        api.list("configmaps"),
        api.get("apikeys", "default", "acme"),
        gw.stderr()
    );
    assert_eq!(r.num("x-concurrent-limit"), 2);

    // A key without a Secret got one: random, prefixed, owned by the key, never logged.
    let generated = api
        .get("secrets", "default", "generated-token")
        .expect("generated Secret");
    assert_eq!(generated["metadata"]["ownerReferences"][0]["kind"], "ApiKey");
    assert_eq!(generated["metadata"]["ownerReferences"][0]["name"], "generated");
    let b64 = generated["data"]["token"].as_str().unwrap();
    let token = String::from_utf8(base64_decode(b64)).unwrap();
    assert!(token.starts_with("sg_live_") && token.len() == 40, "{token}");
    let r = get(&gw.url("/v1/x"), &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{} {:?} {:?} {}",
        r.body,
        api.list("configmaps"),
        api.get("apikeys", "default", "generated"),
        gw.stderr()
    );
    assert!(!gw.stderr().contains(&token));

    // Statuses: Ready, and Enforced from the gateway's own report.
    wait_for("key Enforced", || {
        condition(&api.get("apikeys", "default", "acme"), "Enforced").is_some_and(|c| c.0 == "True")
    })
    .await;
    let acme = api.get("apikeys", "default", "acme");
    assert_eq!(condition(&acme, "Ready").unwrap().0, "True");
    assert_eq!(
        acme.as_ref().unwrap()["status"]["effective"]["maxConcurrentRequests"],
        2
    );
    wait_for("plan Enforced", || {
        condition(&api.get("apiplans", "", "startup"), "Enforced")
            .is_some_and(|c| c.0 == "True" && c.2.starts_with("1/1 gateway replicas enforce configuration"))
    })
    .await;
    assert_eq!(api.get("apiplans", "", "startup").unwrap()["status"]["keys"], 2);

    // Upgrades: from the API server accepting the change to the gateway reporting it enforces it.
    let mut samples = Vec::new();
    for i in 0..20 {
        let slots = if i % 2 == 0 { 5 } else { 2 };
        let before = config_version(&api);
        let writes_before = api.writes.lock().unwrap().len();
        let t0 = Instant::now();
        api.apply("apiplans", plan("startup", slots));
        wait_for("the gateway to enforce the upgrade", || {
            api.reported_version(NS, "gw-0") > before
        })
        .await;
        samples.push(t0.elapsed());
        let writes: Vec<_> = api.writes.lock().unwrap()[writes_before..]
            .iter()
            .filter(|w| w.path.contains("/configmaps/"))
            .map(|w| w.path.clone())
            .collect();
        assert_eq!(
            writes,
            [format!("/api/v1/namespaces/{NS}/configmaps/slotgate-config")]
        );
        let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
        assert_eq!(r.num("x-concurrent-limit"), u64::from(slots));
    }
    // Transitions are Events: the token generated, the plan's limits changed (upgrades that
    // follow each other closely are one Event series).
    assert!(
        events_about(&api, "ApiKey", "generated")
            .iter()
            .any(|(r, _)| r == "TokenGenerated"),
        "{:?}",
        api.list("events")
    );
    wait_for("a PlanChanged event", || {
        events_about(&api, "ApiPlan", "startup")
            .iter()
            .any(|(r, n)| r == "PlanChanged" && n.contains(" slots); configuration "))
    })
    .await;
    samples.sort();
    eprintln!(
        "propagation over {} upgrades: p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples.last().unwrap()
    );
    assert_calls_declared(&api);
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (u32::from(val(c)) << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_in_use_stays_terminating_naming_its_keys_until_they_move() {
    let api = FakeApi::start().await;
    api.apply("apiplans", plan("startup", 2));
    api.apply("apiplans", plan("business", 50));
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "startup", Some("acme-token")));
    let _ctl = start_controller(&api, "ctl-0");
    wait_for("the finalizer", || {
        api.get("apiplans", "", "startup")
            .is_some_and(|p| p["metadata"]["finalizers"][0] == "slotgate.dev/plan-in-use")
    })
    .await;

    api.delete("apiplans", "", "startup");
    wait_for("the InUse condition", || {
        condition(&api.get("apiplans", "", "startup"), "Ready")
            .is_some_and(|c| c.1 == "InUse" && c.2.contains("acme"))
    })
    .await;
    let p = api.get("apiplans", "", "startup").unwrap();
    assert!(!p["metadata"]["deletionTimestamp"].is_null());
    // The key is still served on it meanwhile.
    assert_eq!(
        condition(&api.get("apikeys", "default", "acme"), "Ready")
            .unwrap()
            .0,
        "True"
    );

    api.apply("apikeys", key("acme", "business", Some("acme-token")));
    wait_for("the plan to go", || api.get("apiplans", "", "startup").is_none()).await;
    wait_for("the key on its new plan", || {
        api.get("apikeys", "default", "acme")
            .is_some_and(|k| k["status"]["effective"]["maxConcurrentRequests"] == 50)
    })
    .await;
    assert_calls_declared(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_plans_duplicate_tokens_and_rotation_are_reported_and_enforced() {
    let api = FakeApi::start().await;
    let stub = Stub::start().await;
    api.apply("apiplans", plan("startup", 2));
    api.apply("secrets", secret("a-token", "tok-shared"));
    api.apply("secrets", secret("b-token", "tok-shared"));
    api.apply("apikeys", key("a", "startup", Some("a-token")));
    api.apply("apikeys", key("b", "startup", Some("b-token")));
    api.apply("apikeys", key("lost", "nonexistent", Some("a-token")));
    let _ctl = start_controller(&api, "ctl-0");
    wait_for("conditions", || {
        condition(&api.get("apikeys", "default", "lost"), "PlanResolved")
            .is_some_and(|c| c.0 == "False" && c.1 == "PlanNotFound")
            && condition(&api.get("apikeys", "default", "b"), "TokenReady")
                .is_some_and(|c| c.0 == "False" && c.1 == "DuplicateToken")
    })
    .await;
    let gw = api.start_gateway(NS, "gw-0", &stub.url());
    wait_for("the gateway's report", || {
        api.reported_version(NS, "gw-0") >= config_version(&api)
    })
    .await;
    assert_eq!(
        get(&gw.url("/v1/x"), &[("x-api-key", "tok-shared")]).await.status,
        StatusCode::OK
    );

    // Rotation: a new token in the Secret is in force at the gateway, the old one is not.
    let before = config_version(&api);
    let t0 = Instant::now();
    api.apply("secrets", secret("a-token", "tok-rotated"));
    wait_for("rotation enforced", || api.reported_version(NS, "gw-0") > before).await;
    eprintln!(
        "token rotation enforced {:?} after the Secret changed",
        t0.elapsed()
    );
    assert_eq!(
        get(&gw.url("/v1/x"), &[("x-api-key", "tok-rotated")])
            .await
            .status,
        StatusCode::OK
    );
    // b, which had the duplicate, now owns tok-shared alone.
    wait_for("b admitted", || {
        condition(&api.get("apikeys", "default", "b"), "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    // A deleted key stops being admitted; its generated Secret is garbage-collected with it.
    let before = config_version(&api);
    api.delete("apikeys", "default", "a");
    wait_for("deletion enforced", || api.reported_version(NS, "gw-0") > before).await;
    let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-rotated")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_calls_declared(&api);
}

/// Key `acme` (token `tok-acme`) on a 2-slot plan, a controller, and a gateway in front of a
/// stub that enforces what the controller published.
async fn acme_on_two_slots_behind_a_gateway() -> (FakeApi, Stub, Controller, Proc) {
    acme_behind_a_gateway(plan("startup", 2)).await
}

/// Key `acme` (token `tok-acme`) on `startup`, the controller, and a gateway enforcing it.
async fn acme_behind_a_gateway(startup: Value) -> (FakeApi, Stub, Controller, Proc) {
    let api = FakeApi::start().await;
    let stub = Stub::start().await;
    api.apply("apiplans", startup);
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "startup", Some("acme-token")));
    let ctl = start_controller(&api, "ctl-0");
    wait_for("the configuration index", || config_version(&api) > 0).await;
    let gw = api.start_gateway(NS, "gw-0", &stub.url());
    wait_for("the gateway's report", || {
        api.reported_version(NS, "gw-0") >= config_version(&api)
    })
    .await;
    (api, stub, ctl, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_its_last_good_configuration_through_malformed_objects_and_api_outages() {
    let (api, _stub, ctl, gw) = acme_on_two_slots_behind_a_gateway().await;
    let good = config_version(&api);

    // Someone overwrites the index with garbage: refused, counted, the last good one serves, and
    // the controller repairs the object.
    drop(ctl);
    api.apply(
        "configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "slotgate-config", "namespace": NS,
                            "labels": {"slotgate.dev/config": "slotgate-config"}},
               "data": {"index.json": "{not json"}}),
    );
    gw.wait_metric("slotgate_config_reload_failures_total{reason=\"parse\"}", |v| {
        v >= 1.0
    })
    .await;
    assert_eq!(
        get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await.status,
        StatusCode::OK
    );
    assert_eq!(gw.metric("slotgate_config_version").await, good as f64);
    let _ctl = start_controller(&api, "ctl-1");
    wait_for("the index repaired", || config_version(&api) == good).await;

    // The API server goes away: the gateway keeps serving; when it is back, changes flow again.
    api.set_down(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.num("x-concurrent-limit"), 2);
    }
    api.set_down(false);
    api.apply("apiplans", plan("startup", 7));
    wait_for("the upgrade after the outage", || {
        api.reported_version(NS, "gw-0") > good
    })
    .await;
    let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
    assert_eq!(r.num("x-concurrent-limit"), 7);
    assert_calls_declared(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_takes_over_when_the_leader_dies() {
    let api = FakeApi::start().await;
    api.apply("apiplans", plan("startup", 2));
    let first = start_controller(&api, "ctl-a");
    wait_for("a published configuration", || config_version(&api) > 0).await;
    let second = start_controller(&api, "ctl-b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(first.1.leader.get(), 1);
    assert_eq!(second.1.leader.get(), 0, "only one leader at a time");
    let holder = |api: &FakeApi| {
        api.get("leases", NS, "slotgate-config-controller-leader")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
    };
    assert_eq!(holder(&api).as_deref(), Some("ctl-a"));

    drop(first);
    let killed = Instant::now();
    wait_for("the takeover", || holder(&api).as_deref() == Some("ctl-b")).await;
    eprintln!(
        "takeover {:?} after the leader died (lease 2 s)",
        killed.elapsed()
    );
    let before = config_version(&api);
    api.apply("apiplans", plan("startup", 9));
    wait_for("the new leader publishes", || config_version(&api) > before).await;
    assert_eq!(second.1.leader.get(), 1);
    assert_calls_declared(&api);
}

/// The API server fails every call with `code` for `outage` (410: compacts the watch history
/// instead, so every watch must list again); a plan upgrade and a new key made the moment it is
/// back are enforced by the gateway within 5 s. kube's default watch backoff had grown to 30 s by
/// then, and its client retried one call for over a minute.
async fn a_change_right_after_a_fault_is_enforced_within_seconds(code: u16, outage: Duration) {
    let (api, _stub, _ctl, gw) = acme_on_two_slots_behind_a_gateway().await;

    if code == 410 {
        api.expire_watches();
    } else {
        api.set_failing(code);
        tokio::time::sleep(outage).await;
        let r = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
        assert_eq!(r.status, StatusCode::OK, "the last good configuration serves");
        api.set_failing(0);
    }
    let back = Instant::now();
    api.apply("apiplans", plan("startup", 7));
    api.apply("secrets", secret("new-token", "tok-new"));
    api.apply("apikeys", key("new", "startup", Some("new-token")));
    let deadline = back + Duration::from_secs(5);
    loop {
        let upgraded = get(&gw.url("/v1/x"), &[("x-api-key", "tok-acme")]).await;
        let added = get(&gw.url("/v1/x"), &[("x-api-key", "tok-new")]).await;
        if upgraded.num("x-concurrent-limit") == 7 && added.status == StatusCode::OK {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "the change after {outage:?} of {code} was not enforced within 5 s \
                 (limit {}, new key {}, enforced version {}, published {});\ngateway log:\n{}",
                upgraded.num("x-concurrent-limit"),
                added.status,
                api.reported_version(NS, "gw-0"),
                config_version(&api),
                tail(&gw.stderr(), 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "after {outage:?} of {code}: upgrade and new key enforced {:?} after the API returned",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_a_10_second_outage_is_enforced_within_seconds() {
    a_change_right_after_a_fault_is_enforced_within_seconds(503, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_a_60_second_outage_is_enforced_within_seconds() {
    a_change_right_after_a_fault_is_enforced_within_seconds(503, Duration::from_secs(60)).await;
}

/// An API server whose authentication or authorization is not ready after a restart answers 401
/// or 403 for a while: retried like an outage, never fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_a_spell_of_401_is_enforced_within_seconds() {
    a_change_right_after_a_fault_is_enforced_within_seconds(401, Duration::from_secs(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_a_spell_of_403_is_enforced_within_seconds() {
    a_change_right_after_a_fault_is_enforced_within_seconds(403, Duration::from_secs(4)).await;
}

/// Watch history compacted (410 Gone): every watch lists again, and a change made then is
/// enforced at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_the_watch_history_expires_is_enforced_within_seconds() {
    a_change_right_after_a_fault_is_enforced_within_seconds(410, Duration::ZERO).await;
}

/// The last `n` lines of a log, for a failure message.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn controller_logs_piped_into_a_file_carry_no_colour_codes() {
    // No cluster to reach: the controller logs why and stops; its stderr is a pipe here.
    let out = std::process::Command::new(common::SLOTGATE)
        .args(["controller", "--namespace", NS, "--admin-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("SLOTGATE_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = [out.stdout, out.stderr].concat();
    assert!(!all.is_empty(), "the controller said something");
    assert!(
        !all.contains(&0x1b),
        "escape codes in piped logs: {}",
        String::from_utf8_lossy(&all)
    );
}

/// A key-level ban and the key's usage reach its status through the gateway's report: a Warning
/// event when the ban starts, `Banned=True` while it lasts (gone after), and the last minute's
/// requests and refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_key_gets_an_event_and_a_banned_condition_and_its_usage_shows_in_its_status() {
    let mut p = plan("startup", 1);
    p["spec"]["abuse"] = json!({"refusals": 3, "window": "10s", "banDuration": "3s", "by": "Key"});
    let (api, stub, _ctl, gw) = acme_behind_a_gateway(p).await;

    let held = {
        let url = gw.url("/v1/slow?delay_ms=1500");
        tokio::spawn(async move { get(&url, &[("x-api-key", "tok-acme")]).await })
    };
    stub.wait_in_flight(1).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get(&gw.url("/v1/a"), &[("x-api-key", "tok-acme")]).await.code());
    }
    assert_eq!(
        codes,
        [
            "concurrency_limit_exceeded",
            "concurrency_limit_exceeded",
            "concurrency_limit_exceeded",
            "temporarily_blocked"
        ]
    );
    wait_for("the Banned condition", || {
        condition(&api.get("apikeys", "default", "acme"), "Banned").is_some_and(|c| c.0 == "True")
    })
    .await;
    let (_, reason, message) = condition(&api.get("apikeys", "default", "acme"), "Banned").unwrap();
    assert_eq!(reason, "TemporarilyBlocked");
    assert!(message.contains("temporarily_blocked until"), "{message}");
    let events = events_about(&api, "ApiKey", "acme");
    assert!(
        events.iter().any(|(r, _)| r == "TemporarilyBlocked"),
        "{events:?}"
    );
    // A periodic report may have snapshotted the usage just before the refusals; the next
    // snapshot is at most 30 s after it.
    let deadline = Instant::now() + Duration::from_secs(45);
    let reported = || {
        api.get("apikeys", "default", "acme")
            .is_some_and(|k| k["status"]["usage"]["requestsLastMinute"].as_u64() >= Some(4))
    };
    while !reported() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the usage summary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A snapshot taken when the ban started (the report goes at once) holds the 4 requests
    // before it, or all 5; the next comes at most 30 s later.
    let usage = api.get("apikeys", "default", "acme").unwrap()["status"]["usage"].clone();
    let (req, refused) = (
        usage["requestsLastMinute"].as_u64().unwrap(),
        usage["refusedLastMinute"].as_u64().unwrap(),
    );
    assert!((4..=5).contains(&req) && refused == req - 1, "{usage}");
    assert_eq!(held.await.unwrap().status, http::StatusCode::OK);

    // The ban ends: the condition goes.
    wait_for("the Banned condition to go", || {
        condition(&api.get("apikeys", "default", "acme"), "Banned").is_none()
    })
    .await;
    assert_calls_declared(&api);
}

fn upstream(name: &str, url: &str, path: &str, credential: (&str, &str)) -> Value {
    json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiUpstream",
           "metadata": {"name": name},
           "spec": {"url": url, "paths": [path],
                    "credentialRef": {"namespace": credential.0, "name": credential.1, "key": "api-key"},
                    "concurrency": {"maxConcurrentRequests": 3}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_get_conditions_and_their_credentials_reach_the_gateways_through_a_secret_of_their_own() {
    const PROVIDER: &str = "sk-vendor-4242";
    let api = FakeApi::start().await;
    let (stub, vendor) = (Stub::start().await, Stub::start().await);
    let pki = tempfile::tempdir().unwrap();
    let (_, leaf, leaf_key) = test_pki(pki.path());
    let untrusted = tls_front(vendor.addr.unwrap(), &leaf, &leaf_key).await;
    api.apply("apiplans", plan("startup", 4));
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "startup", Some("acme-token")));
    // The provider's Secret lives elsewhere and carries no slotgate label.
    api.apply(
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "provider", "namespace": "vendors"},
               "stringData": {"api-key": PROVIDER}}),
    );
    api.apply(
        "apiupstreams",
        upstream("vendor", &vendor.url(), "/v1/vendor/*", ("vendors", "provider")),
    );
    api.apply(
        "apiupstreams",
        upstream("broken", &vendor.url(), "/v1/broken/*", ("vendors", "gone")),
    );
    // Signed by a CA the gateway does not know.
    let mut no_ca = upstream(
        "untrusted",
        &format!("https://127.0.0.1:{}", untrusted.port()),
        "/v1/untrusted/*",
        ("vendors", "provider"),
    );
    no_ca["spec"].as_object_mut().unwrap().remove("credentialRef");
    api.apply("apiupstreams", no_ca);
    let _ctl = start_controller(&api, "ctl-0");

    let published = "slotgate-config-target-credentials";
    wait_for("the target credentials Secret", || {
        api.get("secrets", NS, published).is_some()
    })
    .await;
    let creds = api.get("secrets", NS, published).unwrap();
    let data = creds["data"].as_object().unwrap().clone();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["vendor"],
        "only resolved credentials: {creds}"
    );
    assert_eq!(
        base64_decode(data["vendor"].as_str().unwrap()),
        PROVIDER.as_bytes()
    );
    wait_for("the configuration with its targets", || {
        api.get("configmaps", NS, "slotgate-config")
            .and_then(|c| c["data"]["index.json"].as_str().map(|t| t.contains("\"vendor\"")))
            .unwrap_or(false)
    })
    .await;
    for c in api.list("configmaps") {
        assert!(
            !c.to_string().contains(PROVIDER),
            "a credential in a ConfigMap: {c}"
        );
    }

    wait_for("the targets' conditions", || {
        condition(&api.get("apiupstreams", "", "vendor"), "Ready").is_some()
            && condition(&api.get("apiupstreams", "", "broken"), "Ready").is_some()
    })
    .await;
    let vendor_obj = api.get("apiupstreams", "", "vendor");
    assert_eq!(condition(&vendor_obj, "Ready").unwrap().0, "True");
    assert_eq!(
        condition(&vendor_obj, "CredentialResolved").unwrap().1,
        "Resolved"
    );
    assert_eq!(condition(&vendor_obj, "TLSValid").unwrap().0, "True");
    let broken = api.get("apiupstreams", "", "broken");
    let (status, reason, message) = condition(&broken, "CredentialResolved").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretNotFound"));
    assert!(message.contains("vendors/gone/api-key"), "{message}");
    assert_eq!(condition(&broken, "Ready").unwrap().1, "CredentialNotFound");

    // The gateway mounts that Secret as the kubelet would: one file per entry.
    let mount = tempfile::tempdir().unwrap();
    for (name, value) in &data {
        std::fs::write(mount.path().join(name), base64_decode(value.as_str().unwrap())).unwrap();
    }
    let gw = api.start_gateway_with(
        NS,
        "gw-0",
        &stub.url(),
        &["--target-credentials", mount.path().to_str().unwrap()],
    );
    wait_for("the gateway's report", || {
        api.reported_version(NS, "gw-0") >= config_version(&api)
    })
    .await;
    let r = get(&gw.url("/v1/vendor/x"), &[("x-api-key", "tok-acme")]).await;
    assert_eq!(r.status, StatusCode::OK, "{} {}", r.body, gw.stderr());
    let seen = vendor.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {PROVIDER}").as_str()
    );
    assert!(!seen[0].headers.contains_key("x-api-key"));
    let r = get(&gw.url("/v1/broken/x"), &[("x-api-key", "tok-acme")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.code(), "target_unavailable");
    assert_eq!(
        stub.seen.lock().unwrap().len(),
        0,
        "nothing fell through to the default upstream"
    );
    assert!(!gw.stderr().contains(PROVIDER), "the credential is never logged");
    assert_calls_declared(&api);
}

fn task_type(name: &str, task_type: &str, path: &str) -> Value {
    json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiTaskType",
           "metadata": {"name": name},
           "spec": {"taskType": task_type, "request": {"method": "POST", "path": path}, "timeout": "90s"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_types_reach_the_configuration_and_each_says_whether_it_is_taken() {
    let api = FakeApi::start().await;
    api.apply("apiplans", plan("startup", 4));
    api.apply(
        "apitasktypes",
        task_type("chat", "CHATGPT", "/v1/monitor/chatgpt"),
    );
    // Same taskType, a name that sorts after: the first keeps it.
    api.apply("apitasktypes", task_type("zz-chat", "CHATGPT", "/v2/chat"));
    // What the API server's CEL rule refuses; the fake has no CEL, compile refuses it too.
    api.apply("apitasktypes", task_type("bad", "BAD", "/v1/x?y=1"));
    let _ctl = start_controller(&api, "ctl-0");
    let index = || -> Option<Value> {
        let c = api.get("configmaps", NS, "slotgate-config")?;
        serde_json::from_str(c["data"]["index.json"].as_str()?).ok()
    };
    wait_for("the task types in the configuration", || {
        index().is_some_and(|i| i["taskTypes"]["CHATGPT"].is_object())
    })
    .await;
    let i = index().unwrap();
    assert_eq!(i["taskTypes"]["CHATGPT"]["path"], "/v1/monitor/chatgpt");
    assert_eq!(i["taskTypes"]["CHATGPT"]["timeoutMs"], 90_000);
    assert!(i["taskTypes"].get("BAD").is_none(), "{i}");
    wait_for("the task types' conditions", || {
        ["chat", "zz-chat", "bad"]
            .iter()
            .all(|n| condition(&api.get("apitasktypes", "", n), "Ready").is_some())
    })
    .await;
    assert_eq!(
        condition(&api.get("apitasktypes", "", "chat"), "Ready")
            .unwrap()
            .1,
        "Declared"
    );
    let (status, reason, message) = condition(&api.get("apitasktypes", "", "zz-chat"), "Ready").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Duplicate"));
    assert!(message.contains("ApiTaskType chat"), "{message}");
    assert_eq!(
        condition(&api.get("apitasktypes", "", "bad"), "Ready").unwrap().1,
        "Invalid"
    );

    // A change of a task type is published like a plan change.
    let version = config_version(&api);
    api.apply("apitasktypes", task_type("chat", "CHATGPT", "/v1/monitor/chat2"));
    wait_for("the new path", || {
        index().is_some_and(|i| i["taskTypes"]["CHATGPT"]["path"] == "/v1/monitor/chat2")
    })
    .await;
    assert!(config_version(&api) > version);
    assert_calls_declared(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_secrets_are_generated_never_overwritten_and_published_for_the_gateways_to_mount() {
    const KEPT: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let api = FakeApi::start().await;
    let mut tasks_plan = plan("async", 4);
    tasks_plan["spec"]["tasks"] = json!({});
    api.apply("apiplans", tasks_plan);
    api.apply("apiplans", plan("sync-only", 4));
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "async", Some("acme-token")));
    let mut kept = secret("kept-token", "tok-kept");
    kept["stringData"]["webhook-secret"] = json!(KEPT);
    api.apply("secrets", kept);
    api.apply("apikeys", key("kept", "async", Some("kept-token")));
    api.apply("secrets", secret("plain-token", "tok-plain"));
    api.apply("apikeys", key("plain", "sync-only", Some("plain-token")));
    let _ctl = start_controller(&api, "ctl-0");

    let entry = |secret: &str| -> Option<String> {
        let s = api.get("secrets", "default", secret)?;
        let b64 = s["data"]["webhook-secret"].as_str()?;
        Some(String::from_utf8(base64_decode(b64)).unwrap())
    };
    wait_for("a generated signing secret", || entry("acme-token").is_some()).await;
    let generated = entry("acme-token").unwrap();
    let raw = generated.strip_prefix("whsec_").expect("whsec_ prefix");
    assert_eq!(base64_decode(raw).len(), 32, "{generated}");
    // The token itself is untouched, and the signing secret admits nothing.
    assert_eq!(
        base64_decode(
            api.get("secrets", "default", "acme-token").unwrap()["data"]["token"]
                .as_str()
                .unwrap()
        ),
        b"tok-acme"
    );

    // Every key's signing secret, published where the gateways mount it from; none for a key
    // whose plan has no tasks, and the one already there kept as it was.
    let published = || -> BTreeMap<String, String> {
        api.list("secrets")
            .iter()
            .filter(|s| {
                s["metadata"]["namespace"] == NS
                    && s["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("slotgate-config-webhook-secrets-"))
            })
            .flat_map(|s| {
                s["data"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8(base64_decode(v.as_str().unwrap())).unwrap()))
            })
            .collect()
    };
    wait_for("both signing secrets published", || published().len() == 2).await;
    let p = published();
    assert_eq!(p["default.acme"], generated);
    assert_eq!(p["default.kept"], KEPT);
    assert!(!p.contains_key("default.plain"));
    assert_eq!(entry("kept-token").as_deref(), Some(KEPT), "never overwritten");
    assert_eq!(entry("plain-token"), None);

    // The key generated for stays as it is on later passes.
    api.apply("apikeys", key("acme", "async", Some("acme-token")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(entry("acme-token").unwrap(), generated);
    // The gateways read no Secret through the API: they mount these.
    assert!(
        slotgate::gateway::kube_source::API_CALLS
            .iter()
            .all(|c| c.resource != "secrets")
    );
    assert_calls_declared(&api);
}

/// An upstream that takes connections and never answers: tasks sent to it stay running.
async fn silent_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Plan `async` (2 slots, tasks), key `acme` (token `tok-acme`) and task type `WORK`, with a
/// controller that has published them; returns the controller.
async fn tasks_on_two_slots(api: &FakeApi) -> Controller {
    let mut tasks_plan = plan("async", 2);
    tasks_plan["spec"]["tasks"] = json!({});
    api.apply("apiplans", tasks_plan);
    api.apply("secrets", secret("acme-token", "tok-acme"));
    api.apply("apikeys", key("acme", "async", Some("acme-token")));
    api.apply("apitasktypes", task_type("work", "WORK", "/v1/work"));
    let ctl = start_controller(api, "ctl-0");
    wait_for("the task type in the configuration", || {
        api.get("configmaps", NS, "slotgate-config")
            .and_then(|c| c["data"]["index.json"].as_str().map(|t| t.contains("\"WORK\"")))
            .unwrap_or(false)
    })
    .await;
    ctl
}

/// Submits `n` WORK tasks as `acme`, task `i` to gateway `i % gws.len()`; each must be accepted.
async fn submit_work(gws: &[&Proc], n: usize) {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    for i in 0..n {
        let req = http::Request::post(gws[i % gws.len()].url("/v1/tasks"))
            .header("x-api-key", "tok-acme")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"taskType": "WORK", "payload": {}}).to_string(),
            )))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_queued_and_running_tasks_show_in_its_status() {
    let api = FakeApi::start().await;
    let upstream = silent_upstream().await;
    let _ctl = tasks_on_two_slots(&api).await;
    let data = tempfile::tempdir().unwrap();
    let gw = api.start_gateway_with(
        NS,
        "gw-0",
        &format!("http://{upstream}"),
        &["--data-dir", data.path().to_str().unwrap()],
    );
    wait_for("the gateway's report", || {
        api.reported_version(NS, "gw-0") >= config_version(&api)
    })
    .await;
    submit_work(&[&gw], 5).await;
    // Two slots: two running, three waiting; summed from the gateways' reports.
    wait_for("the task counts in the key's status", || {
        api.get("apikeys", "default", "acme").is_some_and(|k| {
            k["status"]["usage"]["tasksRunning"] == 2 && k["status"]["usage"]["tasksQueued"] == 3
        })
    })
    .await;
    assert_calls_declared(&api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_queued_and_running_tasks_show_in_its_status_counted_once() {
    let api = FakeApi::start().await;
    let redis = Redis::start();
    let upstream = silent_upstream().await;
    let _ctl = tasks_on_two_slots(&api).await;
    // Two replicas sharing their tasks in one Redis.
    let state = redis.url();
    let fleet = ["--state", state.as_str(), "--task-store", "redis"];
    let gws: Vec<_> = ["gw-0", "gw-1"]
        .into_iter()
        .map(|name| api.start_gateway_with(NS, name, &format!("http://{upstream}"), &fleet))
        .collect();
    for name in ["gw-0", "gw-1"] {
        wait_for("the gateways' reports", || {
            api.reported_version(NS, name) >= config_version(&api)
        })
        .await;
    }
    submit_work(&gws.iter().collect::<Vec<_>>(), 7).await;
    // Two slots across the fleet: two running, five queued, whichever replica holds what; the
    // fleet-wide count is reported by both and counted once.
    wait_for("the fleet's task counts in the key's status", || {
        api.get("apikeys", "default", "acme").is_some_and(|k| {
            k["status"]["usage"]["tasksRunning"] == 2 && k["status"]["usage"]["tasksQueued"] == 5
        })
    })
    .await;
    assert_calls_declared(&api);
}
