//! The floor for the load benchmark: a hyper reverse proxy with no limits, built the same way as
//! `slotgate gateway` (same client, same accept loop), so the difference between the two is the
//! cost of slotgate's work per request.
//!
//! Run by `benches/load.sh`: `bare_proxy LISTEN UPSTREAM [WORKER_THREADS]`. Under `cargo bench`
//! without arguments it does nothing.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

// The gateway's allocator (src/main.rs), so that the difference stays slotgate's own work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [listen, upstream, rest @ ..] = args.as_slice() else {
        return;
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN address");
    let upstream: Uri = upstream.parse().expect("UPSTREAM url");
    let threads: usize = rest.first().and_then(|t| t.parse().ok()).unwrap_or(1);
    // Same runtime choice as `slotgate gateway --worker-threads`.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(listen, upstream));
}

async fn run(listen: SocketAddr, upstream: Uri) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build(connector);
    let listener = TcpListener::bind(listen).await.unwrap();
    println!(
        "bare proxy listening on http://{}",
        listener.local_addr().unwrap()
    );
    let authority = upstream.authority().unwrap().clone();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        let svc = tower::service_fn(move |req: Request<Incoming>| {
            let client = client.clone();
            let authority = authority.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                let pq = parts.uri.path_and_query().cloned();
                parts.uri = Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(pq.unwrap_or_else(|| "/".parse().unwrap()))
                    .build()
                    .unwrap();
                parts.headers.remove(http::header::HOST);
                let res: Response<Body> = match client.request(Request::from_parts(parts, body)).await {
                    Ok(res) => res.map(|b| b.map_err(|e| Box::new(e) as _).boxed_unsync()),
                    Err(_) => {
                        let mut r = Response::new(
                            Full::new(bytes::Bytes::new())
                                .map_err(|n| match n {})
                                .boxed_unsync(),
                        );
                        *r.status_mut() = StatusCode::BAD_GATEWAY;
                        r
                    }
                };
                Ok::<_, Infallible>(res)
            }
        });
        tokio::spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await;
        });
    }
}
