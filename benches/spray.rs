//! A spray of requests from many loopback source addresses (127.0.0.0/8 holds 16 million), one
//! connection each, with heavy hitters among them: what `benches/abuse.sh` runs against a
//! gateway to measure the ban table under a distributed attack. Run by hand, through the script:
//!
//! ```text
//! spray ADDR SOURCES HEAVY PER_HEAVY [CONCURRENCY]
//! ```
//!
//! Every source sends one request with an unknown key; each of the HEAVY sources (127.0.0.2
//! onwards) sends PER_HEAVY, spread over the run. Prints one JSON line: requests, seconds, and
//! the answers by status.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // `cargo test --all-targets` runs this without arguments: nothing to do.
    let [addr, sources, heavy, per_heavy, rest @ ..] = args.as_slice() else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("ADDR such as 127.0.0.1:8080");
    let sources: u32 = sources.parse().expect("SOURCES");
    let heavy: u32 = heavy.parse().expect("HEAVY");
    let per_heavy: u32 = per_heavy.parse().expect("PER_HEAVY");
    let concurrency: u32 = rest.first().map_or(256, |c| c.parse().expect("CONCURRENCY"));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(addr, sources, heavy, per_heavy, concurrency));
}

/// The source address of spray request `n`: 127.1.0.0 onwards (127.0.x.x are the heavy hitters),
/// a new one for each request.
fn sprayer(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7f01_0000 + n)
}

async fn run(addr: SocketAddr, sources: u32, heavy: u32, per_heavy: u32, concurrency: u32) {
    let total = u64::from(sources) + u64::from(heavy) * u64::from(per_heavy);
    let next = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, statuses) = (Arc::clone(&next), Arc::clone(&statuses));
            tokio::spawn(async move {
                let mut seen = BTreeMap::<String, u64>::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    // The heavy hitters' requests are spread evenly through the spray.
                    let heavy_total = u64::from(heavy) * u64::from(per_heavy);
                    let every = (total / heavy_total.max(1)).max(1);
                    let source = if heavy_total > 0 && i % every == 0 && i / every < heavy_total {
                        Ipv4Addr::from(0x7f00_0002 + ((i / every) % u64::from(heavy)) as u32)
                    } else {
                        sprayer(i as u32)
                    };
                    let status = request(addr, source, i).await;
                    *seen.entry(status).or_default() += 1;
                }
                let mut all = statuses.lock().unwrap();
                for (k, v) in seen {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let statuses = statuses.lock().unwrap();
    println!(
        "{{\"requests\": {total}, \"seconds\": {secs:.1}, \"statuses\": {}}}",
        serde_json::to_string(&*statuses).unwrap()
    );
}

/// One request on its own connection from `source`; the answer's status and code.
async fn request(addr: SocketAddr, source: Ipv4Addr, i: u64) -> String {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let mut stream = socket.connect(addr).await?;
        let req = format!(
            "GET /v1/work HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer guess-{i}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match attempt.await {
        Ok(buf) => {
            let text = String::from_utf8_lossy(&buf);
            let status = text.get(9..12).unwrap_or("???").to_string();
            let code = text
                .split("\"code\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("");
            format!("{status} {code}")
        }
        Err(e) => format!("error {}", e.kind()),
    }
}
