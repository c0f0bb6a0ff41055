//! The `slotgate` binary: one CLI for every role.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use slotgate::gateway::{self, Gateway, GatewayOptions, GatewayService, Listening, Upstream};
use tokio::net::TcpListener;

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
    /// Run the gateway: a reverse proxy enforcing a configuration file it watches.
    Gateway(GatewayArgs),
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

/// Options of `slotgate gateway`.
#[derive(Args, Debug)]
struct GatewayArgs {
    /// Compiled configuration (JSON, from `slotgate compile`), re-read whenever it changes.
    #[arg(long, env = "SLOTGATE_CONFIG")]
    config: PathBuf,
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
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
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
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let gw = Gateway::new(GatewayOptions {
        upstream,
        upstream_timeout: args.upstream_timeout,
        max_upstream_in_flight: args.max_upstream_in_flight,
    });
    match gateway::source::load_file(&gw, &args.config) {
        Ok(r) => {
            tracing::info!(config = %args.config.display(), version = r.to_version, keys = r.keys, "configuration loaded")
        }
        // Not fatal: the gateway stays unready (503 on /readyz) until a good file appears.
        Err(e) => {
            tracing::error!(error = %e, "no configuration yet; /readyz answers 503 until a valid one is written")
        }
    }
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

    let watcher = tokio::spawn(gateway::source::watch_file(Arc::clone(&gw), args.config.clone()));
    let sweeper = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                gw.sweep();
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_gw = Arc::clone(&gw);
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(gateway::serve(
        admin,
        move |_| gateway::admin_service(Arc::clone(&admin_gw)),
        async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        },
        Duration::from_secs(1),
    ));
    let proxy_gw = Arc::clone(&gw);
    gateway::serve(
        proxy,
        move |remote| GatewayService {
            gateway: Arc::clone(&proxy_gw),
            remote: Some(remote),
        },
        shutdown_signal(),
        args.shutdown_timeout,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    watcher.abort();
    sweeper.abort();
    Ok(())
}

async fn run_demo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(listen, "--listen").await?;
    println!(
        "slotgate demo upstream listening on http://{}",
        listener.local_addr()?
    );
    gateway::serve(
        listener,
        |_| slotgate::demo::DemoUpstream,
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Gateway(args) => {
            init_tracing();
            runtime(args.worker_threads)?.block_on(run_gateway(args))?;
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
                eprintln!("warning: skipped {skipped}: not an ApiPlan, ApiKey or Secret");
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
