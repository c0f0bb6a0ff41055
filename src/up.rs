//! `slotgate up`: compile and gateway in one process, from a folder of the manifests `kubectl
//! apply` takes, with a demo upstream when none is given. The folder is watched: an edit is
//! applied at once and reported in one line; a broken edit is reported with its file and line and
//! the previous configuration keeps serving.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
    time::Instant,
};

use tokio::net::TcpListener;

use crate::{
    config::GatewayConfig,
    gateway::{self, Gateway, GatewayOptions, Upstream, source::ChangeStream},
    standalone::{FolderError, describe_changes, load_dir},
    tasks::{Tasks, TasksOptions},
};

/// Options of `slotgate up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Folder of manifests.
    pub dir: PathBuf,
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Upstream; `None` starts the demo upstream.
    pub upstream: Option<Upstream>,
    /// Time to wait for the upstream's response headers.
    pub upstream_timeout: Duration,
    /// Time left to requests in flight at shutdown.
    pub shutdown_timeout: Duration,
    /// Where slots and rate buckets live (memory, or Redis shared with other gateways).
    pub state: gateway::StateOptions,
    /// Bans, trusted proxies and the ban allowlist.
    pub abuse: gateway::AbuseOptions,
    /// Where the access log goes; `None` (the default of `up`, whose terminal shows its own
    /// report): no access log.
    pub access_log: Option<crate::usage::LogTarget>,
    /// Folder of the durable task store; by default `.slotgate/tasks-<port>` in the working
    /// directory (one per listen port, so two `up`s side by side do not share a store), or a
    /// temporary folder removed at exit when the port is 0 (a restart could not find it again).
    pub data_dir: Option<PathBuf>,
    /// Largest task payload accepted, in bytes.
    pub max_task_payload_bytes: usize,
    /// A PEM bundle of CAs https webhook receivers may be signed by, beside the system's.
    pub webhook_ca: Option<PathBuf>,
    /// Tasks live in the Redis of `state`, shared with the other gateways on it, with this claim
    /// timeout (`None`: in the embedded store under `data_dir`).
    pub shared_tasks: Option<Duration>,
}

/// Why `slotgate up` could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The folder could not be read or holds an invalid manifest.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// A listener could not be opened.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The folder cannot be watched.
    #[error(transparent)]
    Watch(#[from] gateway::source::SourceError),
    /// The gateway could not start (the shared state URL, the access log).
    #[error(transparent)]
    Gateway(#[from] gateway::GatewayError),
    /// The task store could not be opened.
    #[error(transparent)]
    Tasks(#[from] crate::tasks::TasksError),
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, UpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| UpError::Listen { addr, what, source })
}

/// Runs until `shutdown` resolves; then lets requests in flight finish and returns.
pub async fn run(opts: UpOptions, shutdown: impl Future<Output = ()>) -> Result<(), UpError> {
    let started = Instant::now();
    // Watch before the first read, so an edit made while starting is not missed.
    let mut changes = ChangeStream::new(vec![opts.dir.clone()])?;
    let folder = load_dir(&opts.dir)?;
    for skipped in &folder.skipped {
        eprintln!(
            "warning: skipped {skipped}: not an ApiPlan, ApiKey, ApiTaskType, ApiUpstream, Secret or ConfigMap"
        );
    }
    let compiled = folder.compile(None);
    print!("{}", folder.report(&compiled));

    let (upstream, demo) = match opts.upstream.clone() {
        Some(u) => (u, None),
        None => {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "demo upstream").await?;
            let addr = listener.local_addr().map_err(|source| UpError::Listen {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                what: "demo upstream",
                source,
            })?;
            let task = tokio::spawn(gateway::serve(
                listener,
                |_| hyper_util::service::TowerToHyperService::new(crate::demo::DemoUpstream),
                std::future::pending(),
                Duration::ZERO,
            ));
            let upstream: Upstream = format!("http://{addr}").parse().expect("a loopback URL parses");
            (upstream, Some(task))
        }
    };
    let gw = Gateway::new(GatewayOptions {
        upstream: upstream.clone(),
        upstream_timeout: opts.upstream_timeout,
        max_upstream_in_flight: None,
        state: opts.state.clone(),
        abuse: opts.abuse.clone(),
        access_log: opts.access_log.clone(),
    })
    .await?;
    let mut current = compiled.config;
    gw.set_target_credentials(folder.target_credentials());
    gw.apply(current.clone());
    for w in folder
        .task_type_warnings()
        .into_iter()
        .chain(folder.target_warnings())
    {
        eprintln!("warning: {w}");
    }
    // On a laptop the webhook receiver is usually on this machine too.
    let (data_dir, ephemeral) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None if opts.listen.port() == 0 => (
            std::env::temp_dir().join(format!("slotgate-up-{}", std::process::id())),
            true,
        ),
        None => (
            PathBuf::from(".slotgate").join(format!("tasks-{}", opts.listen.port())),
            false,
        ),
    };
    let mut task_opts = TasksOptions::new(data_dir.clone(), upstream.to_string(), opts.upstream_timeout);
    task_opts.webhook_reach.all_private = true;
    task_opts.max_payload_bytes = opts.max_task_payload_bytes;
    task_opts.webhook_ca = opts.webhook_ca.clone();
    let tasks = match (opts.shared_tasks, &opts.state.shared) {
        (Some(claim), Some(shared)) => Tasks::open_shared(
            task_opts,
            &shared.url,
            &shared.prefix,
            claim,
            gw.metrics.tasks.clone(),
        )?,
        _ => Tasks::open(task_opts, gw.metrics.tasks.clone())?,
    };
    warn_bad_secrets(&tasks, &folder.webhook_secrets);
    let resumed = gw.enable_tasks(Arc::clone(&tasks))?;

    let proxy = bind(opts.listen, "--listen").await?;
    let admin = bind(opts.admin_listen, "--admin-listen").await?;
    let (proxy_addr, admin_addr) = (
        proxy.local_addr().unwrap_or(opts.listen),
        admin.local_addr().unwrap_or(opts.admin_listen),
    );
    let upstream_note = if demo.is_some() {
        format!("demo upstream {upstream}")
    } else {
        format!("upstream {upstream}")
    };
    println!(
        "slotgate up: listening on http://{proxy_addr} (admin http://{admin_addr}), {upstream_note}; configuration {} ({} keys), ready in {} ms",
        current.version,
        current.keys.len(),
        started.elapsed().as_millis()
    );
    let store = match (&opts.shared_tasks, &opts.state.shared) {
        (Some(_), Some(shared)) => format!(
            "shared in {} with the other gateways on it",
            crate::limiter::shared::redact_url(&shared.url)
        ),
        _ => format!("{}, {resumed} unfinished tasks resumed", data_dir.display()),
    };
    println!(
        "async tasks: POST http://{proxy_addr}/v1/tasks ({} task types; store {store}; webhooks may reach private addresses)",
        current.task_types.len(),
    );
    println!("watching {} for changes; Ctrl-C to stop", opts.dir.display());

    let watch_gw = Arc::clone(&gw);
    let dir = opts.dir.clone();
    let watcher = tokio::spawn(async move {
        loop {
            changes.changed().await;
            let (gw, dir) = (Arc::clone(&watch_gw), dir.clone());
            // Reading, compiling and applying the folder block; requests keep flowing meanwhile.
            match gateway::off_the_serving_threads(move || reload(&gw, &dir, current)).await {
                Some(enforced) => current = enforced,
                None => return,
            }
        }
    });
    gateway::run(gw, proxy, admin, shutdown, opts.shutdown_timeout).await;
    watcher.abort();
    if let Some(d) = demo {
        d.abort();
    }
    if ephemeral {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    println!("slotgate up: stopped");
    Ok(())
}

fn warn_bad_secrets(tasks: &Tasks, secrets: &std::collections::BTreeMap<String, String>) {
    for id in tasks.set_webhook_secrets(secrets) {
        eprintln!(
            "warning: ApiKey {id}: its webhook-secret is not whsec_ followed by base64; its webhooks cannot be signed"
        );
    }
}

/// Re-reads the folder and applies it if it compiles to something new; returns the configuration
/// enforced afterwards. An unreadable folder or bad manifest leaves `current` serving.
fn reload(gw: &Gateway, dir: &Path, mut current: GatewayConfig) -> GatewayConfig {
    let t = Instant::now();
    match load_dir(dir) {
        Err(e) => {
            gw.metrics.reload_failure(if matches!(e, FolderError::Io { .. }) {
                "io"
            } else {
                "manifest"
            });
            eprintln!(
                "error: {e}\n  the previous configuration ({}) keeps serving",
                current.version
            );
        }
        Ok(folder) => {
            if let Some(tasks) = gw.tasks() {
                warn_bad_secrets(tasks, &folder.webhook_secrets);
            }
            for w in folder
                .task_type_warnings()
                .into_iter()
                .chain(folder.target_warnings())
            {
                eprintln!("warning: {w}");
            }
            gw.set_target_credentials(folder.target_credentials());
            let compiled = folder.compile(Some(&current));
            let lines = describe_changes(&current, &compiled.config);
            for (id, report) in &compiled.keys {
                if let Some(c) = report.conditions.iter().find(|c| !c.status) {
                    eprintln!(
                        "warning: ApiKey {id}: {}=False {}: {}",
                        c.type_, c.reason, c.message
                    );
                }
            }
            if compiled.config.hash != current.hash {
                gw.apply(compiled.config.clone());
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if lines.is_empty() {
                    println!("configuration {} applied in {ms:.0} ms", compiled.config.version);
                }
                for line in lines {
                    println!("{line}, applied in {ms:.0} ms");
                }
                current = compiled.config;
            }
        }
    }
    current
}
