//! The access log: one JSON line per request, written by a thread of its own from a bounded
//! queue, so that a slow disk or a stalled `kubectl logs` never slows a request. When the queue
//! is full the line is dropped and counted.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use serde::Serialize;

/// Lines waiting for the writer at most; beyond, new lines are dropped.
const QUEUE: usize = 16_384;

/// Where access-log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output (what a container's log collector reads).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl std::str::FromStr for LogTarget {
    type Err = std::convert::Infallible;

    /// `stdout` or `-`, else a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Self::Stdout,
            path => Self::File(path.into()),
        })
    }
}

/// One request, as its access-log line shows it. Names the key by namespace and name, never by
/// its token; the path carries no query string (a key may be sent as `?apikey=`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// When the request arrived, RFC 3339 UTC with milliseconds (filled in by the writer from
    /// `at_ms`, off the request path).
    pub time: String,
    /// When the request arrived, in milliseconds since the Unix epoch.
    #[serde(skip)]
    pub at_ms: u64,
    /// The key's name, when the request presented a known one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The key's plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The client's address (behind trusted proxies, the one they report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// The gateway's error code, when it answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Time waited for a slot (0: slots are never queued for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_wait_ms: Option<f64>,
    /// Time the request held its slot, until the response's last byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_held_ms: Option<f64>,
    /// Time to the upstream's response headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Response body bytes sent.
    pub bytes: u64,
}

impl Record {
    /// Splits a key id (`namespace/name`) into the record's fields.
    pub fn set_key(&mut self, id: &str, plan: &str) {
        let (ns, name) = id.split_once('/').unwrap_or(("", id));
        self.namespace = Some(ns.to_string());
        self.key = Some(name.to_string());
        self.plan = Some(plan.to_string());
    }
}

/// The queue to the access-log writer.
#[derive(Debug)]
pub struct AccessLog {
    queue: mpsc::SyncSender<Record>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer thread for `target`.
    pub fn start(target: &LogTarget) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write(lines, out))?;
        Ok(Self {
            queue,
            dropped: Arc::default(),
        })
    }

    /// Queues a line; drops it (counted) rather than wait when the writer is behind.
    pub fn log(&self, record: Record) {
        if self.queue.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write(lines: mpsc::Receiver<Record>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        // Flushes whenever the queue runs dry, so a line is out within a few milliseconds of
        // its request, and a busy queue is written in large blocks.
        let record = match lines.try_recv() {
            Ok(r) => r,
            Err(mpsc::TryRecvError::Empty) => {
                let _ = out.flush();
                match lines.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        let mut record = record;
        record.time = k8s_openapi::jiff::Timestamp::from_millisecond(record.at_ms as i64)
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        if serde_json::to_writer(&mut out, &record).is_ok() {
            let _ = out.write_all(b"\n");
        }
    }
    let _ = out.flush();
}
