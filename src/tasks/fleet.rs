//! Running tasks across gateway replicas: the tasks live in Redis ([`RedisStore`]) and every
//! replica's dispatcher takes work from the keys' streams.
//!
//! - A replica serves the keys with work round robin, as the single-replica scheduler does. For
//!   a key it claims one entry of the key's stream at a time (one the fleet has not handed out,
//!   or one a dead replica left idle past the claim timeout), and asks the shared limiter for a
//!   slot: the key's slots are one pool across replicas and shared with its synchronous
//!   requests, so the upstream never sees more than the key's limit in flight.
//! - A claim is held until its task is finished and its webhook delivered (or given up): the
//!   entry is then acknowledged and deleted. While held, its idle time is reset every third of
//!   the claim timeout; a replica that dies stops resetting it, and another takes the entry over
//!   once it is idle for the claim timeout. The task then runs again if it was running: at least
//!   once, and more than once only for tasks that were running on the dead replica (the upstream
//!   gets the task's id as `Idempotency-Key` to tell).
//! - A cancel and a start are compare-and-set on the record's status, so one of them wins.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    Admit, KeyRef, Tasks,
    model::{DeliveryStatus, Task, TaskStatus, unix_ms_now},
    redis_store::{Claim, RedisStore},
    scheduler::{Delivered, Outcome},
};

/// How often the set of keys with work is read again (another replica's submissions).
const REFRESH: Duration = Duration::from_millis(250);
/// How soon a key whose slots are all taken is asked again: slots free on other replicas too,
/// which nothing here announces. Each further refusal in a row doubles the wait, up to
/// [`FULL_POLL_MAX`]; a task of the key ending on this replica asks again at once. So a key held
/// full by long tasks elsewhere costs Redis some 12 admissions a second instead of 100.
const FULL_POLL: Duration = Duration::from_millis(10);
/// The longest wait of a key whose slots stay taken.
const FULL_POLL_MAX: Duration = Duration::from_millis(80);
/// How long the tasks of a key that is not admitted (deleted, suspended) wait.
const GONE_POLL: Duration = Duration::from_secs(1);
/// How often the fleet-wide task counts of the keys with work are read, for the report...
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// ... of at most this many keys.
const OPEN_KEYS: usize = 2000;
/// How often a replica forgets the stream consumers of replicas that are gone...
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// ... those holding nothing and idle this long (a live replica reads its keys' streams far
/// more often).
const GONE_AFTER: Duration = Duration::from_secs(3600);
/// Keys looked at per pruning pass.
const PRUNE_KEYS: usize = 1000;
/// Most tasks one key starts in one round, so a round visits every key soon.
const ROUND_BUDGET: usize = 64;

/// How the replicas share their tasks.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// This replica's consumer name in the streams' group (unique per process).
    pub consumer: String,
    /// How long a claim may go without a heartbeat before another replica takes it over.
    pub claim_timeout: Duration,
}

/// One key's claimed work on this replica.
#[derive(Debug)]
struct KeyWork {
    /// Claimed and ready to run, oldest first.
    ready: VecDeque<(Task, String)>,
    digest: [u8; 32],
    running: u32,
    /// Waiting for a retry's backoff.
    delayed: u32,
    /// Where the scan for abandoned claims goes on.
    cursor: String,
    in_ring: bool,
    blocked_until: Option<Instant>,
    /// Admissions in a row that found every slot taken: `blocked_until` is their backoff.
    full: u32,
}

/// What this replica holds.
#[derive(Debug, Default)]
struct FleetState {
    keys: HashMap<Arc<str>, KeyWork>,
    ring: VecDeque<Arc<str>>,
    /// Entries this replica has claimed and not finished, by key: heartbeated.
    owned: HashMap<Arc<str>, HashSet<String>>,
}

impl FleetState {
    fn key(&mut self, id: &str, digest: Option<[u8; 32]>) -> (Arc<str>, &mut KeyWork) {
        let name = match self.keys.get_key_value(id) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(id),
        };
        let w = self.keys.entry(Arc::clone(&name)).or_insert_with(|| KeyWork {
            ready: VecDeque::new(),
            digest: digest.unwrap_or([0; 32]),
            running: 0,
            delayed: 0,
            cursor: "0-0".into(),
            in_ring: false,
            blocked_until: None,
            full: 0,
        });
        if let Some(d) = digest
            && w.digest == [0; 32]
        {
            w.digest = d;
        }
        (name, w)
    }

    /// Puts a key in the ring if it is not there.
    fn visit(&mut self, id: &str, digest: Option<[u8; 32]>) {
        let (name, w) = self.key(id, digest);
        if !w.in_ring {
            w.in_ring = true;
            self.ring.push_back(name);
        }
    }

    fn own(&mut self, key: &Arc<str>, entry: &str) {
        self.owned
            .entry(Arc::clone(key))
            .or_default()
            .insert(entry.to_string());
    }

    fn disown(&mut self, key: &str, entry: &str) {
        if let Some(set) = self.owned.get_mut(key) {
            set.remove(entry);
            if set.is_empty() {
                self.owned.remove(key);
            }
        }
        self.forget_if_idle(key);
    }

    fn forget_if_idle(&mut self, key: &str) {
        if self
            .keys
            .get(key)
            .is_some_and(|w| w.ready.is_empty() && w.running == 0 && w.delayed == 0 && !w.in_ring)
            && !self.owned.contains_key(key)
        {
            self.keys.remove(key);
        }
    }
}

/// The fleet side of one replica's task subsystem.
pub struct Fleet {
    pub(super) store: RedisStore,
    options: FleetOptions,
    state: Mutex<FleetState>,
    /// Set at shutdown: nothing more is claimed.
    stopping: AtomicBool,
    /// Unfinished tasks across the fleet of the keys with work, as last read.
    open: Mutex<Vec<(Arc<str>, u64)>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("consumer", &self.options.consumer)
            .finish_non_exhaustive()
    }
}

/// A consumer name unique to this process: the pod's (or host's) name, the process id and the
/// start time, so a restarted pod never resumes a dead process's claims as its own by mistake.
pub fn consumer_name() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}-{}-{}", std::process::id(), unix_ms_now())
}

fn digest_of(hex_digest: &str) -> Option<[u8; 32]> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut d).ok().map(|()| d)
}

impl Fleet {
    /// The fleet side over `store`.
    pub fn new(store: RedisStore, options: FleetOptions) -> Self {
        Self {
            store,
            options,
            state: Mutex::default(),
            stopping: AtomicBool::new(false),
            open: Mutex::default(),
        }
    }

    /// Claims nothing more from now on.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A submission on this replica: its key is looked at in the next round.
    pub(super) fn submitted(&self, key_id: &str, digest: [u8; 32]) {
        self.state().visit(key_id, Some(digest));
    }

    /// Tasks this replica runs, by key (as `[0, running]`: what is queued is the fleet's, counted
    /// from [`Fleet::open_by_key`]).
    pub(super) fn counts_by_key(&self) -> Vec<(Arc<str>, [u64; 2])> {
        self.state()
            .keys
            .iter()
            .filter(|(_, w)| w.running > 0)
            .map(|(k, w)| (Arc::clone(k), [0, u64::from(w.running)]))
            .collect()
    }

    /// Unfinished tasks across the fleet by key, for the keys with work (as last read).
    pub(super) fn open_by_key(&self) -> Vec<(Arc<str>, u64)> {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the unfinished counts of (up to [`OPEN_KEYS`] of) `keys`.
    async fn read_open(&self, keys: &[String]) {
        let keys = &keys[..keys.len().min(OPEN_KEYS)];
        match self.store.open_counts(keys).await {
            Ok(counts) => {
                let open = keys
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| (Arc::from(k.as_str()), n))
                    .collect();
                *self.open.lock().unwrap_or_else(|e| e.into_inner()) = open;
            }
            Err(e) => tracing::warn!(error = %e, "could not read the keys' task counts"),
        }
    }

    /// The entry has no work left: acknowledged, and no longer heartbeated.
    async fn done(&self, key: &str, entry: &str) {
        if let Err(e) = self.store.done(key, entry).await {
            // Left claimed: when the heartbeat stops, another replica finds the task finished.
            tracing::warn!(key, error = %e, "could not acknowledge a finished task");
        }
        self.state().disown(key, entry);
    }

    /// Gives back the claims of tasks that have not started (a replica shutting down): the next
    /// replica to look takes them at once. Running tasks keep theirs until they end or lapse.
    pub(super) async fn leave(&self) {
        let waiting: Vec<(Arc<str>, Vec<String>)> = {
            let mut st = self.state();
            let mut out = Vec::new();
            for (key, w) in st.keys.iter_mut() {
                let entries: Vec<String> = w.ready.drain(..).map(|(_, e)| e).collect();
                if !entries.is_empty() {
                    out.push((Arc::clone(key), entries));
                }
            }
            for (key, entries) in &out {
                if let Some(set) = st.owned.get_mut(key) {
                    for e in entries {
                        set.remove(e);
                    }
                }
            }
            out
        };
        for (key, entries) in waiting {
            let ids: Vec<&str> = entries.iter().map(String::as_str).collect();
            if let Err(e) = self.store.release(&key, &self.options.consumer, &ids).await {
                tracing::warn!(key = %key, error = %e, "could not give claimed tasks back");
            }
        }
    }

    /// Forgets the consumers gone replicas left in the streams of the keys with work.
    async fn prune(&self) {
        let keys = match self.store.active_keys().await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the keys with tasks");
                return;
            }
        };
        let mut gone = 0;
        for key in keys.iter().take(PRUNE_KEYS) {
            match self.store.prune(key, &self.options.consumer, GONE_AFTER).await {
                Ok(n) => gone += n,
                Err(e) => tracing::warn!(error = %e, "could not prune the consumers of gone replicas"),
            }
        }
        if gone > 0 {
            tracing::debug!(consumers = gone, "forgot the stream consumers of gone replicas");
        }
    }

    /// Keeps every claim of this replica alive; drops those another replica took over.
    async fn heartbeat(&self) {
        let owned: Vec<(Arc<str>, Vec<String>)> = self
            .state()
            .owned
            .iter()
            .map(|(k, set)| (Arc::clone(k), set.iter().cloned().collect()))
            .collect();
        for (key, entries) in owned {
            for chunk in entries.chunks(500) {
                let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
                match self.store.keep(&key, &self.options.consumer, &ids).await {
                    Ok(lost) if !lost.is_empty() => {
                        tracing::warn!(key = %key, lost = lost.len(), "claims taken over by another replica");
                        let mut st = self.state();
                        if let Some(w) = st.keys.get_mut(&key) {
                            w.ready.retain(|(_, e)| !lost.contains(e));
                        }
                        for e in &lost {
                            st.disown(&key, e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not renew task claims"),
                }
            }
        }
    }
}

impl Tasks {
    /// The dispatcher of a replica in a fleet.
    pub(super) async fn fleet_loop(self: Arc<Self>, fleet: Arc<Fleet>) {
        let mut refreshed: Option<Instant> = None;
        let mut counted: Option<Instant> = None;
        loop {
            if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
                match fleet.store.active_keys().await {
                    Ok(keys) => {
                        {
                            let mut st = fleet.state();
                            for k in &keys {
                                st.visit(k, None);
                            }
                        }
                        if counted.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
                            counted = Some(Instant::now());
                            fleet.read_open(&keys).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not read the keys with tasks"),
                }
                refreshed = Some(Instant::now());
            }
            let wait = self.fleet_round(&fleet).await.min(REFRESH);
            let _ = tokio::time::timeout(wait, self.wake.notified()).await;
        }
    }

    /// Renews this replica's claims every third of the claim timeout, and every
    /// [`PRUNE_EVERY`] forgets the consumers of replicas that are gone.
    pub(super) async fn fleet_heartbeat(fleet: Arc<Fleet>) {
        let mut tick = tokio::time::interval(fleet.options.claim_timeout / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned = Instant::now();
        loop {
            tick.tick().await;
            fleet.heartbeat().await;
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                fleet.prune().await;
            }
        }
    }

    /// One round over the keys in the ring; returns how long to wait before the next.
    async fn fleet_round(self: &Arc<Self>, fleet: &Arc<Fleet>) -> Duration {
        let Some(limits) = self.limits.get().cloned() else {
            return GONE_POLL;
        };
        if fleet.stopping.load(Ordering::Acquire) {
            return REFRESH;
        }
        let config = self.config.load_full();
        let keys: Vec<Arc<str>> = fleet.state().ring.drain(..).collect();
        let mut wait = REFRESH;
        let mut soonest = |d: Duration| wait = wait.min(d);
        let mut back = Vec::new();
        for key in keys {
            let mut keep = true;
            for _ in 0..ROUND_BUDGET {
                let now = Instant::now();
                let (front, digest, running) = {
                    let mut st = fleet.state();
                    let (_, w) = st.key(&key, None);
                    if let Some(until) = w.blocked_until {
                        if until > now {
                            soonest(until - now);
                            break;
                        }
                        w.blocked_until = None;
                    }
                    (w.ready.front().cloned(), w.digest, w.running)
                };
                let Some((task, entry)) = front else {
                    match self.fleet_claim(fleet, &key).await {
                        Ok(true) => continue,
                        Ok(false) => {
                            keep = false;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, error = %e, "could not claim tasks");
                            soonest(GONE_POLL);
                            break;
                        }
                    }
                };
                let plan = limits.plan_of(&digest);
                let policy = plan
                    .as_deref()
                    .and_then(|p| config.plans.get(p))
                    .and_then(|p| p.tasks.as_ref());
                if let Some(max) = policy.and_then(|p| p.max_concurrent)
                    && running >= max
                {
                    soonest(FULL_POLL);
                    break;
                }
                let Some(task_type) = config.task_types.get(&task.task_type).cloned() else {
                    fleet.state().key(&key, None).1.ready.pop_front();
                    let mut task = task;
                    let message = format!(
                        "task type {} is no longer declared by any ApiTaskType",
                        task.task_type
                    );
                    self.finish(
                        &mut task,
                        TaskStatus::Failed,
                        Some(super::model::TaskError {
                            code: "unknown_task_type".into(),
                            message,
                        }),
                    );
                    tokio::spawn(Arc::clone(self).fleet_settle(
                        Arc::clone(fleet),
                        Arc::clone(&key),
                        entry,
                        task,
                    ));
                    continue;
                };
                let admit = limits
                    .admit(
                        KeyRef {
                            id: &key,
                            digest: &digest,
                        },
                        &task_type.path,
                    )
                    .await;
                match admit {
                    Admit::Go(permit) => {
                        {
                            let mut st = fleet.state();
                            let (_, w) = st.key(&key, None);
                            // A heartbeat may have dropped it meanwhile (taken over elsewhere).
                            if w.ready.front().is_none_or(|(t, _)| t.id != task.id) {
                                continue;
                            }
                            w.ready.pop_front();
                            w.running += 1;
                            w.full = 0;
                        }
                        tokio::spawn(Arc::clone(self).fleet_run(
                            Arc::clone(fleet),
                            Arc::clone(&key),
                            entry,
                            task,
                            task_type,
                            plan,
                            permit,
                        ));
                    }
                    Admit::Full => {
                        let mut st = fleet.state();
                        let (_, w) = st.key(&key, None);
                        let d = (FULL_POLL * 2u32.pow(w.full.min(3))).min(FULL_POLL_MAX);
                        w.full = w.full.saturating_add(1);
                        w.blocked_until = Some(now + d);
                        soonest(d);
                        break;
                    }
                    Admit::Wait(d) => {
                        let mut st = fleet.state();
                        let (_, w) = st.key(&key, None);
                        (w.blocked_until, w.full) = (Some(now + d), 0);
                        soonest(d);
                        break;
                    }
                    Admit::Rekey(d) => fleet.state().key(&key, None).1.digest = d,
                    Admit::Gone => {
                        let mut st = fleet.state();
                        let (_, w) = st.key(&key, None);
                        (w.blocked_until, w.full) = (Some(now + GONE_POLL), 0);
                        soonest(GONE_POLL);
                        break;
                    }
                }
            }
            if keep {
                back.push(key);
            } else {
                let mut st = fleet.state();
                if let Some(w) = st.keys.get_mut(&key) {
                    w.in_ring = false;
                }
                st.forget_if_idle(&key);
            }
        }
        let mut st = fleet.state();
        for key in back {
            // Put back behind the keys a submission added meanwhile.
            st.ring.push_back(key);
        }
        wait
    }

    /// Claims one entry of a key's stream and sorts out its task: ready to run (queued in the
    /// key's work), waiting for its retry, finished with a webhook to deliver, or gone. `false`:
    /// the stream had nothing to claim.
    async fn fleet_claim(
        self: &Arc<Self>,
        fleet: &Arc<Fleet>,
        key: &Arc<str>,
    ) -> Result<bool, super::StoreError> {
        let mut cursor = fleet.state().key(key, None).1.cursor.clone();
        let claimed = fleet
            .store
            .claim(
                key,
                &fleet.options.consumer,
                fleet.options.claim_timeout,
                &mut cursor,
            )
            .await;
        fleet.state().key(key, None).1.cursor = cursor;
        let Some(Claim { entry, task: id }) = claimed? else {
            fleet.store.idle(key).await?;
            return Ok(false);
        };
        // Heartbeated only once sorted out: a claim whose record could not be read lapses and is
        // taken again later.
        let task = self.store.get(key, id).await?;
        fleet.state().own(key, &entry);
        let Some(task) = task else {
            // Expired or never written whole: nothing to do.
            fleet.done(key, &entry).await;
            return Ok(true);
        };
        if task.status.is_final() {
            if task.is_open() {
                // Finished on a replica that died before its webhook was delivered.
                tokio::spawn(Arc::clone(self).fleet_deliver(Arc::clone(fleet), Arc::clone(key), entry, task));
            } else {
                fleet.done(key, &entry).await;
            }
            return Ok(true);
        }
        let digest = digest_of(&task.key_digest);
        let wait = task
            .not_before
            .map(|t| t.saturating_sub(unix_ms_now()))
            .filter(|&ms| ms > 0);
        let mut st = fleet.state();
        let (_, w) = st.key(key, digest);
        match wait {
            Some(ms) => {
                w.delayed += 1;
                drop(st);
                tokio::spawn(Self::fleet_later(
                    Arc::clone(self),
                    Arc::clone(fleet),
                    Arc::clone(key),
                    entry,
                    task,
                    Duration::from_millis(ms),
                ));
            }
            None => w.ready.push_back((task, entry)),
        }
        Ok(true)
    }

    /// A task waiting for its retry: back at the front of its key's work when the wait is over.
    async fn fleet_later(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        key: Arc<str>,
        entry: String,
        task: Task,
        after: Duration,
    ) {
        tokio::time::sleep(after).await;
        {
            let mut st = fleet.state();
            let still_ours = st.owned.get(&key).is_some_and(|s| s.contains(&entry));
            let (_, w) = st.key(&key, None);
            w.delayed = w.delayed.saturating_sub(1);
            if still_ours {
                w.ready.push_front((task, entry));
            }
            st.visit(&key, None);
        }
        self.wake.notify_one();
    }

    /// Runs one attempt of a claimed task that holds a slot (`permit`).
    #[allow(clippy::too_many_arguments)]
    async fn fleet_run(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        key: Arc<str>,
        entry: String,
        mut task: Task,
        task_type: crate::config::CompiledTaskType,
        plan: Option<Arc<str>>,
        permit: Box<dyn std::any::Any + Send + Sync>,
    ) {
        task.status = TaskStatus::Running;
        task.attempts += 1;
        task.not_before = None;
        let started = unix_ms_now();
        task.started_at = Some(started);
        let ended = |fleet: &Fleet| {
            let mut st = fleet.state();
            let (_, w) = st.key(&key, None);
            w.running = w.running.saturating_sub(1);
            // A slot of the key is free here: a key backing off because all were taken asks now.
            if w.full > 0 {
                (w.blocked_until, w.full) = (None, 0);
            }
        };
        // Marked before the request goes out, and only if still queued (or running: taken over
        // from a dead replica): a cancel that won leaves the task canceled and unrun.
        match fleet
            .store
            .swap(&task, &[TaskStatus::Queued, TaskStatus::Running])
            .await
        {
            Ok(Some(TaskStatus::Queued | TaskStatus::Running)) => {}
            Ok(_) => {
                drop(permit);
                ended(&fleet);
                self.wake.notify_one();
                fleet.done(&key, &entry).await;
                return;
            }
            Err(e) => {
                tracing::error!(task = %task.id, error = %e, "task store failed while starting a task");
                drop(permit);
                ended(&fleet);
                // Not acknowledged: the claim lapses and the task runs later, here or elsewhere.
                fleet.state().disown(&key, &entry);
                return;
            }
        }
        self.metrics
            .queue_wait
            .observe(started.saturating_sub(task.id.unix_ms()) as f64 / 1e3);
        let t = Instant::now();
        let answer = self
            .call_upstream(&task, &task_type, plan.as_deref(), &*permit)
            .await;
        let took = t.elapsed();
        drop(permit);
        ended(&fleet);
        self.metrics.run_time.observe(took.as_secs_f64());
        self.queues.lock().expect("queues lock").record_run(took);
        // A slot is free: the next task may start now.
        self.wake.notify_one();
        match self.judge(task, answer) {
            Outcome::Retry(task, after) => {
                if let Err(e) = self.store.put(vec![task.clone()]).await {
                    tracing::error!(task = %task.id, error = %e, "task store failed while scheduling a retry");
                    fleet.state().disown(&key, &entry);
                    return;
                }
                fleet.state().key(&key, None).1.delayed += 1;
                Self::fleet_later(self, fleet, key, entry, task, after).await;
            }
            Outcome::Done(task) => self.fleet_settle(fleet, key, entry, task).await,
        }
    }

    /// Stores a finished task, delivers its webhook, then lets its entry go.
    async fn fleet_settle(self: Arc<Self>, fleet: Arc<Fleet>, key: Arc<str>, entry: String, task: Task) {
        let id = task.id;
        if let Err(e) = self.store.put(vec![task.clone()]).await {
            tracing::error!(task = %id, error = %e, "task store failed while storing a result");
            fleet.state().disown(&key, &entry);
            return;
        }
        if task
            .webhook
            .as_ref()
            .is_some_and(|w| w.status == DeliveryStatus::Pending)
        {
            self.fleet_deliver(fleet, key, entry, task).await;
        } else {
            fleet.done(&key, &entry).await;
        }
    }

    async fn fleet_deliver(self: Arc<Self>, fleet: Arc<Fleet>, key: Arc<str>, entry: String, task: Task) {
        match Arc::clone(&self).deliver(key.to_string(), task.id).await {
            Delivered::Done => fleet.done(&key, &entry).await,
            Delivered::Interrupted => fleet.state().disown(&key, &entry),
        }
    }
}
