//! `slotgate load --tasks N`: the seeds' "async with webhooks" pattern as a tool. It submits N
//! tasks at once from a few connections, receives their webhooks on a listener of its own,
//! checks each signature, and reports how fast tasks were accepted, how long each took from its
//! 202 to its webhook, and whether any was lost or delivered twice. It is the demo of the task
//! API and its end-to-end benchmark.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io::IsTerminal,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{Latency, LoadError, percentiles, spawn_progress};
use crate::tasks::webhook::Secret;

/// Options of `slotgate load --tasks`.
#[derive(Clone, Debug)]
pub struct TaskLoadOptions {
    /// The gateway's task endpoint, such as `http://127.0.0.1:8080/v1/tasks`.
    pub url: Uri,
    /// API key, sent as `Authorization: Bearer`.
    pub key: Option<String>,
    /// Tasks to submit.
    pub tasks: u64,
    /// Connections submitting at once.
    pub concurrency: usize,
    /// `taskType` of every task.
    pub task_type: String,
    /// `payload` of every task.
    pub payload: Value,
    /// Where the webhook receiver listens.
    pub webhook_listen: SocketAddr,
    /// The key's `whsec_` secret: with it every webhook's signature is checked.
    pub webhook_secret: Option<String>,
    /// Retries of a submission refused with a Retry-After (a full queue, the rate limit).
    pub retries: u32,
    /// Longest wait for the webhooks after the last submission.
    pub wait: Duration,
    /// Progress output on standard error.
    pub progress: bool,
}

/// The end-of-run summary of a task load.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TaskSummary {
    /// Tasks submitted (each counted once, whatever its retries).
    pub submitted: u64,
    /// Answered 202.
    pub accepted: u64,
    /// Refused for good, by error code.
    pub refused: BTreeMap<String, u64>,
    /// Connection failures and answers without an error code.
    pub errors: u64,
    /// Seconds from the first submission to the last answer.
    pub submit_s: f64,
    /// `accepted / submit_s`.
    pub accepted_per_second: f64,
    /// Accepted tasks whose webhook arrived.
    pub delivered: u64,
    /// Accepted tasks whose webhook never arrived within the wait.
    pub lost: u64,
    /// Webhooks that arrived again after a 2xx for the same `webhook-id`.
    pub duplicates: u64,
    /// Webhooks whose signature did not verify with `--webhook-secret`.
    pub bad_signatures: u64,
    /// Delivered tasks by final status (`completed`, `failed`).
    pub by_status: BTreeMap<String, u64>,
    /// From a task's 202 to its webhook's arrival.
    pub completion_ms: Latency,
    /// Wall time in seconds.
    pub duration_s: f64,
    /// The URL the tasks named as their webhook.
    pub webhook_url: String,
}

impl TaskSummary {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = format!(
            "submitted {}  accepted {} in {:.2} s ({:.0} tasks/s)  errors {}\n",
            self.submitted, self.accepted, self.submit_s, self.accepted_per_second, self.errors
        );
        for (code, n) in &self.refused {
            s.push_str(&format!("refused {code}: {n}\n"));
        }
        let statuses: Vec<String> = self.by_status.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!(
            "webhooks: delivered {} ({})  lost {}  duplicates {}  bad signatures {}\n",
            self.delivered,
            statuses.join(", "),
            self.lost,
            self.duplicates,
            self.bad_signatures
        ));
        s.push_str(&format!(
            "202 to webhook: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  (duration {:.2} s)\n",
            self.completion_ms.p50, self.completion_ms.p90, self.completion_ms.p99, self.duration_s
        ));
        s
    }
}

#[derive(Default)]
struct Received {
    /// First arrival of each task's webhook, and its final status.
    first: HashMap<String, (Instant, String)>,
    duplicates: u64,
    bad_signatures: u64,
}

/// Runs a task load: binds the receiver, submits, waits for the webhooks, summarises.
pub async fn run(opts: TaskLoadOptions) -> Result<TaskSummary, LoadError> {
    if opts.url.scheme_str() != Some("http") || opts.url.authority().is_none() {
        return Err(LoadError::Url(opts.url.to_string()));
    }
    if opts.concurrency == 0 {
        return Err(LoadError::Options("--concurrency must be at least 1"));
    }
    let secret = opts
        .webhook_secret
        .as_deref()
        .map(Secret::parse)
        .transpose()
        .map_err(|_| LoadError::Options("--webhook-secret must be whsec_ followed by base64"))?;
    let listener = TcpListener::bind(opts.webhook_listen)
        .await
        .map_err(|e| LoadError::Listen(opts.webhook_listen, e))?;
    let mut local = listener
        .local_addr()
        .map_err(|e| LoadError::Listen(opts.webhook_listen, e))?;
    if local.ip().is_unspecified() {
        local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let webhook_url = format!("http://{local}/hook");
    let received = Arc::new(Mutex::new(Received::default()));
    let receiver = tokio::spawn(receive(listener, Arc::clone(&received), secret.map(Arc::new)));

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(opts.concurrency)
        .build(connector);
    let body = Bytes::from(
        json!({"taskType": opts.task_type, "payload": opts.payload, "webhook": {"url": webhook_url}})
            .to_string(),
    );
    let start = Instant::now();
    let issued = Arc::new(AtomicU64::new(0));
    let accepted_n = Arc::new(AtomicU64::new(0));
    let opts = Arc::new(opts);
    let progress = {
        let (accepted, received, total) = (Arc::clone(&accepted_n), Arc::clone(&received), opts.tasks);
        spawn_progress(opts.progress, move || {
            let a = accepted.load(Ordering::Relaxed);
            let d = received.lock().unwrap_or_else(|e| e.into_inner()).first.len();
            format!("{a}/{total} accepted, {d} webhooks")
        })
    };
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|_| {
            let (client, opts, body) = (client.clone(), Arc::clone(&opts), body.clone());
            let (issued, accepted_n) = (Arc::clone(&issued), Arc::clone(&accepted_n));
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut refused: BTreeMap<String, u64> = BTreeMap::new();
                let mut errors = 0u64;
                while issued.fetch_add(1, Ordering::Relaxed) < opts.tasks {
                    match submit(&client, &opts, &body).await {
                        Ok(id) => {
                            accepted.push((id, Instant::now()));
                            accepted_n.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Some(code)) => *refused.entry(code).or_default() += 1,
                        Err(None) => errors += 1,
                    }
                }
                (accepted, refused, errors)
            })
        })
        .collect();
    let mut accepted: HashMap<String, Instant> = HashMap::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((a, r, e)) = w.await {
            accepted.extend(a);
            for (code, n) in r {
                *refused.entry(code).or_default() += n;
            }
            errors += e;
        }
    }
    let submit_s = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + opts.wait;
    loop {
        let got = {
            let r = received.lock().unwrap_or_else(|e| e.into_inner());
            accepted.keys().filter(|id| r.first.contains_key(*id)).count()
        };
        if got == accepted.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A moment for duplicates of the last deliveries to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    progress.abort();
    receiver.abort();
    if opts.progress && std::io::stderr().is_terminal() {
        eprintln!();
    }
    let r = received.lock().unwrap_or_else(|e| e.into_inner());
    let mut latencies = Vec::with_capacity(accepted.len());
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    for (id, at) in &accepted {
        if let Some((arrived, status)) = r.first.get(id) {
            latencies.push(arrived.saturating_duration_since(*at));
            *by_status.entry(status.clone()).or_default() += 1;
        }
    }
    let delivered = latencies.len() as u64;
    Ok(TaskSummary {
        submitted: opts.tasks,
        accepted: accepted.len() as u64,
        refused,
        errors,
        submit_s,
        accepted_per_second: accepted.len() as f64 / submit_s.max(1e-9),
        delivered,
        lost: accepted.len() as u64 - delivered,
        duplicates: r.duplicates,
        bad_signatures: r.bad_signatures,
        by_status,
        completion_ms: percentiles(&mut latencies),
        duration_s: start.elapsed().as_secs_f64(),
        webhook_url,
    })
}

/// One submission with its retries: the task id, or the final error code (`None`: no code).
async fn submit(
    client: &Client<HttpConnector, Full<Bytes>>,
    opts: &TaskLoadOptions,
    body: &Bytes,
) -> Result<String, Option<String>> {
    let mut attempt = 0;
    loop {
        let mut req = Request::post(opts.url.clone()).header(http::header::CONTENT_TYPE, "application/json");
        if let Some(k) = &opts.key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Full::new(body.clone())).expect("a POST request builds");
        let res = client.request(req).await.map_err(|_| None)?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = Limited::new(res.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|_| None)?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == StatusCode::ACCEPTED {
            return v["task"]["id"].as_str().map(str::to_string).ok_or(None);
        }
        let code = v["error"]["code"].as_str().map(str::to_string);
        match retry_after {
            Some(secs) if attempt < opts.retries => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(secs.clamp(1, 60))).await;
            }
            _ => return Err(code),
        }
    }
}

async fn receive(listener: TcpListener, received: Arc<Mutex<Received>>, secret: Option<Arc<Secret>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (received, secret) = (Arc::clone(&received), secret.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (received, secret) = (Arc::clone(&received), secret.clone());
                async move {
                    let status = one_hook(req, &received, secret.as_deref()).await;
                    let mut res = Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = status;
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn one_hook(
    req: Request<hyper::body::Incoming>,
    received: &Mutex<Received>,
    secret: Option<&Secret>,
) -> StatusCode {
    let arrived = Instant::now();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (msg_id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let Ok(body) = Limited::new(req.into_body(), 16 << 20).collect().await else {
        return StatusCode::BAD_REQUEST;
    };
    let body = body.to_bytes();
    let mut r = received.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(secret) = secret {
        let ok = timestamp
            .parse::<u64>()
            .is_ok_and(|ts| secret.verify(&msg_id, ts, &body, &signature));
        if !ok {
            r.bad_signatures += 1;
            return StatusCode::UNAUTHORIZED;
        }
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(id) = v["task"]["id"].as_str() else {
        return StatusCode::BAD_REQUEST;
    };
    let status = v["task"]["status"].as_str().unwrap_or("unknown").to_string();
    if r.first.contains_key(id) {
        r.duplicates += 1;
    } else {
        r.first.insert(id.to_string(), (arrived, status));
    }
    StatusCode::NO_CONTENT
}
