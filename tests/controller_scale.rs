//! The controller binary at scale against the in-memory API server: many keys, one plan upgrade.
//! CI runs 20,000 keys; `SLOTGATE_SCALE_KEYS=100000 SLOTGATE_SCALE_ROUNDS=20 cargo test --release
//! --test controller_scale -- --nocapture` gives the figures quoted for 100,000.

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

    // A gateway watching the configuration through the API, as in a cluster.
    let stub = Stub::start().await;
    let gw = api.start_gateway(NS, "gw-0", &stub.url());
    let version = published["version"].as_u64().unwrap();
    while api.reported_version(NS, "gw-0") < version {
        assert!(
            Instant::now() < deadline,
            "the gateway never enforced the configuration"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gateway_first = started.elapsed();
    // Steady state: the first pass (statuses of every key included) is over.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Plan upgrades: each rewrites exactly one configuration object, and is timed from the API
    // server's change to the controller's publish and to the gateway reporting it enforces it.
    let rounds: usize = std::env::var("SLOTGATE_SCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut to_publish, mut to_enforce, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    let mut version = version;
    for round in 0..rounds {
        let writes_before = api.writes.lock().unwrap().len();
        let t0 = Instant::now();
        api.apply("apiplans", plan(26 + round as u32));
        while index(&api).and_then(|i| i["version"].as_u64()) == Some(version) {
            assert!(Instant::now() < deadline, "the upgrade was never published");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        to_publish.push(t0.elapsed());
        version = index(&api).unwrap()["version"].as_u64().unwrap();
        while api.reported_version(NS, "gw-0") < version {
            assert!(
                Instant::now() < deadline,
                "the gateway never enforced the upgrade"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        to_enforce.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Still the upgraded plan once every pass has settled: a full pass that read the plans
        // before the shortcut published must not have written the old ones back.
        assert_eq!(
            index(&api).unwrap()["plans"]["startup"]["concurrency"]["max"],
            26 + round as u64,
            "the upgrade was reverted"
        );
        writes.push(
            api.writes.lock().unwrap()[writes_before..]
                .iter()
                .filter(|w| w.path.contains("/configmaps/"))
                .count(),
        );
    }
    let rss = peak_rss_mib(ctl.child.id());
    let gw_rss = peak_rss_mib(gw.child.id());
    for line in ctl
        .stderr()
        .lines()
        .filter(|l| l.contains("published") || l.contains("pass phases"))
        .chain(
            gw.stderr()
                .lines()
                .filter(|l| l.contains("configuration applied")),
        )
    {
        eprintln!("{line}");
    }
    to_publish.sort();
    to_enforce.sort();
    eprintln!(
        "{n} keys: first publish {first_publish:?} ({shards} shards, largest object {largest} bytes), \
         gateway enforcing at {gateway_first:?}; {rounds} plan upgrades: published p50 {:?} max {:?}, \
         enforced by the gateway p50 {:?} max {:?}; configuration objects written per upgrade {writes:?}; \
         peak RSS controller {rss:.0} MiB, gateway {gw_rss:.0} MiB",
        to_publish[rounds / 2],
        to_publish[rounds - 1],
        to_enforce[rounds / 2],
        to_enforce[rounds - 1],
    );
    assert!(
        writes.iter().all(|w| *w == 1),
        "a plan upgrade rewrites the index only: {writes:?}"
    );
    assert_eq!(shards, n.div_ceil(2000).next_power_of_two());
}
