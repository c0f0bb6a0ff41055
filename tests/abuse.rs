//! Black-box tests of abuse protection: temporary bans after repeated refusals or invalid keys,
//! with trusted proxies and an allowlist. The real binary, a stub upstream, real HTTP on
//! loopback; 127.0.0.2 and 127.0.0.3 are other clients.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Slots 2; 6 refusals within 10 s ban for `ban`, doubling for a repeat within a minute.
fn abuse_plan(by: &str, ban: &str) -> String {
    plan_yaml(
        "p",
        &format!(
            "  concurrency:\n    maxConcurrentRequests: 2\n    paths: [\"/v1/*\"]\n  abuse:\n    refusals: 6\n    window: 10s\n    banDuration: {ban}\n    escalationWindow: 1m\n    escalationFactor: 2\n    maxBanDuration: 1h\n    by: {by}"
        ),
    )
}

fn manifests(by: &str) -> String {
    manifests_with(by, "2s")
}

fn manifests_with(by: &str, ban: &str) -> String {
    abuse_plan(by, ban) + &key_yaml("k", "p", "") + &key_yaml("k2", "p", "")
}

struct Client {
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl Client {
    fn from(source: &str) -> Self {
        Self {
            http: client_from(source),
        }
    }

    async fn get(&self, gw: &Proc, path: &str, token: &str, extra: &[(&str, &str)]) -> Got {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        get_on(&self.http, &gw.url(path), &headers).await
    }
}

/// Holds both of `token`'s slots from `client` for `hold_ms`, then sends one request at a time
/// (the looping client) until one is blocked. Returns the refusals before it and the block.
async fn flood(
    gw: &Proc,
    stub: &Stub,
    source: &str,
    token: &str,
    extra: &[(&str, &str)],
    hold_ms: u64,
) -> (usize, Got) {
    let base = stub.in_flight();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (url, token, source) = (
                gw.url(&format!("/v1/work?delay_ms={hold_ms}")),
                format!("Bearer {token}"),
                source.to_string(),
            );
            let extra: Vec<(String, String)> = extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            tokio::spawn(async move {
                let mut h: Vec<(&str, &str)> = vec![("authorization", token.as_str())];
                h.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                get_on(&client_from(&source), &url, &h).await
            })
        })
        .collect();
    stub.wait_in_flight(base + 2).await;
    let c = Client::from(source);
    let mut refused = 0;
    for _ in 0..100 {
        let r = c.get(gw, "/v1/work", token, extra).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
        match r.code().as_str() {
            "concurrency_limit_exceeded" => refused += 1,
            "temporarily_blocked" => {
                for h in held {
                    h.abort();
                }
                return (refused, r);
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    panic!("never blocked after {refused} refusals");
}

async fn admin_json(gw: &Proc, path: &str) -> serde_json::Value {
    let r = get(&format!("http://{}{path}", gw.admin.unwrap()), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.json()
}

/// Waits until `source` is served again with `token`; how long that took.
async fn served_again(gw: &Proc, source: &str, token: &str) -> Duration {
    let t0 = Instant::now();
    let c = Client::from(source);
    loop {
        let r = c.get(gw, "/v1/work", token, &[]).await;
        if r.status == StatusCode::OK {
            return t0.elapsed();
        }
        assert_eq!(r.code(), "temporarily_blocked", "{}", r.body);
        assert!(t0.elapsed() < Duration::from_secs(30), "still blocked after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_exceeding_its_slots_is_banned_longer_each_time_and_others_are_served() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&manifests("ClientIP"));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;

    // A second client, on another key of the same plan, sends throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (stop, url) = (stop.clone(), gw.url("/v1/work"));
        tokio::spawn(async move {
            let c = client_from("127.0.0.2");
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = get_on(&c, &url, &[("authorization", "Bearer tok-k2")]).await;
                statuses.push(r.status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };

    let (refused, blocked) = flood(&gw, &stub, "127.0.0.1", "tok-k", &[], 1_000).await;
    assert_eq!(refused, 6, "the sixth refusal starts the ban");
    assert_eq!(blocked.num("retry-after"), 2, "{:?}", blocked.headers);
    assert_eq!(blocked.num("x-concurrent-limit"), 2);
    assert_eq!(blocked.num("x-concurrent-remaining"), 0);
    let message = blocked.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("2 s"), "{message}");
    let bans = admin_json(&gw, "/bans").await;
    assert_eq!(bans["bans"][0]["subject"], "ip:127.0.0.1", "{bans}");
    assert_eq!(bans["bans"][0]["reason"], "repeated_refusals");
    assert_eq!(bans["bans"][0]["strike"], 1);
    assert!(bans["bans"][0]["remainingMs"].as_u64().unwrap() <= 2_000);
    let waited = served_again(&gw, "127.0.0.1", "tok-k").await;
    assert!(waited <= Duration::from_secs(5), "served again {waited:?} later");

    // The repeat, within the escalation window: twice as long.
    let (refused, blocked) = flood(&gw, &stub, "127.0.0.1", "tok-k", &[], 1_000).await;
    assert_eq!(refused, 6);
    assert_eq!(blocked.num("retry-after"), 4, "{:?}", blocked.headers);
    let bans = admin_json(&gw, "/bans").await;
    assert_eq!(bans["bans"][0]["strike"], 2, "{bans}");
    assert!(bans["bans"][0]["remainingMs"].as_u64().unwrap() > 2_000, "{bans}");
    let waited = served_again(&gw, "127.0.0.1", "tok-k").await;
    assert!(
        waited >= Duration::from_millis(1_500),
        "the repeat lasted only {waited:?}"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = other.await.unwrap();
    assert!(statuses.len() > 20, "{}", statuses.len());
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "slotgate_bans_started_total{reason=\"repeated_refusals\",by=\"ip\"}"
        ),
        2.0
    );
    assert!(
        metric_value(
            &m,
            "slotgate_banned_requests_total{reason=\"repeated_refusals\",by=\"ip\"}"
        ) >= 2.0
    );
    assert!(
        metric_value(
            &m,
            "slotgate_requests_total{outcome=\"refused\",code=\"temporarily_blocked\"}"
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_and_lifts_bans() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&manifests("ClientIP"));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;
    let (_, _) = flood(&gw, &stub, "127.0.0.1", "tok-k", &[], 300).await;
    let admin = format!("http://{}", gw.admin.unwrap());
    let lift = |subject: &str| {
        let url = format!("{admin}/bans/{subject}");
        async move {
            let req = http::Request::delete(url)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            client().request(req).await.unwrap().status()
        }
    };
    assert_eq!(lift("ip:127.0.0.9").await, StatusCode::NOT_FOUND);
    assert_eq!(lift("nonsense").await, StatusCode::BAD_REQUEST);
    assert_eq!(lift("ip:127.0.0.1").await, StatusCode::OK);
    assert_eq!(admin_json(&gw, "/bans").await["bans"], serde_json::json!([]));
    stub.wait_in_flight(0).await;
    let r = Client::from("127.0.0.1").get(&gw, "/v1/work", "tok-k", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_that_bans_by_key_bans_the_key_from_every_address_and_no_other_key() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&manifests("Key"));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;
    let (refused, _) = flood(&gw, &stub, "127.0.0.1", "tok-k", &[], 300).await;
    assert_eq!(refused, 6);
    let r = Client::from("127.0.0.2").get(&gw, "/v1/work", "tok-k", &[]).await;
    assert_eq!(r.code(), "temporarily_blocked", "{}", r.body);
    let r = Client::from("127.0.0.1")
        .get(&gw, "/v1/work", "tok-k2", &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let bans = admin_json(&gw, "/bans").await;
    assert_eq!(bans["bans"][0]["subject"], "key:default/k", "{bans}");
    assert_eq!(
        gw.metric("slotgate_bans_started_total{reason=\"repeated_refusals\",by=\"key\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies_and_the_allowlist_is_never_banned() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&manifests("ClientIP"));
    let gw = Proc::gateway(
        &cfg.config,
        &stub.url(),
        &[
            "--trusted-proxies",
            "127.0.0.2/32",
            "--ban-allowlist",
            "127.0.0.3",
        ],
    );
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;

    // Through the trusted proxy, the client it names is banned, not the proxy.
    let xff = [("x-forwarded-for", "203.0.113.9, 198.51.100.7")];
    flood(&gw, &stub, "127.0.0.2", "tok-k", &xff, 300).await;
    let bans = admin_json(&gw, "/bans").await;
    assert_eq!(bans["bans"][0]["subject"], "ip:198.51.100.7", "{bans}");
    stub.wait_in_flight(0).await;
    let proxy = Client::from("127.0.0.2");
    let r = proxy
        .get(&gw, "/v1/work", "tok-k2", &[("x-forwarded-for", "198.51.100.8")])
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "another client behind the proxy: {}",
        r.body
    );
    let r = proxy.get(&gw, "/v1/work", "tok-k2", &xff).await;
    assert_eq!(r.code(), "temporarily_blocked");

    // From an untrusted peer the header is the client's own claim: the peer is banned.
    let spoof = [("x-forwarded-for", "198.51.100.8")];
    flood(&gw, &stub, "127.0.0.1", "tok-k", &spoof, 300).await;
    let subjects: Vec<String> = admin_json(&gw, "/bans").await["bans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["subject"].as_str().unwrap().to_string())
        .collect();
    assert!(subjects.contains(&"ip:127.0.0.1".to_string()), "{subjects:?}");
    assert!(!subjects.contains(&"ip:198.51.100.8".to_string()), "{subjects:?}");
    stub.wait_in_flight(0).await;
    let r = proxy
        .get(&gw, "/v1/work", "tok-k2", &[("x-forwarded-for", "198.51.100.8")])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // The allowlisted address is refused by its limits as often as it likes, and never banned.
    stub.wait_in_flight(0).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/v1/work?delay_ms=1000");
            tokio::spawn(async move {
                get_on(
                    &client_from("127.0.0.3"),
                    &url,
                    &[("authorization", "Bearer tok-k")],
                )
                .await
            })
        })
        .collect();
    stub.wait_in_flight(2).await;
    let c = Client::from("127.0.0.3");
    for _ in 0..30 {
        let r = c.get(&gw, "/v1/work", "tok-k", &[]).await;
        assert_eq!(r.code(), "concurrency_limit_exceeded", "{}", r.body);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        gw.metric("slotgate_bans_started_total{reason=\"repeated_refusals\",by=\"ip\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_keeps_sending_unknown_keys_is_banned_and_valid_keys_elsewhere_are_not() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&manifests("ClientIP"));
    let gw = Proc::gateway(
        &cfg.config,
        &stub.url(),
        &[
            "--invalid-key-limit",
            "5",
            "--invalid-key-window",
            "1m",
            "--invalid-key-ban",
            "3s",
        ],
    );
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;
    let guesser = Client::from("127.0.0.1");
    for i in 0..5 {
        let r = guesser.get(&gw, "/v1/work", &format!("guess-{i}"), &[]).await;
        assert_eq!(r.code(), "invalid_api_key", "guess {i}: {}", r.body);
    }
    // Even a valid key is refused from the banned address now.
    let r = guesser.get(&gw, "/v1/work", "tok-k", &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.code(), "temporarily_blocked");
    assert_eq!(r.num("retry-after"), 3);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid API keys")
    );
    let r = Client::from("127.0.0.2").get(&gw, "/v1/work", "tok-k", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let bans = admin_json(&gw, "/bans").await;
    assert_eq!(bans["bans"][0]["reason"], "invalid_keys", "{bans}");
    assert_eq!(
        gw.metric("slotgate_bans_started_total{reason=\"invalid_keys\",by=\"ip\"}")
            .await,
        1.0
    );
    assert!(gw.stderr().contains("ban started"));
    assert!(!gw.stderr().contains("guess-"), "a guessed token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shared_state_a_ban_on_one_replica_holds_on_every_replica_and_a_lift_too() {
    let redis = Redis::start();
    let stub = Stub::start().await;
    // Long enough that only a lift can end it within the test.
    let cfg = ConfigDir::new(&manifests_with("ClientIP", "10m"));
    let url = redis.url();
    let state = ["--state", url.as_str()];
    let (a, b) = (
        Proc::gateway(&cfg.config, &stub.url(), &state),
        Proc::gateway(&cfg.config, &stub.url(), &state),
    );
    for gw in [&a, &b] {
        gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;
    }
    let (refused, _) = flood(&a, &stub, "127.0.0.1", "tok-k", &[], 1_000).await;
    assert_eq!(refused, 6);
    let started = Instant::now();
    let c = Client::from("127.0.0.1");
    loop {
        let r = c.get(&b, "/v1/work", "tok-k", &[]).await;
        if r.code() == "temporarily_blocked" {
            assert!((590..=600).contains(&r.num("retry-after")), "{:?}", r.headers);
            break;
        }
        assert_eq!(r.status, StatusCode::OK, "before the ban reaches b: {}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ban never reached the other replica"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("the ban held on the other replica {:?} later", started.elapsed());
    // Another client is served by both.
    let other = Client::from("127.0.0.2");
    for gw in [&a, &b] {
        assert_eq!(
            other.get(gw, "/v1/work", "tok-k2", &[]).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        admin_json(&b, "/bans").await["bans"][0]["subject"],
        "ip:127.0.0.1"
    );

    // Lifted on b, the ban ends on a too.
    let req = http::Request::delete(format!("http://{}/bans/ip:127.0.0.1", b.admin.unwrap()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), StatusCode::OK);
    stub.wait_in_flight(0).await;
    let lifted = Instant::now();
    loop {
        let r = c.get(&a, "/v1/work", "tok-k", &[]).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(r.code(), "temporarily_blocked", "{}", r.body);
        assert!(
            lifted.elapsed() < Duration::from_secs(10),
            "the lift never reached a"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("the lift reached the other replica {:?} later", lifted.elapsed());
}
