//! Configuration sources. Every source ends in [`Gateway::apply`] or [`Gateway::reject`]: a
//! document that does not parse or validate never replaces the one being enforced.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Gateway, ReloadReport};
use crate::config::{ConfigError, GatewayConfig};

/// Why a configuration file could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The document was refused.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ConfigError,
    },
    /// The file system cannot be watched.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: notify::Error,
    },
}

fn apply_bytes(gateway: &Gateway, path: &Path, bytes: &[u8]) -> Result<ReloadReport, SourceError> {
    match GatewayConfig::from_json(bytes) {
        Ok(config) => Ok(gateway.apply(config)),
        Err(source) => {
            gateway.reject(&path.display().to_string(), &source);
            Err(SourceError::Config {
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

/// A debounced stream of "something under these paths changed" signals. Watches the parent
/// folders, so editors that replace a file by renaming a new one over it are seen too, and polls
/// modification times as a fallback where file events are not delivered (some network and
/// overlay file systems).
pub struct ChangeStream {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
    paths: Vec<PathBuf>,
    stamps: Vec<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeStream")
            .field("paths", &self.paths)
            .finish()
    }
}

/// Quiet time after an event before reading: editors write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(25);
const POLL: Duration = Duration::from_secs(1);

impl ChangeStream {
    /// Watches files or folders.
    pub fn new(paths: Vec<PathBuf>) -> Result<Self, SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })
        .map_err(|source| SourceError::Watch {
            path: PathBuf::new(),
            source,
        })?;
        for p in &paths {
            let dir = if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            };
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|source| SourceError::Watch { path: dir, source })?;
        }
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        Ok(Self {
            _watcher: watcher,
            rx,
            paths,
            stamps,
        })
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) {
        let mut poll = tokio::time::interval(POLL);
        poll.tick().await;
        loop {
            tokio::select! {
                Some(()) = self.rx.recv() => break,
                _ = poll.tick() => {
                    let now: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
                    if now != self.stamps {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.rx.try_recv().is_ok() {}
        self.stamps = self.paths.iter().map(|p| stamp(p)).collect();
    }
}

/// Newest modification time and total size under a path (a file, or a folder's direct entries).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return Some((meta.modified().ok()?, meta.len()));
    }
    let mut newest = meta.modified().ok()?;
    let mut size = 0;
    for entry in std::fs::read_dir(path).ok()?.flatten() {
        if let Ok(m) = entry.metadata() {
            newest = newest.max(m.modified().unwrap_or(newest));
            size += m.len();
        }
    }
    Some((newest, size))
}

/// A configuration file, applied when opened and again whenever it changes.
#[derive(Debug)]
pub struct FileSource {
    changes: ChangeStream,
    loader: Loader,
}

/// Reads, checks and applies the file: the whole of a reload, run away from the threads that
/// serve requests once they serve.
#[derive(Debug)]
struct Loader {
    gateway: Arc<Gateway>,
    path: PathBuf,
    /// SHA-256 of the bytes last applied or refused: an unchanged file is not parsed again.
    last: Option<[u8; 32]>,
}

impl FileSource {
    /// Starts watching `path`, then applies it once, so an edit made meanwhile is not missed.
    /// A missing or invalid file is logged and the gateway stays unready until a good one appears.
    pub fn open(gateway: Arc<Gateway>, path: PathBuf) -> Result<Self, SourceError> {
        let changes = ChangeStream::new(vec![path.clone()])?;
        let mut loader = Loader {
            gateway,
            path,
            last: None,
        };
        // Nothing is served yet: the first load may run here.
        loader.apply();
        Ok(Self { changes, loader })
    }

    /// Re-applies the file on every change; runs until the task is dropped.
    pub async fn run(self) {
        let Self {
            mut changes,
            mut loader,
        } = self;
        loop {
            changes.changed().await;
            let load = move || {
                loader.apply();
                loader
            };
            match super::off_the_serving_threads(load).await {
                Some(back) => loader = back,
                None => return,
            }
        }
    }
}

impl Loader {
    fn apply(&mut self) {
        let path = &self.path;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if !self.gateway.is_ready() => {
                tracing::error!(path = %path.display(), error = %e, "no configuration yet; /readyz answers 503 until a valid one is written");
                return;
            }
            Err(e) => {
                // A file being replaced is briefly missing; the next event brings it back.
                tracing::warn!(path = %path.display(), error = %e, "configuration file unreadable; keeping the last good configuration");
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if self.last == Some(digest) {
            return;
        }
        self.last = Some(digest);
        let started = std::time::Instant::now();
        if let Ok(r) = apply_bytes(&self.gateway, path, &bytes)
            && r.changed
        {
            self.gateway
                .metrics
                .reload_duration
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(
                path = %path.display(),
                from = r.from_version,
                to = r.to_version,
                keys = r.keys,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "configuration applied"
            );
        }
    }
}

/// Reads the provider credentials of the upstream targets from a folder holding one file per
/// target, named after it: what a mounted Secret looks like (the kubelet's `..data` links and
/// other dot-files are skipped). Values are trimmed of surrounding whitespace.
pub fn read_credentials(dir: &Path) -> Result<std::collections::BTreeMap<String, String>, SourceError> {
    let read = |path: &Path| SourceError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::other("unreadable"),
    };
    let mut out = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|source| SourceError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|_| read(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Follows the links a mounted Secret is made of.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| SourceError::Read {
            path: path.clone(),
            source,
        })?;
        out.insert(name, text.trim().to_string());
    }
    Ok(out)
}

/// Keeps the gateway's target credentials in step with `dir` (`--target-credentials`): read
/// every `every`, applied when something changed. A folder that cannot be read keeps the last
/// credentials read.
pub async fn poll_credentials(gateway: Arc<Gateway>, dir: PathBuf, every: Duration) {
    poll_with(dir, every, "target credentials", read_credentials, move |now| {
        gateway.set_target_credentials(now.clone());
    })
    .await;
}

/// The webhook signing secrets of a folder of the Secrets the controller publishes (mounted:
/// one file per key, `<namespace>.<name>`), by key id.
pub fn read_webhook_secrets(dir: &Path) -> Result<std::collections::BTreeMap<String, String>, SourceError> {
    Ok(read_credentials(dir)?
        .into_iter()
        .map(|(entry, secret)| (entry.replacen('.', "/", 1), secret))
        .collect())
}

/// Keeps the task subsystem's signing secrets in step with `dir` (`--webhook-secrets` given a
/// folder), read every `every`.
pub async fn poll_webhook_secrets(tasks: Arc<crate::tasks::Tasks>, dir: PathBuf, every: Duration) {
    poll_with(
        dir,
        every,
        "webhook signing secrets",
        read_webhook_secrets,
        move |now| {
            for id in tasks.set_webhook_secrets(now) {
                tracing::warn!(
                    key = id,
                    "its webhook-secret is not whsec_ followed by base64; its webhooks cannot be signed"
                );
            }
        },
    )
    .await;
}

/// Reads `dir` with `read` every `every` and hands what it read to `apply` when it changed. A
/// folder that cannot be read keeps what was read last.
async fn poll_with(
    dir: PathBuf,
    every: Duration,
    what: &'static str,
    read: fn(&Path) -> Result<std::collections::BTreeMap<String, String>, SourceError>,
    mut apply: impl FnMut(&std::collections::BTreeMap<String, String>),
) {
    let mut last = None;
    loop {
        match read(&dir) {
            Ok(now) if last.as_ref() != Some(&now) => {
                // Names only: the values are secrets.
                tracing::info!(dir = %dir.display(), entries = now.len(), "{what} read");
                apply(&now);
                last = Some(now);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "{what} not read; the last ones read stay"),
        }
        tokio::time::sleep(every).await;
    }
}
