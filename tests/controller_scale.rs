//! The controller binary at scale against the in-memory API server and a real gateway: many keys,
//! then plan upgrades, keys added and tokens rotated one at a time, each timed from the API
//! server's change to the gateway enforcing it (a request with the new token admitted).
//!
//! CI runs 20,000 keys; `SLOTGATE_SCALE_KEYS=100000 SLOTGATE_SCALE_ROUNDS=20 cargo test --release
//! --test controller_scale -- --nocapture` gives the figures quoted for 100,000, and
//! `SLOTGATE_BIN=<an earlier build>` runs the same against it, side by side.

mod common;

use std::time::{Duration, Instant};

use common::{fakeapi::FakeApi, *};
use serde_json::{Value, json};

const NS: &str = "slotgate-system";

fn index(api: &FakeApi) -> Option<Value> {
    let cm = api.get("configmaps", NS, "slotgate-config")?;
    serde_json::from_str(cm["data"]["index.json"].as_str()?).ok()
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    rss_mib(pid, "VmHWM:")
}

/// The `q` quantile of durations (nearest rank).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secret(name: &str, token: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "default", "labels": {"slotgate.dev/token": "true"}},
           "stringData": {"token": token}})
}

/// Waits until the gateway admits `token`, and returns how long that took from `t0`.
async fn admitted(gw: &Proc, token: &str, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if get(&gw.url("/v1/x"), &[("x-api-key", token)]).await.status == 200 {
            return t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never admitted the new token"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
    // A gateway with no configuration yet: the size a gateway has before any key.
    let idle_stub = Stub::start().await;
    let idle = api.start_gateway("idle", "gw-idle", &idle_stub.url());
    for i in 0..n {
        api.apply("secrets", secret(&format!("k{i}-token"), &format!("tok-{i:08}")));
        api.apply(
            "apikeys",
            json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiKey",
                   "metadata": {"name": format!("k{i}"), "namespace": "default"},
                   "spec": {"plan": "startup", "secretRef": {"name": format!("k{i}-token")}}}),
        );
    }
    // High enough that every status can catch up within the test; the writer runs behind the
    // changes throughout, which is what its priority queue is for.
    let status_rate: u32 = std::env::var("SLOTGATE_SCALE_STATUS_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
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
            "--status-writes-per-second",
            &status_rate.to_string(),
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

    // Keys added one at a time, then tokens rotated one at a time.
    let (mut to_add, mut to_rotate) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t0 = Instant::now();
        api.apply(
            "secrets",
            secret(&format!("new{round}-token"), &format!("tok-new-{round}")),
        );
        api.apply(
            "apikeys",
            json!({"apiVersion": "slotgate.dev/v1alpha1", "kind": "ApiKey",
                   "metadata": {"name": format!("new{round}"), "namespace": "default"},
                   "spec": {"plan": "startup", "secretRef": {"name": format!("new{round}-token")}}}),
        );
        to_add.push(admitted(&gw, &format!("tok-new-{round}"), t0).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for round in 0..rounds {
        let t0 = Instant::now();
        let token = format!("tok-rotated-{round}");
        api.apply("secrets", secret(&format!("k{round}-token"), &token));
        to_rotate.push(admitted(&gw, &token, t0).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    to_add.sort();
    to_rotate.sort();

    let rss = peak_rss_mib(ctl.child.id());
    let rss_now = rss_mib(ctl.child.id(), "VmRSS:");
    let gw_rss = rss_mib(gw.child.id(), "VmRSS:");
    let idle_rss = rss_mib(idle.child.id(), "VmRSS:");
    let per_key = (gw_rss - idle_rss) * 1024.0 * 1024.0 / n as f64;
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
         gateway enforcing every key at {gateway_first:?}; {rounds} plan upgrades: published p50 {:?} \
         max {:?}, enforced by the gateway p50 {:?} p99 {:?}; configuration objects written per \
         upgrade {writes:?}; key added -> admitted p50 {:?} p99 {:?}; token rotated -> admitted p50 \
         {:?} p99 {:?}; controller RSS peak {rss:.0} MiB, now {rss_now:.0} MiB; gateway RSS {gw_rss:.0} MiB, \
         idle {idle_rss:.0} MiB, {per_key:.0} B per key",
        quantile(&to_publish, 0.5),
        quantile(&to_publish, 1.0),
        quantile(&to_enforce, 0.5),
        quantile(&to_enforce, 0.99),
        quantile(&to_add, 0.5),
        quantile(&to_add, 0.99),
        quantile(&to_rotate, 0.5),
        quantile(&to_rotate, 0.99),
    );
    assert!(
        writes.iter().all(|w| *w == 1),
        "a plan upgrade rewrites the index only: {writes:?}"
    );
    assert_eq!(shards, n.div_ceil(2000).next_power_of_two());

    // Every key's status converges: all of them report the limits of the last upgrade and a
    // gateway enforcing them, written at the bounded rate.
    let slots =
        api.get("apiplans", "", "startup").unwrap()["spec"]["concurrency"]["maxConcurrentRequests"].clone();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(600);
    let behind = loop {
        let keys = api.list("apikeys");
        let behind = keys
            .iter()
            .filter(|k| {
                let enforced = k["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Enforced" && c["status"] == "True");
                !(enforced && k["status"]["effective"]["maxConcurrentRequests"] == slots)
            })
            .count();
        if behind == 0 || Instant::now() > deadline {
            break (behind, keys.len());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!(
        "statuses of {} keys converged {:?} after the last change (writer at {status_rate}/s)",
        behind.1,
        t0.elapsed()
    );
    assert_eq!(
        behind.0, 0,
        "{} of {} key statuses never converged",
        behind.0, behind.1
    );
}
