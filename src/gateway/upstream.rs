//! Keep-alive HTTP/1.1 connections to the upstream.
//!
//! A connection is leased for one request and comes back to the idle list only when the
//! response body has been read to its end (the `Held` body owns the lease), so a connection
//! whose response was abandoned halfway is closed rather than reused. This does less per request
//! than hyper-util's general-purpose pool, which the proxy does not need: one upstream, one
//! protocol.

use std::sync::{Arc, Mutex};

use http::{Request, Response, uri::Authority};
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections kept per gateway; beyond this a finished connection is closed.
const MAX_IDLE: usize = 1024;

/// Connections to one upstream.
#[derive(Debug)]
pub(super) struct Pool {
    authority: Authority,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

/// A connection on loan for one request.
#[derive(Debug)]
pub(super) struct Lease {
    pool: Arc<Pool>,
    sender: SendRequest<Incoming>,
}

impl Lease {
    /// The response was read to its end: the connection may serve another request.
    pub(super) fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(self.sender);
        }
    }
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// No connection could be opened.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        /// The upstream.
        authority: Authority,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl Pool {
    pub(super) fn new(authority: Authority) -> Arc<Self> {
        Arc::new(Self {
            authority,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, SendError> {
        let stream = TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|source| SendError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends a request (origin-form URI, `Host` set) on an idle connection or a new one. A
    /// request that a stale keep-alive connection refused before sending anything is sent again
    /// on a fresh connection; nothing is ever sent twice.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) => (s, true),
                // Boxed: the handshake's state is large and needed only for a new connection,
                // and every request's future (moved once into its box) would otherwise carry it.
                None => (Box::pin(self.connect()).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(SendError::Connect {
                    authority: self.authority.clone(),
                    source: std::io::Error::other("connection closed before the request was sent"),
                });
            }
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let lease = Lease {
                        pool: Arc::clone(self),
                        sender,
                    };
                    return Ok((res, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }
}
