//! Accept loop shared by the proxy and admin listeners: HTTP/1.1 and HTTP/2, graceful shutdown.

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;

use super::body::ProxyBody;

/// Addresses a gateway listens on (port 0 resolved), printed at start so callers can connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// The proxy listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

/// Serves connections from `listener` with a service made per connection, until `shutdown`
/// resolves; then stops accepting and lets requests in flight finish for up to `grace`. A
/// `tower::Service` is served through `hyper_util::service::TowerToHyperService`.
pub async fn serve<S, F>(
    listener: TcpListener,
    make_service: F,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder
                    .serve_connection(TokioIo::new(stream), make_service(remote))
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period over; closing remaining connections"
        );
    }
}

/// Runs a gateway on its two listeners until `shutdown` resolves: the proxy (graceful, requests
/// in flight get up to `grace`), the admin endpoints, and the periodic sweep of idle buckets.
pub async fn run(
    gateway: std::sync::Arc<super::Gateway>,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    use std::sync::Arc;
    let sweeper = {
        let gw = Arc::clone(&gateway);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                // A pass over every key: at a million keys, tens of milliseconds that requests on
                // this thread would wait for.
                let gw = Arc::clone(&gw);
                if super::off_the_serving_threads(move || gw.sweep()).await.is_none() {
                    return;
                }
            }
        })
    };
    // Bans end on their own; this keeps the gauges true and forgets old records (a pass over a
    // table of fixed size, a millisecond at most).
    let ban_sweeper = {
        let gw = Arc::clone(&gateway);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                gw.sweep_bans();
            }
        })
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let leaving = Arc::clone(&gateway);
    let admin_gw = Arc::clone(&gateway);
    let admin_task = tokio::spawn(serve(
        admin,
        move |_| super::admin_service(Arc::clone(&admin_gw)),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
        Duration::from_secs(1),
    ));
    serve(
        proxy,
        move |remote| super::GatewayService::new(Arc::clone(&gateway), Some(remote)),
        shutdown,
        grace,
    )
    .await;
    // Requests in flight have finished: send their releases and leave the replica set, so the
    // other replicas' share of each limit grows at once if Redis goes away later.
    // Tasks this replica claimed but has not started go back to the fleet at once, instead of
    // after the claim timeout.
    if let Some(tasks) = leaving.tasks() {
        tasks.leave().await;
    }
    if let Some(shared) = leaving.shared() {
        shared.leave().await;
    }
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    sweeper.abort();
    ban_sweeper.abort();
}
