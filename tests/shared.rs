//! Limits shared by several `slotgate gateway` processes through a real `redis-server`: the
//! real binary, a stub upstream counting requests in flight, real HTTP on loopback.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use futures::future::join_all;
use http::StatusCode;

const KEY_ID: &str = "default/k";

fn shared_gateway(cfg: &ConfigDir, stub: &Stub, redis: &Redis, extra: &[&str]) -> Proc {
    let url = redis.url();
    let mut args = vec!["--state", url.as_str()];
    args.extend_from_slice(extra);
    Proc::gateway(&cfg.config, &stub.url(), &args)
}

async fn as_key(gw: &Proc, path: &str) -> Got {
    get(&gw.url(path), &[("x-api-key", "tok-k")]).await
}

/// Statuses seen by a background load, and the stub's peak while it ran.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<u16, u64>>);

impl Tally {
    fn add(&self, status: StatusCode) {
        *self.0.lock().unwrap().entry(status.as_u16()).or_default() += 1;
    }
    fn take(&self) -> BTreeMap<u16, u64> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// `clients` workers, each with its own keep-alive connection, sending to the gateways in turn
/// until `stop` is set.
fn background_load(
    gateways: &[&Proc],
    clients: usize,
    path: &str,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let url = gateways[i % gateways.len()].url(path);
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tokio::spawn(async move {
                let http = client_keep_alive();
                while !stop.load(Ordering::Relaxed) {
                    let r = get_on(&http, &url, &[("x-api-key", "tok-k")]).await;
                    tally.add(r.status);
                    if r.status == StatusCode::TOO_MANY_REQUESTS {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

fn client_keep_alive() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_sharing_redis_never_exceed_one_keys_slots() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 25) + &key_yaml("k", "p", "")));
    // What is tested is sharing, not the fallback: on a host busy with other tests a Redis
    // answer can take longer than the default 100 ms, and the fallback's local share would show.
    let gws: Vec<Proc> = (0..3)
        .map(|_| shared_gateway(&cfg, &stub, &redis, &["--state-timeout", "5s"]))
        .collect();
    for gw in &gws {
        gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    }

    // 500 concurrent clients on one key, spread over the three replicas, each sending 4
    // requests that hold the upstream for 50 ms.
    let tally = Arc::new(Tally::default());
    let clients = (0..500).map(|i| {
        let url = gws[i % 3].url("/v1/work?delay_ms=50");
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            let http = client_keep_alive();
            let mut limits = Vec::new();
            for _ in 0..4 {
                let r = get_on(&http, &url, &[("x-api-key", "tok-k")]).await;
                tally.add(r.status);
                if r.status == StatusCode::TOO_MANY_REQUESTS {
                    assert_eq!(r.code(), "concurrency_limit_exceeded");
                }
                limits.push(r.num("x-concurrent-limit"));
            }
            limits
        })
    });
    for limits in join_all(clients).await {
        assert!(limits.unwrap().iter().all(|&l| l == 25));
    }
    let seen = tally.take();
    let peak = stub.peak();
    eprintln!("statuses {seen:?}, upstream peak in flight {peak}");
    assert!(
        peak <= 25,
        "the upstream saw {peak} requests of a 25-slot key at once"
    );
    // Each replica alone would stop at 25 too; more than a third of it shows the pool is shared
    // rather than split.
    assert!(peak > 9, "peak {peak}: the replicas did not use one shared pool");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![200, 429],
        "{seen:?}"
    );
    // Every slot is handed back: the releases reach Redis off the response path, right after.
    wait_until("all leases released", || redis.leases(KEY_ID) == 0).await;
    for gw in &gws {
        assert_eq!(gw.metric("slotgate_in_flight{plan=\"p\"}").await, 0.0);
        assert_eq!(gw.metric("slotgate_state_errors_total{op=\"admit\"}").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_slots_come_back_within_the_lease_ttl_and_long_requests_keep_theirs() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 3) + &key_yaml("k", "p", "") + &key_yaml("other", "p", "")));
    let ttl = ["--state-lease-ttl", "1s"];
    let mut doomed = shared_gateway(&cfg, &stub, &redis, &ttl);
    let survivor = shared_gateway(&cfg, &stub, &redis, &ttl);

    let holders: Vec<_> = (0..3)
        .map(|_| {
            let url = doomed.url("/v1/work?delay_ms=60000");
            tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await })
        })
        .collect();
    stub.wait_in_flight(3).await;
    let r = as_key(&survivor, "/v1/work").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.num("x-concurrent-current"), 3);

    // Three lease TTLs later the requests are still in flight, so their slots are still theirs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(redis.leases(KEY_ID), 3);
    let r = as_key(&survivor, "/v1/work").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);

    // kill -9: nobody releases or renews those leases any more.
    let _ = doomed.child.kill();
    let _ = doomed.child.wait();
    for h in holders {
        assert!(h.await.is_err() || stub.in_flight() < 3);
    }
    let killed = Instant::now();
    let mut statuses = BTreeMap::<u16, u32>::new();
    loop {
        // The survivor keeps serving throughout: another key is admitted every time.
        let other = get(&survivor.url("/v1/other"), &[("x-api-key", "tok-other")]).await;
        assert_eq!(other.status, StatusCode::OK, "{}", other.body);
        let r = as_key(&survivor, "/v1/work").await;
        *statuses.entry(r.status.as_u16()).or_default() += 1;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "slots free again {} ms after kill -9 (lease TTL 1000 ms); statuses meanwhile {statuses:?}",
        killed.elapsed().as_millis()
    );
    wait_until("dead leases gone", || redis.leases(KEY_ID) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_local_fallback_then_the_exact_limit_again() {
    let mut redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 4) + &key_yaml("k", "p", "")));
    let ttl = ["--state-lease-ttl", "1s", "--state-timeout", "100ms"];
    let a = shared_gateway(&cfg, &stub, &redis, &ttl);
    let b = shared_gateway(&cfg, &stub, &redis, &ttl);
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_state_replicas", |v| v == 2.0).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let load = background_load(
        &[&a, &b],
        16,
        "/v1/work?delay_ms=20",
        Arc::clone(&stop),
        Arc::clone(&tally),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let shared_phase = tally.take();
    assert!(stub.peak() <= 4, "peak {} with redis up", stub.peak());

    redis.stop();
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_state_shared", |v| v == 0.0).await;
    }
    // Requests admitted through Redis before the switch finish within their 20 ms (spread
    // unevenly, they can exceed one replica's share meanwhile); from then on each replica holds
    // its share.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tally.take();
    stub.peak.store(stub.in_flight(), Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let fallback_phase = tally.take();
    // Each of the two replicas enforces half of the 4 slots.
    let fallback_peak = stub.peak();
    assert!(fallback_peak <= 4, "peak {fallback_peak} in fallback");
    assert!(
        fallback_phase.get(&200).copied().unwrap_or(0) > 0,
        "{fallback_phase:?}"
    );

    redis.start_again();
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    }
    // Requests admitted locally during the outage finish within their 20 ms; from then on the
    // shared pool is exact again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stub.peak.store(stub.in_flight(), Ordering::SeqCst);
    tally.take();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let recovered = tally.take();
    let recovered_peak = stub.peak();
    stop.store(true, Ordering::Relaxed);
    join_all(load).await;
    eprintln!(
        "shared {shared_phase:?}; fallback {fallback_phase:?} peak {fallback_peak}; recovered {recovered:?} peak {recovered_peak}"
    );
    assert!(recovered_peak <= 4, "peak {recovered_peak} after redis came back");
    assert!(redis.leases(KEY_ID) <= 4);
    for phase in [&shared_phase, &fallback_phase, &recovered] {
        assert!(
            phase.keys().all(|s| *s == 200 || *s == 429),
            "only admissions and refusals, never an error: {phase:?}"
        );
    }
    for gw in [&a, &b] {
        let errors = gw.metric("slotgate_state_errors_total{op=\"admit\"}").await
            + gw.metric("slotgate_state_errors_total{op=\"renew\"}").await;
        assert!(errors >= 1.0, "the outage shows in the error metrics");
        let log = gw.stderr();
        assert!(log.contains("each replica enforces 1/2 of every limit"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_while_redis_hangs_and_recovers_when_it_answers() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 4) + &key_yaml("k", "p", "")));
    let gw = shared_gateway(
        &cfg,
        &stub,
        &redis,
        &["--state-fallback", "fail-closed", "--state-timeout", "100ms"],
    );
    gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    assert_eq!(as_key(&gw, "/v1/work").await.status, StatusCode::OK);

    // A Redis that accepts but never answers: each admission waits at most the timeout.
    redis.pause(true);
    let r = as_key(&gw, "/v1/work").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.code(), "limiter_unavailable");
    assert_eq!(r.num("retry-after"), 1);
    gw.wait_metric("slotgate_state_shared", |v| v == 0.0).await;
    let r = as_key(&gw, "/v1/work").await;
    assert_eq!(r.code(), "limiter_unavailable");
    // Paths no limit covers do not need the limiter.
    assert_eq!(as_key(&gw, "/health").await.status, StatusCode::OK);

    redis.pause(false);
    gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    let r = as_key(&gw, "/v1/work").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.num("x-concurrent-limit"), 4);
    assert!(
        gw.metric("slotgate_requests_total{outcome=\"error\",code=\"limiter_unavailable\"}")
            .await
            >= 2.0
    );
    assert!(gw.stderr().contains("fail-closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_limit_applies_to_the_shared_pool_at_once() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let mut cfg = ConfigDir::new(&(slots_plan("p", 2) + &key_yaml("k", "p", "")));
    let a = shared_gateway(&cfg, &stub, &redis, &[]);
    let b = shared_gateway(&cfg, &stub, &redis, &[]);

    let hold = |gw: &Proc| {
        let url = gw.url("/v1/work?delay_ms=3000");
        tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await })
    };
    let first = [hold(&a), hold(&a)];
    stub.wait_in_flight(2).await;
    let r = as_key(&b, "/v1/work").await;
    assert_eq!(
        (r.status, r.num("x-concurrent-limit")),
        (StatusCode::TOO_MANY_REQUESTS, 2)
    );

    // Upgrade 2 -> 4: both replicas admit two more at once, into the same pool.
    let version = cfg.write(&(slots_plan("p", 4) + &key_yaml("k", "p", "")));
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_config_version", |v| v == version as f64)
            .await;
    }
    let second = [hold(&b), hold(&a)];
    stub.wait_in_flight(4).await;
    let r = as_key(&b, "/v1/work").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(
        (r.num("x-concurrent-limit"), r.num("x-concurrent-current")),
        (4, 4)
    );

    // Downgrade 4 -> 1: nothing in flight is cut; nothing new until fewer than 1 are in flight.
    let version = cfg.write(&(slots_plan("p", 1) + &key_yaml("k", "p", "")));
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_config_version", |v| v == version as f64)
            .await;
    }
    let r = as_key(&a, "/v1/work").await;
    assert_eq!(
        (r.status, r.num("x-concurrent-limit")),
        (StatusCode::TOO_MANY_REQUESTS, 1)
    );
    for h in first.into_iter().chain(second) {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    wait_until("leases released", || redis.leases(KEY_ID) == 0).await;
    let r = as_key(&b, "/v1/work").await;
    assert_eq!((r.status, r.num("x-concurrent-current")), (StatusCode::OK, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_bucket_across_replicas_and_a_plan_change_rescales_it() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let rate = |per_second: u32, burst: u32| {
        plan_yaml(
            "p",
            &format!(
                "  rateLimit:\n    requestsPerSecond: {per_second}\n    burst: {burst}\n    per: Key\n    paths: [\"/v1/*\"]"
            ),
        ) + &key_yaml("k", "p", "")
    };
    let mut cfg = ConfigDir::new(&rate(1, 3));
    let a = shared_gateway(&cfg, &stub, &redis, &[]);
    let b = shared_gateway(&cfg, &stub, &redis, &[]);

    // One bucket of 3 drained across both replicas, whichever serves.
    let mut remaining = Vec::new();
    for gw in [&a, &b, &a] {
        let r = as_key(gw, "/v1/x").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        remaining.push(r.num("x-ratelimit-remaining"));
    }
    assert_eq!(remaining, [2, 1, 0]);
    let r = as_key(&b, "/v1/y").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.code(), "rate_limit");
    assert_eq!(r.num("retry-after"), 1);
    assert_eq!(r.num("x-ratelimit-remaining"), 0);

    // Upgrade to 10/s burst 30: the bucket was all used, so it stays (nearly) all used, rather
    // than starting again from a full burst of 30.
    let version = cfg.write(&rate(10, 30));
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_config_version", |v| v == version as f64)
            .await;
    }
    let r = as_key(&a, "/v1/x").await;
    let left = r.num("x-ratelimit-remaining");
    assert!(left < 15, "a plan change refilled the bucket ({left} of 30 left)");
    assert_eq!(r.num("x-ratelimit-limit"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_slotgate_up_processes_share_one_folders_limits_through_redis() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plans.yaml"),
        slots_plan("p", 1) + &key_yaml("k", "p", ""),
    )
    .unwrap();
    let url = redis.url();
    let up = |dir: &std::path::Path| Proc::up(dir, &["--state", &url]);
    let (a, b) = (up(dir.path()), up(dir.path()));
    let held = {
        let url = a.url("/v1/work?delay_ms=2000");
        tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await })
    };
    wait_until("the lease is taken", || redis.leases(KEY_ID) == 1).await;
    let r = as_key(&b, "/v1/work").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.num("x-concurrent-current"), 1);
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
}

#[test]
fn a_state_that_is_not_redis_is_refused_by_name_without_its_password() {
    let out = std::process::Command::new(SLOTGATE)
        .args([
            "gateway",
            "--config",
            "/nonexistent.json",
            "--upstream",
            "http://127.0.0.1:1",
            "--state",
            "mysql://root:hunter2@db:3306",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--state") && err.contains("redis://"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_down_serves_its_share_and_joins_when_redis_is_up() {
    let mut redis = Redis::start();
    redis.stop();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 4) + &key_yaml("k", "p", "")));
    // Two replicas are expected: until Redis says otherwise, this one enforces half the slots.
    let gw = shared_gateway(&cfg, &stub, &redis, &["--replicas", "2"]);
    assert_eq!(gw.metric("slotgate_state_shared").await, 0.0);
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/v1/work?delay_ms=1500");
            tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await })
        })
        .collect();
    stub.wait_in_flight(2).await;
    let r = as_key(&gw, "/v1/work").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.num("x-concurrent-limit"), 2);
    for h in holders {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }

    redis.start_again();
    gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    gw.wait_metric("slotgate_state_replicas", |v| v == 1.0).await;
    let r = as_key(&gw, "/v1/work").await;
    assert_eq!((r.status, r.num("x-concurrent-limit")), (StatusCode::OK, 4));
    wait_until("the lease is released", || redis.leases(KEY_ID) == 0).await;
    assert!(gw.stderr().contains("shared state reachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_buckets_are_shared_per_path_and_long_paths_stay_small_keys() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(
        &(plan_yaml(
            "p",
            "  rateLimit:\n    requestsPerSecond: 1\n    burst: 2\n    per: Endpoint\n    paths: [\"/v1/*\"]",
        ) + &key_yaml("k", "p", "")),
    );
    let a = shared_gateway(&cfg, &stub, &redis, &[]);
    let b = shared_gateway(&cfg, &stub, &redis, &[]);
    let long = format!("/v1/{}", "x".repeat(4000));
    for path in ["/v1/a", "/v1/b", long.as_str()] {
        // Two per endpoint, whichever replica serves them; the third is refused.
        let statuses = [
            as_key(&a, path).await.status,
            as_key(&b, path).await.status,
            as_key(&a, path).await.status,
        ];
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS],
            "{}",
            &path[..path.len().min(20)]
        );
    }
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("slotgate:*:rate:*").query(&mut c).unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| k.len() < 200), "{keys:?}");
}

/// A request admitted on a replica's own share while Redis was down may still run when Redis
/// comes back: the shared pool counts it from the first renewal on, so another replica does not
/// hand its slot out a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_admitted_during_an_outage_counts_in_the_shared_pool_once_redis_returns() {
    let mut redis = Redis::start();
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 2) + &key_yaml("k", "p", "")));
    let ttl = ["--state-lease-ttl", "1s", "--state-timeout", "100ms"];
    let a = shared_gateway(&cfg, &stub, &redis, &ttl);
    let b = shared_gateway(&cfg, &stub, &redis, &ttl);
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_state_replicas", |v| v == 2.0).await;
    }

    redis.stop();
    a.wait_metric("slotgate_state_shared", |v| v == 0.0).await;
    // A's share of the 2 slots is 1: a long request, admitted on A's own count.
    let url = a.url("/v1/work?delay_ms=6000");
    let long = tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await });
    wait_until("the long request reached the upstream", || stub.in_flight() == 1).await;

    redis.start_again();
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    }
    wait_until("the outage's request counted in redis", || {
        redis.leases(KEY_ID) == 1
    })
    .await;
    assert!(stub.in_flight() == 1, "the long request is still running");
    let (r1, r2) = tokio::join!(
        as_key(&b, "/v1/work?delay_ms=300"),
        as_key(&b, "/v1/work?delay_ms=300")
    );
    let mut statuses = [r1.status.as_u16(), r2.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 429],
        "one slot of two left: {} / {}",
        r1.body,
        r2.body
    );
    let refused = if r1.status == StatusCode::TOO_MANY_REQUESTS {
        &r1
    } else {
        &r2
    };
    assert_eq!(refused.num("x-concurrent-current"), 2, "{}", refused.body);
    assert!(stub.peak() <= 2, "peak {}", stub.peak());
    assert_eq!(long.await.unwrap().status, StatusCode::OK);
    wait_until("leases released", || redis.leases(KEY_ID) == 0).await;
}

/// Tells nobody: the limiter-level test reads Redis itself.
struct Unobserved;

impl slotgate::limiter::shared::SharedObserver for Unobserved {
    fn call(
        &self,
        _: slotgate::limiter::shared::SharedOp,
        _: Duration,
        _: Option<&slotgate::limiter::shared::SharedError>,
    ) {
    }
    fn mode(&self, _: bool, _: u32) {}
    fn replicas(&self, _: u32) {}
}

/// Admissions of one key that arrive together share script calls, and each is still decided as
/// if it had come alone: exactly the slots, exactly the burst, each admitted request told its
/// own place among those in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_arriving_together_share_script_calls_and_stay_exact() {
    use slotgate::limiter::{
        RateParams, SharedDecision, SharedLimiter, SharedOptions,
        shared::{BucketName, SharedRequest},
    };
    let redis = Redis::start();
    let options = SharedOptions {
        url: redis.url(),
        prefix: "slotgate".into(),
        lease_ttl: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
        replicas_hint: 1,
    };
    let limiter = SharedLimiter::start(options, Arc::new(Unobserved)).await.unwrap();
    let request = SharedRequest {
        scope: KEY_ID,
        slots: Some(25),
        rate: Some((
            BucketName::Key,
            RateParams {
                per_second: 1,
                burst: 40,
            },
        )),
    };
    let calls_before = redis.script_calls();
    let first = join_all((0..200).map(|_| limiter.admit(request))).await;
    let calls = redis.script_calls() - calls_before;
    let mut places = Vec::new();
    let mut leases = Vec::new();
    let mut full = 0;
    for d in first {
        match d.unwrap() {
            SharedDecision::Admitted { lease, in_flight, .. } => {
                places.push(in_flight);
                leases.push(lease);
            }
            SharedDecision::SlotsFull { in_flight, .. } => {
                assert_eq!(in_flight, 25);
                full += 1;
            }
            other => panic!("a full bucket refused: {other:?}"),
        }
    }
    places.sort_unstable();
    assert_eq!(
        places,
        (1..=25).collect::<Vec<u32>>(),
        "each admission its own place"
    );
    assert_eq!(full, 175);
    assert_eq!(redis.leases(KEY_ID), 25);
    assert!(calls < 20, "200 admissions of one key took {calls} script calls");

    // Refused requests took no quota: 15 of the burst are left (16 if a second has passed).
    drop(leases);
    wait_until("leases released", || redis.leases(KEY_ID) == 0).await;
    let second = join_all((0..200).map(|_| limiter.admit(request))).await;
    let admitted = second
        .iter()
        .filter(|d| matches!(d, Ok(SharedDecision::Admitted { .. })))
        .count();
    let limited = second
        .iter()
        .filter(|d| matches!(d, Ok(SharedDecision::RateLimited { retry_after_nanos, .. }) if *retry_after_nanos > 0))
        .count();
    assert!(
        (15..=16).contains(&admitted),
        "{admitted} admitted from 15 tokens"
    );
    assert_eq!(admitted + limited, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_slots_are_one_pool_across_replicas() {
    let redis = Redis::start();
    let (target, default) = (Stub::start().await, Stub::start().await);
    let dir = tempfile::tempdir().unwrap();
    let manifests = slots_plan("p", 10)
        + &key_yaml("a", "p", "")
        + &key_yaml("b", "p", "")
        + &format!(
            "apiVersion: slotgate.dev/v1alpha1\nkind: ApiUpstream\nmetadata:\n  name: vendor\nspec:\n  url: {}\n  paths: [\"/v1/vendor/*\"]\n  concurrency: {{maxConcurrentRequests: 3}}\n",
            target.url()
        );
    std::fs::write(dir.path().join("all.yaml"), manifests).unwrap();
    let url = redis.url();
    let up = || Proc::up(dir.path(), &["--upstream", &default.url(), "--state", &url]);
    let (one, two) = (up(), up());
    // Two keys, eight requests at once, spread over both replicas: the target's 3 slots hold
    // across them, while each key is far within its own 10.
    let requests = (0..8).map(|i| {
        let gw = if i % 2 == 0 { &one } else { &two };
        let url = gw.url("/v1/vendor/x?delay_ms=800");
        let token = if i < 4 { "tok-a" } else { "tok-b" };
        async move { get(&url, &[("x-api-key", token)]).await }
    });
    let answers = join_all(requests).await;
    let ok = answers.iter().filter(|r| r.status == StatusCode::OK).count();
    let refused: Vec<String> = answers
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .map(|r| r.code())
        .collect();
    assert!(target.peak() <= 3, "the target had {} in flight", target.peak());
    assert_eq!(ok, 3, "{refused:?}");
    assert!(
        refused.iter().all(|c| c == "target_concurrency_limit_exceeded"),
        "{refused:?}"
    );
    // The leases went back: the target serves again from either replica.
    wait_until("the target's leases are released", || {
        redis.leases("target:vendor") == 0
    })
    .await;
    assert_eq!(
        as_key_token(&two, "/v1/vendor/y", "tok-a").await.status,
        StatusCode::OK
    );
    assert_eq!(default.seen.lock().unwrap().len(), 0);
}

async fn as_key_token(gw: &Proc, path: &str, token: &str) -> Got {
    get(&gw.url(path), &[("x-api-key", token)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_many_slots_is_served_from_lease_blocks_and_three_replicas_still_never_exceed_it() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    // 128 slots and a burst of 100,000: big enough for blocks (4 slots and 1,024 tokens at a time).
    let plan = plan_yaml(
        "p",
        "  concurrency:\n    maxConcurrentRequests: 128\n    paths: [\"/v1/*\"]\n  rateLimit:\n    requestsPerSecond: 100000\n    burst: 100000\n    per: Key\n    paths: [\"/v1/*\"]",
    );
    let cfg = ConfigDir::new(&(plan + &key_yaml("k", "p", "")));
    let mut gws: Vec<Proc> = (0..3)
        .map(|_| {
            shared_gateway(
                &cfg,
                &stub,
                &redis,
                &["--state-timeout", "5s", "--state-lease-ttl", "2s"],
            )
        })
        .collect();
    for gw in &gws {
        gw.wait_metric("slotgate_state_shared", |v| v == 1.0).await;
    }
    // Below the limit: 96 clients over the three replicas, 8 requests each holding the upstream
    // 30 ms. Most requests come from blocks, so Redis runs far fewer scripts than requests.
    let calls_before = redis.script_calls();
    let (seen, peak) = burst_of(&gws, &stub, 96, 8).await;
    let calls = redis.script_calls() - calls_before;
    eprintln!(
        "below the limit: statuses {seen:?}, upstream peak {peak}, {calls} script calls for 768 requests"
    );
    assert!(
        peak <= 128,
        "the upstream saw {peak} requests of a 128-slot key at once"
    );
    assert_eq!(seen.get(&200).copied(), Some(768), "{seen:?}");
    assert!(
        calls < 768 / 2,
        "{calls} script calls for 768 requests: the blocks were not used"
    );
    // Over it: 300 clients. The fleet still never has more than 128 in flight.
    let (seen, peak) = burst_of(&gws, &stub, 300, 4).await;
    eprintln!("over the limit: statuses {seen:?}, upstream peak {peak}");
    assert!(
        peak <= 128,
        "the upstream saw {peak} requests of a 128-slot key at once"
    );
    assert!(peak > 64, "peak {peak}: the replicas did not share one pool");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![200, 429],
        "{seen:?}"
    );
    // Blocks go back once the key is idle: every lease is released.
    wait_until("all leases released", || redis.leases(KEY_ID) == 0).await;

    // A replica killed while its block holds slots: they expire within the lease TTL.
    // Raw connections: the replica dies under them, which a client library would report as an
    // error; these just end.
    let addr = gws[0].url("").trim_start_matches("http://").to_string();
    let hold: Vec<_> = (0..20)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                let req = "GET /v1/work?delay_ms=10000 HTTP/1.1\r\nhost: gw\r\nx-api-key: tok-k\r\n\r\n";
                c.write_all(req.as_bytes()).await.unwrap();
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink).await;
            })
        })
        .collect();
    wait_until("20 held upstream", || stub.in_flight() >= 20).await;
    assert!(redis.leases(KEY_ID) >= 20);
    gws[0].child.kill().unwrap();
    gws[0].child.wait().unwrap();
    wait_until("the killed replica's leases expired", || {
        redis.leases(KEY_ID) == 0
    })
    .await;
    for h in hold {
        let _ = h.await;
    }
    let r = as_key(&gws[1], "/v1/work").await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `clients` clients spread over `gws`, each sending `each` requests that hold the upstream 30 ms;
/// the statuses, and the upstream's peak in flight (reset first).
async fn burst_of(gws: &[Proc], stub: &Stub, clients: usize, each: usize) -> (BTreeMap<u16, u64>, usize) {
    stub.reset_peak();
    let tally = Arc::new(Tally::default());
    let runs = (0..clients).map(|i| {
        let url = gws[i % gws.len()].url("/v1/work?delay_ms=30");
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            let http = client_keep_alive();
            for _ in 0..each {
                let r = get_on(&http, &url, &[("x-api-key", "tok-k")]).await;
                tally.add(r.status);
                assert_eq!(r.num("x-concurrent-limit"), 128);
                if r.status == StatusCode::TOO_MANY_REQUESTS {
                    assert_eq!(r.code(), "concurrency_limit_exceeded");
                }
            }
        })
    });
    for r in join_all(runs).await {
        r.unwrap();
    }
    (tally.take(), stub.peak())
}
