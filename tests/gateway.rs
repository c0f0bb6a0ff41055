//! Black-box tests of `slotgate gateway`: the real binary, a stub upstream, real HTTP on loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::{StreamExt, future::join_all};
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

const TOKEN: &str = "tok-k";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn held(gw: &Proc, path: &str) -> Got {
    let auth = bearer(TOKEN);
    get(&gw.url(path), &[("authorization", &auth)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_n_of_n_plus_k_simultaneous_requests_are_admitted() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);

    let holders: Vec<_> = (0..5)
        .map(|_| {
            let url = gw.url("/v1/work?delay_ms=1500");
            tokio::spawn(async move { get(&url, &[("x-api-key", TOKEN)]).await })
        })
        .collect();
    stub.wait_in_flight(5).await;

    let refused = join_all((0..3).map(|_| held(&gw, "/v1/work"))).await;
    for r in &refused {
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
        assert_eq!(r.code(), "concurrency_limit_exceeded");
        assert_eq!(r.json()["error"]["limit"], 5);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("5 concurrent")
        );
        assert_eq!(r.num("x-concurrent-limit"), 5);
        assert_eq!(r.num("x-concurrent-current"), 5);
        assert_eq!(r.num("x-concurrent-remaining"), 0);
        assert_eq!(r.num("concurrency-limit"), 5);
        assert_eq!(r.num("concurrency-remaining"), 0);
        assert!(r.num("retry-after") >= 1);
    }
    let mut currents = Vec::new();
    for h in holders {
        let r = h.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.num("x-concurrent-limit"), 5);
        let current = r.num("x-concurrent-current");
        assert_eq!(r.num("x-concurrent-remaining"), 5 - current);
        currents.push(current);
    }
    currents.sort();
    assert_eq!(currents, [1, 2, 3, 4, 5]);
    assert_eq!(stub.peak(), 5);
    // Refusals never reached the upstream.
    assert_eq!(stub.seen.lock().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_headers_count_this_request_as_the_seeds_describe() {
    // Limit 20, three in flight including this one: 20 / 3 / 17.
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 20) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let a = tokio::spawn({
        let url = gw.url("/v1/a?delay_ms=800");
        async move { get(&url, &[("x-api-key", TOKEN)]).await }
    });
    let b = tokio::spawn({
        let url = gw.url("/v1/b?delay_ms=800");
        async move { get(&url, &[("x-api-key", TOKEN)]).await }
    });
    stub.wait_in_flight(2).await;
    let r = held(&gw, "/v1/c").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        (
            r.num("x-concurrent-limit"),
            r.num("x-concurrent-current"),
            r.num("x-concurrent-remaining")
        ),
        (20, 3, 17)
    );
    assert!(r.header("retry-after").is_none());
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_with_client_aborts_returns_every_slot() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 20) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);

    // A fixed-seed generator: the same mix of delays and aborts on every run.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let plan: Vec<(u64, Option<u64>, bool)> = (0..1000)
        .map(|_| {
            let delay = next() % 40;
            let abort = (next() % 3 == 0).then(|| next() % 30);
            let stream = next() % 10 == 0;
            (delay, abort, stream)
        })
        .collect();
    let outcomes: Vec<&'static str> = futures::stream::iter(plan)
        .map(|(delay, abort, stream)| {
            let url = if stream {
                gw.url(&format!("/v1/s?stream_ms={delay}"))
            } else {
                gw.url(&format!("/v1/d?delay_ms={delay}"))
            };
            async move {
                let req = get(&url, &[("x-api-key", TOKEN)]);
                let got = match abort {
                    Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), req).await {
                        Ok(g) => g,
                        Err(_) => return "aborted",
                    },
                    None => req.await,
                };
                let current: usize = got
                    .header("x-concurrent-current")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(usize::MAX);
                match got.status {
                    StatusCode::OK if current <= 20 => "ok",
                    StatusCode::OK => "over the limit",
                    StatusCode::TOO_MANY_REQUESTS => "429",
                    _ => "other",
                }
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let count = |k| outcomes.iter().filter(|o| **o == k).count();
    assert_eq!(count("other"), 0, "no request may fail for another reason");
    // The gateway's own count, not the stub's: after a client abort the gateway frees the slot
    // and closes the upstream connection at once, but the stub only stops counting the request
    // when it notices the close, so its peak can briefly read 21 without the gateway ever
    // holding more than 20.
    assert_eq!(
        count("over the limit"),
        0,
        "an admitted request saw more than 20 in flight"
    );
    assert!(count("ok") > 0 && count("429") > 0 && count("aborted") > 0);

    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
    // Every slot is back: 20 held at once are all admitted.
    let all = join_all((0..20).map(|_| {
        let url = gw.url("/v1/again?delay_ms=300");
        async move { get(&url, &[("x-api-key", TOKEN)]).await.status }
    }))
    .await;
    assert!(all.iter().all(|s| *s == StatusCode::OK), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_holds_its_slot_until_the_last_byte() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 1) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    // Read the headers only; the body is still streaming.
    let res = client()
        .request(
            http::Request::get(gw.url("/v1/stream?stream_ms=1000"))
                .header("x-api-key", TOKEN)
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let refused = held(&gw, "/v1/other").await;
    assert_eq!(refused.code(), "concurrency_limit_exceeded");
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first\nlast\n");
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
    assert_eq!(held(&gw, "/v1/other").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_downgrade_under_load_fail_no_request() {
    let stub = Stub::start().await;
    let key = key_yaml("k", "p", "");
    let mut cfg = ConfigDir::new(&(slots_plan("p", 2) + &key));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let hold = |gw: &Proc| {
        let url = gw.url("/v1/long?delay_ms=2500");
        tokio::spawn(async move { get(&url, &[("x-api-key", TOKEN)]).await })
    };
    let mut running = vec![hold(&gw), hold(&gw)];
    stub.wait_in_flight(2).await;
    assert_eq!(held(&gw, "/v1/x").await.code(), "concurrency_limit_exceeded");

    // Upgrade 2 -> 4: two more start at once; the fifth is refused against the new limit.
    let v = cfg.write(&(slots_plan("p", 4) + &key));
    gw.wait_metric("slotgate_config_version", |x| x == v as f64).await;
    running.push(hold(&gw));
    running.push(hold(&gw));
    stub.wait_in_flight(4).await;
    let r = held(&gw, "/v1/x").await;
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(
        (r.num("x-concurrent-limit"), r.num("x-concurrent-current")),
        (4, 4)
    );

    // Downgrade 4 -> 1 with 4 in flight: nothing is cut, new requests wait for < 1 in flight.
    let v = cfg.write(&(slots_plan("p", 1) + &key));
    gw.wait_metric("slotgate_config_version", |x| x == v as f64).await;
    let r = held(&gw, "/v1/x").await;
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(
        (r.num("x-concurrent-limit"), r.num("x-concurrent-current")),
        (1, 4)
    );
    for h in running {
        let r = h.await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "a reload failed a request in flight: {}",
            r.body
        );
    }
    let r = held(&gw, "/v1/x").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.num("x-concurrent-limit"), 1);
    let metrics = gw.metrics().await;
    for reason in ["parse", "schema", "hash_mismatch", "invalid"] {
        let series = format!("slotgate_config_reload_failures_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&series), "{series} missing");
    }
    assert!(gw.metric("slotgate_config_reload_duration_seconds_count").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moved_to_another_plan_keeps_its_in_flight_count() {
    let stub = Stub::start().await;
    let plans = slots_plan("small", 1) + &slots_plan("big", 3);
    let mut cfg = ConfigDir::new(&(plans.clone() + &key_yaml("k", "big", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let url = gw.url("/v1/long?delay_ms=1500");
    let a = tokio::spawn(async move { get(&url, &[("x-api-key", TOKEN)]).await });
    let url = gw.url("/v1/long?delay_ms=1500");
    let b = tokio::spawn(async move { get(&url, &[("x-api-key", TOKEN)]).await });
    stub.wait_in_flight(2).await;
    let v = cfg.write(&(plans + &key_yaml("k", "small", "")));
    gw.wait_metric("slotgate_config_version", |x| x == v as f64).await;
    let r = held(&gw, "/v1/x").await;
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(
        (r.num("x-concurrent-limit"), r.num("x-concurrent-current")),
        (1, 2)
    );
    assert_eq!(a.await.unwrap().status, StatusCode::OK);
    assert_eq!(b.await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_file_leaves_the_old_limits_enforced() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 1) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let good = std::fs::read_to_string(&cfg.config).unwrap();

    cfg.write_raw(b"{ this is not json");
    gw.wait_metric("slotgate_config_reload_failures_total{reason=\"parse\"}", |v| {
        v == 1.0
    })
    .await;
    // Edited by hand: the declared hash no longer matches the content.
    cfg.write_raw(good.replace("\"max\": 1", "\"max\": 100").as_bytes());
    gw.wait_metric(
        "slotgate_config_reload_failures_total{reason=\"hash_mismatch\"}",
        |v| v == 1.0,
    )
    .await;

    let url = gw.url("/v1/long?delay_ms=800");
    let first = tokio::spawn(async move { get(&url, &[("x-api-key", TOKEN)]).await });
    stub.wait_in_flight(1).await;
    let r = held(&gw, "/v1/x").await;
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(r.num("x-concurrent-limit"), 1);
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let log = gw.stderr();
    assert!(log.contains("configuration refused"), "{log}");
    assert!(log.contains("does not match its content"), "{log}");
    assert_eq!(gw.metric("slotgate_config_version").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_reach_the_upstream() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let auth = bearer(TOKEN);
    for r in [
        get(&gw.url("/v1/q?a=1"), &[("authorization", &auth)]).await,
        get(&gw.url("/v1/q?a=1"), &[("x-api-key", TOKEN)]).await,
        get(&gw.url(&format!("/v1/q?a=1&apikey={TOKEN}&b=2")), &[]).await,
        get(
            &gw.url("/v1/q?a=1"),
            &[("x-api-key", TOKEN), ("x-slotgate-key-id", "forged/key")],
        )
        .await,
    ] {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let dump = format!("{} {:?}", s.uri, s.headers);
        assert!(!dump.contains(TOKEN), "the key reached the upstream: {dump}");
        assert!(s.uri.contains("a=1"), "{}", s.uri);
        assert!(!s.uri.contains("apikey"), "{}", s.uri);
        assert!(s.headers.get("authorization").is_none());
        assert!(s.headers.get("x-api-key").is_none());
        assert_eq!(s.headers.get("x-slotgate-key-id").unwrap(), "default/k");
        assert_eq!(s.headers.get("x-slotgate-plan").unwrap(), "p");
        assert!(s.headers.get("x-forwarded-for").is_some());
    }
    assert!(seen[2].uri.ends_with("?a=1&b=2"), "{}", seen[2].uri);
    // Nor the logs or metrics.
    assert!(!gw.stderr().contains(TOKEN));
    assert!(!gw.metrics().await.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_its_base_path_its_host_and_where_the_request_came_from() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &format!("{}/base/", stub.url()), &[]);
    let r = get(
        &gw.url(&format!("/v1/q?apikey={TOKEN}&a=1")),
        &[("x-forwarded-for", "203.0.113.7"), ("te", "trailers")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = get(&gw.url("/v1/plain"), &[("x-api-key", TOKEN)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(seen[0].uri, "/base/v1/q?a=1");
    assert_eq!(seen[1].uri, "/base/v1/plain");
    let h = &seen[0].headers;
    assert_eq!(h.get("host").unwrap(), stub.addr.unwrap().to_string().as_str());
    assert_eq!(h.get("x-forwarded-host").unwrap(), gw.proxy.to_string().as_str());
    // The client's hops first, then the client itself, on one line.
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h.get("x-forwarded-for").unwrap(), "203.0.113.7, 127.0.0.1");
    assert!(h.get("te").is_none(), "a hop-by-hop header was forwarded: {h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_forwarded_with_its_authority_as_the_forwarded_host_and_one_cookie_line() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let h2: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // An HTTP/2 client sends `:authority`, no `Host`, and may split its cookies (RFC 9113 §8.2.3).
    let r = get_on(
        &h2,
        &gw.url("/v1/h2"),
        &[("x-api-key", TOKEN), ("cookie", "a=1"), ("cookie", "b=2")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.num("x-concurrent-limit"), 5);
    let seen = stub.seen.lock().unwrap().clone();
    let h = &seen[0].headers;
    assert_eq!(h.get("x-forwarded-host").unwrap(), gw.proxy.to_string().as_str());
    assert_eq!(h.get("host").unwrap(), stub.addr.unwrap().to_string().as_str());
    assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    assert!(h.get("x-api-key").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_unknown_suspended_and_expired_keys_are_refused() {
    let stub = Stub::start().await;
    let manifests = slots_plan("p", 5)
        + &key_yaml("k", "p", "")
        + &key_yaml("off", "p", "  suspended: true")
        + &key_yaml("old", "p", "  expiresAt: \"2020-01-01T00:00:00Z\"");
    let cfg = ConfigDir::new(&manifests);
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let cases = [
        (vec![], StatusCode::UNAUTHORIZED, "missing_api_key"),
        (
            vec![("x-api-key", "nope")],
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        ),
        (
            vec![("x-api-key", "tok-off")],
            StatusCode::FORBIDDEN,
            "key_suspended",
        ),
        (
            vec![("x-api-key", "tok-old")],
            StatusCode::UNAUTHORIZED,
            "key_expired",
        ),
    ];
    for (headers, status, code) in cases {
        let r = get(&gw.url("/v1/x"), &headers).await;
        assert_eq!(r.status, status, "{}", r.body);
        assert_eq!(r.code(), code);
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    }
    assert!(stub.seen.lock().unwrap().is_empty());
    assert_eq!(
        gw.metric("slotgate_requests_total{outcome=\"refused\",code=\"key_suspended\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_endpoint_and_per_key() {
    let stub = Stub::start().await;
    let rate = |per: &str| {
        format!(
            "  rateLimit:\n    requestsPerSecond: 1\n    burst: 3\n    per: {per}\n    paths: [\"/v1/*\"]"
        )
    };
    let manifests = plan_yaml("ep", &rate("Endpoint"))
        + &plan_yaml("shared", &rate("Key"))
        + &key_yaml("e", "ep", "")
        + &key_yaml("s", "shared", "");
    let cfg = ConfigDir::new(&manifests);
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    let call = |token: &'static str, path: &'static str| get_owned(gw.url(path), token);

    for remaining in [2, 1, 0] {
        let r = call("tok-e", "/v1/monitor/a").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.num("x-ratelimit-limit"), 1);
        assert_eq!(r.num("x-ratelimit-remaining"), remaining);
        assert_eq!(r.header("ratelimit-policy"), Some("\"default\";q=3;w=3"));
    }
    let r = call("tok-e", "/v1/monitor/a").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "rate_limit");
    assert_eq!(r.num("x-ratelimit-remaining"), 0);
    assert_eq!(r.num("retry-after"), 1);
    assert!(r.header("ratelimit").unwrap().starts_with("\"default\";r=0;"));
    // Another endpoint has its own bucket.
    assert_eq!(call("tok-e", "/v1/monitor/b").await.status, StatusCode::OK);

    // Scope Key: every path draws on one bucket.
    for path in ["/v1/a", "/v1/b", "/v1/c"] {
        assert_eq!(call("tok-s", path).await.status, StatusCode::OK);
    }
    assert_eq!(call("tok-s", "/v1/d").await.code(), "rate_limit");
    // Outside the plan's paths, no limit applies.
    let r = call("tok-s", "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-ratelimit-limit").is_none());
}

async fn get_owned(url: String, token: &'static str) -> Got {
    get(&url, &[("x-api-key", token)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_and_the_upstream_cap() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 10) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(
        &cfg.config,
        &stub.url(),
        &["--upstream-timeout", "1500ms", "--max-upstream-in-flight", "2"],
    );
    let r = held(&gw, "/v1/slow?delay_ms=4000").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.code(), "upstream_timeout");
    assert_eq!(r.num("x-concurrent-limit"), 10);

    let urls = [gw.url("/v1/a?delay_ms=700"), gw.url("/v1/b?delay_ms=700")];
    let running: Vec<_> = urls
        .into_iter()
        .map(|u| tokio::spawn(async move { get(&u, &[("x-api-key", TOKEN)]).await }))
        .collect();
    // The timed-out request may still be running at the stub; wait for exactly the two.
    wait_until("two requests at the upstream", || {
        stub.seen.lock().unwrap().len() == 3 && stub.in_flight() >= 2
    })
    .await;
    let r = held(&gw, "/v1/c").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.code(), "upstream_concurrency_limit_exceeded");
    assert_eq!(r.json()["error"]["limit"], 2);
    for h in running {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;

    // An upstream that is gone: 502, and the slot comes back.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw2 = Proc::gateway(&cfg.config, &dead, &[]);
    let r = held(&gw2, "/v1/x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.code(), "upstream_unavailable");
    gw2.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 3) + &key_yaml("k", "p", "")));
    // No configuration yet: alive but not ready, and every key unknown.
    let missing = cfg.dir.path().join("later.json");
    let gw = Proc::gateway(&missing, &stub.url(), &[]);
    let admin = |p: &str| format!("http://{}{p}", gw.admin.unwrap());
    assert_eq!(get(&admin("/healthz"), &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(&admin("/readyz"), &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(held(&gw, "/v1/x").await.code(), "invalid_api_key");

    std::fs::copy(&cfg.config, &missing).unwrap();
    wait_until_ready(&admin("/readyz")).await;
    assert_eq!(held(&gw, "/v1/x").await.status, StatusCode::OK);
    let m = gw.metrics().await;
    for name in [
        "slotgate_requests_total{outcome=\"forwarded\",code=\"200\"} 1",
        "slotgate_requests_total{outcome=\"refused\",code=\"invalid_api_key\"} 1",
        "slotgate_slot_capacity{plan=\"p\"} 3",
        "slotgate_slot_utilisation_ratio{plan=\"p\"}",
        "slotgate_config_version 1",
        "slotgate_config_keys 1",
        "slotgate_config_reloads_total 1",
        "slotgate_upstream_latency_seconds_count 1",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
}

async fn wait_until_ready(url: &str) {
    for _ in 0..2000 {
        if get(url, &[]).await.status == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} never became ready");
}

#[test]
fn bad_flags_name_what_is_wrong() {
    let out = std::process::Command::new(SLOTGATE)
        .args([
            "gateway",
            "--config",
            "x.json",
            "--upstream",
            "https://api.example.com",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only http:// upstreams"), "{err}");

    let out = std::process::Command::new(SLOTGATE)
        .args([
            "gateway",
            "--config",
            "x.json",
            "--upstream",
            "http://127.0.0.1:1",
            "--upstream-timeout",
            "3 fortnights",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--upstream-timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_closed_ones_are_not_reused() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    for _ in 0..20 {
        assert_eq!(held(&gw, "/v1/a").await.status, StatusCode::OK);
    }
    assert_eq!(
        stub.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    // An upstream that closes after each response: every request still succeeds.
    for _ in 0..10 {
        assert_eq!(held(&gw, "/v1/a?close=1").await.status, StatusCode::OK);
    }
    assert!(stub.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 10);
    // A client that abandons a streaming response: that connection is dropped, the next is fine.
    let _ = tokio::time::timeout(Duration::from_millis(100), held(&gw, "/v1/s?stream_ms=2000")).await;
    assert_eq!(held(&gw, "/v1/a").await.status, StatusCode::OK);
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readyz_then_finishes_requests_in_flight_and_exits() {
    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &["--shutdown-delay", "2s"]);
    let readyz = format!("http://{}/readyz", gw.admin.unwrap());
    assert_eq!(get(&readyz, &[]).await.status, StatusCode::OK);
    let slow = tokio::spawn({
        let url = gw.url("/v1/slow?delay_ms=2500");
        async move { get(&url, &[("x-api-key", TOKEN)]).await }
    });
    stub.wait_in_flight(1).await;

    let term = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // Load balancers see the pod leave while it still serves: new requests are admitted.
    wait_until("/readyz to answer 503", || {
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &readyz])
            .output()
            .is_ok_and(|o| o.stdout == b"503")
    })
    .await;
    let late = held(&gw, "/v1/late").await;
    assert_eq!(late.status, StatusCode::OK, "{}", late.body);

    let r = slow.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the request in flight was cut: {}",
        r.body
    );
    let status = gw.exit_status().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_the_upstream_whole_over_kept_alive_connections() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
    use hyper::body::Frame;
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let stub = Stub::start().await;
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &stub.url(), &[]);
    // Keeps its connection to the gateway alive between requests.
    let client =
        Client::builder(TokioExecutor::new()).build_http::<BoxBody<Bytes, std::convert::Infallible>>();
    let pattern = |size: usize| -> Vec<u8> { (0..size).map(|i| (i * 31 % 251) as u8).collect() };
    for (size, chunked) in [
        (0, false),
        (1, false),
        (64 * 1024, false),
        (3 * 1024 * 1024 + 17, false),
        (1024 * 1024 + 5, true),
    ] {
        let sent = pattern(size);
        let body = if chunked {
            // No Content-Length: the gateway forwards a chunked body as it arrives.
            let chunks: Vec<_> = sent
                .chunks(100_000)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            BoxBody::new(StreamBody::new(futures::stream::iter(chunks)))
        } else {
            BoxBody::new(Full::new(Bytes::from(sent.clone())))
        };
        let req = http::Request::post(gw.url("/v1/upload?echo=1"))
            .header("x-api-key", TOKEN)
            .body(body)
            .unwrap();
        // A hang guard, not a timing assertion.
        let res = tokio::time::timeout(Duration::from_secs(60), async {
            let res = client.request(req).await.expect("an answer");
            let (parts, body) = res.into_parts();
            (parts, body.collect().await.expect("a whole body").to_bytes())
        })
        .await
        .expect("answered within 60 s");
        let (parts, got) = res;
        assert_eq!(parts.status, StatusCode::OK, "{size} bytes");
        assert_eq!(parts.headers["x-concurrent-limit"], "5");
        assert_eq!(got.len(), size, "chunked: {chunked}");
        assert!(got == sent, "{size} bytes came back altered");
    }
    // The gateway reused one upstream connection for all of them, and holds no slot now.
    assert_eq!(stub.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
    assert!(
        stub.seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.headers.contains_key("x-api-key"))
    );
}
