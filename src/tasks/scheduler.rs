//! Running tasks: one dispatcher serves the keys round robin (each key, in turn, starts as many
//! of its queued tasks, oldest first, as it has free slots and rate tokens), so a key with a
//! million queued tasks delays another key's first task by one round at most. Each started task
//! runs its upstream request on its own tokio task and gives its slot back when the answer is
//! read; then its result is stored and its webhook delivered.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

use super::{
    Admit, Answer, KeyRef, Tasks, UpstreamCall, answer_of,
    model::{DeliveryAttempt, DeliveryStatus, Task, TaskError, TaskId, TaskStatus, unix_ms_now},
    webhook,
};
use crate::config::GatewayConfig;

/// How often a key whose slots are all taken is looked at again: its slots also free when its
/// synchronous requests end, which nothing announces.
/// Least time between two computations of the per-plan gauges.
const GAUGE_PERIOD: Duration = Duration::from_millis(250);
const FULL_POLL: Duration = Duration::from_millis(5);
/// How often the tasks of a key that is not admitted (deleted, suspended) are looked at again.
const GONE_POLL: Duration = Duration::from_secs(1);
/// Most upstream attempts of one task however often the upstream answers 429 (which does not
/// count against `maxAttempts`).
const MAX_TOTAL_ATTEMPTS: u32 = 50;
/// Most webhook deliveries in flight at once, across keys.
const MAX_DELIVERIES: usize = 512;
/// Webhook deliveries in flight for one key.
const MAX_KEY_DELIVERIES: usize = 32;

/// One key's tasks as the dispatcher sees them.
#[derive(Debug)]
struct KeyQueue {
    /// Ready to run, oldest first, with their task type.
    ready: VecDeque<(TaskId, Arc<str>)>,
    /// Waiting for a retry's backoff.
    delayed: usize,
    /// Running now.
    running: u32,
    /// Being written by a submission that has not yet been answered.
    reserved: usize,
    digest: [u8; 32],
    in_ring: bool,
    /// Not looked at again before this instant (its rate bucket is empty, or it is not admitted).
    blocked_until: Option<Instant>,
}

impl KeyQueue {
    fn new(digest: [u8; 32]) -> Self {
        Self {
            ready: VecDeque::new(),
            delayed: 0,
            running: 0,
            reserved: 0,
            digest,
            in_ring: false,
            blocked_until: None,
        }
    }

    fn unfinished(&self) -> usize {
        self.ready.len() + self.delayed + self.running as usize + self.reserved
    }
}

/// Every key's queue, the round-robin ring and the retry timers.
#[derive(Debug, Default)]
pub struct Queues {
    keys: HashMap<Arc<str>, KeyQueue>,
    ring: VecDeque<Arc<str>>,
    timers: BinaryHeap<Reverse<(u64, TaskId)>>,
    /// Key and task type of each delayed task, by id.
    delayed: HashMap<TaskId, (Arc<str>, Arc<str>)>,
    running: HashMap<TaskId, Arc<str>>,
    /// Task type names, shared by every queued task of a type.
    types: HashMap<String, Arc<str>>,
    /// Mean run time of recent tasks, for an honest Retry-After.
    mean_run: Option<Duration>,
    /// When the per-plan gauges were last computed (a pass over every key, so not every round).
    gauges_at: Option<Instant>,
}

impl Queues {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.types.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.types.insert(s.to_string(), Arc::clone(&a));
        a
    }

    fn key(&mut self, id: &str, digest: [u8; 32]) -> (Arc<str>, &mut KeyQueue) {
        let name = match self.keys.get_key_value(id) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(id),
        };
        let q = self
            .keys
            .entry(Arc::clone(&name))
            .or_insert_with(|| KeyQueue::new(digest));
        (name, q)
    }

    fn enqueue(&mut self, key_id: &str, digest: [u8; 32], id: TaskId, task_type: &str, front: bool) {
        let task_type = self.intern(task_type);
        let (name, q) = self.key(key_id, digest);
        if front {
            q.ready.push_front((id, task_type));
        } else {
            q.ready.push_back((id, task_type));
        }
        if !q.in_ring {
            q.in_ring = true;
            self.ring.push_back(name);
        }
    }

    fn forget_if_idle(&mut self, key_id: &str) {
        if self
            .keys
            .get(key_id)
            .is_some_and(|q| q.unfinished() == 0 && !q.in_ring)
        {
            self.keys.remove(key_id);
        }
    }

    /// Unfinished tasks of a key (queued, delayed, running, being submitted).
    pub fn unfinished(&self, key_id: &str) -> usize {
        self.keys.get(key_id).map_or(0, KeyQueue::unfinished)
    }

    /// Reserves room for one submission of a key if it has fewer than `max` unfinished tasks.
    pub fn reserve(&mut self, key_id: &str, digest: [u8; 32], max: usize) -> Result<(), usize> {
        let (_, q) = self.key(key_id, digest);
        let n = q.unfinished();
        if n >= max {
            return Err(n);
        }
        q.reserved += 1;
        Ok(())
    }

    /// Ends a reservation: the task is queued if it was stored.
    pub fn settle(&mut self, key_id: &str, digest: [u8; 32], stored: Option<(TaskId, &str)>) {
        if let Some(q) = self.keys.get_mut(key_id) {
            q.reserved = q.reserved.saturating_sub(1);
        }
        match stored {
            Some((id, task_type)) => self.enqueue(key_id, digest, id, task_type, false),
            None => self.forget_if_idle(key_id),
        }
    }

    /// Removes a queued task (a cancel). `Err(true)` when it is running, `Err(false)` when it is
    /// not queued here at all.
    pub fn take_queued(&mut self, key_id: &str, id: TaskId) -> Result<(), bool> {
        if self.running.contains_key(&id) {
            return Err(true);
        }
        if self.delayed.remove(&id).is_some() {
            if let Some(q) = self.keys.get_mut(key_id) {
                q.delayed = q.delayed.saturating_sub(1);
            }
            // The timer stays in the heap and finds no task when it fires.
            self.forget_if_idle(key_id);
            return Ok(());
        }
        let q = self.keys.get_mut(key_id).ok_or(false)?;
        let at = q.ready.iter().position(|(t, _)| *t == id).ok_or(false)?;
        q.ready.remove(at);
        self.forget_if_idle(key_id);
        Ok(())
    }

    /// The estimated seconds until `excess` more of a key's tasks have finished, at `slots` at
    /// once: what a refused submission's Retry-After says.
    pub fn retry_after_secs(&self, excess: usize, slots: u32) -> u64 {
        let mean = self.mean_run.unwrap_or(Duration::from_secs(1));
        let rounds = excess.div_ceil(slots.max(1) as usize) as f64;
        (mean.as_secs_f64() * rounds).ceil().max(1.0) as u64
    }

    pub(super) fn record_run(&mut self, took: Duration) {
        self.mean_run = Some(match self.mean_run {
            None => took,
            Some(m) => m.mul_f64(0.9) + took.mul_f64(0.1),
        });
    }
}

fn digest_of(hex_digest: &str) -> [u8; 32] {
    let mut d = [0u8; 32];
    let _ = hex::decode_to_slice(hex_digest, &mut d);
    d
}

/// How a webhook delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivered {
    /// Nothing is left to deliver (delivered, given up, or no webhook).
    Done,
    /// The store failed: the delivery is not recorded as over, and is picked up again.
    Interrupted,
}

/// How a run ended.
pub(super) enum Outcome {
    Done(Task),
    Retry(Task, Duration),
}

/// The client tasks' upstream requests go through.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl UpstreamClient {
    /// A client for `http://host:port[/base]`; `None` for anything else.
    pub fn new(base: &str) -> Option<Self> {
        let uri: http::Uri = base.parse().ok()?;
        (uri.scheme_str() == Some("http") && uri.authority().is_some()).then(|| {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            Self {
                base: base.trim_end_matches('/').to_string(),
                client: Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build(c),
            }
        })
    }
}

impl UpstreamClient {
    /// Sends a task's request to the default upstream.
    async fn call(&self, call: &UpstreamCall<'_>) -> Answer {
        let mut req = Request::builder()
            .method(call.method.clone())
            .uri(format!("{}{}", self.base, call.path))
            .body(Full::new(call.body.clone()))
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        h.extend(call.headers.clone());
        let (id, plan) = call.key;
        if let Ok(v) = HeaderValue::from_str(id) {
            h.insert("x-slotgate-key-id", v);
        }
        if let Some(p) = Some(plan)
            .filter(|p| !p.is_empty())
            .and_then(|p| HeaderValue::from_str(p).ok())
        {
            h.insert("x-slotgate-plan", p);
        }
        let res = self.client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                msg = format!("{msg}: {src}");
            }
            msg
        })?;
        answer_of(res, call.max_bytes).await
    }
}

/// The client webhooks go through (SSRF-guarded).
#[derive(Clone, Debug)]
pub struct HookClient {
    client: Client<webhook::HookConnector, Full<Bytes>>,
    reach: Arc<webhook::Reach>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Deliveries in flight per key, so one key's slow or dead receiver holds at most
    /// [`MAX_KEY_DELIVERIES`] of the shared slots and other keys' webhooks keep going.
    per_key: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
}

impl HookClient {
    /// A client that reaches the private addresses `reach` allows and no others, and trusts the
    /// system's CAs and `extra_roots` for https receivers.
    pub fn new(reach: webhook::Reach, extra_roots: &[rustls::pki_types::CertificateDer<'static>]) -> Self {
        let reach = Arc::new(reach);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(webhook::connector(Arc::clone(&reach), extra_roots)),
            reach,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_DELIVERIES)),
            per_key: Arc::default(),
        }
    }

    /// Waits for a delivery slot of `key`, then one of the shared pool.
    async fn permit(&self, key: &str) -> Result<DeliveryPermit, String> {
        let own = Arc::clone(
            self.per_key
                .lock()
                .expect("per-key deliveries lock")
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_KEY_DELIVERIES))),
        );
        let own = own.acquire_owned().await.map_err(|e| e.to_string())?;
        let shared = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        Ok(DeliveryPermit {
            key: key.to_string(),
            per_key: Arc::clone(&self.per_key),
            own: Some(own),
            _shared: shared,
        })
    }
}

/// A delivery's place in its key's and the shared pool; forgets an idle key's semaphore.
struct DeliveryPermit {
    key: String,
    per_key: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
    own: Option<tokio::sync::OwnedSemaphorePermit>,
    _shared: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for DeliveryPermit {
    fn drop(&mut self) {
        drop(self.own.take());
        let mut map = self.per_key.lock().expect("per-key deliveries lock");
        // Only the map holds it and nobody waits: the key has no delivery in flight.
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1 && s.available_permits() == MAX_KEY_DELIVERIES)
        {
            map.remove(&self.key);
        }
    }
}

impl Tasks {
    fn limits(&self) -> Option<&Arc<dyn super::Limits>> {
        self.limits.get()
    }

    /// Puts the store's open tasks back in the queues, reading them one at a time; returns how
    /// many, and the finished ones whose webhook is still to be delivered.
    pub(super) fn recover(&self) -> Result<(usize, Vec<(String, TaskId)>), super::StoreError> {
        let mut q = self.queues.lock().expect("queues lock");
        let mut deliveries = Vec::new();
        let now = unix_ms_now();
        let n = self.store.open_tasks(&mut |task| {
            let digest = digest_of(&task.key_digest);
            match task.status {
                TaskStatus::Queued | TaskStatus::Running => match task.not_before.filter(|&t| t > now) {
                    Some(at) => {
                        let tt = q.intern(&task.task_type);
                        let (name, kq) = q.key(&task.key_id, digest);
                        kq.delayed += 1;
                        q.delayed.insert(task.id, (name, tt));
                        q.timers.push(Reverse((at, task.id)));
                    }
                    None => q.enqueue(&task.key_id, digest, task.id, &task.task_type, false),
                },
                _ => deliveries.push((task.key_id, task.id)),
            }
        })?;
        self.publish_gauges(&mut q, &self.config.load(), true);
        Ok((n, deliveries))
    }

    /// Unfinished tasks across the fleet by key, when tasks live in the shared store (empty
    /// otherwise): reported beside [`Tasks::counts_by_key`].
    pub fn open_by_key(&self) -> Vec<(Arc<str>, u64)> {
        self.fleet.as_ref().map(|f| f.open_by_key()).unwrap_or_default()
    }

    /// Tasks queued (ready or waiting for a retry) and running, by key id, for the keys that have
    /// any: what a report to the controller shows in each key's status.
    pub fn counts_by_key(&self) -> Vec<(Arc<str>, [u64; 2])> {
        if let Some(fleet) = &self.fleet {
            return fleet.counts_by_key();
        }
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.keys
            .iter()
            .map(|(id, kq)| {
                (
                    Arc::clone(id),
                    [(kq.ready.len() + kq.delayed) as u64, u64::from(kq.running)],
                )
            })
            .filter(|(_, [queued, running])| queued + running > 0)
            .collect()
    }

    /// Sets the queued and running gauges of every plan; at most every 250 ms unless `force`.
    fn publish_gauges(&self, q: &mut Queues, config: &GatewayConfig, force: bool) {
        if !force && q.gauges_at.is_some_and(|t| t.elapsed() < GAUGE_PERIOD) {
            return;
        }
        q.gauges_at = Some(Instant::now());
        let mut per_plan: HashMap<&str, (i64, i64)> =
            config.plans.keys().map(|p| (p.as_str(), (0, 0))).collect();
        let limits = self.limits();
        let plans: Vec<Option<Arc<str>>> = q
            .keys
            .values()
            .map(|kq| limits.and_then(|l| l.plan_of(&kq.digest)))
            .collect();
        for (kq, plan) in q.keys.values().zip(&plans) {
            let e = per_plan.entry(plan.as_deref().unwrap_or("")).or_default();
            e.0 += (kq.ready.len() + kq.delayed) as i64;
            e.1 += i64::from(kq.running);
        }
        for (plan, (queued, running)) in per_plan {
            self.metrics.set_plan(plan, queued, running);
        }
    }

    pub(super) async fn dispatch_loop(self: Arc<Self>) {
        loop {
            let wait = self.dispatch_round();
            match wait {
                Some(d) => {
                    let _ = tokio::time::timeout(d, self.wake.notified()).await;
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// One round over every key with ready tasks; returns how long the dispatcher may sleep
    /// before the next round is due (`None`: until something happens).
    fn dispatch_round(self: &Arc<Self>) -> Option<Duration> {
        let Some(limits) = self.limits().cloned() else {
            return Some(GONE_POLL);
        };
        let config = self.config.load_full();
        let now = Instant::now();
        let now_ms = unix_ms_now();
        let mut q = self.queues.lock().expect("queues lock");
        // Retries whose backoff is over go to the front of their key's queue: they are older.
        while let Some(Reverse((at, id))) = q.timers.peek().copied() {
            if at > now_ms {
                break;
            }
            q.timers.pop();
            if let Some((key, tt)) = q.delayed.remove(&id)
                && let Some(kq) = q.keys.get_mut(&key)
            {
                kq.delayed = kq.delayed.saturating_sub(1);
                let digest = kq.digest;
                q.enqueue(&key, digest, id, &tt, true);
            }
        }
        let mut wake: Option<Duration> = q
            .timers
            .peek()
            .map(|Reverse((at, _))| Duration::from_millis(at - now_ms));
        let soonest = |d: Duration, wake: &mut Option<Duration>| {
            *wake = Some(wake.map_or(d, |w| w.min(d)));
        };
        let mut started = Vec::new();
        let mut failed = Vec::new();
        for _ in 0..q.ring.len() {
            let Some(key) = q.ring.pop_front() else { break };
            let Some(kq) = q.keys.get_mut(&key) else { continue };
            if kq.ready.is_empty() {
                kq.in_ring = false;
                continue;
            }
            if let Some(until) = kq.blocked_until {
                if until > now {
                    soonest(until - now, &mut wake);
                    q.ring.push_back(key);
                    continue;
                }
                kq.blocked_until = None;
            }
            let plan = limits.plan_of(&kq.digest);
            let policy = plan
                .as_deref()
                .and_then(|p| config.plans.get(p))
                .and_then(|p| p.tasks.as_ref());
            while let Some((id, tt)) = kq.ready.front().cloned() {
                if let Some(max) = policy.and_then(|p| p.max_concurrent)
                    && kq.running >= max
                {
                    soonest(FULL_POLL, &mut wake);
                    break;
                }
                let Some(task_type) = config.task_types.get(&*tt) else {
                    kq.ready.pop_front();
                    failed.push((Arc::clone(&key), id, tt));
                    continue;
                };
                let digest = kq.digest;
                match limits.try_admit(
                    KeyRef {
                        id: &key,
                        digest: &digest,
                    },
                    &task_type.path,
                ) {
                    Admit::Go(permit) => {
                        kq.ready.pop_front();
                        kq.running += 1;
                        started.push((id, Arc::clone(&key), task_type.clone(), plan.clone(), permit));
                    }
                    Admit::Full => {
                        soonest(FULL_POLL, &mut wake);
                        break;
                    }
                    Admit::Wait(d) => {
                        kq.blocked_until = Some(now + d);
                        soonest(d, &mut wake);
                        break;
                    }
                    Admit::Rekey(d) => kq.digest = d,
                    Admit::Gone => {
                        kq.blocked_until = Some(now + GONE_POLL);
                        soonest(GONE_POLL, &mut wake);
                        break;
                    }
                }
            }
            if kq.ready.is_empty() {
                kq.in_ring = false;
            } else {
                q.ring.push_back(key);
            }
        }
        for (id, key, ..) in &started {
            q.running.insert(*id, Arc::clone(key));
        }
        // Forced at the edges (first start, last finish) so an idle gateway never shows stale counts.
        let edge = q.running.is_empty() || q.running.len() == started.len();
        self.publish_gauges(&mut q, &config, edge);
        drop(q);
        for (id, key, task_type, plan, permit) in started {
            tokio::spawn(Arc::clone(self).run(id, key, task_type, plan, permit));
        }
        for (key, id, tt) in failed {
            tokio::spawn(Arc::clone(self).fail_unknown_type(key, id, tt));
        }
        wake
    }

    async fn fail_unknown_type(self: Arc<Self>, key: Arc<str>, id: TaskId, task_type: Arc<str>) {
        let Ok(Some(mut task)) = self.store.get(&key, id).await else {
            return;
        };
        let key = task.key_id.clone();
        self.finish(
            &mut task,
            TaskStatus::Failed,
            Some(TaskError {
                code: "unknown_task_type".into(),
                message: format!("task type {task_type} is no longer declared by any ApiTaskType"),
            }),
        );
        self.store_and_deliver(task).await;
        self.queues.lock().expect("queues lock").forget_if_idle(&key);
    }

    /// Runs one attempt of a task that holds a slot (`permit`).
    async fn run(
        self: Arc<Self>,
        id: TaskId,
        key: Arc<str>,
        task_type: crate::config::CompiledTaskType,
        plan: Option<Arc<str>>,
        permit: Box<dyn std::any::Any + Send + Sync>,
    ) {
        let outcome = match self.store.get(&key, id).await {
            Ok(Some(mut task)) if task.status == TaskStatus::Queued || task.status == TaskStatus::Running => {
                task.status = TaskStatus::Running;
                task.attempts += 1;
                task.not_before = None;
                let started = unix_ms_now();
                self.metrics
                    .queue_wait
                    .observe(started.saturating_sub(id.unix_ms()) as f64 / 1e3);
                task.started_at = Some(started);
                // "Running" is written while the request goes out, not before: waiting for the
                // sync would hold the slot idle for it. Safe because the store applies writes
                // in call order (the result cannot be overtaken by this mark), and a crash before
                // the mark is on disk leaves the task queued, so it runs again: at most twice,
                // as for any task running at a crash (the attempt may then go uncounted).
                let marked = self.store.put(vec![task.clone()]);
                let t = Instant::now();
                let (answer, marked) = tokio::join!(
                    self.call_upstream(&task, &task_type, plan.as_deref(), &*permit),
                    marked
                );
                let took = t.elapsed();
                drop(permit);
                if let Err(e) = marked {
                    tracing::error!(task = %id, error = %e, "task store failed while marking a task running");
                }
                self.metrics.run_time.observe(took.as_secs_f64());
                self.queues.lock().expect("queues lock").record_run(took);
                Some(self.judge(task, answer))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(task = %id, error = %e, "task store failed while starting a task");
                None
            }
        };
        {
            let mut q = self.queues.lock().expect("queues lock");
            q.running.remove(&id);
            if let Some(kq) = q.keys.get_mut(&key) {
                kq.running = kq.running.saturating_sub(1);
            }
            if let Some(Outcome::Retry(task, after)) = &outcome {
                let tt = q.intern(&task.task_type);
                if let Some(kq) = q.keys.get_mut(&key) {
                    kq.delayed += 1;
                }
                q.delayed.insert(id, (Arc::clone(&key), tt));
                q.timers
                    .push(Reverse((unix_ms_now() + after.as_millis() as u64, id)));
            }
            q.forget_if_idle(&key);
        }
        // A slot is free: the next task may start now, not at the next poll.
        self.wake.notify_one();
        match outcome {
            Some(Outcome::Retry(task, _)) => {
                if let Err(e) = self.store.put(vec![task]).await {
                    tracing::error!(task = %id, error = %e, "task store failed while scheduling a retry");
                }
            }
            Some(Outcome::Done(task)) => self.store_and_deliver(task).await,
            None => {}
        }
    }

    /// One attempt of `task`: to the `ApiUpstream` target the gateway routes its type's path
    /// to, or to the default upstream. `held` is the task's admission (see [`super::Limits`]).
    pub(super) async fn call_upstream(
        &self,
        task: &Task,
        task_type: &crate::config::CompiledTaskType,
        plan: Option<&str>,
        held: &(dyn std::any::Any + Send + Sync),
    ) -> Answer {
        let method = Method::from_bytes(task_type.method.as_str().as_bytes()).expect("a valid method");
        let mut headers = http::HeaderMap::with_capacity(3);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let id = HeaderValue::try_from(task.id.to_string()).expect("a task id is a header value");
        headers.insert("idempotency-key", id.clone());
        headers.insert("x-slotgate-task-id", id);
        let call = UpstreamCall {
            method: &method,
            path: &task_type.path,
            key: (&task.key_id, plan.unwrap_or_default()),
            headers,
            body: Bytes::from(serde_json::to_vec(&task.payload).expect("a payload serialises")),
            max_bytes: self.options.max_result_bytes,
        };
        let timeout = task_type
            .timeout_ms
            .map_or(self.options.upstream_timeout, Duration::from_millis);
        let exchange = async {
            match self.limits().and_then(|l| l.send(held, &call)) {
                Some(routed) => routed.await,
                None => self.upstream.call(&call).await,
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
    }

    /// What a run's answer means for the task.
    pub(super) fn judge(&self, mut task: Task, answer: Answer) -> Outcome {
        let config = self.config.load();
        let max_attempts = self
            .plan_of(&task.key_digest)
            .and_then(|p| config.plans.get(&*p))
            .and_then(|p| p.tasks.as_ref())
            .map_or(crate::config::tasks::DEFAULT_MAX_ATTEMPTS, |p| p.max_attempts);
        let backoff =
            |attempts: u32| webhook::jitter(Duration::from_secs(1 << attempts.saturating_sub(1).min(6)), 0.5);
        let exhausted = |t: &Task| t.attempts >= max_attempts || t.attempts >= MAX_TOTAL_ATTEMPTS;
        match answer {
            Err(e) if !exhausted(&task) => {
                task.error = Some(TaskError {
                    code: "upstream_unavailable".into(),
                    message: e,
                });
                task.status = TaskStatus::Queued;
                let d = backoff(task.attempts);
                task.not_before = Some(unix_ms_now() + d.as_millis() as u64);
                Outcome::Retry(task, d)
            }
            Err(e) => {
                let message = format!("{e} (attempt {} of {max_attempts})", task.attempts);
                self.finish(
                    &mut task,
                    TaskStatus::Failed,
                    Some(TaskError {
                        code: "upstream_unavailable".into(),
                        message,
                    }),
                );
                Outcome::Done(task)
            }
            Ok((status, retry_after, body)) => {
                task.upstream_status = Some(status.as_u16());
                let body = match body {
                    Ok(b) => b,
                    Err(_) => {
                        self.finish(
                            &mut task,
                            TaskStatus::Failed,
                            Some(TaskError {
                                code: "result_too_large".into(),
                                message: format!(
                                    "the upstream's answer is larger than {} bytes",
                                    self.options.max_result_bytes
                                ),
                            }),
                        );
                        return Outcome::Done(task);
                    }
                };
                let response = serde_json::from_slice::<Value>(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
                if status.is_success() {
                    task.response = Some(response);
                    task.error = None;
                    self.finish(&mut task, TaskStatus::Completed, None);
                    return Outcome::Done(task);
                }
                let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                // A 429 says "later", not "broken": it does not use up maxAttempts.
                if status == StatusCode::TOO_MANY_REQUESTS {
                    task.attempts = task.attempts.saturating_sub(1);
                }
                let hard_cap = task.attempts >= MAX_TOTAL_ATTEMPTS;
                if retryable && !exhausted(&task) && !hard_cap {
                    let d = match (status, retry_after) {
                        (StatusCode::TOO_MANY_REQUESTS, Some(s)) => Duration::from_secs(s.min(3600)),
                        _ => backoff(task.attempts.max(1)),
                    };
                    task.error = Some(TaskError {
                        code: "upstream_error".into(),
                        message: format!("the upstream answered {status}"),
                    });
                    task.status = TaskStatus::Queued;
                    task.not_before = Some(unix_ms_now() + d.as_millis() as u64);
                    return Outcome::Retry(task, d);
                }
                task.response = Some(response);
                let code = if retryable {
                    "upstream_error"
                } else {
                    "upstream_rejected"
                };
                let message = format!("the upstream answered {status} (attempt {})", task.attempts);
                self.finish(
                    &mut task,
                    TaskStatus::Failed,
                    Some(TaskError {
                        code: code.into(),
                        message,
                    }),
                );
                Outcome::Done(task)
            }
        }
    }

    /// Marks a task final, with its retention.
    pub(super) fn finish(&self, task: &mut Task, status: TaskStatus, error: Option<TaskError>) {
        let now = unix_ms_now();
        let config = self.config.load();
        let retention = self
            .plan_of(&task.key_digest)
            .and_then(|p| config.plans.get(&*p))
            .and_then(|p| p.tasks.as_ref())
            .map_or(crate::config::tasks::DEFAULT_RETENTION_SECS, |p| p.retention_secs);
        task.status = status;
        task.error = error;
        task.not_before = None;
        task.finished_at = Some(now);
        task.expires_at = Some(now + retention * 1000);
        self.metrics.finished(status);
    }

    /// Stores a finished task and, when it has a webhook, delivers it.
    pub(super) async fn store_and_deliver(self: &Arc<Self>, task: Task) {
        let (id, key) = (task.id, task.key_id.clone());
        let hook = task.webhook.is_some();
        if let Err(e) = self.store.put(vec![task]).await {
            tracing::error!(task = %id, error = %e, "task store failed while storing a result");
            return;
        }
        if hook {
            tokio::spawn(Arc::clone(self).deliver(key, id));
        }
    }

    /// Delivers a finished task's webhook, attempt after attempt on the schedule, until the
    /// receiver answers 2xx or 410 or the schedule is used up. Each attempt is stored, so a
    /// restart goes on where this left off, and GET shows it.
    pub(super) async fn deliver(self: Arc<Self>, key: String, id: TaskId) -> Delivered {
        loop {
            let task = match self.store.get(&key, id).await {
                Ok(Some(task)) => task,
                Ok(None) => return Delivered::Done,
                Err(_) => return Delivered::Interrupted,
            };
            let mut task = task;
            let Some(hook) = task.webhook.clone() else {
                return Delivered::Done;
            };
            if hook.status != DeliveryStatus::Pending {
                return Delivered::Done;
            }
            if let Some(at) = hook.next_attempt_at {
                let now = unix_ms_now();
                if at > now {
                    tokio::time::sleep(Duration::from_millis(at - now)).await;
                }
            }
            let result = self.send_hook(&task, &hook.url).await;
            let now = unix_ms_now();
            let hook = task.webhook.as_mut().expect("checked above");
            let attempt = match &result {
                Ok(s) => DeliveryAttempt {
                    at: now,
                    status: Some(*s),
                    error: None,
                },
                Err(e) => DeliveryAttempt {
                    at: now,
                    status: None,
                    error: Some(e.clone()),
                },
            };
            hook.attempts.push(attempt);
            let (status, label) = match result {
                Ok(s) if (200..300).contains(&s) => (DeliveryStatus::Delivered, "delivered"),
                Ok(410) => (DeliveryStatus::Failed, "gone"),
                _ => match webhook::next_delay(hook.attempts.len()) {
                    Some(d) => {
                        hook.next_attempt_at = Some(now + d.as_millis() as u64);
                        (DeliveryStatus::Pending, "retry")
                    }
                    None => (DeliveryStatus::Failed, "failed"),
                },
            };
            if status != DeliveryStatus::Pending {
                hook.next_attempt_at = None;
            }
            hook.status = status;
            self.metrics.delivery(label);
            if status == DeliveryStatus::Delivered
                && let Some(done) = task.finished_at
            {
                self.metrics
                    .webhook_latency
                    .observe(now.saturating_sub(done) as f64 / 1e3);
            }
            if let Err(e) = self.store.put(vec![task]).await {
                tracing::error!(task = %id, error = %e, "task store failed while recording a delivery");
                return Delivered::Interrupted;
            }
            if status != DeliveryStatus::Pending {
                return Delivered::Done;
            }
        }
    }

    /// One delivery attempt: the receiver's status, or why there was none.
    async fn send_hook(&self, task: &Task, url: &str) -> Result<u16, String> {
        let uri = webhook::check_url(url, &self.hooks.reach).map_err(|e| e.to_string())?;
        let secrets = self.secrets.load();
        let Some(secret) = secrets.get(&task.key_id) else {
            return Err(format!(
                "key {} has no webhook secret (the `webhook-secret` entry of its token Secret)",
                task.key_id
            ));
        };
        // The task as it finished, without the delivery's own state: every attempt sends the
        // same bytes under the same webhook-id, so a receiver can dedupe on either.
        let mut view = task.view();
        if let Some(m) = view.as_object_mut() {
            m.remove("webhook");
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "task": view,
            "response": task.response,
        }))
        .expect("json serialises");
        let msg_id = format!("msg_{}", task.id);
        let timestamp = unix_ms_now() / 1000;
        let signature = secret.header(&msg_id, timestamp, &body);
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "slotgate-webhooks")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let _permit = self.hooks.permit(&task.key_id).await?;
        let exchange =
            async {
                let res =
                    self.hooks.client.request(req).await.map_err(|e| {
                        match std::error::Error::source(&e) {
                            Some(src) => format!("{e}: {src}"),
                            None => e.to_string(),
                        }
                    })?;
                let status = res.status().as_u16();
                // Read (a little of) the body so the connection can be kept alive.
                let _ = Limited::new(res.into_body(), 64 << 10).collect().await;
                Ok(status)
            };
        tokio::time::timeout(webhook::TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", webhook::TIMEOUT.as_secs())))
    }
}
