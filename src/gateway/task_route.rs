//! The gateway's side of async tasks: it routes the task endpoints to [`Tasks`] after the usual
//! authentication and rate limit, and lends tasks its slots ([`Limits`]), so a task and a
//! synchronous request of one key draw from one pool.

use std::{
    any::Any,
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;

use super::{
    Gateway,
    body::{ProxyBody, full},
    headers::{Added, forward_fields, limit_headers, retry_after},
    proxy::{refused, request_head},
    table::{self, Refusal},
    targets::Target,
    upstream::{Prepared, SendError},
};
use crate::tasks::{Admit, Answer, KeyRef, Limits, Tasks, TasksError, UpstreamCall, answer_of, api::Caller};

impl Gateway {
    /// Turns on the task endpoints with `tasks`, picks up the tasks its store left unfinished and
    /// starts running them; returns how many were picked up.
    pub fn enable_tasks(self: &Arc<Self>, tasks: Arc<Tasks>) -> Result<usize, TasksError> {
        if self.tasks.set(Arc::clone(&tasks)).is_err() {
            return Ok(0);
        }
        tasks.configure(Arc::clone(&self.table().config));
        tasks.start(Arc::new(GatewayLimits(Arc::downgrade(self))))
    }

    /// The task subsystem, when enabled.
    pub fn tasks(&self) -> Option<&Arc<Tasks>> {
        self.tasks.get()
    }

    /// Answers a request on a task endpoint: authenticate, take a rate token (a submission holds
    /// no slot; the task takes one when it runs), then let the task subsystem answer.
    pub(super) async fn handle_task(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: Option<std::net::IpAddr>,
    ) -> Response<ProxyBody> {
        let Some(tasks) = self.tasks.get().cloned() else {
            unreachable!("routed here only when tasks are enabled")
        };
        let (parts, body) = req.into_parts();
        let table = arc_swap::Guard::into_inner(self.table.load());
        let entry = match self.authenticate(&parts, &table, client) {
            Ok(e) => e,
            Err(answer) => return self.count(answer),
        };
        let rate = match table::admit_rate(&entry, parts.uri.path(), self.now()) {
            Ok(rate) => rate,
            Err(refusal) => {
                entry.metrics.refusal(refusal.code());
                self.note_refusal(&parts, Some(&entry), refusal.code(), client);
                self.count_refusal(&entry, client);
                return self.count((Some(refusal.code()), refused(refusal)));
            }
        };
        let pending = self.note_admitted(&parts, &entry, client);
        let caller = Caller {
            key_id: &entry.id,
            digest: entry.digest(),
            plan: entry.plan,
            slots: entry.limits.slots.as_ref().map(|s| s.max),
        };
        let reply = tasks
            .handle(caller, &parts.method, parts.uri.path(), parts.uri.query(), body)
            .await;
        if let Some(mut log) = pending {
            log.record.status = reply.status.as_u16();
            log.finish(std::time::Instant::now(), false);
        }
        let mut res = Response::new(full(reply.body));
        *res.status_mut() = reply.status;
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(loc) = reply.location.and_then(|l| HeaderValue::try_from(l).ok()) {
            h.insert(header::LOCATION, loc);
        }
        if let Some(secs) = reply.retry_after {
            retry_after(h, secs);
        }
        limit_headers(h, None, rate);
        res
    }
}

/// What a running task holds: its admission (slot, upstream cap, the target's slot) and its
/// share of the plan's in-flight gauge, all given back when the task's upstream exchange ends.
struct TaskHold {
    _admitted: table::Admitted,
    gauge: Option<Gauge>,
    /// The target the task's path routes to, whose slot the admission took: the request goes
    /// there even if a reload routes the path elsewhere meanwhile.
    target: Option<Arc<Target>>,
}

impl Drop for TaskHold {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec();
        }
    }
}

/// The gateway's limiter, lent to tasks. Weak: the gateway owns the task subsystem, not the
/// other way round.
struct GatewayLimits(Weak<Gateway>);

impl Limits for GatewayLimits {
    fn plan_of(&self, digest: &[u8; 32]) -> Option<Arc<str>> {
        let gw = self.0.upgrade()?;
        let table = gw.table.load();
        table.get(digest).map(|e| Arc::clone(e.plan))
    }

    fn try_admit(&self, key: KeyRef<'_>, path: &str) -> Admit {
        let Some(gw) = self.0.upgrade() else {
            return Admit::Gone;
        };
        let table = gw.table.load();
        let entry = match admissible(&table, key) {
            Ok(e) => e,
            Err(answer) => return answer,
        };
        let target = match target_with_room(&gw, path) {
            Ok(t) => t,
            Err(full) => return full,
        };
        let result = table::admit(&entry, path, gw.now(), gw.cap.as_ref(), 1);
        let result = gw.admit_target(result, target.as_deref(), 1);
        verdict(&entry, result, target)
    }

    fn admit<'a>(&'a self, key: KeyRef<'a>, path: &'a str) -> BoxFuture<'a, Admit> {
        Box::pin(async move {
            let Some(gw) = self.0.upgrade() else {
                return Admit::Gone;
            };
            let Some(shared) = gw.shared.clone() else {
                return self.try_admit(key, path);
            };
            // The decision awaits Redis: own the table instead of borrowing it.
            let table = arc_swap::Guard::into_inner(gw.table.load());
            let entry = match admissible(&table, key) {
                Ok(e) => e,
                Err(answer) => return answer,
            };
            let target = match target_with_room(&gw, path) {
                Ok(t) => t,
                Err(full) => return full,
            };
            let result = match table::admit_shared(&entry, path, &shared, gw.cap.as_ref()).await {
                Ok(result) => result,
                Err(_) => gw.fallback(&entry, path, &shared),
            };
            let result = gw.admit_target_shared(result, target.as_deref(), &shared).await;
            verdict(&entry, result, target)
        })
    }

    fn send<'a>(
        &'a self,
        held: &'a (dyn Any + Send + Sync),
        call: &'a UpstreamCall<'a>,
    ) -> Option<BoxFuture<'a, Answer>> {
        let target = held.downcast_ref::<TaskHold>()?.target.as_ref()?;
        let gw = self.0.upgrade()?;
        Some(Box::pin(async move { gw.send_task(target, call).await }))
    }
}

impl Gateway {
    /// Sends a task's request to its target as a synchronous request of the key would go: the
    /// target's base path, `Host` and provider credential, through its connection pool (TLS
    /// included), with the target's health recorded for the controller.
    async fn send_task(&self, target: &Target, call: &UpstreamCall<'_>) -> Answer {
        let uri = Uri::try_from(call.path).map_err(|e| format!("the task type's path: {e}"))?;
        let mut head = request_head(&target.compiled.base_path, call.method, &uri);
        let added = Added {
            host: &target.host,
            authority: None,
            client_ip: None,
            key: Some(call.key),
            credential: target.credential.as_ref().map(|(n, v)| (n, v)),
        };
        forward_fields(&call.headers, &mut head, added);
        match target.pool.send(Prepared::whole(head, call.body.clone())).await {
            Ok(res) => {
                if target.answered() {
                    self.report_soon.notify_one();
                }
                answer_of(res, call.max_bytes).await
            }
            Err(e) => {
                if matches!(e, SendError::Tls { .. }) && target.tls_failed(e.to_string()) {
                    self.report_soon.notify_one();
                }
                Err(format!("target {}: {e}", target.name))
            }
        }
    }
}

/// The target `path` routes to, unless this replica has every one of its slots in use: then the
/// task waits as for a full key, before the key's admission spends a rate token for nothing. In a
/// fleet this is the replica's own count only; the fleet's is asked with the admission.
fn target_with_room(gw: &Gateway, path: &str) -> Result<Option<Arc<Target>>, Admit> {
    match gw.targets.load().route(path) {
        Some(t) if t.is_full() => Err(Admit::Full),
        t => Ok(t.cloned()),
    }
}

/// The key a task belongs to, if it may run now; otherwise what the dispatcher is told.
fn admissible<'t>(table: &'t table::KeyTable, key: KeyRef<'_>) -> Result<table::KeyView<'t>, Admit> {
    let entry = match table.get(key.digest) {
        Some(e) if &*e.id == key.id => e,
        // The token was rotated (or the key is gone): find the key by its id. Rare, and
        // followed by a rekey, so the scan is not repeated.
        _ => {
            return Err(match table.entries().find(|e| &*e.id == key.id) {
                Some(e) => Admit::Rekey(*e.digest()),
                None => Admit::Gone,
            });
        }
    };
    let expired = entry.expires_at().is_some_and(|at| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now >= at
    });
    if entry.suspended() || expired {
        return Err(Admit::Gone);
    }
    Ok(entry)
}

/// The limiter's decision as the dispatcher sees it.
fn verdict(
    entry: &table::KeyView<'_>,
    result: Result<table::Admitted, Refusal>,
    target: Option<Arc<Target>>,
) -> Admit {
    match result {
        Ok(admitted) => {
            let gauge = admitted.slot.as_ref().map(|_| {
                let g = entry.metrics.in_flight.clone();
                g.inc();
                g
            });
            Admit::Go(Box::new(TaskHold {
                _admitted: admitted,
                gauge,
                target,
            }))
        }
        Err(Refusal::Concurrency { .. } | Refusal::Upstream { .. }) => Admit::Full,
        // A bucket's wait is exact; a millisecond floor keeps the dispatcher from spinning.
        Err(Refusal::Rate { wait_nanos, .. }) => Admit::Wait(Duration::from_nanos(wait_nanos.max(1_000_000))),
        // The target's own wait: a second for a slot (taken elsewhere in the fleet, or since
        // `Target::is_full` looked), the bucket's refill, a few seconds for one that is unavailable
        // (its credential or TLS settings are missing). Each such refusal spent a rate token of
        // the key, as a synchronous request refused by a target does.
        Err(Refusal::Target { retry_after, .. }) => Admit::Wait(Duration::from_secs(retry_after.max(1))),
        Err(Refusal::Unavailable) => Admit::Wait(Duration::from_secs(1)),
    }
}
