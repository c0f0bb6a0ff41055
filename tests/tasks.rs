//! Black-box tests of the async task API: the real `slotgate` binary, a counting upstream and a
//! webhook receiver on loopback, signatures checked with the Standard Webhooks reference library.

mod common;

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_c2xvdGdhdGUtdGVzdC1rZXktYi1zZWNyZXQ=";

/// Serves every connection of `listener` with `answer`.
fn serve<F, Fut>(listener: TcpListener, answer: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("application/json"));
    res
}

/// An upstream that counts requests in flight and runs per `Idempotency-Key`. A task's payload
/// steers it: `delay_ms` holds the answer, `hold: true` holds it until [`Upstream::release`],
/// `fail: [500, 429, ...]` answers those statuses to the first attempts. Synchronous requests
/// take `?delay_ms=N`.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    runs: Arc<Mutex<HashMap<String, usize>>>,
    /// Requests by the `X-Slotgate-Key-Id` they carried, in arrival order.
    order: Arc<Mutex<Vec<String>>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            in_flight: Arc::default(),
            peak: Arc::default(),
            runs: Arc::default(),
            order: Arc::default(),
            release: tokio::sync::watch::channel(false).0,
        };
        let u = up.clone();
        serve(listener, move |req| {
            let u = u.clone();
            async move { u.answer(req).await }
        });
        up
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let _count = Leave(Arc::clone(&self.in_flight));
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let key = header("x-slotgate-key-id").unwrap_or_default();
        let idem = header("idempotency-key");
        self.order.lock().unwrap().push(key.clone());
        let query_delay = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("delay_ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64);
        let path = req.uri().path().to_string();
        let (authorization, host) = (header("authorization"), header("host"));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let attempt = match &idem {
            Some(id) => {
                let mut runs = self.runs.lock().unwrap();
                let n = runs.entry(id.clone()).or_default();
                *n += 1;
                *n
            }
            None => 1,
        };
        let delay = payload["delay_ms"].as_u64().unwrap_or(query_delay);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if payload["hold"] == true {
            let mut rx = self.release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
        }
        if let Some(status) = payload["fail"]
            .as_array()
            .and_then(|f| f.get(attempt - 1))
            .and_then(Value::as_u64)
        {
            let status = StatusCode::from_u16(status as u16).unwrap();
            let mut res = json_response(status, &json!({"error": "as the test asked"}));
            if status == StatusCode::TOO_MANY_REQUESTS {
                res.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
            }
            return res;
        }
        json_response(
            StatusCode::OK,
            &json!({
                "text": format!("answer to {}", payload["prompt"].as_str().unwrap_or("")),
                "path": path,
                "attempt": attempt,
                "key": key,
                "authorization": authorization,
                "host": host,
            }),
        )
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn runs(&self) -> HashMap<String, usize> {
        self.runs.lock().unwrap().clone()
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

struct Leave(Arc<AtomicUsize>);
impl Drop for Leave {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One webhook call as the receiver saw it.
#[derive(Clone, Debug)]
struct Hook {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

/// A webhook receiver: `/ok` answers 200, `/gone` 410, `/flaky` 500 to the first call of each
/// `webhook-id` and 200 after.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl Receiver {
    async fn start(ip: &str) -> Receiver {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            hooks: Arc::default(),
        };
        let hooks = Arc::clone(&r.hooks);
        serve(listener, move |req: Request<Incoming>| {
            let hooks = Arc::clone(&hooks);
            async move {
                let h = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let (id, timestamp, signature) =
                    (h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"));
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut hooks = hooks.lock().unwrap();
                let seen_before = hooks.iter().any(|x| x.id == id);
                hooks.push(Hook {
                    path: path.clone(),
                    id,
                    timestamp,
                    signature,
                    body: String::from_utf8(body.to_vec()).unwrap(),
                });
                let status = match path.as_str() {
                    "/gone" => StatusCode::GONE,
                    "/flaky" if !seen_before => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::OK,
                };
                json_response(status, &json!({}))
            }
        });
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The same receiver behind TLS with `cert`/`key` (PEM files): its URLs are `https://`.
    async fn start_tls(cert: &Path, key: &Path) -> Receiver {
        // A plain receiver on a loopback port of its own does the answering; the front end
        // terminates TLS and relays bytes to it.
        let inner = Receiver::start("127.0.0.1").await;
        let front = tls_front(inner.addr, cert, key).await;
        Receiver {
            addr: front,
            hooks: inner.hooks,
        }
    }

    fn tls_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.hooks.lock().unwrap().len()
    }
}

/// The Python of the chart tests' virtual environment, which has the reference verifier.
fn python() -> std::path::PathBuf {
    let p = std::env::var_os("SLOTGATE_CHART_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chart-venv/bin/python"),
        Into::into,
    );
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/test.sh` (it installs standardwebhooks into target/chart-venv)",
        p.display()
    );
    p
}

/// Verifies every hook with `standardwebhooks` (the spec's reference library) and returns how
/// many it accepted; a copy of the first hook with its body altered must be refused.
fn verify_with_reference(secret: &str, hooks: &[Hook]) -> usize {
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
cases = json.load(sys.stdin)
wh = Webhook(cases["secret"])
ok = 0
for h in cases["hooks"]:
    wh.verify(h["body"], {"webhook-id": h["id"], "webhook-timestamp": h["timestamp"], "webhook-signature": h["signature"]})
    ok += 1
t = cases["hooks"][0]
try:
    wh.verify(t["body"] + " ", {"webhook-id": t["id"], "webhook-timestamp": t["timestamp"], "webhook-signature": t["signature"]})
    print("tampered body accepted")
    sys.exit(2)
except Exception:
    pass
print(ok)
"#;
    let input = json!({
        "secret": secret,
        "hooks": hooks.iter().map(|h| json!({
            "id": h.id, "timestamp": h.timestamp, "signature": h.signature, "body": h.body,
        })).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks refused a delivery: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

type BodyClient = Client<HttpConnector, Full<Bytes>>;

fn body_client() -> BodyClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request with a body, answered in full.
async fn send(client: &BodyClient, method: Method, url: &str, key: &str, body: &str) -> Got {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer within 60 s"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A plan with `slots` and the task policy `tasks` (YAML flow map), on `/v1/*`.
fn task_plan(name: &str, slots: u32, tasks: &str) -> String {
    plan_yaml(
        name,
        &format!(
            "  concurrency:\n    maxConcurrentRequests: {slots}\n    paths: [\"/v1/*\"]\n  tasks: {tasks}"
        ),
    )
}

/// A key (token `tok-<name>`) whose token Secret may carry a webhook secret.
fn hook_key(name: &str, plan: &str, secret: Option<&str>) -> String {
    let hook = secret.map_or(String::new(), |s| format!("  webhook-secret: {s}\n"));
    format!(
        "apiVersion: slotgate.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  plan: {plan}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-token\n  namespace: default\nstringData:\n  token: tok-{name}\n{hook}---\n"
    )
}

const WORK_TYPE: &str = "apiVersion: slotgate.dev/v1alpha1\nkind: ApiTaskType\nmetadata:\n  name: work\nspec:\n  taskType: WORK\n  request:\n    path: /v1/work\n---\n";

fn manifests(dir: &Path, text: &str) {
    let tmp = dir.join("all.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("all.yaml")).unwrap();
}

/// A manifest folder holding `text`, and an empty data folder for the task store.
fn folder(text: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    manifests(dir.path(), text);
    (dir, tempfile::tempdir().unwrap())
}

/// `slotgate up DIR` in front of `upstream`, keeping tasks in `data`.
fn up(dir: &Path, upstream: &str, data: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["--upstream", upstream, "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    Proc::up(dir, &args)
}

fn task_body(payload: Value, hook: Option<&str>) -> String {
    let mut b = json!({"taskType": "WORK", "payload": payload});
    if let Some(url) = hook {
        b["webhook"] = json!({ "url": url });
    }
    b.to_string()
}

/// Submits `n` tasks from `parallel` connections; returns the ids (the `i`th is task `i`'s),
/// and panics on anything but 202.
async fn submit_all(
    gw: &Proc,
    key: &str,
    n: usize,
    parallel: usize,
    body: impl Fn(usize) -> String,
) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let bodies: Arc<Vec<String>> = Arc::new((0..n).map(body).collect());
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (next, bodies, url, key) = (
            Arc::clone(&next),
            Arc::clone(&bodies),
            gw.url("/v1/tasks"),
            key.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let client = body_client();
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= bodies.len() {
                    return ids;
                }
                let r = send(&client, Method::POST, &url, &key, &bodies[i]).await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
                let task = &r.json()["task"];
                let id = task["id"].as_str().unwrap().to_string();
                assert_eq!(r.header("location"), Some(format!("/v1/tasks/{id}").as_str()));
                assert_eq!(task["status"], "queued");
                assert_eq!(task["taskType"], "WORK");
                assert!(task["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')));
                ids.push((i, id));
            }
        }));
    }
    let mut ids = Vec::new();
    for w in workers {
        ids.extend(w.await.unwrap());
    }
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

async fn task(gw: &Proc, key: &str, id: &str) -> Value {
    let r = get(&gw.url(&format!("/v1/tasks/{id}")), &[("x-api-key", key)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.json()
}

/// Every task of `key` with `status`, through the paginated list.
async fn list_all(gw: &Proc, key: &str, status: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = gw.url(&format!("/v1/tasks?limit=1000&status={status}"));
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = get(&url, &[("x-api-key", key)]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let page = r.json();
        out.extend(page["tasks"].as_array().unwrap().iter().cloned());
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// The tasks that ran twice, after checking none ran more often and each had reached the
/// upstream before the kill (`seen_at_kill`): a task that had not started runs once.
fn reruns_only_of_started<'a>(
    runs: &'a HashMap<String, usize>,
    seen_at_kill: &HashSet<String>,
) -> Vec<&'a String> {
    let twice: Vec<&String> = runs.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    assert!(
        runs.values().all(|&n| n <= 2),
        "a task ran more than twice: {twice:?}"
    );
    for id in &twice {
        assert!(
            seen_at_kill.contains(*id),
            "task {id} had not started at the kill and ran twice"
        );
    }
    twice
}

/// Waits until webhooks with `n` distinct ids have arrived.
async fn wait_for_webhooks(receiver: &Receiver, n: usize) {
    wait_for("a webhook for every task", 60, || async {
        receiver
            .hooks()
            .iter()
            .map(|h| h.id.clone())
            .collect::<HashSet<_>>()
            .len()
            == n
    })
    .await;
}

/// Polls until `cond` holds, up to `secs` (a hang guard, not a timing assertion).
async fn wait_for<F, Fut>(what: &str, secs: u64, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_tasks_on_a_25_slot_key_run_within_its_slots_and_every_webhook_verifies() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // Tasks may hold 20 of the 25 slots: the other 5 stay for the key's synchronous requests.
    manifests(
        dir.path(),
        &format!(
            "{}{}{WORK_TYPE}",
            task_plan("startup", 25, "{maxConcurrent: 20}"),
            hook_key("alpha", "startup", Some(SECRET_A))
        ),
    );
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    gw.wait_output(&format!("async tasks: POST {}", gw.url("/v1/tasks")), false)
        .await;
    let hook = receiver.url("/ok");
    let ids = submit_all(&gw, "tok-alpha", 300, 16, |i| {
        task_body(json!({"prompt": format!("p{i}"), "delay_ms": 100}), Some(&hook))
    })
    .await;
    assert_eq!(ids.len(), 300);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 300, "distinct ids");
    assert!(ids.iter().all(|id| id.len() == 26), "{:?}", &ids[..3]);

    // While the backlog runs, synchronous requests of the same key are admitted in the slots
    // tasks leave free, and the upstream sees the sum of both within the key's 25.
    let client = body_client();
    let mut sync_ok = 0;
    for _ in 0..10 {
        let r = send(
            &client,
            Method::GET,
            &gw.url("/v1/work?delay_ms=50"),
            "tok-alpha",
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.num("x-concurrent-limit"), 25);
        sync_ok += 1;
    }
    assert_eq!(sync_ok, 10);

    wait_for("300 webhooks", 120, || async { receiver.count() >= 300 }).await;
    let hooks = receiver.hooks();
    assert_eq!(hooks.len(), 300, "one delivery per task");
    assert!(
        upstream.peak() <= 25,
        "upstream peak {} > 25 slots",
        upstream.peak()
    );
    assert!(
        upstream.peak() >= 20,
        "tasks used their 20 slots: peak {}",
        upstream.peak()
    );
    let runs = upstream.runs();
    assert_eq!(runs.len(), 300);
    assert!(runs.values().all(|&n| n == 1), "each task ran once");

    assert_eq!(verify_with_reference(SECRET_A, &hooks), 300);
    let mut delivered = HashSet::new();
    for h in &hooks {
        let body: Value = serde_json::from_str(&h.body).unwrap();
        let id = body["task"]["id"].as_str().unwrap().to_string();
        assert_eq!(body["task"]["status"], "completed");
        assert!(
            body["response"]["text"]
                .as_str()
                .unwrap()
                .starts_with("answer to p")
        );
        assert_eq!(h.id, format!("msg_{id}"), "webhook-id names the task");
        delivered.insert(id);
    }
    assert_eq!(delivered, ids.iter().cloned().collect());

    wait_for("the delivery recorded", 30, || async {
        task(&gw, "tok-alpha", &ids[7]).await["task"]["webhook"]["status"] == "delivered"
    })
    .await;
    let t = task(&gw, "tok-alpha", &ids[7]).await;
    assert_eq!(t["task"]["status"], "completed");
    assert_eq!(t["task"]["attempts"], 1);
    assert_eq!(t["response"]["text"], "answer to p7");
    assert_eq!(t["response"]["path"], "/v1/work");
    assert_eq!(t["task"]["webhook"]["status"], "delivered");
    assert_eq!(t["task"]["webhook"]["attempts"][0]["status"], 200);
    assert_eq!(list_all(&gw, "tok-alpha", "completed").await.len(), 300);

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "slotgate_tasks_finished_total{status=\"completed\"}"),
        300.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "slotgate_tasks_submitted_total"), 300.0);
    assert_eq!(
        metric_value(&m, "slotgate_tasks_deliveries_total{result=\"delivered\"}"),
        300.0
    );
    assert!(m.contains("slotgate_tasks_queued{plan=\"startup\"} 0"), "{m}");
    assert!(m.contains("slotgate_tasks_running{plan=\"startup\"} 0"), "{m}");
    assert_eq!(metric_value(&m, "slotgate_tasks_queue_wait_seconds_count"), 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_upgrade_applies_to_the_queue_at_once() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let write = |slots| {
        manifests(
            dir.path(),
            &format!(
                "{}{}{WORK_TYPE}",
                task_plan("startup", slots, "{}"),
                hook_key("alpha", "startup", Some(SECRET_A))
            ),
        )
    };
    write(25);
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let ids = submit_all(&gw, "tok-alpha", 120, 8, |_| {
        task_body(json!({"hold": true}), None)
    })
    .await;
    wait_until("25 tasks held upstream", || upstream.in_flight() == 25).await;
    write(50);
    wait_until("50 tasks held upstream after the upgrade", || {
        upstream.in_flight() == 50
    })
    .await;
    upstream.release();
    wait_for("every task completed", 60, || async {
        list_all(&gw, "tok-alpha", "completed").await.len() == ids.len()
    })
    .await;
    assert_eq!(upstream.peak(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_no_task_and_runs_none_that_had_not_started_twice() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start("127.0.0.1").await;
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}",
        task_plan("startup", 25, "{maxQueued: 5000}"),
        hook_key("alpha", "startup", Some(SECRET_A))
    ));
    let mut gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let hook = receiver.url("/ok");
    // The upstream holds the first tasks until every submission is in, so that a slow host
    // cannot finish the run before the kill; after the release each task takes 100 ms.
    let ids = submit_all(&gw, "tok-alpha", 1000, 16, |i| {
        task_body(
            json!({"prompt": format!("p{i}"), "delay_ms": 100, "hold": true}),
            Some(&hook),
        )
    })
    .await;
    assert_eq!(ids.len(), 1000);
    upstream.release();
    wait_until("a third of the run", || upstream.runs().len() >= 300).await;
    let in_flight_at_kill = upstream.in_flight();
    gw.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    gw.child.wait().unwrap();
    let seen_at_kill: HashSet<String> = upstream.runs().into_keys().collect();
    let started_at_kill = seen_at_kill.len();
    assert!(started_at_kill < 1000, "the kill came mid-run");
    drop(gw);

    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    wait_for("every accepted task completed after the restart", 120, || async {
        list_all(&gw, "tok-alpha", "completed").await.len() == 1000
    })
    .await;
    let runs = upstream.runs();
    assert_eq!(runs.len(), 1000, "every task reached the upstream");
    for id in &ids {
        assert!(runs.contains_key(id), "task {id} never ran");
    }
    // Only a task that had reached the upstream before the kill, and whose result was not yet
    // on disk, may run again; one that had not started runs exactly once.
    let twice = reruns_only_of_started(&runs, &seen_at_kill);
    wait_for_webhooks(&receiver, 1000).await;
    eprintln!(
        "kill -9 after {started_at_kill} started, {in_flight_at_kill} in flight: {} ran twice",
        twice.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_a_huge_backlog_does_not_delay_another_keys_first_task() {
    let upstream = Upstream::start().await;
    let (dir, data) = folder(&format!(
        "{}{}{}{WORK_TYPE}",
        task_plan("startup", 25, "{maxQueued: 20000}"),
        hook_key("alpha", "startup", Some(SECRET_A)),
        hook_key("bravo", "startup", Some(SECRET_B))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    // Key A's tasks are held upstream until the test releases them: its 25 slots stay taken and
    // 9,975 stay queued, so B's task cannot be waiting for A's to finish.
    let a = submit_all(&gw, "tok-alpha", 10_000, 32, |_| {
        task_body(json!({"hold": true}), None)
    })
    .await;
    assert_eq!(a.len(), 10_000);
    wait_until("A's 25 slots taken", || upstream.in_flight() == 25).await;
    let b = submit_all(&gw, "tok-bravo", 1, 1, |_| {
        task_body(json!({"prompt": "b"}), None)
    })
    .await;
    wait_for("B's task completed", 30, || async {
        task(&gw, "tok-bravo", &b[0]).await["task"]["status"] == "completed"
    })
    .await;
    let queued_a = list_all(&gw, "tok-alpha", "queued").await.len();
    assert_eq!(
        queued_a,
        10_000 - 25,
        "A's backlog had not moved when B's task ran"
    );
    let order = upstream.order.lock().unwrap().clone();
    assert_eq!(order.iter().filter(|k| *k == "default/bravo").count(), 1);
    // Another key's task is not A's to read.
    let r = get(
        &gw.url(&format!("/v1/tasks/{}", b[0])),
        &[("x-api-key", "tok-alpha")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "task_not_found");
    upstream.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_get_their_code_and_store_nothing() {
    let upstream = Upstream::start().await;
    let (dir, data) = folder(&format!(
        "{}{}{}{}{}{WORK_TYPE}",
        task_plan("startup", 25, "{maxQueued: 2}"),
        plan_yaml("trial", "  concurrency:\n    maxConcurrentRequests: 1"),
        hook_key("alpha", "startup", Some(SECRET_A)),
        hook_key("nohook", "startup", None),
        hook_key("trialkey", "trial", Some(SECRET_B)),
    ));
    let gw = up(
        dir.path(),
        &upstream.url(),
        data.path(),
        &["--max-task-payload-bytes", "1000"],
    );
    let client = body_client();
    let url = gw.url("/v1/tasks");
    let big = "x".repeat(2000);
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        (
            "tok-alpha",
            "not json".into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "not JSON",
        ),
        (
            "tok-alpha",
            "[1]".into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "JSON object",
        ),
        (
            "tok-alpha",
            r#"{"payload":{}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "taskType is required",
        ),
        (
            "tok-alpha",
            r#"{"taskType":5}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "taskType must be",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"WORK","priority":1}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "priority",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"WORK","webhook":"http://x"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "webhook must be an object",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"WORK","webhook":{}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_task",
            "webhook.url",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"CHATGPT"}"#.into(),
            StatusCode::BAD_REQUEST,
            "unknown_task_type",
            "known task types: WORK",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"WORK","webhook":{"url":"ftp://example.com/x"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_webhook_url",
            "http",
        ),
        (
            "tok-alpha",
            r#"{"taskType":"WORK","webhook":{"url":"not a url"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_webhook_url",
            "",
        ),
        (
            "tok-alpha",
            format!(r#"{{"taskType":"WORK","payload":{{"p":"{big}"}}}}"#),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "1000 bytes",
        ),
        (
            "tok-nohook",
            r#"{"taskType":"WORK","webhook":{"url":"http://127.0.0.1:9/x"}}"#.into(),
            StatusCode::BAD_REQUEST,
            "webhook_secret_missing",
            "webhook-secret",
        ),
        (
            "tok-trialkey",
            r#"{"taskType":"WORK"}"#.into(),
            StatusCode::FORBIDDEN,
            "tasks_not_in_plan",
            "trial plan",
        ),
    ];
    for (key, body, status, code, words) in &cases {
        let r = send(&client, Method::POST, &url, key, body).await;
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        assert_eq!(r.code(), *code, "{body}: {}", r.body);
        assert!(r.body.contains(words), "{body}: expected {words:?} in {}", r.body);
    }
    let r = send(
        &client,
        Method::POST,
        &url,
        "tok-nobody",
        r#"{"taskType":"WORK"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for key in ["tok-alpha", "tok-nohook", "tok-trialkey"] {
        let r = get(&gw.url("/v1/tasks"), &[("x-api-key", key)]).await;
        assert_eq!(r.json()["tasks"], json!([]), "{key}: nothing stored");
    }
    assert_eq!(upstream.runs().len(), 0);

    // A full queue says when to come back; nothing of the refused task is kept.
    let held = submit_all(&gw, "tok-alpha", 2, 1, |_| task_body(json!({"hold": true}), None)).await;
    wait_until("both tasks running", || upstream.in_flight() == 2).await;
    let r = send(&client, Method::POST, &url, "tok-alpha", r#"{"taskType":"WORK"}"#).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.code(), "task_queue_full");
    assert!(r.num("retry-after") >= 1);
    // A running task cannot be canceled; a queued one can, and then never runs.
    let r = send(
        &client,
        Method::DELETE,
        &gw.url(&format!("/v1/tasks/{}", held[0])),
        "tok-alpha",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.code(), "task_not_cancelable");
    upstream.release();
    wait_for("both held tasks completed", 30, || async {
        list_all(&gw, "tok-alpha", "completed").await.len() == 2
    })
    .await;
    assert_eq!(list_all(&gw, "tok-alpha", "queued").await.len(), 0);
    let r = get(
        &gw.url("/v1/tasks/01JZZZZZZZZZZZZZZZZZZZZZZZ"),
        &[("x-api-key", "tok-alpha")],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = get(&gw.url("/v1/tasks?status=done"), &[("x-api-key", "tok-alpha")]).await;
    assert_eq!(r.code(), "invalid_task");
    assert!(r.body.contains("queued, running"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_can_be_canceled_and_never_runs() {
    let upstream = Upstream::start().await;
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}",
        task_plan("startup", 1, "{}"),
        hook_key("alpha", "startup", Some(SECRET_A))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let ids = submit_all(&gw, "tok-alpha", 2, 1, |_| task_body(json!({"hold": true}), None)).await;
    wait_until("the first task running", || upstream.in_flight() == 1).await;
    let client = body_client();
    let r = send(
        &client,
        Method::DELETE,
        &gw.url(&format!("/v1/tasks/{}", ids[1])),
        "tok-alpha",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["task"]["status"], "canceled");
    upstream.release();
    wait_for("the first task completed", 30, || async {
        task(&gw, "tok-alpha", &ids[0]).await["task"]["status"] == "completed"
    })
    .await;
    assert_eq!(
        task(&gw, "tok-alpha", &ids[1]).await["task"]["status"],
        "canceled"
    );
    assert_eq!(upstream.runs().len(), 1, "the canceled task never ran");
}

/// A task config with key `alpha` (5 slots) for `slotgate gateway`, the key's signing secret in
/// a `--webhook-secrets` file and an empty store folder.
struct SecretFileGateway {
    cfg: ConfigDir,
    secrets: std::path::PathBuf,
    data: tempfile::TempDir,
}

impl SecretFileGateway {
    fn new() -> Self {
        let manifests = format!(
            "{}{}{WORK_TYPE}",
            task_plan("startup", 5, "{}"),
            hook_key("alpha", "startup", None)
        );
        let mut cfg = ConfigDir::new(&manifests);
        cfg.write(&manifests);
        let secrets = cfg.dir.path().join("secrets.yaml");
        std::fs::write(&secrets, format!("default/alpha: {SECRET_A}\n")).unwrap();
        let data = tempfile::tempdir().unwrap();
        Self { cfg, secrets, data }
    }

    /// The store and secrets flags, then `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let base = [
            "--data-dir",
            self.data.path().to_str().unwrap(),
            "--webhook-secrets",
            self.secrets.to_str().unwrap(),
        ];
        base.iter().chain(extra).map(|a| a.to_string()).collect()
    }

    /// The gateway in front of `upstream`, with `extra` flags.
    fn start(&self, upstream: &Upstream, extra: &[&str]) -> Proc {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::gateway(&self.cfg.config, &upstream.url(), &args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_webhook_urls_are_refused_without_the_flag() {
    let upstream = Upstream::start().await;
    let setup = SecretFileGateway::new();
    let gw = setup.start(&upstream, &[]);
    let client = body_client();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.7/hook",
        "https://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://localhost/hook",
        "http://192.168.1.1/hook",
    ] {
        let body = json!({"taskType": "WORK", "webhook": {"url": url}}).to_string();
        let r = send(&client, Method::POST, &gw.url("/v1/tasks"), "tok-alpha", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {}", r.body);
        assert_eq!(r.code(), "invalid_webhook_url", "{url}: {}", r.body);
        assert!(r.body.contains("allow-private-webhooks"), "{url}: {}", r.body);
    }
    let r = get(&gw.url("/v1/tasks"), &[("x-api-key", "tok-alpha")]).await;
    assert_eq!(r.json()["tasks"], json!([]), "nothing stored");
}

/// `--webhook-allow-cidrs` opens the listed private range (an in-cluster receiver's) and no other
/// private address; a range that does not parse stops the gateway, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_private_range_gets_webhooks_and_every_other_private_address_is_still_refused() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start("127.0.0.2").await;
    let setup = SecretFileGateway::new();
    let gw = setup.start(
        &upstream,
        &["--webhook-allow-cidrs", "127.0.0.2/32, 10.96.0.0/12"],
    );
    let client = body_client();
    let hook = receiver.url("/in-cluster");
    let r = send(
        &client,
        Method::POST,
        &gw.url("/v1/tasks"),
        "tok-alpha",
        &task_body(json!({}), Some(&hook)),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    wait_for("the webhook to the allowed range", 30, || async {
        receiver.count() >= 1
    })
    .await;
    assert_eq!(verify_with_reference(SECRET_A, &receiver.hooks()), 1);
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.112.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://localhost/hook",
    ] {
        let body = json!({"taskType": "WORK", "webhook": {"url": url}}).to_string();
        let r = send(&client, Method::POST, &gw.url("/v1/tasks"), "tok-alpha", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}: {}", r.body);
        assert_eq!(r.code(), "invalid_webhook_url", "{url}: {}", r.body);
        assert!(r.body.contains("--webhook-allow-cidrs"), "{url}: {}", r.body);
    }
    drop(gw);

    let out = std::process::Command::new(SLOTGATE)
        .args([
            "gateway",
            "--config",
            setup.cfg.config.to_str().unwrap(),
            "--upstream",
            &upstream.url(),
        ])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(setup.args(&["--webhook-allow-cidrs", "10.0.0.0/33"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--webhook-allow-cidrs") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_retry_4xx_fails_and_webhooks_retry_until_delivered_or_gone() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start("127.0.0.1").await;
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}",
        task_plan("startup", 5, "{maxAttempts: 2}"),
        hook_key("alpha", "startup", Some(SECRET_A))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let client = body_client();
    let submit = |payload: Value, hook: &str| {
        let (client, url, body) = (
            client.clone(),
            gw.url("/v1/tasks"),
            task_body(payload, Some(&receiver.url(hook))),
        );
        async move {
            let r = send(&client, Method::POST, &url, "tok-alpha", &body).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            r.json()["task"]["id"].as_str().unwrap().to_string()
        }
    };
    let retried = submit(json!({"fail": [503]}), "/ok").await;
    let throttled = submit(json!({"fail": [429, 429]}), "/ok").await;
    let exhausted = submit(json!({"fail": [500, 502]}), "/ok").await;
    let rejected = submit(json!({"fail": [422]}), "/gone").await;
    let flaky = submit(json!({}), "/flaky").await;
    let done = |id: String| {
        let gw = &gw;
        async move {
            let t = task(gw, "tok-alpha", &id).await;
            matches!(t["task"]["status"].as_str(), Some("completed" | "failed"))
        }
    };
    for id in [&retried, &throttled, &exhausted, &rejected, &flaky] {
        wait_for("the task finished", 30, || done(id.clone())).await;
    }
    let t = task(&gw, "tok-alpha", &retried).await;
    assert_eq!(t["task"]["status"], "completed", "{t}");
    assert_eq!(t["task"]["attempts"], 2);
    let t = task(&gw, "tok-alpha", &throttled).await;
    assert_eq!(
        t["task"]["status"], "completed",
        "429s do not use up maxAttempts: {t}"
    );
    let t = task(&gw, "tok-alpha", &exhausted).await;
    assert_eq!(t["task"]["status"], "failed", "{t}");
    assert_eq!(t["task"]["attempts"], 2);
    assert_eq!(t["task"]["error"]["code"], "upstream_error");
    let t = task(&gw, "tok-alpha", &rejected).await;
    assert_eq!(t["task"]["status"], "failed", "{t}");
    assert_eq!(t["task"]["attempts"], 1);
    assert_eq!(t["task"]["error"]["code"], "upstream_rejected");
    assert_eq!(
        t["response"]["error"], "as the test asked",
        "the upstream's answer is kept"
    );
    let runs = upstream.runs();
    assert_eq!(runs[&retried], 2);
    assert_eq!(runs[&throttled], 3);
    assert_eq!(runs[&exhausted], 2);
    assert_eq!(runs[&rejected], 1);

    // 410 stops at once; a 500 is retried on the schedule (first retry after about 5 s).
    wait_for("the rejected task's webhook given up", 30, || async {
        task(&gw, "tok-alpha", &rejected).await["task"]["webhook"]["status"] == "failed"
    })
    .await;
    let t = task(&gw, "tok-alpha", &rejected).await;
    assert_eq!(t["task"]["webhook"]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(t["task"]["webhook"]["attempts"][0]["status"], 410);
    wait_for("the flaky receiver's second attempt", 30, || async {
        task(&gw, "tok-alpha", &flaky).await["task"]["webhook"]["status"] == "delivered"
    })
    .await;
    let t = task(&gw, "tok-alpha", &flaky).await;
    let attempts = t["task"]["webhook"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{t}");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[1]["status"], 200);
    let flaky_hooks: Vec<Hook> = receiver
        .hooks()
        .into_iter()
        .filter(|h| h.path == "/flaky")
        .collect();
    assert_eq!(flaky_hooks.len(), 2);
    assert_eq!(
        flaky_hooks[0].id, flaky_hooks[1].id,
        "webhook-id is stable across retries"
    );
    assert_eq!(flaky_hooks[0].body, flaky_hooks[1].body);
    let failed: Value = serde_json::from_str(
        &receiver
            .hooks()
            .into_iter()
            .find(|h| h.path == "/gone")
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(
        failed["task"]["status"], "failed",
        "final failures are delivered too"
    );
    assert_eq!(
        verify_with_reference(SECRET_A, &receiver.hooks()),
        receiver.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slotgate_load_tasks_submits_receives_and_verifies_every_webhook() {
    let upstream = Upstream::start().await;
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}",
        task_plan("startup", 10, "{}"),
        hook_key("alpha", "startup", Some(SECRET_A))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let load = |secret: &str, wait: &str| {
        let (url, secret, wait) = (gw.url(""), secret.to_string(), wait.to_string());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(SLOTGATE)
                .args(["load", &url, "--key", "tok-alpha", "--tasks", "200", "-c", "8"])
                .args(["--task-type", "WORK", "--payload", r#"{"delay_ms": 5}"#])
                .args(["--webhook-secret", &secret, "--wait", &wait, "--json"])
                .output()
                .unwrap()
        })
    };
    let out = load(SECRET_A, "60s").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["accepted"], 200, "{s}");
    assert_eq!(s["delivered"], 200, "{s}");
    assert_eq!(s["lost"], 0);
    assert_eq!(s["duplicates"], 0);
    assert_eq!(s["bad_signatures"], 0);
    assert_eq!(s["by_status"]["completed"], 200);
    assert!(
        s["webhook_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(upstream.peak() <= 10, "peak {}", upstream.peak());

    // With the wrong secret every webhook is refused as unsigned, and the run fails.
    let out = load(SECRET_B, "2s").await.unwrap();
    assert!(!out.status.success());
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["accepted"], 200, "{s}");
    assert_eq!(s["delivered"], 0, "{s}");
    assert!(s["bad_signatures"].as_u64().unwrap() >= 200, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_receiver_does_not_hold_up_another_keys_deliveries() {
    let upstream = Upstream::start().await;
    let good = Receiver::start("127.0.0.1").await;
    // Accepts connections and never answers: each delivery to it waits out its 10 s timeout.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((s, _)) = dead.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    let (dir, data) = folder(&format!(
        "{}{}{}{WORK_TYPE}",
        task_plan("startup", 25, "{}"),
        hook_key("alpha", "startup", Some(SECRET_A)),
        hook_key("bravo", "startup", Some(SECRET_B))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    // More hung deliveries than the gateway runs at once across keys.
    let a = submit_all(&gw, "tok-alpha", 600, 16, |_| {
        task_body(json!({}), Some(&dead_url))
    })
    .await;
    wait_for("A's tasks completed", 60, || async {
        list_all(&gw, "tok-alpha", "completed").await.len() == a.len()
    })
    .await;
    wait_until("A's receiver holding connections", || {
        !held.lock().unwrap().is_empty()
    })
    .await;
    let b = submit_all(&gw, "tok-bravo", 1, 1, |_| {
        task_body(json!({"prompt": "b"}), Some(&good.url("/ok")))
    })
    .await;
    wait_for("B's webhook", 30, || async { good.count() == 1 }).await;
    // Not one of A's deliveries has timed out yet: B did not wait behind them.
    let attempts: usize = list_all(&gw, "tok-alpha", "completed")
        .await
        .iter()
        .map(|t| t["webhook"]["attempts"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(attempts, 0, "B's webhook waited for A's to time out");
    wait_for("B's delivery recorded", 30, || async {
        task(&gw, "tok-bravo", &b[0]).await["task"]["webhook"]["status"] == "delivered"
    })
    .await;
    assert!(
        held.lock().unwrap().len() <= 32,
        "one key holds at most 32 deliveries: {} connections",
        held.lock().unwrap().len()
    );
    assert_eq!(verify_with_reference(SECRET_B, &good.hooks()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_are_delivered_to_receivers_the_gateway_trusts() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(pki.path());
    let receiver = Receiver::start_tls(&cert, &key).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    manifests(
        dir.path(),
        &format!(
            "{}{}{WORK_TYPE}",
            task_plan("startup", 5, "{}"),
            hook_key("alpha", "startup", Some(SECRET_A))
        ),
    );
    let client = body_client();
    let submit = |gw: &Proc| {
        let (url, body) = (
            gw.url("/v1/tasks"),
            task_body(json!({"prompt": "tls"}), Some(&receiver.tls_url("/ok"))),
        );
        let client = client.clone();
        async move {
            let r = send(&client, Method::POST, &url, "tok-alpha", &body).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            r.json()["task"]["id"].as_str().unwrap().to_string()
        }
    };

    // Signed by a CA the gateway was given: delivered, over TLS, signature intact.
    let data = tempfile::tempdir().unwrap();
    let gw = up(
        dir.path(),
        &upstream.url(),
        data.path(),
        &["--webhook-ca", ca.to_str().unwrap()],
    );
    let id = submit(&gw).await;
    // The receiver counts a call before the gateway has read its answer, so wait for the
    // delivery the gateway recorded.
    wait_for("the https webhook delivered", 30, || async {
        task(&gw, "tok-alpha", &id).await["task"]["webhook"]["status"] == "delivered"
    })
    .await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(verify_with_reference(SECRET_A, &receiver.hooks()), 1);
    drop(gw);

    // Without that CA the receiver is not trusted: the attempt fails naming the certificate,
    // and nothing reaches it.
    let data = tempfile::tempdir().unwrap();
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let id = submit(&gw).await;
    wait_for("the refused attempt recorded", 30, || async {
        task(&gw, "tok-alpha", &id).await["task"]["webhook"]["attempts"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    let t = task(&gw, "tok-alpha", &id).await;
    let error = t["task"]["webhook"]["attempts"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(error.contains("certificate"), "{t}");
    assert_eq!(t["task"]["webhook"]["status"], "pending", "retried later: {t}");
    assert_eq!(receiver.count(), 1);

    // A bundle that is not PEM stops the gateway at start, naming the flag.
    let bad = pki.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(SLOTGATE)
        .args([
            "up",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--webhook-ca",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--webhook-ca") && stderr.contains("bad.pem"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_count_against_the_rate_limit_and_tasks_wait_for_tokens() {
    let upstream = Upstream::start().await;
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}",
        plan_yaml(
            "metered",
            "  concurrency:\n    maxConcurrentRequests: 5\n  rateLimit:\n    requestsPerSecond: 4\n    burst: 4\n    per: Endpoint\n    paths: [\"/v1/*\"]\n  tasks: {}"
        ),
        hook_key("alpha", "metered", Some(SECRET_A))
    ));
    let gw = up(dir.path(), &upstream.url(), data.path(), &[]);
    let client = body_client();
    // The work endpoint's bucket is emptied by synchronous calls before any task can run.
    let mut drained = 0;
    for _ in 0..8 {
        let r = send(&client, Method::GET, &gw.url("/v1/work"), "tok-alpha", "").await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.code(), "rate_limit");
            drained += 1;
        }
    }
    assert!(drained > 0, "the work bucket is empty");
    // Submissions have their own endpoint's bucket: four pass, the fifth is refused like any
    // request over the limit, and stores nothing.
    let mut ids = Vec::new();
    let mut refused = None;
    for _ in 0..5 {
        let r = send(
            &client,
            Method::POST,
            &gw.url("/v1/tasks"),
            "tok-alpha",
            r#"{"taskType":"WORK"}"#,
        )
        .await;
        match r.status {
            StatusCode::ACCEPTED => ids.push(r.json()["task"]["id"].as_str().unwrap().to_string()),
            _ => refused = Some(r),
        }
    }
    let refused = refused.expect("the fifth submission is over the limit");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.body);
    assert_eq!(refused.code(), "rate_limit");
    assert!(refused.num("retry-after") >= 1);
    assert_eq!(ids.len(), 4);
    // The tasks wait for tokens of the work endpoint instead of failing: each runs once.
    // (Polling the task endpoints is metered too, so the test watches the admin metrics.)
    gw.wait_metric("slotgate_tasks_finished_total{status=\"completed\"}", |v| {
        v == 4.0
    })
    .await;
    assert_eq!(
        gw.metric("slotgate_tasks_finished_total{status=\"failed\"}")
            .await,
        0.0
    );
    let runs = upstream.runs();
    assert_eq!(runs.len(), 4);
    assert!(ids.iter().all(|id| runs.get(id) == Some(&1)), "{runs:?}");
}

/// The signing secrets as the controller publishes them and a gateway pod mounts them: a folder
/// of one file per key, `<namespace>.<name>`, re-read while the gateway runs; a rotated secret
/// signs beside the old one for `--webhook-rotation-overlap`, then alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_folder_of_signing_secrets_signs_webhooks_and_a_rotation_overlaps_then_ends() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start("127.0.0.1").await;
    let manifests = format!(
        "{}{}{WORK_TYPE}",
        task_plan("startup", 5, "{}"),
        hook_key("alpha", "startup", None)
    );
    let mut cfg = ConfigDir::new(&manifests);
    cfg.write(&manifests);
    let mount = tempfile::tempdir().unwrap();
    std::fs::write(mount.path().join("default.alpha"), format!("{SECRET_A}\n")).unwrap();
    // What the kubelet's atomic writer leaves beside the entries.
    std::fs::create_dir(mount.path().join("..data")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let gw = Proc::gateway(
        &cfg.config,
        &upstream.url(),
        &[
            "--data-dir",
            data.path().to_str().unwrap(),
            "--webhook-secrets",
            mount.path().to_str().unwrap(),
            "--allow-private-webhooks",
            "--webhook-rotation-overlap",
            "2s",
        ],
    );
    let client = body_client();
    let submit = || {
        let (client, url, body) = (
            client.clone(),
            gw.url("/v1/tasks"),
            task_body(json!({}), Some(&receiver.url("/ok"))),
        );
        async move {
            let r = send(&client, Method::POST, &url, "tok-alpha", &body).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        }
    };
    submit().await;
    wait_for("the first webhook", 30, || async { receiver.count() >= 1 }).await;
    assert_eq!(verify_with_reference(SECRET_A, &receiver.hooks()), 1);

    // Rotated in the Secret: once the gateway has re-read the folder, webhooks carry the new
    // secret's signature and, for the overlap, the old one's too: a receiver verifies with
    // either (the reference library takes any of the signatures in the header).
    std::fs::write(mount.path().join("default.alpha"), format!("{SECRET_B}\n")).unwrap();
    wait_for("the folder re-read", 30, || async {
        gw.stderr().matches("webhook signing secrets read").count() >= 2
    })
    .await;
    submit().await;
    wait_for("the second webhook", 30, || async { receiver.count() >= 2 }).await;
    let second = &receiver.hooks()[1..2];
    assert_eq!(
        second[0].signature.matches("v1,").count(),
        2,
        "{}",
        second[0].signature
    );
    assert_eq!(verify_with_reference(SECRET_B, second), 1);
    assert_eq!(verify_with_reference(SECRET_A, second), 1);
    // After the overlap, only the new one.
    wait_for("a webhook signed by the new secret alone", 30, || async {
        let before = receiver.count();
        submit().await;
        wait_for("the next webhook", 30, || async { receiver.count() > before }).await;
        receiver.hooks().last().unwrap().signature.matches("v1,").count() == 1
    })
    .await;
    let last = receiver.hooks().last().cloned().unwrap();
    assert_eq!(verify_with_reference(SECRET_B, &[last]), 1);
    assert!(!gw.stderr().contains(SECRET_B.trim_start_matches("whsec_")));
}

/// Task type `GEN` on `/v1/gen/run`, and an ApiUpstream at `url` serving `/v1/gen/*` with
/// `spec` (more of its spec, indented by two).
fn gen_on_target(url: &str, spec: &str) -> String {
    format!(
        "apiVersion: slotgate.dev/v1alpha1\nkind: ApiTaskType\nmetadata:\n  name: gen\nspec:\n  taskType: GEN\n  request:\n    path: /v1/gen/run\n---\n\
apiVersion: slotgate.dev/v1alpha1\nkind: ApiUpstream\nmetadata:\n  name: provider\nspec:\n  url: {url}\n  paths: [\"/v1/gen/*\"]\n{spec}---\n"
    )
}

/// A `GEN` task its upstream answers after 150 ms.
const GEN_TASK: &str = r#"{"taskType": "GEN", "payload": {"delay_ms": 150}}"#;

/// A task type whose path an `ApiUpstream` serves goes there, as a synchronous request on that
/// path would: over HTTPS (a test CA), with the target's base path, `Host` and provider key in
/// place of the customer's, within the target's slots; other task types stay on the default
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_a_targets_path_go_to_the_target_with_its_key_and_within_its_slots() {
    let (default, provider) = (Upstream::start().await, Upstream::start().await);
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(pki.path());
    let front = tls_front(provider.addr, &cert, &key).await;
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let ca_map = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: provider-ca\n  namespace: default\ndata:\n  ca.crt: |\n{}---\n",
        ca_pem.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    let provider_key = "sk-provider-for-tasks-42";
    let (dir, data) = folder(&format!(
        "{}{}{WORK_TYPE}{ca_map}{}\
apiVersion: v1\nkind: Secret\nmetadata:\n  name: provider\n  namespace: default\nstringData:\n  api-key: {provider_key}\n---\n",
        task_plan("startup", 8, "{}"),
        hook_key("alpha", "startup", None),
        gen_on_target(
            &format!("https://127.0.0.1:{}/base", front.port()),
            "  credentialRef: {namespace: default, name: provider, key: api-key}
  tls:
    caBundleRef: {namespace: default, name: provider-ca, key: ca.crt}
  concurrency: {maxConcurrentRequests: 2}
"
        ),
    ));
    let gw = up(dir.path(), &default.url(), data.path(), &[]);
    let gen_ids = submit_round_robin(&[&gw], "tok-alpha", 8, 8, GEN_TASK).await;
    let work_ids = submit_all(&gw, "tok-alpha", 2, 1, |_| task_body(json!({}), None)).await;
    wait_for("every task completed", 30, || async {
        list_all(&gw, "tok-alpha", "completed").await.len() == 10
    })
    .await;

    for id in &gen_ids {
        let t = task(&gw, "tok-alpha", id).await;
        let answer = &t["response"];
        assert_eq!(answer["path"], "/base/v1/gen/run", "{t}");
        assert_eq!(answer["authorization"], format!("Bearer {provider_key}"), "{t}");
        assert_eq!(answer["host"], format!("127.0.0.1:{}", front.port()), "{t}");
        assert_eq!(answer["key"], "default/alpha", "{t}");
    }
    for id in &work_ids {
        let t = task(&gw, "tok-alpha", id).await;
        let answer = &t["response"];
        assert_eq!(answer["path"], "/v1/work", "{t}");
        assert_eq!(answer["authorization"], Value::Null, "{t}");
    }
    // Each ran once, at the upstream its path routes to.
    let (at_provider, at_default) = (provider.runs(), default.runs());
    assert_eq!(at_provider.len(), 8, "{at_provider:?}");
    assert!(
        gen_ids.iter().all(|id| at_provider.get(id) == Some(&1)),
        "{at_provider:?}"
    );
    assert_eq!(at_default.len(), 2, "{at_default:?}");
    assert!(
        work_ids.iter().all(|id| at_default.get(id) == Some(&1)),
        "{at_default:?}"
    );
    // 8 key slots, but the target takes 2 at once.
    assert!(
        provider.peak() <= 2,
        "the target had {} tasks in flight",
        provider.peak()
    );
    assert_eq!(provider.peak(), 2, "the target's slots were used");
    assert!(!gw.stdout().contains(provider_key) && !gw.stderr().contains(provider_key));
}

/// A Redis, a counting upstream and a folder with plan `startup` (`slots`, task policy `tasks`),
/// key `alpha` (signing secret A) and task type `WORK`: what every fleet test starts from.
async fn fleet_setup(slots: u32, tasks: &str) -> (Redis, Upstream, tempfile::TempDir) {
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    manifests(
        dir.path(),
        &format!(
            "{}{}{WORK_TYPE}",
            task_plan("startup", slots, tasks),
            hook_key("alpha", "startup", Some(SECRET_A))
        ),
    );
    (redis, upstream, dir)
}

/// `slotgate up` in front of `upstream` with its tasks in the Redis at `state`, shared with the
/// other gateways there; claims lapse after 2 s without a heartbeat.
fn fleet_member(dir: &Path, upstream: &str, state: &str) -> Proc {
    fleet_member_with(dir, upstream, state, "2s")
}

fn fleet_member_with(dir: &Path, upstream: &str, state: &str, claim_timeout: &str) -> Proc {
    Proc::up(
        dir,
        &[
            "--upstream",
            upstream,
            "--state",
            state,
            "--state-lease-ttl",
            "1s",
            "--task-store",
            "redis",
            "--task-claim-timeout",
            claim_timeout,
        ],
    )
}

/// Submits `n` tasks, task `i` to gateway `i % gws.len()`, from `parallel` connections; returns
/// the ids in task order.
async fn submit_round_robin(gws: &[&Proc], key: &str, n: usize, parallel: usize, body: &str) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let urls: Arc<Vec<String>> = Arc::new(gws.iter().map(|g| g.url("/v1/tasks")).collect());
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (next, urls, key, body) = (
            Arc::clone(&next),
            Arc::clone(&urls),
            key.to_string(),
            body.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let client = body_client();
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return ids;
                }
                let r = send(&client, Method::POST, &urls[i % urls.len()], &key, &body).await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
                ids.push((i, r.json()["task"]["id"].as_str().unwrap().to_string()));
            }
        }));
    }
    let mut ids = Vec::new();
    for w in workers {
        ids.extend(w.await.unwrap());
    }
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_run_2000_tasks_within_25_slots_through_a_kill_9() {
    let (redis, upstream, dir) = fleet_setup(25, "{maxQueued: 5000}").await;
    let state = redis.url();
    let receiver = Receiver::start("127.0.0.1").await;
    let mut gws: Vec<Proc> = (0..3)
        .map(|_| fleet_member(dir.path(), &upstream.url(), &state))
        .collect();
    for gw in &gws {
        gw.wait_output("store shared in redis://", false).await;
    }
    // Held upstream until every submission is in, so that the kill comes mid-run on any host;
    // after the release each task takes 20 ms.
    let hook = receiver.url("/ok");
    let body = task_body(json!({"delay_ms": 20, "hold": true}), Some(&hook));
    let ids = submit_round_robin(&gws.iter().collect::<Vec<_>>(), "tok-alpha", 2000, 12, &body).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 2000);
    wait_until("25 tasks held upstream", || upstream.in_flight() == 25).await;
    upstream.release();
    wait_until("a quarter of the run", || upstream.runs().len() >= 500).await;
    let victim = &mut gws[1];
    victim.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    victim.child.wait().unwrap();
    let seen_at_kill: HashSet<String> = upstream.runs().into_keys().collect();
    assert!(seen_at_kill.len() < 2000, "the kill came mid-run");

    let (a, c) = (&gws[0], &gws[2]);
    wait_for("every task completed on the two replicas left", 180, || async {
        list_all(a, "tok-alpha", "completed").await.len() == 2000
    })
    .await;
    assert_eq!(
        list_all(c, "tok-alpha", "completed").await.len(),
        2000,
        "one store for the fleet"
    );
    assert!(
        upstream.peak() <= 25,
        "upstream peak {} > the key's 25 slots",
        upstream.peak()
    );
    let runs = upstream.runs();
    for id in &ids {
        assert!(runs.contains_key(id), "task {id} never ran");
    }
    // A task runs again only if it had reached the upstream before the kill (it was running on
    // the killed replica, whose result never got stored): at most that replica's share of 25.
    let twice = reruns_only_of_started(&runs, &seen_at_kill);
    assert!(twice.len() <= 25, "{} tasks ran twice", twice.len());
    wait_for_webhooks(&receiver, 2000).await;
    let hooks = receiver.hooks();
    assert_eq!(verify_with_reference(SECRET_A, &hooks), hooks.len());
    for h in &hooks {
        let body: Value = serde_json::from_str(&h.body).unwrap();
        assert_eq!(body["task"]["status"], "completed");
        assert_eq!(h.id, format!("msg_{}", body["task"]["id"].as_str().unwrap()));
    }
    // The two replicas left both ran tasks: the work is the fleet's, not one replica's.
    for gw in [a, c] {
        let m = gw.metrics().await;
        let finished = metric_value(&m, "slotgate_tasks_finished_total{status=\"completed\"}");
        assert!(finished > 0.0, "a replica ran no task: {m}");
    }
    eprintln!(
        "3 replicas, kill -9 of one after {} started: {} ran twice, {} webhooks for 2000 tasks",
        seen_at_kill.len(),
        twice.len(),
        hooks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_to_one_replica_is_read_listed_and_canceled_through_another() {
    let (redis, upstream, dir) = fleet_setup(2, "{maxQueued: 5}").await;
    let state = redis.url();
    let a = fleet_member(dir.path(), &upstream.url(), &state);
    let b = fleet_member(dir.path(), &upstream.url(), &state);
    for gw in [&a, &b] {
        gw.wait_output("store shared in redis://", false).await;
    }
    let body = task_body(json!({"hold": true}), None);
    let ids = submit_round_robin(&[&a], "tok-alpha", 5, 1, &body).await;
    // The queue's cap is the fleet's: the sixth, sent to the other replica, is refused.
    let client = body_client();
    let r = send(&client, Method::POST, &b.url("/v1/tasks"), "tok-alpha", &body).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "task_queue_full");
    assert!(r.header("retry-after").is_some());

    wait_until("2 tasks held upstream", || upstream.in_flight() == 2).await;
    let running = list_all(&b, "tok-alpha", "running").await;
    assert_eq!(running.len(), 2, "{running:?}");
    let queued = list_all(&b, "tok-alpha", "queued").await;
    assert_eq!(queued.len(), 3);
    let last = ids.last().unwrap();
    assert_eq!(task(&b, "tok-alpha", last).await["task"]["status"], "queued");
    // Another key sees none of them.
    let r = get(
        &b.url(&format!("/v1/tasks/{last}")),
        &[("x-api-key", "tok-nobody")],
    )
    .await;
    assert_ne!(r.status, StatusCode::OK);

    let url = |gw: &Proc, id: &str| gw.url(&format!("/v1/tasks/{id}"));
    let r = send(&client, Method::DELETE, &url(&b, last), "tok-alpha", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["task"]["status"], "canceled");
    let busy = running[0]["id"].as_str().unwrap();
    let r = send(&client, Method::DELETE, &url(&a, busy), "tok-alpha", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "task_not_cancelable");

    upstream.release();
    wait_for("the other four completed", 30, || async {
        list_all(&a, "tok-alpha", "completed").await.len() == 4
    })
    .await;
    assert_eq!(task(&a, "tok-alpha", last).await["task"]["status"], "canceled");
    assert!(!upstream.runs().contains_key(last), "a canceled task never runs");
    assert!(upstream.peak() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_shutting_down_gives_the_tasks_it_had_not_started_back_at_once() {
    let (redis, upstream, dir) = fleet_setup(2, "{}").await;
    let state = redis.url();
    // Claims lapse only after a minute: whatever the second replica runs within the test came
    // back from the first at its shutdown, not by a takeover.
    let mut a = fleet_member_with(dir.path(), &upstream.url(), &state, "60s");
    a.wait_output("store shared in redis://", false).await;
    let body = task_body(json!({"hold": true}), None);
    let ids = submit_round_robin(&[&a], "tok-alpha", 4, 1, &body).await;
    // A request counts in flight as it arrives and in `runs` once its body is read: wait for both.
    wait_until("2 tasks held upstream", || {
        upstream.in_flight() == 2 && upstream.runs().len() == 2
    })
    .await;
    let running: HashSet<String> = upstream.runs().into_keys().collect();
    let b = fleet_member_with(dir.path(), &upstream.url(), &state, "60s");
    b.wait_output("store shared in redis://", false).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    a.child.wait().unwrap();
    upstream.release();
    let waiting: Vec<&String> = ids.iter().filter(|id| !running.contains(*id)).collect();
    assert_eq!(waiting.len(), 2);
    wait_for(
        "the two tasks that had not started completed on the other replica",
        20,
        || async {
            let done = list_all(&b, "tok-alpha", "completed").await;
            waiting
                .iter()
                .all(|id| done.iter().any(|t| t["id"] == id.as_str()))
        },
    )
    .await;
    // The two that were running on the stopped replica wait for the claim timeout.
    for id in &running {
        assert_eq!(task(&b, "tok-alpha", id).await["task"]["status"], "running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_key_with_a_backlog_does_not_delay_another_keys_first_task() {
    let redis = Redis::start();
    let state = redis.url();
    let upstream = Upstream::start().await;
    let (dir, _data) = folder(&format!(
        "{}{}{}{WORK_TYPE}",
        task_plan("startup", 25, "{maxQueued: 20000}"),
        hook_key("alpha", "startup", Some(SECRET_A)),
        hook_key("bravo", "startup", Some(SECRET_B))
    ));
    let a = fleet_member(dir.path(), &upstream.url(), &state);
    let b = fleet_member(dir.path(), &upstream.url(), &state);
    for gw in [&a, &b] {
        gw.wait_output("store shared in redis://", false).await;
    }
    // Key A's tasks are held upstream: its 25 slots, across both replicas, stay taken.
    let body = task_body(json!({"hold": true}), None);
    let backlog = submit_round_robin(&[&a, &b], "tok-alpha", 2000, 8, &body).await;
    assert_eq!(backlog.len(), 2000);
    wait_until("A's 25 slots taken", || upstream.in_flight() == 25).await;
    let first = submit_round_robin(&[&a], "tok-bravo", 1, 1, &task_body(json!({"prompt": "b"}), None)).await;
    wait_for("B's task completed", 30, || async {
        task(&b, "tok-bravo", &first[0]).await["task"]["status"] == "completed"
    })
    .await;
    assert_eq!(upstream.peak(), 26, "A's 25 and B's one");
    assert_eq!(list_all(&a, "tok-alpha", "queued").await.len(), 2000 - 25);
    upstream.release();
}

/// A claimed task whose key has every slot taken (by long tasks) asks the shared limiter again
/// with a growing wait, not every 10 ms, and still starts once a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_key_kept_full_backs_off_its_admissions_and_starts_once_a_slot_frees() {
    let (redis, upstream, dir) = fleet_setup(2, "{}").await;
    let state = redis.url();
    let a = fleet_member(dir.path(), &upstream.url(), &state);
    let b = fleet_member(dir.path(), &upstream.url(), &state);
    for gw in [&a, &b] {
        gw.wait_output("store shared in redis://", false).await;
    }
    let held = submit_round_robin(
        &[&a, &b],
        "tok-alpha",
        2,
        1,
        &task_body(json!({"hold": true}), None),
    )
    .await;
    wait_until("both slots taken", || upstream.in_flight() == 2).await;
    let waiting = submit_round_robin(&[&a, &b], "tok-alpha", 2, 1, &task_body(json!({}), None)).await;
    // Within a refresh (250 ms) each replica holds a claimed task that finds the key full.
    tokio::time::sleep(Duration::from_millis(750)).await;
    let before = redis.script_calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = redis.script_calls() - before;
    eprintln!("script calls in 2 s with the key full: {calls}");
    // Polling every 10 ms would be about 200 admissions a replica in 2 s; the backoff is 80 ms at
    // most, about 25 a replica, beside the leases' renewals and the claims' heartbeats.
    assert!(
        calls < 150,
        "{calls} script calls in 2 s while the key stayed full"
    );
    assert_eq!(upstream.in_flight(), 2, "nothing beyond the key's 2 slots");
    upstream.release();
    wait_for("every task completed", 30, || async {
        list_all(&a, "tok-alpha", "completed").await.len() == 4
    })
    .await;
    let runs = upstream.runs();
    assert!(
        held.iter().chain(&waiting).all(|id| runs.get(id) == Some(&1)),
        "{runs:?}"
    );
    assert!(upstream.peak() <= 2, "peak {}", upstream.peak());
}

/// In a fleet a target's slots are one pool: tasks of one key taken by two replicas never have
/// more in flight at the target than its limit, though the key has more slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_tasks_on_a_target_share_its_slots_across_replicas() {
    let (redis, upstream, dir) = fleet_setup(8, "{}").await;
    let provider = Upstream::start().await;
    manifests(
        dir.path(),
        &format!(
            "{}{}{WORK_TYPE}{}",
            task_plan("startup", 8, "{}"),
            hook_key("alpha", "startup", Some(SECRET_A)),
            gen_on_target(&provider.url(), "  concurrency: {maxConcurrentRequests: 3}\n")
        ),
    );
    let state = redis.url();
    let a = fleet_member(dir.path(), &upstream.url(), &state);
    let b = fleet_member(dir.path(), &upstream.url(), &state);
    for gw in [&a, &b] {
        gw.wait_output("store shared in redis://", false).await;
    }
    let ids = submit_round_robin(&[&a, &b], "tok-alpha", 12, 4, GEN_TASK).await;
    wait_for("every task completed", 60, || async {
        list_all(&a, "tok-alpha", "completed").await.len() == 12
    })
    .await;
    let runs = provider.runs();
    assert!(ids.iter().all(|id| runs.get(id) == Some(&1)), "{runs:?}");
    assert!(upstream.runs().is_empty(), "no task went to the default upstream");
    assert!(
        provider.peak() <= 3,
        "the target had {} tasks in flight",
        provider.peak()
    );
}

#[test]
fn the_redis_task_store_without_redis_state_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), WORK_TYPE).unwrap();
    for extra in [
        &["--task-store", "redis"][..],
        &["--task-store", "redis", "--state", "memory"],
    ] {
        let out = std::process::Command::new(SLOTGATE)
            .args(["up", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--upstream",
                "http://127.0.0.1:9",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--task-store redis") && err.contains("--state redis://"),
            "{err}"
        );
    }
    let out = std::process::Command::new(SLOTGATE)
        .args(["up", dir.path().to_str().unwrap(), "--task-store", "disk"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--task-store") && err.contains("embedded") && err.contains("redis"),
        "{err}"
    );
}
