//! The gateway's HTTP/1.1 exchange with the upstream, against an upstream scripted byte by byte:
//! the framings of RFC 9112, upstreams that close kept-alive connections, answer early, or send
//! garbage. The real binary, real sockets on loopback.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TOKEN: &str = "tok-k";

/// What the scripted upstream does with one request.
enum Reply {
    /// Send these bytes and keep the connection for the next request.
    Keep(Vec<u8>),
    /// Send these bytes and close the connection (no `Connection: close` unless in the bytes).
    Close(Vec<u8>),
    /// Send these bytes without reading the request body, then read and discard until the
    /// gateway closes (a lingering close, so the answer is not lost to a reset).
    Early(Vec<u8>),
}

/// An upstream that reads request heads and answers each by `script(request head)`.
struct Scripted {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(script: fn(&str) -> Reply) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(conn, script));
            }
        });
        Scripted { addr, accepted, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(mut conn: TcpStream, script: fn(&str) -> Reply) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        // Bodies are skipped by length; the scripts here only get them with `Early`.
        match script(&head) {
            Reply::Keep(bytes) => {
                if conn.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Close(bytes) => {
                let _ = conn.write_all(&bytes).await;
                return;
            }
            Reply::Early(bytes) => {
                let _ = conn.write_all(&bytes).await;
                let _ = conn.shutdown().await;
                let mut sink = [0; 65536];
                while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
        }
    }
}

fn path_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

async fn request(gw: &Proc, method: Method, path: &str, body: Bytes) -> Got {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(gw.url(path))
        .header("x-api-key", TOKEN)
        .body(Full::new(body))
        .unwrap();
    // A hang guard, not a timing assertion.
    let (parts, body) = tokio::time::timeout(Duration::from_secs(60), async {
        let res = client.request(req).await.expect("an answer");
        let (parts, body) = res.into_parts();
        (parts, body.collect().await.map(|b| b.to_bytes()))
    })
    .await
    .expect("answered within 60 s");
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
    }
}

fn gateway(upstream: &Scripted) -> (ConfigDir, Proc) {
    let cfg = ConfigDir::new(&(slots_plan("p", 5) + &key_yaml("k", "p", "")));
    let gw = Proc::gateway(&cfg.config, &upstream.url(), &[]);
    (cfg, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_client_whole() {
    let upstream = Scripted::start(|head| match path_of(head) {
        "/v1/length" => Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-up: 1\r\n\r\nhello".to_vec()),
        "/v1/chunked" => Reply::Keep(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
                .to_vec(),
        ),
        "/v1/interim" => Reply::Keep(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        ),
        "/v1/no-content" => Reply::Keep(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
        "/v1/head" => Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n".to_vec()),
        "/v1/until-close" => Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec()),
        _ => Reply::Keep(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()),
    })
    .await;
    let (_cfg, gw) = gateway(&upstream);

    let got = request(&gw, Method::GET, "/v1/length", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "hello"));
    assert_eq!(got.header("x-up"), Some("1"));
    assert_eq!(got.header("x-concurrent-limit"), Some("5"));

    let got = request(&gw, Method::GET, "/v1/chunked", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "hello, world"));

    let got = request(&gw, Method::GET, "/v1/interim", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::CREATED, "ok"));
    assert_eq!(got.header("link"), None, "the 103's fields are not the answer's");

    let got = request(&gw, Method::GET, "/v1/no-content", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::NO_CONTENT, ""));

    // A HEAD answer announces a length and sends no body; the next answer on the same
    // connection is not mistaken for it.
    let got = request(&gw, Method::HEAD, "/v1/head", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, ""));
    assert_eq!(got.header("content-length"), Some("1234"));
    let got = request(&gw, Method::GET, "/v1/length", Bytes::new()).await;
    assert_eq!(got.body, "hello");
    assert_eq!(
        upstream.accepted.load(Ordering::SeqCst),
        1,
        "all of the above on one connection"
    );

    // No length: the body ends when the upstream closes, and that connection is not reused.
    let got = request(&gw, Method::GET, "/v1/until-close", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "until the end"));
    let got = request(&gw, Method::GET, "/v1/length", Bytes::new()).await;
    assert_eq!(got.body, "hello");
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_kept_alive_connections_fails_no_request() {
    // Answers as if it would keep the connection, then closes it: what an upstream whose
    // keep-alive timeout just ran out does.
    let upstream =
        Scripted::start(|_| Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())).await;
    let (_cfg, gw) = gateway(&upstream);
    for i in 0..30 {
        let method = if i % 2 == 0 { Method::GET } else { Method::DELETE };
        let got = request(&gw, method, "/v1/a", Bytes::new()).await;
        assert_eq!(
            (got.status, got.body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_is_forwarded_without_waiting_for_the_whole_upload() {
    let upstream = Scripted::start(|head| {
        if head.starts_with("POST") {
            Reply::Early(
                b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!"
                    .to_vec(),
            )
        } else {
            Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        }
    })
    .await;
    let (_cfg, gw) = gateway(&upstream);
    // A raw client announces 16 MiB, sends 64 KiB and then only listens: the answer must come
    // while most of the upload has not even been sent.
    let mut client = TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "POST /v1/upload HTTP/1.1\r\nhost: x\r\nx-api-key: {TOKEN}\r\ncontent-length: {}\r\n\r\n",
        16 * 1024 * 1024
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&vec![7u8; 64 * 1024]).await.unwrap();
    let mut answer = Vec::new();
    // A hang guard, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut chunk = [0; 4096];
        while !String::from_utf8_lossy(&answer).contains("too big!") {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("answered before the upload finished");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(answer.contains("x-concurrent-limit: 5"), "{answer}");
    assert!(answer.ends_with("too big!"), "{answer}");
    // That connection was not reused: the next request gets a fresh one and its answer.
    let got = request(&gw, Method::GET, "/v1/a", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_speaking_something_else_gets_a_502_that_says_so() {
    let upstream = Scripted::start(|head| match path_of(head) {
        "/v1/garbage" => Reply::Close(b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        "/v1/cut" => Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part".to_vec()),
        _ => Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
    })
    .await;
    let (_cfg, gw) = gateway(&upstream);
    let got = request(&gw, Method::GET, "/v1/garbage", Bytes::new()).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.code(), "upstream_unavailable");
    assert!(
        got.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid response"),
        "{}",
        got.body
    );
    // A body cut short by the upstream is cut short for the client too: never padded or
    // passed off as whole.
    let cut = Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>()
        .request(
            Request::get(gw.url("/v1/cut"))
                .header("x-api-key", TOKEN)
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    // Either the head never made it out before the connection was cut, or the body ends in an
    // error; never a whole-looking body.
    if let Ok(res) = cut {
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.into_body().collect().await.is_err(),
            "a truncated body must end in an error"
        );
    }
    let got = request(&gw, Method::GET, "/v1/fine", Bytes::new()).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ok"));
    gw.wait_metric("slotgate_in_flight{plan=\"p\"}", |v| v == 0.0)
        .await;
}
