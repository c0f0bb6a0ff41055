//! The request path: authenticate, admit, forward, and answer with the limit headers.

// The `Err` of the request path's steps is the response itself (an `Answer`), returned at once.
// Boxing it would put an allocation on the refusal path, which must stay cheap under a flood.
#![allow(clippy::result_large_err)]

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use http::{
    HeaderValue, Method, Request, Response, StatusCode, Uri, header,
    request::Parts,
    uri::{Authority, Scheme},
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::limiter::{SharedDecision, SharedLimiter};

use super::{
    Fallback, Gateway,
    body::{BoxError, Held, Hold, ProxyBody},
    head::RequestHead,
    headers::{
        self, Added, error_response, forward_fields, limit_headers, presented_key, retry_after, strip_apikey,
        strip_hop_by_hop,
    },
    metrics::ErrorCode,
    table::{self, Refusal},
    targets::{Target, TargetRefusal},
    upstream::{self, SendError},
};

// The upstream client leaves room in each response's header map for the limit headers.
const _: () = assert!(headers::LIMIT_HEADERS <= upstream::RESPONSE_ROOM);

/// Where the gateway forwards requests: `http://host:port[/base/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    authority: Authority,
    base_path: String,
}

/// Why an upstream URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Not a URL.
    #[error("upstream {0:?} is not a URL like http://127.0.0.1:8000")]
    Invalid(String),
    /// A scheme the gateway cannot speak.
    #[error(
        "upstream {0:?}: only http:// upstreams are supported (terminate TLS in front of slotgate, and reach the upstream over the cluster network)"
    )]
    Scheme(String),
}

impl FromStr for Upstream {
    type Err = UpstreamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s.parse().map_err(|_| UpstreamError::Invalid(s.to_string()))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(UpstreamError::Scheme(s.to_string()));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::Invalid(s.to_string()))?;
        Ok(Self {
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

impl Upstream {
    /// The authority requests are sent to.
    pub(super) fn authority(&self) -> &Authority {
        &self.authority
    }

    fn request_head(&self, method: &Method, uri: &Uri) -> RequestHead {
        request_head(&self.base_path, method, uri)
    }
}

/// Starts the upstream request: its target is the base path, the request's path, and the query
/// without its `apikey` parameter.
pub(super) fn request_head(base_path: &str, method: &Method, uri: &Uri) -> RequestHead {
    {
        let path = match uri.path() {
            "" => "/",
            p => p,
        };
        let stripped;
        let query = match uri.query() {
            Some(q) if q.contains("apikey") => {
                stripped = strip_apikey(q);
                stripped.as_deref()
            }
            q => q,
        };
        let (mark, query) = query.map_or(("", ""), |q| ("?", q));
        RequestHead::new(method, &[base_path, path, mark, query])
    }
}

pub(super) fn refused(refusal: Refusal) -> Response<ProxyBody> {
    match refusal {
        Refusal::Concurrency {
            slots,
            rate,
            retry_after: secs,
        } => {
            let mut res = error_response(
                ErrorCode::ConcurrencyLimitExceeded,
                &format!(
                    "All {} concurrent request slots of this key are in use. Retry when one of your requests completes (about {secs} s), or upgrade the plan for more slots.",
                    slots.limit
                ),
                Some(u64::from(slots.limit)),
            );
            limit_headers(res.headers_mut(), Some(slots), rate);
            retry_after(res.headers_mut(), secs);
            res
        }
        Refusal::Rate {
            slots,
            rate,
            retry_after: secs,
            ..
        } => {
            let mut res = error_response(
                ErrorCode::RateLimit,
                &format!(
                    "Rate limit of {} requests per second (burst {}) reached. Retry after {secs} s.",
                    rate.per_second, rate.burst
                ),
                Some(u64::from(rate.per_second)),
            );
            limit_headers(res.headers_mut(), slots, Some(rate));
            retry_after(res.headers_mut(), secs);
            res
        }
        Refusal::Unavailable => {
            let mut res = error_response(
                ErrorCode::LimiterUnavailable,
                "The limiter's shared state is unavailable, so this request cannot be admitted safely. Retry shortly.",
                None,
            );
            retry_after(res.headers_mut(), 1);
            res
        }
        Refusal::Target {
            code,
            limit,
            retry_after: secs,
            slots,
            rate,
        } => {
            let message = match code {
                ErrorCode::TargetConcurrencyLimitExceeded => format!(
                    "The upstream this path goes to is handling its maximum of {limit} requests at once, across all keys. Retry in a moment."
                ),
                ErrorCode::TargetRateLimit => format!(
                    "The upstream this path goes to takes at most {limit} requests per second, across all keys. Retry after {secs} s."
                ),
                _ => "The upstream this path goes to is not available right now. Retry later.".to_string(),
            };
            let mut res = error_response(code, &message, (limit > 0).then_some(u64::from(limit)));
            limit_headers(res.headers_mut(), slots, rate);
            retry_after(res.headers_mut(), secs);
            res
        }
        Refusal::Upstream { limit } => {
            let mut res = error_response(
                ErrorCode::UpstreamConcurrencyLimitExceeded,
                &format!(
                    "The service is handling its maximum of {limit} requests at once. Retry in a moment."
                ),
                Some(u64::from(limit)),
            );
            retry_after(res.headers_mut(), 1);
            res
        }
    }
}

/// A response and, when the gateway answered itself, why.
pub(super) type Answer = (Option<ErrorCode>, Response<ProxyBody>);

/// An admitted request, encoded for the upstream.
struct Forward {
    request: upstream::Prepared,
    hold: Hold,
    slots: Option<table::SlotView>,
    rate: Option<table::RateView>,
    /// The target the path routes to; `None`: the default upstream.
    target: Option<Arc<Target>>,
}

impl Gateway {
    /// Answers one request: authenticate, admit, forward.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client_ip: Option<HeaderValue>,
        client: Option<IpAddr>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let admitted = match self.shared_decision() {
            None => self.decide_locally(&parts, client),
            Some(shared) => self.decide_shared(&parts, shared, client).await,
        };
        let prepared = admitted.map(|a| self.prepare(&parts, body, a, client_ip));
        // The head is encoded: let the connection's read buffer go before the exchange.
        drop(parts);
        let answer = match prepared {
            Ok(forward) => self.forward(forward).await,
            Err(answer) => answer,
        };
        self.count(answer)
    }

    /// The request as a future. When the decision needs no I/O, everything up to the upstream
    /// exchange is done before the future is returned: a refusal is a ready value, not an async
    /// state machine, and a forwarded request's future holds only the exchange.
    fn respond(
        self: Arc<Self>,
        req: Request<Incoming>,
        client_ip: Option<HeaderValue>,
        peer: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>> {
        let client = self.client_of(&req, peer);
        let (parts, body) = req.into_parts();
        // A banned address is answered first, whatever the path: before a key is looked up in
        // the limiter, and long before the upstream.
        if let Some(answer) = self.address_ban(&parts, client) {
            return Box::pin(std::future::ready(Ok(self.count(answer))));
        }
        if self.tasks.get().is_some() && crate::tasks::api::is_task_path(parts.uri.path()) {
            let req = Request::from_parts(parts, body);
            return Box::pin(async move { Ok(self.handle_task(req, client).await) });
        }
        if self.shared_decision().is_some() {
            let req = Request::from_parts(parts, body);
            return Box::pin(async move { Ok(self.handle(req, client_ip, client).await) });
        }
        match self
            .decide_locally(&parts, client)
            .map(|a| self.prepare(&parts, body, a, client_ip))
        {
            Ok(forward) => Box::pin(async move {
                let answer = self.forward(forward).await;
                Ok(self.count(answer))
            }),
            Err(answer) => Box::pin(std::future::ready(Ok(self.count(answer)))),
        }
    }

    pub(super) fn count(&self, (code, res): Answer) -> Response<ProxyBody> {
        match code {
            Some(c) => self.metrics.answered(c),
            None => self.metrics.forwarded(res.status().as_u16()),
        }
        res
    }

    /// The shared limiter, when decisions go through it now.
    fn shared_decision(&self) -> Option<&SharedLimiter> {
        self.shared.as_deref().filter(|s| s.is_shared())
    }

    /// The key's table entry, or the answer to a request without a usable key.
    pub(super) fn authenticate<'t>(
        &self,
        parts: &Parts,
        table: &'t table::KeyTable,
        client: Option<IpAddr>,
    ) -> Result<table::KeyView<'t>, Answer> {
        let Some(token) = presented_key(parts) else {
            self.metrics.refusal_without_plan(ErrorCode::MissingApiKey);
            self.note_refusal(parts, None, ErrorCode::MissingApiKey, client);
            return Err(refuse_auth(
                ErrorCode::MissingApiKey,
                "No API key. Send it as `Authorization: Bearer <key>`, an `X-API-Key` header, or an `apikey` query parameter.",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let Some(entry) = table.get(&digest) else {
            self.metrics.refusal_without_plan(ErrorCode::InvalidApiKey);
            self.count_invalid_key(client);
            self.note_refusal(parts, None, ErrorCode::InvalidApiKey, client);
            return Err(refuse_auth(
                ErrorCode::InvalidApiKey,
                "This API key is not valid. Check it for typos, or create a new key.",
            ));
        };
        if let Some(answer) = self.key_ban(&entry, parts.uri.path()) {
            self.note_refusal(parts, Some(&entry), ErrorCode::TemporarilyBlocked, client);
            return Err(answer);
        }
        if entry.suspended() {
            entry.metrics.refusal(ErrorCode::KeySuspended);
            self.note_refusal(parts, Some(&entry), ErrorCode::KeySuspended, client);
            return Err(refuse_auth(
                ErrorCode::KeySuspended,
                "This API key is suspended. Contact the API provider to re-enable it.",
            ));
        }
        if let Some(at) = entry.expires_at() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if now >= at {
                entry.metrics.refusal(ErrorCode::KeyExpired);
                self.note_refusal(parts, Some(&entry), ErrorCode::KeyExpired, client);
                return Err(refuse_auth(
                    ErrorCode::KeyExpired,
                    "This API key has expired. Create a new key or extend this one.",
                ));
            }
        }
        Ok(entry)
    }

    /// Authenticates and admits with this replica's own state (no shared limiter, or the
    /// fallback while it is unreachable).
    fn decide_locally(&self, parts: &Parts, client: Option<IpAddr>) -> Result<Admission, Answer> {
        let table = self.table.load();
        let entry = self.authenticate(parts, &table, client)?;
        let path = parts.uri.path();
        // One clock read serves the limiter, the slot's duration and the upstream latency.
        let at = Instant::now();
        let result = match &self.shared {
            None => table::admit(&entry, path, self.nanos(at), self.cap.as_ref(), 1),
            Some(s) => self.fallback(&entry, path, s),
        };
        let target = self.targets.load().route(path).cloned();
        let share = self.shared.as_ref().map_or(1, |s| s.replicas());
        let result = self.admit_target(result, target.as_deref(), share);
        self.hold(parts, &entry, result, at, client, target)
    }

    /// Takes the slot of the request's target after the key's: a request the target refuses
    /// gives the key's slot back at once (the key's rate token stays spent, as for any request
    /// the key sent), and a request the key refuses never touches the target's capacity. `share`
    /// divides the target's limits as it does the key's (see [`table::admit`]).
    pub(super) fn admit_target(
        &self,
        result: Result<table::Admitted, Refusal>,
        target: Option<&Target>,
        share: u32,
    ) -> Result<table::Admitted, Refusal> {
        let Some(target) = target else {
            return result;
        };
        let mut admitted = result?;
        match target.admit(self.epoch, share) {
            Ok(slot) => {
                admitted.target = slot;
                Ok(admitted)
            }
            Err(r) => Err(target_refusal(admitted, r)),
        }
    }

    /// [`Gateway::admit_target`] through the shared state: the target's slots and bucket are one
    /// across every replica. While Redis does not answer, each replica takes its share locally.
    pub(super) async fn admit_target_shared(
        &self,
        result: Result<table::Admitted, Refusal>,
        target: Option<&Target>,
        shared: &SharedLimiter,
    ) -> Result<table::Admitted, Refusal> {
        let Some(target) = target.filter(|t| t.is_limited() && t.unavailable.is_none()) else {
            return self.admit_target(result, target, 1);
        };
        let mut admitted = result?;
        match shared.admit(target.shared_request()).await {
            Ok(SharedDecision::Admitted { lease, .. }) => {
                admitted.target_lease = lease;
                admitted.target = target.count_local();
                Ok(admitted)
            }
            Ok(SharedDecision::SlotsFull { .. }) => Err(target_refusal(
                admitted,
                TargetRefusal::Slots {
                    limit: target.compiled.concurrency.unwrap_or(0),
                },
            )),
            Ok(SharedDecision::RateLimited {
                retry_after_nanos, ..
            }) => Err(target_refusal(
                admitted,
                TargetRefusal::Rate {
                    per_second: target.compiled.rate_limit.map_or(0, |r| r.per_second),
                    retry_after: retry_after_nanos.div_ceil(1_000_000_000).max(1),
                },
            )),
            Err(_) => self.admit_target(Ok(admitted), Some(target), shared.replicas()),
        }
    }

    /// Authenticates and admits through the shared limiter (Redis).
    async fn decide_shared(
        &self,
        parts: &Parts,
        shared: &SharedLimiter,
        client: Option<IpAddr>,
    ) -> Result<Admission, Answer> {
        // The decision awaits Redis: own the table instead of borrowing it.
        let table = arc_swap::Guard::into_inner(self.table.load());
        let entry = self.authenticate(parts, &table, client)?;
        let path = parts.uri.path();
        let result = match table::admit_shared(&entry, path, shared, self.cap.as_ref()).await {
            Ok(result) => result,
            Err(_) => self.fallback(&entry, path, shared),
        };
        let target = self.targets.load().route(path).cloned();
        let result = self.admit_target_shared(result, target.as_deref(), shared).await;
        self.hold(parts, &entry, result, Instant::now(), client, target)
    }

    /// Rewrites an admitted request for the upstream and encodes it.
    fn prepare(
        &self,
        parts: &Parts,
        body: Incoming,
        admission: Admission,
        client_ip: Option<HeaderValue>,
    ) -> Forward {
        let Admission {
            hold,
            slots,
            rate,
            key,
            target,
        } = admission;
        let (mut head, host, credential) = match &target {
            None => (
                self.options.upstream.request_head(&parts.method, &parts.uri),
                &self.upstream_host,
                None,
            ),
            Some(t) => (
                request_head(&t.compiled.base_path, &parts.method, &parts.uri),
                &t.host,
                t.credential.as_ref().map(|(n, v)| (n, v)),
            ),
        };
        let added = Added {
            host,
            authority: parts.uri.authority().map(|a| a.as_str()),
            client_ip: client_ip.as_ref(),
            key: Some((&key.0, &key.1)),
            credential,
        };
        forward_fields(&parts.headers, &mut head, added);
        Forward {
            request: upstream::Prepared::new(head, body),
            hold,
            slots,
            rate,
            target,
        }
    }

    /// Sends an admitted request upstream and answers with the upstream's response.
    async fn forward(&self, forward: Forward) -> Answer {
        let Forward {
            request,
            mut hold,
            slots,
            rate,
            target,
        } = forward;
        let sent = hold.started;
        let (pool, timeout) = match &target {
            None => (&self.pool, self.options.upstream_timeout),
            Some(t) => (&t.pool, t.response_timeout(self.options.upstream_timeout)),
        };
        let deadline = tokio::time::Instant::from_std(sent + timeout);
        let result = tokio::time::timeout_at(deadline, pool.send(request)).await;
        let upstream = Named(&self.options.upstream, target.as_deref());
        let waited = sent.elapsed();
        self.metrics.upstream_latency.observe(waited.as_secs_f64());
        if let Some(log) = hold.log.as_mut() {
            log.record.upstream_ms = Some(super::visibility::millis(waited));
        }
        // A failure after admission still tells the client its limits.
        let fail = |code: ErrorCode, message: &str| failed(code, message, slots, rate);
        let answer = match result {
            Ok(Ok(res)) => {
                if let Some(t) = &target
                    && t.answered()
                {
                    self.report_soon.notify_one();
                }
                if let Some(log) = hold.log.as_mut() {
                    log.record.status = res.status().as_u16();
                }
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                limit_headers(&mut parts.headers, slots, rate);
                let body = Held::new(body.map_err(|e| Box::new(e) as BoxError), hold).boxed_unsync();
                return (None, Response::from_parts(parts, body));
            }
            Ok(Err(SendError::RequestBody(e))) => {
                tracing::debug!(error = %e, "request body failed while it was forwarded");
                fail(
                    ErrorCode::InvalidRequest,
                    "The request body could not be read to its end.",
                )
            }
            Ok(Err(e @ SendError::Tls { .. })) => {
                tracing::warn!(%upstream, error = %e, "TLS with the upstream failed");
                // The controller hears of it with the next report, sent now rather than at its tick.
                if let Some(t) = &target
                    && t.tls_failed(e.to_string())
                {
                    self.report_soon.notify_one();
                }
                fail(
                    ErrorCode::UpstreamTlsError,
                    "The upstream service's TLS certificate could not be verified. The operator has been told; retry later.",
                )
            }
            Ok(Err(e @ SendError::Protocol(_))) => {
                tracing::warn!(%upstream, error = %e, "upstream answered invalid HTTP");
                fail(
                    ErrorCode::UpstreamUnavailable,
                    "The upstream service sent an invalid response. Retry shortly.",
                )
            }
            Ok(Err(e)) => {
                tracing::warn!(%upstream, error = %e, "upstream unavailable");
                fail(
                    ErrorCode::UpstreamUnavailable,
                    "The upstream service could not be reached. Retry shortly.",
                )
            }
            Err(_) => {
                tracing::warn!(%upstream, ?timeout, "upstream timed out");
                fail(
                    ErrorCode::UpstreamTimeout,
                    &format!(
                        "The upstream service did not answer within {} ms.",
                        timeout.as_millis()
                    ),
                )
            }
        };
        // The hold ends with this function: its log line carries the answer's code.
        if let (Some(code), Some(log)) = (answer.0, hold.log.as_mut()) {
            log.record.status = code.status().as_u16();
            log.record.code = Some(code.as_str());
        }
        answer
    }
}

/// The upstream a request went to, for logs: the target's name and URL, or the default's URL.
struct Named<'a>(&'a Upstream, Option<&'a Target>);

impl std::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            None => self.0.fmt(f),
            Some(t) => write!(f, "{} ({})", t.name, t.compiled.url()),
        }
    }
}

/// The refusal of a request its target turned down; the key's admission goes back with it.
fn target_refusal(admitted: table::Admitted, refusal: TargetRefusal) -> Refusal {
    let (code, limit, retry_after) = match refusal {
        TargetRefusal::Unavailable => (ErrorCode::TargetUnavailable, 0, 5),
        TargetRefusal::Slots { limit } => (ErrorCode::TargetConcurrencyLimitExceeded, limit, 1),
        TargetRefusal::Rate {
            per_second,
            retry_after,
        } => (ErrorCode::TargetRateLimit, per_second, retry_after),
    };
    // The key's figures without this request: its slot goes back with `admitted`.
    let slots = admitted.slots.map(|s| table::SlotView {
        current: s.current.saturating_sub(1),
        remaining: (s.remaining + 1).min(s.limit),
        ..s
    });
    Refusal::Target {
        code,
        limit,
        retry_after,
        slots,
        rate: admitted.rate,
    }
}

/// An error answered after admission: it still tells the client its limits.
fn failed(
    code: ErrorCode,
    message: &str,
    slots: Option<table::SlotView>,
    rate: Option<table::RateView>,
) -> Answer {
    let mut res = error_response(code, message, None);
    limit_headers(res.headers_mut(), slots, rate);
    (Some(code), res)
}

/// An admitted request, ready to forward.
struct Admission {
    hold: Hold,
    slots: Option<table::SlotView>,
    rate: Option<table::RateView>,
    /// The key's id and plan, which the upstream is told.
    key: (Arc<str>, Arc<str>),
    /// The target the path routes to; `None`: the default upstream.
    target: Option<Arc<Target>>,
}

impl Gateway {
    /// The decision while the shared state is unreachable, by the configured policy. A slot
    /// taken here also holds a lease the shared state learns of with the first renewal after it
    /// answers again, so that a long request admitted during an outage counts against the key's
    /// slots on every replica from then on.
    pub(super) fn fallback(
        &self,
        entry: &table::KeyView<'_>,
        path: &str,
        shared: &SharedLimiter,
    ) -> Result<table::Admitted, Refusal> {
        let mut admitted = match self.options.state.fallback {
            Fallback::Local => table::admit(entry, path, self.now(), self.cap.as_ref(), shared.replicas()),
            Fallback::FailClosed if table::is_limited(entry, path) => Err(Refusal::Unavailable),
            Fallback::FailClosed => table::admit(entry, path, self.now(), self.cap.as_ref(), 1),
        }?;
        if admitted.slot.is_some() {
            admitted.lease = Some(shared.lease_unconfirmed(&entry.id));
        }
        Ok(admitted)
    }

    /// Counts a refusal, or turns an admission into what the request holds while in flight.
    fn hold(
        &self,
        parts: &Parts,
        entry: &table::KeyView<'_>,
        result: Result<table::Admitted, Refusal>,
        started: Instant,
        client: Option<IpAddr>,
        target: Option<Arc<Target>>,
    ) -> Result<Admission, Answer> {
        let admitted = result.map_err(|r| {
            entry.metrics.refusal(r.code());
            // Counted in the key's usage first: a ban this refusal starts reports the usage at
            // once, and it includes this request.
            self.note_refusal(parts, Some(entry), r.code(), client);
            if r.is_the_clients() {
                self.count_refusal(entry, client);
            }
            (Some(r.code()), refused(r))
        })?;
        let (slots, rate) = (admitted.slots, admitted.rate);
        let gauge = admitted.slot.as_ref().map(|_| {
            let g = entry.metrics.in_flight.clone();
            g.inc();
            g
        });
        Ok(Admission {
            hold: Hold {
                admitted,
                started,
                gauge,
                log: self.note_admitted(parts, entry, client),
            },
            slots,
            rate,
            key: (Arc::clone(entry.entry_id()), Arc::clone(entry.plan)),
            target,
        })
    }
}

fn refuse_auth(code: ErrorCode, message: &str) -> (Option<ErrorCode>, Response<ProxyBody>) {
    let mut res = error_response(code, message, None);
    if code.status() == StatusCode::UNAUTHORIZED {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"slotgate\""),
        );
    }
    (Some(code), res)
}

/// The gateway as a tower `Service`, one per connection (it knows the client's address).
#[derive(Clone, Debug)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
    /// The client's address as an `X-Forwarded-For` value, made once per connection.
    client_ip: Option<HeaderValue>,
    /// The connection's peer.
    peer: Option<IpAddr>,
}

impl GatewayService {
    /// The service for one connection from `remote`.
    pub fn new(gateway: Arc<Gateway>, remote: Option<SocketAddr>) -> Self {
        let client_ip = remote.and_then(|addr| HeaderValue::try_from(addr.ip().to_string()).ok());
        Self {
            gateway,
            client_ip,
            peer: remote.map(|a| a.ip()),
        }
    }
}

impl tower::Service<Request<Incoming>> for GatewayService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        hyper::service::Service::call(self, req)
    }
}

/// What the server calls. hyper calls it as soon as a request head is parsed, before it reads
/// on; tower's adapter would only store the request until the response is polled. Called here,
/// the request's URI and headers (slices of the connection's read buffer) are gone by then, and
/// the server reads the next request into the same buffer instead of allocating a new one for
/// every request.
impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Arc::clone(&self.gateway).respond(req, self.client_ip.clone(), self.peer)
    }
}
