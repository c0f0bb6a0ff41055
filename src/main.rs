//! The `slotgate` binary: one CLI for every role.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use slotgate::gateway::{self, Gateway, GatewayOptions, Listening, ProxyBody, Upstream};
use tokio::net::TcpListener;

// mimalloc is faster than glibc's allocator on the request path (benches/limiter.rs) and spares the
// static musl build musl's slower one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` (the same number in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The controller returns freed pages to the OS at once instead of after mimalloc's 10 ms delay:
/// its cold start and each relist free a lot at a time, and with the delay the pages freed in one
/// burst outlive it (at 100,000 keys, 280 MiB peak and 262 steady before, 264 and 247 after). The
/// gateway keeps the default: it frees little, and purging costs a system call on the request path.
fn purge_freed_memory_at_once() {
    // SAFETY: sets an integer option before this process starts any other thread; mimalloc
    // reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// The controller and the gateway back their memory with 4 KiB pages only. mimalloc asks for
/// transparent huge pages on the 2 MiB-aligned regions it maps, and then a region with a few live
/// objects left in it keeps a whole 2 MiB page resident: at 100,000 keys the gateway held 602 bytes
/// per key with huge pages and 488 without, the controller 255 MiB and 231. What huge pages buy is fewer
/// TLB misses: a limiter decision at 1,000,000 keys takes 81 ns with them and 88 ns without
/// (benches/limiter.rs, side by side), a few nanoseconds of a request that costs tens of
/// microseconds. `up` keeps the default: it serves a laptop's handful of keys.
fn small_pages_only() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and changes no memory
    // this process can see; the kernel applies it to every mapping, including those mimalloc
    // made before `main`, from the next page fault on.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        // A kernel without THP refuses the call; memory is then small pages anyway.
        tracing::debug!(error = %std::io::Error::last_os_error(), "transparent huge pages left as they are");
    }
}

/// slotgate: sell API plans by concurrency slots and rate limits, enforced in front of any upstream.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (`slotgate crds | kubectl apply -f -`).
    Crds,
    /// Compile a folder of ApiPlan, ApiKey and Secret manifests into a gateway configuration file.
    Compile {
        /// Folder of YAML manifests.
        #[arg(default_value = "examples")]
        dir: PathBuf,
        /// Where to write the configuration (JSON); `-` for standard output.
        #[arg(short, long, default_value = "-")]
        output: PathBuf,
    },
    /// Run the operator: reconcile ApiPlans and ApiKeys into gateway configuration and status.
    Controller(ControllerArgs),
    /// Run the gateway: a reverse proxy enforcing a configuration file it watches.
    // A flag given twice takes the last value, so that a wrapper's defaults can be overridden.
    #[command(args_override_self = true)]
    Gateway(GatewayArgs),
    /// Run everything from a folder of manifests, no cluster needed: compile, gateway, demo upstream.
    Up {
        /// Folder of ApiPlan, ApiKey and Secret manifests (watched for changes).
        #[arg(default_value = "examples")]
        dir: PathBuf,
        /// Address of the proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin listener (/healthz, /readyz, /metrics).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Upstream API; without it a demo upstream answers (`?delay_ms=N` holds a request).
        #[arg(long)]
        upstream: Option<String>,
        /// Time to wait for the upstream's response headers before answering 504.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        upstream_timeout: Duration,
        /// On Ctrl-C, time left to requests in flight.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        shutdown_timeout: Duration,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        tasks: TaskArgs,
        #[command(flatten)]
        abuse: AbuseArgs,
        /// Access log, one JSON line per request: `stdout` or a file path. Off by default (the
        /// terminal shows `up`'s own report).
        #[arg(long)]
        access_log: Option<String>,
    },
    /// Send load with concurrent workers and summarise what the limits did.
    Load {
        /// Target URL, e.g. http://127.0.0.1:8080/v1/monitor/chatgpt?delay_ms=500
        url: String,
        /// API key (sent as `Authorization: Bearer`).
        #[arg(long, env = "SLOTGATE_KEY")]
        key: Option<String>,
        /// Concurrent workers.
        #[arg(short, long, default_value_t = 10)]
        concurrency: usize,
        /// Requests to send in all.
        #[arg(short = 'n', long, default_value_t = 100)]
        requests: u64,
        /// Send for this long instead of a fixed count (e.g. 10s).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Retries of a refused or failed request, with exponential backoff, jitter and Retry-After.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Keep the active workers within the free slots the limit headers report.
        #[arg(long)]
        adaptive: bool,
        /// Print the summary as JSON on standard output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tasks: LoadTaskArgs,
    },
    /// Run the demo upstream API (JSON answers; `?delay_ms=N` holds a request for N ms).
    DemoUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Tokio worker threads (default: one per core).
        #[arg(long)]
        worker_threads: Option<usize>,
    },
}

/// `slotgate load --tasks`: async tasks instead of synchronous requests.
#[derive(Args, Debug)]
struct LoadTaskArgs {
    /// Submit this many async tasks to URL (the gateway's `/v1/tasks`; a bare
    /// `http://host:port` gets it appended), receive their webhooks and report submit rate,
    /// 202-to-webhook latency, lost and duplicate deliveries.
    #[arg(long)]
    tasks: Option<u64>,
    /// Where the webhook receiver listens (the tasks name it as their webhook).
    #[arg(long, default_value = "127.0.0.1:0")]
    webhook_listen: SocketAddr,
    /// The key's webhook secret (`whsec_...`): every webhook's signature is checked with it.
    #[arg(long, env = "SLOTGATE_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// `taskType` of the tasks.
    #[arg(long, default_value = "CHATGPT")]
    task_type: String,
    /// `payload` of the tasks, as JSON.
    #[arg(long, default_value = r#"{"prompt": "hello"}"#)]
    payload: String,
    /// Longest wait for the webhooks after the last submission.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    wait: Duration,
}

/// Options of `slotgate controller`.
#[derive(Args, Debug)]
struct ControllerArgs {
    #[command(flatten)]
    kube: KubeArgs,
    /// Address of the admin listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9091", env = "SLOTGATE_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// Status writes per second at most; enforcement never waits on them.
    #[arg(long, default_value_t = 50)]
    status_writes_per_second: u32,
    /// How long a leader stays leader without renewing its Lease.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
}

/// Options of `slotgate gateway`.
#[derive(Args, Debug)]
struct GatewayArgs {
    /// Compiled configuration (JSON, from `slotgate compile`), re-read whenever it changes
    /// (with --config-source file).
    #[arg(long, env = "SLOTGATE_CONFIG", required_if_eq("config_source", "file"))]
    config: Option<PathBuf>,
    /// Where the configuration comes from: `file` (--config) or `kubernetes` (the objects
    /// `slotgate controller` writes, watched through the API with the pod's service account or
    /// the kubeconfig).
    #[arg(long, default_value = "file", value_parser = ["file", "kubernetes"])]
    config_source: String,
    #[command(flatten)]
    kube: KubeArgs,
    /// Upstream API, `http://host:port[/base]`.
    #[arg(long, env = "SLOTGATE_UPSTREAM")]
    upstream: String,
    /// Address of the proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SLOTGATE_LISTEN")]
    listen: SocketAddr,
    /// Address of the admin listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090", env = "SLOTGATE_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// Time to wait for the upstream's response headers before answering 504 (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Gateway-wide cap on requests in flight to the upstream, whatever the key (503 beyond).
    #[arg(long)]
    max_upstream_in_flight: Option<u32>,
    /// On shutdown, time left to requests in flight before connections are closed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// On SIGTERM, keep accepting requests this long with /readyz answering 503, so that the
    /// Service's endpoints drop this pod before its listener closes (e.g. 5s in Kubernetes).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    shutdown_delay: Duration,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    tasks: TaskArgs,
    #[command(flatten)]
    abuse: AbuseArgs,
    /// Access log, one JSON line per request: `stdout` or a file path. Off by default.
    #[arg(long, env = "SLOTGATE_ACCESS_LOG")]
    access_log: Option<String>,
    /// Webhook signing secrets: a YAML or JSON map of key id to secret (`default/acme: whsec_...`),
    /// read at start only; or a folder of one file per key named `<namespace>.<name>` (the
    /// Secrets the controller publishes, mounted), re-read every 5 s. Needed for tasks with a
    /// webhook.
    #[arg(long, env = "SLOTGATE_WEBHOOK_SECRETS")]
    webhook_secrets: Option<PathBuf>,
    /// Folder of the upstream targets' provider credentials, one file per ApiUpstream named after
    /// it (the Secret the controller writes, mounted). Re-read every 5 s. A target that injects a
    /// credential absent here answers 503 `target_unavailable`.
    #[arg(long, env = "SLOTGATE_TARGET_CREDENTIALS")]
    target_credentials: Option<PathBuf>,
}

/// Abuse protection options shared by `slotgate gateway` and `slotgate up`. Each plan's
/// `spec.abuse` says when its clients are banned; these are the gateway-wide parts.
#[derive(Args, Debug, Clone)]
struct AbuseArgs {
    /// Peers whose X-Forwarded-For / Forwarded headers name the client, as comma-separated CIDRs
    /// (your load balancer or ingress, e.g. 10.0.0.0/8). From any other peer the headers are
    /// ignored for bans.
    #[arg(long, default_value = "", env = "SLOTGATE_TRUSTED_PROXIES")]
    trusted_proxies: String,
    /// Client addresses never banned, as comma-separated CIDRs.
    #[arg(long, default_value = "", env = "SLOTGATE_BAN_ALLOWLIST")]
    ban_allowlist: String,
    /// Unknown or revoked keys from one address within --invalid-key-window that ban the address
    /// (someone guessing keys); 0 turns the guard off.
    #[arg(long, default_value_t = 20)]
    invalid_key_limit: u32,
    /// The window invalid keys are counted in.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    invalid_key_window: Duration,
    /// The first ban for invalid keys; each repeat within an hour doubles, up to
    /// --invalid-key-max-ban.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    invalid_key_ban: Duration,
    /// The longest ban for invalid keys.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    invalid_key_max_ban: Duration,
    /// Clients and keys the ban table tracks at once (its memory is about 104 bytes each, taken
    /// only as the table fills).
    #[arg(long, default_value_t = slotgate::gateway::DEFAULT_TRACKED)]
    ban_table_entries: usize,
}

impl AbuseArgs {
    fn options(&self) -> anyhow::Result<gateway::AbuseOptions> {
        let cidrs = |flag: &str, v: &str| -> anyhow::Result<slotgate::abuse::Cidrs> {
            v.parse().with_context(|| format!("--{flag}"))
        };
        let ms = |d: Duration| d.as_millis() as u64;
        Ok(gateway::AbuseOptions {
            trusted_proxies: cidrs("trusted-proxies", &self.trusted_proxies)?,
            allowlist: cidrs("ban-allowlist", &self.ban_allowlist)?,
            invalid_keys: (self.invalid_key_limit > 0).then(|| slotgate::abuse::Policy {
                threshold: self.invalid_key_limit,
                window_ms: ms(self.invalid_key_window).max(1),
                ban_ms: ms(self.invalid_key_ban).max(1),
                escalation_window_ms: 3_600_000,
                escalation_factor: 2,
                max_ban_ms: ms(self.invalid_key_max_ban).max(ms(self.invalid_key_ban)),
            }),
            tracked: self.ban_table_entries.max(1),
        })
    }
}

/// Async task options shared by `slotgate gateway` and `slotgate up`.
#[derive(Args, Debug, Clone)]
struct TaskArgs {
    /// Folder of the durable task store; with it, the gateway serves the async task API
    /// (`POST /v1/tasks`). `slotgate up` defaults to `.slotgate/tasks-<port>` in the working
    /// directory.
    #[arg(long, env = "SLOTGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Let webhooks reach private, loopback and link-local addresses (refused by default, so a
    /// customer cannot point the gateway at the cluster's internals). `slotgate up` sets it.
    #[arg(long)]
    allow_private_webhooks: bool,
    /// Private address ranges webhooks may reach without --allow-private-webhooks, as
    /// comma-separated CIDRs (an in-cluster receiver's, e.g. 10.96.0.0/12); every other private,
    /// loopback and link-local address stays refused, the cloud's metadata address included.
    #[arg(long, default_value = "", env = "SLOTGATE_WEBHOOK_ALLOW_CIDRS")]
    webhook_allow_cidrs: String,
    /// Largest task payload accepted, in bytes (413 `payload_too_large` beyond).
    #[arg(long, default_value_t = 1 << 20)]
    max_task_payload_bytes: usize,
    /// PEM bundle of CAs that https webhook receivers may be signed by, beside the system's.
    #[arg(long, env = "SLOTGATE_WEBHOOK_CA")]
    webhook_ca: Option<PathBuf>,
    /// After a key's signing secret is rotated, how long webhooks still carry the old secret's
    /// signature beside the new one's (receivers switch in their own time).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    webhook_rotation_overlap: Duration,
    /// Where tasks live: `embedded` (a store on local disk under --data-dir, for one replica) or
    /// `redis` (the Redis of --state, shared by every replica: any replica serves, runs and
    /// delivers any task, and a dead replica's tasks are taken over).
    #[arg(long, default_value = "embedded", env = "SLOTGATE_TASK_STORE")]
    task_store: TaskStoreKind,
    /// With `--task-store redis`: how long a task a replica claimed may go without that replica's
    /// heartbeat before another replica takes it over (and runs it again if it was running).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    task_claim_timeout: Duration,
}

/// Where tasks live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TaskStoreKind {
    /// On local disk, for one replica.
    Embedded,
    /// In the shared Redis, for a fleet.
    Redis,
}

impl TaskArgs {
    /// The claim timeout when tasks live in Redis, checked against the state: `--task-store redis`
    /// needs `--state redis://...`.
    fn shared(&self, state: &StateArgs) -> anyhow::Result<Option<Duration>> {
        if self.task_store == TaskStoreKind::Embedded {
            return Ok(None);
        }
        anyhow::ensure!(
            state.state.starts_with("redis://"),
            "--task-store redis keeps tasks in the Redis of --state, but --state is {:?}; add --state redis://host:6379",
            state.state
        );
        anyhow::ensure!(
            self.task_claim_timeout >= Duration::from_secs(1),
            "--task-claim-timeout must be at least 1s (claims are renewed every third of it)"
        );
        Ok(Some(self.task_claim_timeout))
    }

    fn options(
        &self,
        dir: PathBuf,
        upstream: &Upstream,
        timeout: Duration,
    ) -> anyhow::Result<slotgate::tasks::TasksOptions> {
        let mut o = slotgate::tasks::TasksOptions::new(dir, upstream.to_string(), timeout);
        o.webhook_reach = slotgate::tasks::webhook::Reach {
            all_private: self.allow_private_webhooks,
            ranges: self
                .webhook_allow_cidrs
                .parse()
                .context("--webhook-allow-cidrs")?,
        };
        o.max_payload_bytes = self.max_task_payload_bytes;
        o.webhook_ca = self.webhook_ca.clone();
        o.webhook_rotation_overlap = self.webhook_rotation_overlap;
        Ok(o)
    }
}

/// Where the controller and the gateways meet in the cluster.
#[derive(Args, Debug)]
struct KubeArgs {
    /// Namespace of the configuration objects and reports (default: the pod's or kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// Name of the configuration the controller writes and the gateways read.
    #[arg(long, default_value = "slotgate-config", env = "SLOTGATE_CONFIG_NAME")]
    config_name: String,
    /// This replica's name in reports and leader election (default: the host name).
    #[arg(long, env = "POD_NAME")]
    replica_name: Option<String>,
}

impl KubeArgs {
    async fn connect(&self) -> anyhow::Result<(kube::Client, String, String)> {
        let config = kube::Config::infer().await.context(
            "cannot reach the Kubernetes API (no in-cluster service account and no usable kubeconfig)",
        )?;
        let client = slotgate::kube_client(config).context("cannot build a Kubernetes client")?;
        let ns = self
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let replica = self.replica_name.clone().unwrap_or_else(slotgate::host_name);
        Ok((client, ns, replica))
    }
}

/// Where slots and rate buckets live.
#[derive(Args, Debug)]
struct StateArgs {
    /// `memory` (one replica; the default) or `redis://[:password@]host:port[/db]`: slots and rate
    /// buckets shared by every gateway replica using that Redis.
    #[arg(long, default_value = "memory", env = "SLOTGATE_STATE")]
    state: String,
    /// While Redis is unreachable or slower than --state-timeout: `local` (each replica enforces
    /// the limits divided by the live replicas) or `fail-closed` (503 limiter_unavailable).
    #[arg(long, default_value = "local", env = "SLOTGATE_STATE_FALLBACK")]
    state_fallback: gateway::Fallback,
    /// Longest wait for Redis to admit a request before the fallback applies.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    state_timeout: Duration,
    /// Life of a slot lease without renewal: a crashed replica's slots come back within it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    state_lease_ttl: Duration,
    /// Prefix of every Redis key (several fleets can share one Redis).
    #[arg(long, default_value = "slotgate", env = "SLOTGATE_STATE_PREFIX")]
    state_prefix: String,
    /// Gateway replicas assumed until Redis has reported how many are live (for the fallback).
    #[arg(long, default_value_t = 1, env = "SLOTGATE_REPLICAS")]
    replicas: u32,
}

impl StateArgs {
    fn options(self) -> anyhow::Result<gateway::StateOptions> {
        let shared = match self.state.as_str() {
            "memory" => None,
            url if url.starts_with("redis://") => Some(slotgate::limiter::SharedOptions {
                url: self.state,
                prefix: self.state_prefix,
                lease_ttl: self.state_lease_ttl,
                timeout: self.state_timeout,
                replicas_hint: self.replicas,
            }),
            other => anyhow::bail!(
                "--state {}: expected `memory` or a URL like redis://127.0.0.1:6379",
                slotgate::limiter::shared::redact_url(other)
            ),
        };
        anyhow::ensure!(
            self.state_lease_ttl >= Duration::from_millis(300),
            "--state-lease-ttl must be at least 300ms (leases are renewed every third of it)"
        );
        Ok(gateway::StateOptions {
            shared,
            fallback: self.state_fallback,
        })
    }
}

/// Parses `250ms`, `30s`, `2m` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 30s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration like 250ms, 30s or 2m"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime does the same work without cross-thread wake-ups.
    let mut b = match worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(b.enable_all().build()?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLOTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: piped into a file, `kubectl logs` or a collector, escape codes
    // are noise (NO_COLOR turns them off on a terminal too).
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if std::env::var("SLOTGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: no new connections; waiting for requests in flight");
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let upstream: Upstream = args.upstream.parse()?;
    let shared_tasks = args
        .tasks
        .shared(&args.state)?
        .map(|claim| (args.state.state.clone(), args.state.state_prefix.clone(), claim));
    let gw = Gateway::new(GatewayOptions {
        upstream: upstream.clone(),
        upstream_timeout: args.upstream_timeout,
        max_upstream_in_flight: args.max_upstream_in_flight,
        state: args.state.options()?,
        abuse: args.abuse.options()?,
        access_log: args
            .access_log
            .as_deref()
            .map(|t| t.parse().expect("any text is a target")),
    })
    .await?;
    if let Some(dir) = &args.target_credentials {
        // Read once before serving, so the first requests find their credentials. A folder not
        // there yet (an optional Secret volume) is not fatal: targets that need a credential
        // answer 503 until it appears.
        match gateway::source::read_credentials(dir) {
            Ok(credentials) => gw.set_target_credentials(credentials),
            Err(e) => tracing::warn!(error = %e, "--target-credentials: none read yet"),
        }
        tokio::spawn(gateway::source::poll_credentials(
            Arc::clone(&gw),
            dir.clone(),
            Duration::from_secs(5),
        ));
    }
    if args.tasks.data_dir.is_some() || shared_tasks.is_some() {
        let secrets: std::collections::BTreeMap<String, String> = match &args.webhook_secrets {
            // The Secrets the controller publishes, mounted: re-read as they change.
            Some(path) if path.is_dir() => gateway::source::read_webhook_secrets(path)
                .with_context(|| format!("--webhook-secrets {}", path.display()))?,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --webhook-secrets {}", path.display()))?;
                serde_yaml::from_str(&text).with_context(|| {
                    format!(
                        "--webhook-secrets {}: expected a map of key id to whsec_ secret",
                        path.display()
                    )
                })?
            }
            None => Default::default(),
        };
        let dir = args.tasks.data_dir.clone().unwrap_or_default();
        let options = args
            .tasks
            .options(dir.clone(), &upstream, args.upstream_timeout)?;
        let tasks = match &shared_tasks {
            Some((url, prefix, claim)) => {
                slotgate::tasks::Tasks::open_shared(options, url, prefix, *claim, gw.metrics.tasks.clone())?
            }
            None => slotgate::tasks::Tasks::open(options, gw.metrics.tasks.clone())?,
        };
        let bad = tasks.set_webhook_secrets(&secrets);
        if !bad.is_empty() {
            anyhow::bail!(
                "--webhook-secrets: the secrets of {} are not whsec_ followed by base64",
                bad.join(", ")
            );
        }
        if let Some(path) = args.webhook_secrets.as_ref().filter(|p| p.is_dir()) {
            tokio::spawn(gateway::source::poll_webhook_secrets(
                Arc::clone(&tasks),
                path.clone(),
                Duration::from_secs(5),
            ));
        }
        let picked = gw.enable_tasks(tasks)?;
        match &shared_tasks {
            Some((url, ..)) => tracing::info!(
                store = %slotgate::limiter::shared::redact_url(url),
                "async tasks enabled, shared by the replicas on this Redis"
            ),
            None => tracing::info!(data_dir = %dir.display(), resumed = picked, "async tasks enabled"),
        }
    }
    let source: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match &args.config {
        Some(path) if args.config_source == "file" => {
            Box::pin(gateway::source::FileSource::open(Arc::clone(&gw), path.clone())?.run())
        }
        _ => {
            let (client, namespace, replica) = args.kube.connect().await?;
            tracing::info!(
                namespace,
                name = args.kube.config_name,
                replica,
                "configuration from the Kubernetes API"
            );
            Box::pin(gateway::kube_source::run(
                Arc::clone(&gw),
                client,
                gateway::kube_source::KubeSourceOptions {
                    namespace,
                    name: args.kube.config_name.clone(),
                    replica,
                    report_every: Duration::from_secs(5),
                },
            ))
        }
    };
    let proxy = bind(args.listen, "--listen").await?;
    let admin = bind(args.admin_listen, "--admin-listen").await?;
    let listening = Listening {
        proxy: proxy.local_addr()?,
        admin: admin.local_addr()?,
    };
    // One machine-readable line on stdout: tests and scripts that pass port 0 read it.
    println!(
        "slotgate gateway listening on http://{} (admin http://{})",
        listening.proxy, listening.admin
    );
    tracing::info!(proxy = %listening.proxy, admin = %listening.admin, upstream = %args.upstream, "gateway started");

    let watcher = tokio::spawn(source);
    let draining = Arc::clone(&gw);
    let delay = args.shutdown_delay;
    let shutdown = async move {
        shutdown_signal().await;
        draining.drain();
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: /readyz answers 503; still serving until the delay ends");
            tokio::time::sleep(delay).await;
        }
    };
    gateway::run(gw, proxy, admin, shutdown, args.shutdown_timeout).await;
    watcher.abort();
    Ok(())
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let (client, namespace, identity) = args.kube.connect().await?;
    let metrics = Arc::new(slotgate::controller::ControllerMetrics::new());
    let admin = bind(args.admin_listen, "--admin-listen").await?;
    println!(
        "slotgate controller listening on http://{} (admin; replica {identity}, namespace {namespace})",
        admin.local_addr()?
    );
    let admin_metrics = Arc::clone(&metrics);
    tokio::spawn(gateway::serve(
        admin,
        move |_| hyper_util::service::TowerToHyperService::new(controller_admin(Arc::clone(&admin_metrics))),
        std::future::pending(),
        Duration::ZERO,
    ));
    slotgate::controller::run(
        client,
        slotgate::controller::ControllerOptions {
            namespace,
            config_name: args.kube.config_name,
            identity,
            status_writes_per_second: args.status_writes_per_second,
            lease_duration: args.lease_duration,
        },
        metrics,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// The controller's admin endpoints: `/healthz`, `/readyz` (the process is up; a follower is
/// ready too, it only waits to lead) and `/metrics`.
fn controller_admin(
    metrics: Arc<slotgate::controller::ControllerMetrics>,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<ProxyBody>,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<http::Response<ProxyBody>, std::convert::Infallible>>,
> + Clone {
    use http_body_util::BodyExt;
    tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (status, body) = match req.uri().path() {
            "/healthz" | "/readyz" => (200, "ok\n".to_string()),
            "/metrics" => (200, metrics.render()),
            _ => (404, "not found\n".to_string()),
        };
        let body = http_body_util::Full::new(bytes::Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut res = http::Response::new(body);
        *res.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        std::future::ready(Ok(res))
    })
}

async fn run_demo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(listen, "--listen").await?;
    println!(
        "slotgate demo upstream listening on http://{}",
        listener.local_addr()?
    );
    gateway::serve(
        listener,
        |_| hyper_util::service::TowerToHyperService::new(slotgate::demo::DemoUpstream),
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    // One line naming what is wrong, with its causes; never a backtrace for a bad flag or file.
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our error messages already name their cause; add only causes not yet said.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Controller(args) => {
            purge_freed_memory_at_once();
            init_tracing();
            small_pages_only();
            runtime(None)?.block_on(run_controller(args))?;
        }
        Command::Gateway(args) => {
            init_tracing();
            small_pages_only();
            runtime(args.worker_threads)?.block_on(run_gateway(args))?;
        }
        Command::Up {
            dir,
            listen,
            admin_listen,
            upstream,
            upstream_timeout,
            shutdown_timeout,
            state,
            tasks,
            abuse,
            access_log,
        } => {
            init_tracing();
            let shared_tasks = tasks.shared(&state)?;
            let state = state.options()?;
            let abuse = abuse.options()?;
            let upstream = upstream.map(|u| u.parse::<Upstream>()).transpose()?;
            let opts = slotgate::up::UpOptions {
                dir,
                listen,
                admin_listen,
                upstream,
                upstream_timeout,
                shutdown_timeout,
                state,
                abuse,
                access_log: access_log
                    .as_deref()
                    .map(|t| t.parse().expect("any text is a target")),
                data_dir: tasks.data_dir.clone(),
                max_task_payload_bytes: tasks.max_task_payload_bytes,
                webhook_ca: tasks.webhook_ca.clone(),
                shared_tasks,
            };
            runtime(None)?.block_on(slotgate::up::run(opts, shutdown_signal()))?;
        }
        Command::Load {
            url,
            key,
            concurrency,
            requests,
            duration,
            retries,
            adaptive,
            json,
            tasks,
        } => {
            if let Some(n) = tasks.tasks {
                let url = if url.trim_end_matches('/').matches('/').count() <= 2 {
                    format!("{}/v1/tasks", url.trim_end_matches('/'))
                } else {
                    url
                };
                let url: http::Uri = url
                    .parse()
                    .map_err(|_| slotgate::load::LoadError::Url(url.clone()))?;
                let payload: serde_json::Value = serde_json::from_str(&tasks.payload)
                    .map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?;
                let opts = slotgate::load::tasks::TaskLoadOptions {
                    url,
                    key,
                    tasks: n,
                    concurrency,
                    task_type: tasks.task_type,
                    payload,
                    webhook_listen: tasks.webhook_listen,
                    webhook_secret: tasks.webhook_secret,
                    retries,
                    wait: tasks.wait,
                    progress: true,
                };
                let summary = runtime(None)?.block_on(slotgate::load::tasks::run(opts))?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    print!("{}", summary.render());
                }
                if summary.lost > 0 || summary.bad_signatures > 0 {
                    std::process::exit(1);
                }
                return Ok(());
            }
            let url: http::Uri = url
                .parse()
                .map_err(|_| slotgate::load::LoadError::Url(url.clone()))?;
            let opts = slotgate::load::LoadOptions {
                url,
                key,
                concurrency,
                requests,
                duration,
                retries,
                adaptive,
                progress: true,
            };
            let summary = runtime(None)?.block_on(slotgate::load::run(opts))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.render());
            }
        }
        Command::DemoUpstream {
            listen,
            worker_threads,
        } => {
            init_tracing();
            runtime(worker_threads)?.block_on(run_demo(listen))?;
        }
        Command::Crds => print!("{}", slotgate::api::crds_yaml()),
        Command::Compile { dir, output } => {
            let folder = slotgate::standalone::load_dir(&dir)?;
            for skipped in &folder.skipped {
                eprintln!(
                    "warning: skipped {skipped}: not an ApiPlan, ApiKey, ApiTaskType, ApiUpstream, Secret or ConfigMap"
                );
            }
            let compiled = folder.compile(None);
            for (id, report) in &compiled.keys {
                if let Some(c) = report.conditions.iter().find(|c| !c.status) {
                    eprintln!(
                        "warning: ApiKey {id}: {}=False {}: {}",
                        c.type_, c.reason, c.message
                    );
                }
            }
            let json = compiled.config.to_json();
            if output.as_os_str() == "-" {
                println!("{}", String::from_utf8_lossy(&json));
            } else {
                std::fs::write(&output, json).with_context(|| format!("writing {}", output.display()))?;
            }
        }
    }
    Ok(())
}
