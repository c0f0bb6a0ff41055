//! Shared harness for black-box tests: the real `slotgate` binary on loopback ports the OS picks,
//! a stub upstream that counts requests in flight, and a plain HTTP client.
#![allow(dead_code)]

pub mod fakeapi;

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpListener;

pub const SLOTGATE: &str = env!("CARGO_BIN_EXE_slotgate");

/// What the stub upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub uri: String,
    pub headers: HeaderMap,
}

/// An upstream that answers 200 after `?delay_ms=N`, streams its body over `?stream_ms=N`, sends
/// the request body back with `?echo=1`, and records the peak number of requests in flight.
#[derive(Clone, Default)]
pub struct Stub {
    pub addr: Option<SocketAddr>,
    pub in_flight: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
}

fn query_ms(uri: &http::Uri, name: &str) -> u64 {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Count(Arc<AtomicUsize>);
impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Stub {
    pub async fn start() -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut stub = Stub {
            addr: Some(listener.local_addr().unwrap()),
            ..Default::default()
        };
        let s = stub.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        stub.addr = stub.addr.take();
        stub
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        self.seen.lock().unwrap().push(Seen {
            uri: req.uri().to_string(),
            headers: req.headers().clone(),
        });
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let count = Count(Arc::clone(&self.in_flight));
        if query_ms(req.uri(), "echo") == 1 {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            return Response::new(Full::new(body.unwrap_or_default()).boxed());
        }
        let delay = query_ms(req.uri(), "delay_ms");
        let stream = query_ms(req.uri(), "stream_ms");
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if stream > 0 {
            // Headers now, the body's last chunk after `stream` ms: the request stays in flight.
            let chunks = futures::stream::unfold((0, count), move |(i, count)| async move {
                match i {
                    0 => Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first\n"))),
                        (1, count),
                    )),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(stream)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"last\n"))), (2, count)))
                    }
                    _ => None,
                }
            });
            return Response::new(BoxBody::new(StreamBody::new(chunks)));
        }
        drop(count);
        let mut res = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed());
        if query_ms(req.uri(), "close") == 1 {
            // Ends the keep-alive connection after this response.
            res.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
        }
        res
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Starts counting the peak again from the requests in flight now.
    pub fn reset_peak(&self) {
        self.peak.store(self.in_flight(), Ordering::SeqCst);
    }

    pub async fn wait_in_flight(&self, n: usize) {
        wait_until("stub in-flight count", || self.in_flight() == n).await;
    }
}

/// Polls `cond` every 10 ms; fails the test after 20 s (a hang guard, not a timing assertion).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A folder of manifests compiled into a configuration file the gateway watches.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub previous: Option<slotgate::config::GatewayConfig>,
}

impl ConfigDir {
    pub fn new(manifests: &str) -> ConfigDir {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.json");
        let mut c = ConfigDir {
            dir,
            config,
            previous: None,
        };
        c.write(manifests);
        c
    }

    /// Compiles `manifests` as the controller would and replaces the file atomically.
    pub fn write(&mut self, manifests: &str) -> u64 {
        let src = self.dir.path().join("manifests");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("all.yaml"), manifests).unwrap();
        let folder = slotgate::standalone::load_dir(&src).unwrap();
        let compiled = folder.compile(self.previous.as_ref());
        let version = compiled.config.version;
        self.write_raw(&compiled.config.to_json());
        self.previous = Some(compiled.config);
        version
    }

    pub fn write_raw(&self, bytes: &[u8]) {
        let tmp = self.dir.path().join(".gateway.json.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }
}

/// A running `slotgate` process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub stderr: PathBuf,
    /// Every line printed on standard output so far.
    pub stdout: Arc<Mutex<Vec<String>>>,
    _logs: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Waits, off the async workers, for the process to exit by itself.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.child.wait().unwrap())
            .await
            .unwrap()
    }

    /// Starts `slotgate ARGS`, and waits for its "listening on http://A (admin http://B)" line.
    pub fn start(args: &[&str]) -> Proc {
        Proc::start_env(args, &[])
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let logs = tempfile::tempdir().unwrap();
        let stderr = logs.path().join("stderr.log");
        // `SLOTGATE_TEST_LOG` turns up a child's logs when a test needs diagnosing; `SLOTGATE_BIN`
        // runs another build (an A/B benchmark against an earlier commit).
        let bin = std::env::var("SLOTGATE_BIN").unwrap_or(SLOTGATE.to_string());
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "SLOTGATE_LOG",
                std::env::var("SLOTGATE_TEST_LOG").unwrap_or("info".to_string()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("slotgate starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on http://") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!(
                "slotgate did not start: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        let addrs: Vec<SocketAddr> = line
            .split("http://")
            .skip(1)
            .filter_map(|s| s.split([' ', ')']).next()?.parse().ok())
            .collect();
        Proc {
            child,
            proxy: addrs[0],
            admin: addrs.get(1).copied(),
            stderr,
            stdout: lines,
            _logs: logs,
        }
    }

    /// Standard output so far, as one string.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Waits until standard output (or, with `stderr`, standard error) contains `text`.
    pub async fn wait_output(&self, text: &str, stderr: bool) {
        wait_until(text, || {
            if stderr {
                self.stderr().contains(text)
            } else {
                self.stdout().contains(text)
            }
        })
        .await;
    }

    /// `slotgate up DIR` on free ports, with `extra` arguments (`--upstream`, `--state`, ...).
    pub fn up(dir: &Path, extra: &[&str]) -> Proc {
        let mut args = vec![
            "up",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Proc::start(&args)
    }

    /// `slotgate gateway` enforcing the configuration file `config`.
    pub fn gateway(config: &Path, upstream: &str, extra: &[&str]) -> Proc {
        Proc::gateway_from(&["--config", config.to_str().unwrap()], upstream, extra, &[])
    }

    /// `slotgate gateway` with its configuration `source` arguments, on free ports.
    pub fn gateway_from(source: &[&str], upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        // Tests poll for keys that are not admitted yet, which the invalid-key guard would take
        // for guessing; the tests of the guard turn it back on (the last flag wins).
        let mut args = vec!["gateway", "--invalid-key-limit", "0"];
        args.extend_from_slice(source);
        args.extend_from_slice(&[
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        args.extend_from_slice(extra);
        Proc::start_env(&args, env)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        let res = get(&format!("http://{}/metrics", self.admin.unwrap()), &[]).await;
        res.body
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    pub async fn wait_metric(&self, series: &str, want: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.metric(series).await;
            if want(v) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {series} (last {v})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A response read to its end.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn num(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("missing header {name} in {:?}", self.headers))
            .parse()
            .unwrap()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// A client whose connections come from `source` (a loopback address such as 127.0.0.2: a
/// second client, as the gateway sees it).
pub fn client_from(source: &str) -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source.parse().unwrap()));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// GET with headers, on a fresh connection, body read to the end.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    get_on(&client(), url, headers).await
}

/// GET with headers through `client` (which may keep connections alive), body read to the end.
pub async fn get_on(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    // A hang guard, not a timing assertion: no test request takes anywhere near this long.
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(req.body(Empty::new()).unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("GET {url}: no answer within 60 s"))
    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .unwrap_or_else(|_| panic!("GET {url}: body not finished within 60 s"))
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A plan and one key (token `tok-<name>`) per entry of `keys`, as manifests.
pub fn plan_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: slotgate.dev/v1alpha1\nkind: ApiPlan\nmetadata:\n  name: {name}\nspec:\n{spec}\n---\n"
    )
}

pub fn key_yaml(name: &str, plan: &str, extra: &str) -> String {
    format!(
        "apiVersion: slotgate.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  plan: {plan}\n{extra}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-token\n  namespace: default\nstringData:\n  token: tok-{name}\n---\n"
    )
}

pub fn slots_plan(name: &str, slots: u32) -> String {
    plan_yaml(
        name,
        &format!("  concurrency:\n    maxConcurrentRequests: {slots}\n    paths: [\"/v1/*\"]"),
    )
}

/// A `redis-server` of the test's own on a free loopback port, without persistence; killed when
/// dropped. `stop` and `start_again` keep the port, so gateways pointed at it see an outage.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    pub fn start() -> Redis {
        for _ in 0..5 {
            // The OS picks a free port; a rare race with another test is retried on a new one.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut r = Redis {
                child: None,
                port,
                dir: tempfile::tempdir().unwrap(),
            };
            if r.spawn() {
                return r;
            }
        }
        panic!("redis-server did not start (is it installed? scripts/test.sh installs it)");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if self
                .conn()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection()
    }

    /// Kills the server (SIGKILL): the counters it held are gone, as in a crash.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn start_again(&mut self) {
        assert!(
            self.spawn(),
            "redis-server did not start again on port {}",
            self.port
        );
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: a Redis that accepts but never answers.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let sig = if paused { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap().success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Script calls Redis has run since it started (`EVALSHA` and `EVAL`).
    pub fn script_calls(&self) -> u64 {
        let mut c = self.conn().unwrap();
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut c).unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Slot leases held in Redis for a key id (`namespace/name`), expired ones not counted.
    pub fn leases(&self, key_id: &str) -> usize {
        let mut c = self.conn().unwrap();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut c).unwrap();
        let now = secs * 1_000_000 + micros;
        redis::cmd("ZCOUNT")
            .arg(format!("slotgate:{{{key_id}}}:slots"))
            .arg(now)
            .arg("+inf")
            .query(&mut c)
            .unwrap()
    }
}

/// A CA and a leaf certificate for 127.0.0.1 signed by it, made with openssl in `dir`; returns
/// (ca.pem, leaf.pem, leaf.key).
pub fn test_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=slotgate test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
    ]);
    (dir.join("ca.pem"), dir.join("leaf.pem"), dir.join("leaf.key"))
}

/// A TLS front end on a loopback port of its own with `cert`/`key` (PEM files): it terminates
/// TLS and relays the bytes of each connection to `back`. Returns its address.
pub async fn tls_front(back: SocketAddr, cert: &Path, key: &Path) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(back).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    front
}
