//! The controller binary at scale against the in-memory API server: many keys, one plan upgrade.
//! CI runs 20,000 keys; `SLOTGATE_SCALE_KEYS=100000 cargo test --release --test controller_scale
//! -- --nocapture` gives the figures quoted for 100,000.

mod common;

use std::time::{Duration, Instant};

use common::{fakeapi::FakeApi, *};
use serde_json::{Value, json};

const NS: &str = "slotgate-system";

fn index(api: &FakeApi) -> Option<Value> {
    let cm = api.get("configmaps", NS, "slotgate-config")?;
    serde_json::from_str(cm["data"]["index.json"].as_str()?).ok()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_are_sharded_and_a_plan_upgrade_rewrites_one_object() {
    let n: usize = std::env::var("SLOTGATE_SCALE_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let api = FakeApi::start().await;
    let plan = |slots: u32| {
        json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiPlan", "metadata": {"name": "startup"},
               "spec": {"concurrency": {"maxConcurrentRequests": slots, "paths": ["/v1/*"]}}})
    };
    api.apply("apiplans", plan(25));
    for i in 0..n {
        api.apply(
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": format!("k{i}-token"), "namespace": "default",
                                "labels": {"slotgate.dev/token": "true"}},
                   "stringData": {"token": format!("tok-{i:08}")}}),
        );
        api.apply(
            "apikeys",
            json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiKey",
                   "metadata": {"name": format!("k{i}"), "namespace": "default"},
                   "spec": {"plan": "startup", "secretRef": {"name": format!("k{i}-token")}}}),
        );
    }
    let started = Instant::now();
    let ctl = Proc::start_env(
        &[
            "controller",
            "--namespace",
            NS,
            "--replica-name",
            "ctl-0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[
            ("KUBECONFIG", api.kubeconfig.to_str().unwrap()),
            ("SLOTGATE_LOG", "slotgate=debug"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let published = loop {
        if let Some(i) = index(&api)
            && i["version"].as_u64() >= Some(1)
        {
            let keys: usize = api
                .list("configmaps")
                .iter()
                .filter(|c| c["data"]["keys.json"].is_string())
                .map(|c| {
                    serde_json::from_str::<serde_json::Map<String, Value>>(
                        c["data"]["keys.json"].as_str().unwrap(),
                    )
                    .unwrap()
                    .len()
                })
                .sum();
            if keys == n {
                break i;
            }
        }
        assert!(Instant::now() < deadline, "never published all {n} keys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first_publish = started.elapsed();
    let shards = published["shards"].as_object().unwrap().len();
    let largest = api
        .list("configmaps")
        .iter()
        .map(|c| serde_json::to_string(&c["data"]).unwrap().len())
        .max()
        .unwrap();
    assert!(
        largest < 1024 * 1024,
        "an object of {largest} bytes exceeds the 1 MiB limit"
    );

    // One plan upgrade: exactly one configuration object written.
    let version = published["version"].as_u64().unwrap();
    let writes_before = api.writes.lock().unwrap().len();
    let t0 = Instant::now();
    api.apply("apiplans", plan(50));
    while index(&api).and_then(|i| i["version"].as_u64()) == Some(version) {
        assert!(Instant::now() < deadline, "the upgrade was never published");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let upgrade = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let config_writes = api.writes.lock().unwrap()[writes_before..]
        .iter()
        .filter(|w| w.path.contains("/configmaps/"))
        .count();
    let rss = peak_rss_mib(ctl.child.id());
    for line in ctl
        .stderr()
        .lines()
        .filter(|l| l.contains("reconcile pass") || l.contains("published"))
    {
        eprintln!("controller: {line}");
    }
    eprintln!(
        "{n} keys: first publish {first_publish:?} ({shards} shards, largest object {largest} bytes); plan upgrade published in {upgrade:?} with {config_writes} configuration object(s) written; controller peak RSS {rss:.0} MiB"
    );
    assert_eq!(config_writes, 1, "a plan upgrade rewrites the index only");
    assert_eq!(shards, n.div_ceil(2000).next_power_of_two());
}
