//! Black-box tests of usage visibility: the access log (JSON Lines, never a token) and the
//! per-key usage counters of the admin endpoint. The real binary, real HTTP on loopback.

mod common;

use std::path::Path;

use common::*;
use futures::future::join_all;
use http::StatusCode;

/// Every token in the example manifests (`token:` and `webhookSecret:` lines of Secrets).
fn example_secrets() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keys.yaml")).unwrap();
    let secrets: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, v)| (*k == "token" || k.starts_with("webhook")) && v.len() > 10)
        .map(|(_, v)| v.trim().to_string())
        .collect();
    assert!(secrets.len() >= 3, "{secrets:?}");
    secrets
}

async fn admin(gw: &Proc, path: &str) -> Got {
    get(&format!("http://{}{path}", gw.admin.unwrap()), &[]).await
}

/// The access log's lines once there are `n`, each parsed.
async fn lines(path: &Path, n: usize) -> (String, Vec<serde_json::Value>) {
    let mut text = String::new();
    wait_until(&format!("{n} access-log lines"), || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines().count() >= n
    })
    .await;
    let parsed = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (text, parsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_match_a_known_workload_and_every_request_has_a_log_line() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 2) + &key_yaml("k", "p", "") + &key_yaml("idle", "p", "")));
    let log = cfg.dir.path().join("access.log");
    let gw = Proc::gateway(&cfg.config, &stub.url(), &["--access-log", log.to_str().unwrap()]);
    gw.wait_metric("slotgate_config_keys", |v| v == 2.0).await;

    // 3 admitted by header, 1 by query parameter.
    for _ in 0..3 {
        let r = get(&gw.url("/v1/a"), &[("authorization", "Bearer tok-k")]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = get(&gw.url("/v1/q?apikey=tok-k&x=1"), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // 2 more held, 3 refused meanwhile.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/v1/slow?delay_ms=800");
            tokio::spawn(async move { get(&url, &[("x-api-key", "tok-k")]).await })
        })
        .collect();
    stub.wait_in_flight(2).await;
    let during = admin(&gw, "/usage?key=default/k").await;
    assert_eq!(during.json()["inFlight"], 2, "{}", during.body);
    let url = gw.url("/v1/a");
    for r in join_all((0..3).map(|_| get(&url, &[("x-api-key", "tok-k")]))).await {
        assert_eq!(r.code(), "concurrency_limit_exceeded");
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    // Requests with no key or an unknown one count for no key.
    assert_eq!(get(&gw.url("/v1/a"), &[]).await.code(), "missing_api_key");
    assert_eq!(
        get(&gw.url("/v1/a"), &[("x-api-key", "tok-nobody")]).await.code(),
        "invalid_api_key"
    );

    let u = admin(&gw, "/usage?key=default/k").await;
    assert_eq!(u.status, StatusCode::OK, "{}", u.body);
    let u = u.json();
    assert_eq!(u["requests"], 9, "{u}");
    assert_eq!(u["admitted"], 6, "{u}");
    assert_eq!(
        u["refused"],
        serde_json::json!({"concurrency_limit_exceeded": 3}),
        "{u}"
    );
    assert_eq!(
        u["lastMinute"],
        serde_json::json!({"requests": 9, "refused": 3}),
        "{u}"
    );
    assert_eq!(u["inFlight"], 0);
    let idle = admin(&gw, "/usage?key=default%2Fidle").await.json();
    assert_eq!(
        (idle["requests"].as_u64(), idle["inFlight"].as_u64()),
        (Some(0), Some(0)),
        "{idle}"
    );
    assert_eq!(
        admin(&gw, "/usage?key=default/nobody").await.status,
        StatusCode::NOT_FOUND
    );
    let all = admin(&gw, "/usage").await.json();
    assert_eq!(all["keys"]["default/k"]["requests"], 9, "{all}");

    let (text, lines) = lines(&log, 11).await;
    assert_eq!(lines.len(), 11, "{text}");
    assert!(!text.contains("tok-"), "a token in the access log:\n{text}");
    let ok: Vec<_> = lines.iter().filter(|l| l["status"] == 200).collect();
    assert_eq!(ok.len(), 6, "{text}");
    for l in &ok {
        assert_eq!(
            (l["key"].as_str(), l["namespace"].as_str(), l["plan"].as_str()),
            (Some("k"), Some("default"), Some("p"))
        );
        assert_eq!(l["method"], "GET");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["upstreamMs"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(
            l["slotHeldMs"].as_f64().unwrap() >= l["upstreamMs"].as_f64().unwrap(),
            "{l}"
        );
        assert_eq!(l["slotWaitMs"], 0.0);
        assert!(l["bytes"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["client"], "127.0.0.1");
        assert!(l.get("code").is_none(), "{l}");
    }
    assert!(
        ok.iter().any(|l| l["path"] == "/v1/q"),
        "the query string is not logged: {text}"
    );
    let slow: Vec<_> = ok.iter().filter(|l| l["path"] == "/v1/slow").collect();
    assert!(
        slow.iter().all(|l| l["slotHeldMs"].as_f64().unwrap() >= 800.0),
        "{slow:?}"
    );
    let refused: Vec<&str> = lines.iter().filter_map(|l| l["code"].as_str()).collect();
    let count = |c: &str| refused.iter().filter(|r| **r == c).count();
    assert_eq!(count("concurrency_limit_exceeded"), 3, "{text}");
    assert_eq!(
        (count("missing_api_key"), count("invalid_api_key")),
        (1, 1),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l["code"] == "invalid_api_key")
            .all(|l| l.get("key").is_none())
    );
    assert_eq!(gw.metric("slotgate_access_log_dropped_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_of_up_never_holds_an_example_token_or_secret() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let gw = Proc::start(&[
        "up",
        examples.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        log.to_str().unwrap(),
    ]);
    let secrets = example_secrets();
    let mut sent = 0;
    for s in &secrets {
        let auth = format!("Bearer {s}");
        get(&gw.url("/v1/monitor/chatgpt"), &[("authorization", &auth)]).await;
        get(&gw.url(&format!("/v1/monitor/chatgpt?apikey={s}")), &[]).await;
        get(&gw.url("/v1/search"), &[("x-api-key", s)]).await;
        sent += 3;
    }
    let (text, lines) = lines(&log, sent).await;
    assert!(
        lines
            .iter()
            .any(|l| l["status"] == 200 && l["key"] == "trial-demo"),
        "{text}"
    );
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "{s} is in the access log:\n{text}");
        assert!(
            !gw.stdout().contains(s.as_str()) && !gw.stderr().contains(s.as_str()),
            "{s} was printed"
        );
    }
}
