//! Black-box tests of upstream targets (`ApiUpstream`): routing by path to an HTTPS target (a test
//! CA made here) and an HTTP one, the provider credential injected in place of the customer's
//! key, target slots across every key stacked on each key's own, and what bad TLS and a missing
//! credential answer. Every process and server is on loopback ports the OS picks.

mod common;

use std::{net::SocketAddr, path::Path};

use common::*;
use http::StatusCode;

const PROVIDER_KEY: &str = "sk-provider-0123456789";

/// An https target in front of `stub`: a TLS front end with a leaf for 127.0.0.1 signed by the
/// test CA. Returns the front's address.
async fn https_in_front(stub: &Stub, pki: &Path) -> (SocketAddr, std::path::PathBuf) {
    let (ca, cert, key) = test_pki(pki);
    (tls_front(stub.addr.unwrap(), &cert, &key).await, ca)
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn ca_config_map(ca_pem: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: provider-ca\n  namespace: default\ndata:\n  ca.crt: |\n{}---\n",
        indent(&std::fs::read_to_string(ca_pem).unwrap(), 4)
    )
}

fn credential_secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: provider\n  namespace: default\nstringData:\n  api-key: {PROVIDER_KEY}\n---\n"
    )
}

/// An ApiUpstream; `extra` is more of its spec, indented by two.
fn upstream_yaml(name: &str, url: &str, paths: &str, extra: &str) -> String {
    format!(
        "apiVersion: slotgate.dev/v1alpha1\nkind: ApiUpstream\nmetadata:\n  name: {name}\nspec:\n  url: {url}\n  paths: {paths}\n{extra}---\n"
    )
}

const WITH_CREDENTIAL: &str = "  credentialRef: {namespace: default, name: provider, key: api-key}\n";
const WITH_CA: &str = "  tls:\n    caBundleRef: {namespace: default, name: provider-ca, key: ca.crt}\n";

fn up(dir: &Path, upstream: &str) -> Proc {
    Proc::up(dir, &["--upstream", upstream])
}

fn bearer(name: &str) -> String {
    format!("Bearer tok-{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_reach_their_targets_with_the_provider_key_and_target_slots_cap_every_key() {
    let (images, search, default) = (Stub::start().await, Stub::start().await, Stub::start().await);
    let pki = tempfile::tempdir().unwrap();
    let (front, ca) = https_in_front(&images, pki.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = [
        slots_plan("startup", 4),
        key_yaml("acme", "startup", ""),
        key_yaml("globex", "startup", ""),
        credential_secret(),
        ca_config_map(&ca),
        upstream_yaml(
            "images",
            &format!("https://127.0.0.1:{}/base", front.port()),
            "[\"/v1/images/*\"]",
            &format!("{WITH_CREDENTIAL}{WITH_CA}  concurrency: {{maxConcurrentRequests: 5}}\n"),
        ),
        upstream_yaml("search", &search.url(), "[\"/v1/search\"]", ""),
    ]
    .concat();
    std::fs::write(dir.path().join("all.yaml"), manifests).unwrap();
    let gw = up(dir.path(), &default.url());
    let table = gw.stdout();
    assert!(table.contains("TARGETS"), "{table}");
    assert!(
        !table.contains(PROVIDER_KEY) && !gw.stderr().contains(PROVIDER_KEY),
        "the provider key is never printed"
    );

    // Routing: the longest pattern, the base path, the default upstream for the rest.
    let r = get(
        &gw.url("/v1/images/cat?size=2"),
        &[("authorization", &bearer("acme"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = get(&gw.url("/v1/search?q=1"), &[("x-api-key", "tok-globex")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = get(&gw.url("/v1/other"), &[("authorization", &bearer("acme"))]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let seen = |s: &Stub| s.seen.lock().unwrap().clone();
    let (at_images, at_search, at_default) = (seen(&images), seen(&search), seen(&default));
    assert_eq!((at_images.len(), at_search.len(), at_default.len()), (1, 1, 1));
    assert_eq!(at_images[0].uri, "/base/v1/images/cat?size=2");
    assert_eq!(at_search[0].uri, "/v1/search?q=1");
    assert_eq!(at_default[0].uri, "/v1/other");

    // The https target gets the provider's key and never the customer's.
    let h = &at_images[0].headers;
    assert_eq!(h["authorization"], format!("Bearer {PROVIDER_KEY}").as_str());
    assert_eq!(h["host"], format!("127.0.0.1:{}", front.port()).as_str());
    for seen in at_images.iter().chain(&at_search).chain(&at_default) {
        for (name, value) in &seen.headers {
            let v = value.to_str().unwrap_or_default();
            assert!(!v.contains("tok-"), "{name}: the customer's key was forwarded");
        }
    }
    // A target without a credential gets the request less the customer's key.
    assert!(!at_search[0].headers.contains_key("authorization"));
    assert!(!at_search[0].headers.contains_key("x-api-key"));

    // Two keys of 4 slots each, 6 requests each at once, on a target of 5 slots.
    let mut all = Vec::new();
    for key in ["acme", "globex"] {
        for _ in 0..6 {
            let url = gw.url("/v1/images/slow?delay_ms=600");
            let auth = bearer(key);
            all.push(tokio::spawn(async move {
                (key, get(&url, &[("authorization", &auth)]).await)
            }));
        }
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for task in all {
        let (key, r) = task.await.unwrap();
        let code = if r.status == StatusCode::OK {
            // Each key within its own slots, whatever the target has left.
            assert_eq!(r.num("x-concurrent-limit"), 4, "{key}");
            assert!(r.num("x-concurrent-current") <= 4, "{key}: {:?}", r.headers);
            "ok".to_string()
        } else {
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
            assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
            if r.code() == "target_concurrency_limit_exceeded" {
                assert!(r.body.contains("5 requests at once"), "{}", r.body);
                // The key's own figures, honest: its slot was given back.
                assert_eq!(r.num("x-concurrent-limit"), 4);
            }
            r.code()
        };
        *codes.entry(code).or_default() += 1;
    }
    assert!(images.peak() <= 5, "the target had {} in flight", images.peak());
    assert_eq!(codes.get("ok"), Some(&5), "{codes:?}");
    assert!(
        codes
            .get("target_concurrency_limit_exceeded")
            .is_some_and(|n| *n >= 1),
        "{codes:?}"
    );
    assert_eq!(codes.values().sum::<usize>(), 12, "{codes:?}");
    // Every slot came back: the key and the target serve again.
    images.wait_in_flight(0).await;
    let r = get(
        &gw.url("/v1/images/after"),
        &[("authorization", &bearer("globex"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let states = get(&format!("http://{}/targets", gw.admin.unwrap()), &[])
        .await
        .json();
    let images_state = states["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "images")
        .unwrap()
        .clone();
    assert_eq!(images_state["inFlight"], 0, "{states}");
    assert_eq!(images_state["limit"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_answers_502_and_a_missing_credential_503_until_it_is_there() {
    let (stub, default) = (Stub::start().await, Stub::start().await);
    let pki = tempfile::tempdir().unwrap();
    let (front, ca) = https_in_front(&stub, pki.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = front.port();
    let manifests = [
        slots_plan("startup", 4),
        key_yaml("acme", "startup", ""),
        ca_config_map(&ca),
        // The test CA is not among the public roots.
        upstream_yaml(
            "unknown-ca",
            &format!("https://127.0.0.1:{port}"),
            "[\"/v1/a/*\"]",
            "",
        ),
        // The leaf is for 127.0.0.1, not for localhost.
        upstream_yaml(
            "wrong-name",
            &format!("https://localhost:{port}"),
            "[\"/v1/b/*\"]",
            WITH_CA,
        ),
        // Its credential Secret is not there (yet).
        upstream_yaml(
            "no-credential",
            &format!("https://127.0.0.1:{port}"),
            "[\"/v1/c/*\"]",
            &format!("{WITH_CREDENTIAL}{WITH_CA}"),
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("all.yaml"), &manifests).unwrap();
    let gw = up(dir.path(), &default.url());
    let auth = [("authorization", bearer("acme"))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    for (path, why) in [
        ("/v1/a/x", "UnknownIssuer"),
        ("/v1/b/x", "not valid for name \"localhost\""),
    ] {
        let r = get(&gw.url(path), &auth).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{path}: {}", r.body);
        assert_eq!(r.code(), "upstream_tls_error", "{path}");
        // Limits still told after admission.
        assert_eq!(r.num("x-concurrent-limit"), 4);
        let states = get(&format!("http://{}/targets", gw.admin.unwrap()), &[])
            .await
            .json();
        let name = if path.starts_with("/v1/a") {
            "unknown-ca"
        } else {
            "wrong-name"
        };
        let state = states["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone();
        let error = state["lastTlsError"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{name}: {states}");
    }
    assert_eq!(stub.seen.lock().unwrap().len(), 0, "no request passed bad TLS");

    // A missing credential: said at start, and its paths answer 503 rather than go out without it.
    let table = gw.stdout();
    let line = table.lines().find(|l| l.contains("no-credential")).unwrap();
    assert!(
        line.contains("False CredentialNotFound") && line.contains("default/provider/api-key"),
        "{table}"
    );
    gw.wait_output("ApiUpstream no-credential: credential", true)
        .await;
    let r = get(&gw.url("/v1/c/x"), &auth).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.code(), "target_unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        default.seen.lock().unwrap().len(),
        0,
        "never sent to the default upstream instead"
    );

    // The Secret arrives: the target serves, with the credential, without a restart.
    std::fs::write(dir.path().join("secret.yaml"), credential_secret()).unwrap();
    wait_until_ok(&gw, "/v1/c/x", &auth).await;
    let seen = stub.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap().headers["authorization"],
        format!("Bearer {PROVIDER_KEY}").as_str()
    );
}

async fn wait_until_ok(gw: &Proc, path: &str, headers: &[(&str, &str)]) {
    for _ in 0..400 {
        if get(&gw.url(path), headers).await.status == StatusCode::OK {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{path} never answered 200: {}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_rate_limit_refuses_with_its_own_code() {
    let (stub, default) = (Stub::start().await, Stub::start().await);
    let dir = tempfile::tempdir().unwrap();
    let manifests = [
        slots_plan("startup", 4),
        key_yaml("acme", "startup", ""),
        upstream_yaml(
            "metered",
            &stub.url(),
            "[\"/v1/m/*\"]",
            "  rateLimit: {requestsPerSecond: 1, burst: 2}\n",
        ),
    ]
    .concat();
    std::fs::write(dir.path().join("all.yaml"), manifests).unwrap();
    let gw = up(dir.path(), &default.url());
    let auth = bearer("acme");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&gw.url("/v1/m/x"), &[("authorization", &auth)]).await);
    }
    assert_eq!(statuses[0].status, StatusCode::OK);
    assert_eq!(statuses[1].status, StatusCode::OK);
    let refused = &statuses[2];
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert_eq!(refused.code(), "target_rate_limit");
    assert!(refused.num("retry-after") >= 1);
    assert_eq!(stub.seen.lock().unwrap().len(), 2);
}
