//! `slotgate load`: the "concurrent workers" pattern API providers document for their customers,
//! as a tool. Workers send requests with a key; refusals are counted by code; `--retries` backs
//! off exponentially with jitter and honours `Retry-After`; `--adaptive` keeps the number of
//! active workers within the slots the limit headers report.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;

pub mod tasks;

/// Options of `slotgate load`.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Target URL.
    pub url: Uri,
    /// API key, sent as `Authorization: Bearer`.
    pub key: Option<String>,
    /// Workers.
    pub concurrency: usize,
    /// Requests to send in all (ignored when `duration` is set).
    pub requests: u64,
    /// Send for this long instead of a fixed count.
    pub duration: Option<Duration>,
    /// Retries of a refused or failed request.
    pub retries: u32,
    /// Keep active workers within the free slots.
    pub adaptive: bool,
    /// Progress output on standard error.
    pub progress: bool,
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL is not absolute http://.
    #[error("{0}: the URL must be absolute, like http://127.0.0.1:8080/v1/monitor/x")]
    Url(String),
    /// Nonsense options.
    #[error("{0}")]
    Options(&'static str),
    /// The webhook receiver could not listen.
    #[error("cannot listen on {0} (--webhook-listen): {1}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
}

/// The median, 90th and 99th percentiles of `samples`, in milliseconds (sorts them).
pub(crate) fn percentiles(samples: &mut [Duration]) -> Latency {
    samples.sort();
    let pct = |p: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    Latency {
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The end-of-run summary. `total = succeeded + sum(refused) + errors`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Requests (each counted once, whatever its retries).
    pub total: u64,
    /// Answered 2xx.
    pub succeeded: u64,
    /// Percent of `total` that succeeded.
    pub succeeded_pct: f64,
    /// Refused (final answer 4xx/5xx with an error code), by code.
    pub refused: BTreeMap<String, u64>,
    /// Connection failures and answers without an error code.
    pub errors: u64,
    /// Retries sent.
    pub retries: u64,
    /// Wall time in seconds.
    pub duration_s: f64,
    /// `total / duration_s`.
    pub requests_per_second: f64,
    /// Latency of each request, retries included.
    pub latency_ms: Latency,
}

impl Summary {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = format!(
            "total {}  succeeded {} ({:.1}%)  errors {}  retries {}\n",
            self.total, self.succeeded, self.succeeded_pct, self.errors, self.retries
        );
        for (code, n) in &self.refused {
            s.push_str(&format!("refused {code}: {n}\n"));
        }
        s.push_str(&format!(
            "duration {:.2} s  {:.1} req/s  latency p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms\n",
            self.duration_s,
            self.requests_per_second,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99
        ));
        s
    }
}

enum Outcome {
    Ok,
    Refused(String),
    Error,
}

struct Shared {
    issued: AtomicU64,
    done: AtomicU64,
    ok: AtomicU64,
    refused: AtomicU64,
    retries: AtomicU64,
    /// Adaptive mode: workers with an index below this may send.
    active: AtomicUsize,
    results: Mutex<(Vec<Duration>, BTreeMap<String, u64>, u64)>,
}

/// A small xorshift generator for backoff jitter: no need for cryptographic randomness here.
struct Jitter(u64);
impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn header_u64(h: &HeaderMap, names: &[&str]) -> Option<u64> {
    names.iter().find_map(|n| {
        h.get(*n)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Runs the load and returns the summary.
pub async fn run(opts: LoadOptions) -> Result<Summary, LoadError> {
    if opts.url.scheme_str() != Some("http") || opts.url.authority().is_none() {
        return Err(LoadError::Url(opts.url.to_string()));
    }
    if opts.concurrency == 0 {
        return Err(LoadError::Options("--concurrency must be at least 1"));
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(opts.concurrency)
        .build(connector);
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        // Adaptive mode starts with one worker and grows to the slots the headers report.
        active: AtomicUsize::new(if opts.adaptive { 1 } else { opts.concurrency }),
        results: Mutex::new((Vec::new(), BTreeMap::new(), 0)),
    });
    let start = Instant::now();
    let deadline = opts.duration.map(|d| start + d);
    let opts = Arc::new(opts);

    let progress = {
        let (shared, opts) = (Arc::clone(&shared), Arc::clone(&opts));
        spawn_progress(opts.progress, move || {
            let (done, ok, refused) = (
                shared.done.load(Ordering::Relaxed),
                shared.ok.load(Ordering::Relaxed),
                shared.refused.load(Ordering::Relaxed),
            );
            match opts.duration {
                Some(d) => {
                    let frac = (start.elapsed().as_secs_f64() / d.as_secs_f64()).min(1.0);
                    format!("{} {done} done, {ok} ok, {refused} refused", bar(frac))
                }
                None => format!(
                    "{} {done}/{} done, {ok} ok, {refused} refused",
                    bar(done as f64 / opts.requests.max(1) as f64),
                    opts.requests
                ),
            }
        })
    };

    // Different clients must not back off in lockstep: seed the jitter from the clock.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
        | 1;
    let workers: Vec<_> = (0..opts.concurrency)
        .map(|index| {
            let (client, shared, opts) = (client.clone(), Arc::clone(&shared), Arc::clone(&opts));
            tokio::spawn(async move {
                let mut jitter = Jitter(seed ^ ((index as u64 + 1) * 0x2545_F491));
                loop {
                    if index >= shared.active.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if deadline.is_some_and(|d| Instant::now() >= d)
                            || (deadline.is_none() && shared.issued.load(Ordering::Relaxed) >= opts.requests)
                        {
                            return;
                        }
                        continue;
                    }
                    match deadline {
                        Some(d) if Instant::now() >= d => return,
                        Some(_) => {
                            shared.issued.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {
                            if shared.issued.fetch_add(1, Ordering::Relaxed) >= opts.requests {
                                return;
                            }
                        }
                    }
                    let t = Instant::now();
                    let outcome = one_request(&client, &opts, &shared, &mut jitter).await;
                    let elapsed = t.elapsed();
                    let mut r = shared.results.lock().unwrap_or_else(|e| e.into_inner());
                    r.0.push(elapsed);
                    match outcome {
                        Outcome::Ok => {
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Refused(code) => {
                            shared.refused.fetch_add(1, Ordering::Relaxed);
                            *r.1.entry(code).or_default() += 1;
                        }
                        Outcome::Error => r.2 += 1,
                    }
                    drop(r);
                    shared.done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    progress.abort();
    if opts.progress && std::io::stderr().is_terminal() {
        eprintln!();
    }
    let duration = start.elapsed();
    let (mut latencies, refused, errors) =
        std::mem::take(&mut *shared.results.lock().unwrap_or_else(|e| e.into_inner()));
    let latency_ms = percentiles(&mut latencies);
    let total = latencies.len() as u64;
    let succeeded = shared.ok.load(Ordering::Relaxed);
    Ok(Summary {
        total,
        succeeded,
        succeeded_pct: if total == 0 {
            0.0
        } else {
            succeeded as f64 * 100.0 / total as f64
        },
        refused,
        errors,
        retries: shared.retries.load(Ordering::Relaxed),
        duration_s: duration.as_secs_f64(),
        requests_per_second: total as f64 / duration.as_secs_f64().max(1e-9),
        latency_ms,
    })
}

/// Prints `line()` on standard error while the run lasts: redrawn in place ten times a second on
/// a terminal, a line a second otherwise. Nothing when not `enabled`.
pub(crate) fn spawn_progress(
    enabled: bool,
    line: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled {
            return;
        }
        let tty = std::io::stderr().is_terminal();
        let mut tick = tokio::time::interval(if tty {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        });
        tick.tick().await;
        loop {
            tick.tick().await;
            let line = line();
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}   ")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
        }
    })
}

fn bar(frac: f64) -> String {
    let filled = (frac.clamp(0.0, 1.0) * 30.0).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(30 - filled))
}

/// One request with its retries; returns the final outcome.
async fn one_request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    opts: &LoadOptions,
    shared: &Shared,
    jitter: &mut Jitter,
) -> Outcome {
    let mut attempt = 0;
    loop {
        let mut req = Request::get(opts.url.clone());
        if let Some(k) = &opts.key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req.body(Empty::new()).expect("a GET request builds");
        let (outcome, retry_after) = match client.request(req).await {
            Err(_) => (Outcome::Error, None),
            Ok(res) => {
                let (parts, body) = res.into_parts();
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if opts.adaptive {
                    adapt(shared, opts, &parts.headers, parts.status.as_u16() == 429);
                }
                let retry_after = header_u64(&parts.headers, &["retry-after"]).map(Duration::from_secs);
                if parts.status.is_success() {
                    (Outcome::Ok, None)
                } else {
                    let code = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
                    match code {
                        Some(c) => (Outcome::Refused(c), retry_after),
                        None => (
                            Outcome::Refused(format!("http_{}", parts.status.as_u16())),
                            retry_after,
                        ),
                    }
                }
            }
        };
        if matches!(outcome, Outcome::Ok) || attempt >= opts.retries {
            return outcome;
        }
        attempt += 1;
        shared.retries.fetch_add(1, Ordering::Relaxed);
        // Full jitter over an exponential window (100 ms, 200 ms, ... capped at 10 s), and never
        // sooner than the server's Retry-After.
        let window = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
        let backoff = Duration::from_millis(jitter.next() % (window + 1));
        tokio::time::sleep(backoff.max(retry_after.unwrap_or_default())).await;
    }
}

/// Adaptive mode: grow the active workers up to the free slots the headers report; shrink by one
/// on a concurrency refusal (another client may share the key).
fn adapt(shared: &Shared, opts: &LoadOptions, headers: &HeaderMap, refused: bool) {
    let limit = header_u64(headers, &["x-concurrent-limit", "concurrency-limit"]);
    let remaining = header_u64(headers, &["x-concurrent-remaining", "concurrency-remaining"]);
    let active = shared.active.load(Ordering::Relaxed);
    let next = match (limit, remaining) {
        _ if refused => active.saturating_sub(1).max(1),
        (Some(l), Some(r)) => {
            let cap = (l as usize).min(opts.concurrency);
            if r > 0 {
                (active + r as usize).min(cap)
            } else {
                active.min(cap)
            }
        }
        // No concurrency limit reported: every worker may send.
        _ => opts.concurrency,
    };
    shared.active.store(next.max(1), Ordering::Relaxed);
}
