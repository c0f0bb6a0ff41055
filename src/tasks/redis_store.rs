//! The shared task store: tasks in Redis, so that every gateway replica can serve, run and
//! deliver any of them ([`RedisStore`]).
//!
//! Every Redis key of one API key carries the key id as its hash tag (`{ns/name}`), so each
//! script touches one Redis Cluster slot, as the limiter's do:
//!
//! - `<p>:t:{key}:task:<id>`: a hash, `rec` (the task as JSON) and `st` (its status, which the
//!   scripts compare and set without decoding the record). A finished task expires with its
//!   retention;
//! - `<p>:t:{key}:index`: a sorted set of the key's task ids, all of score 0, so `ZRANGE BYLEX`
//!   lists them oldest first (ids sort by submission time);
//! - `<p>:t:{key}:expiry`: the finished ids by end of retention, so the sweep can trim the index;
//! - `<p>:t:{key}:open`: the count of the key's unfinished tasks (its `maxQueued` is checked
//!   against it, fleet-wide, in the submission's script);
//! - `<p>:t:{key}:queue`: the key's work, a stream with one consumer group (`fleet`) for all
//!   replicas: the fair-share unit. An entry names a task; it is acknowledged and deleted once
//!   the task is finished and its webhook delivered, so an entry a dead replica had claimed is
//!   claimed again by another after the claim timeout (`XAUTOCLAIM`).
//!
//! Two sets are global, touched outside the scripts: `<p>:t:active` (keys whose stream may hold
//! work) and `<p>:t:sweep` (keys with finished tasks, by their earliest end of retention).

use std::{sync::LazyLock, time::Duration};

use futures::future::BoxFuture;
use redis::{Script, ScriptInvocation, Value, aio::ConnectionManager};
use tokio::sync::{mpsc, oneshot};

use super::{
    model::{Task, TaskId, TaskStatus},
    store::{Page, StoreError, TaskStore},
};

/// The consumer group of every replica of a fleet.
const GROUP: &str = "fleet";
/// Most ids one page of `list` looks at (as [`super::store`]'s `MAX_SCAN`).
const MAX_SCAN: usize = 10_000;
/// Keys swept per call of `expire`, and ids per key.
const SWEEP_KEYS: usize = 100;
const SWEEP_IDS: usize = 1_000;

/// Writes a record; keeps the index and the count of unfinished tasks right whatever it was
/// before (a new task, a status change, the same status again).
/// KEYS: record, index, open, expiry. ARGV: id, json, status, final (0/1), expires at ms (0: none).
const PUT_LUA: &str = r"
local before = redis.call('HGET', KEYS[1], 'st')
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'st', ARGV[3])
if not before then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  if ARGV[4] == '0' then redis.call('INCR', KEYS[3]) end
elseif ARGV[4] == '1' and before ~= 'completed' and before ~= 'failed' and before ~= 'canceled' then
  redis.call('DECR', KEYS[3])
end
if ARGV[5] ~= '0' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
end
return 1
";

/// Takes a new task if the key has fewer than `max` unfinished ones, and queues it.
/// KEYS: record, index, open, queue. ARGV: id, json, max. Returns -1 when stored, else the count.
const SUBMIT_LUA: &str = r"
local open = tonumber(redis.call('GET', KEYS[3]) or '0')
if open >= tonumber(ARGV[3]) then return open end
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'st', 'queued')
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('INCR', KEYS[3])
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[4], 'fleet', '0', 'MKSTREAM')
end
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
return -1
";

/// Writes a record only if its status is one of ARGV[3..]: the compare-and-set that keeps a
/// cancel and a start from both winning. KEYS: record, open, expiry. ARGV: id, json, new status,
/// final (0/1), expires at ms (0: none), allowed statuses... Returns the status before ('' when
/// there is no record); the write happened when it is one of the allowed.
const SWAP_LUA: &str = r"
local before = redis.call('HGET', KEYS[1], 'st')
if not before then return '' end
for i = 6, #ARGV do
  if before == ARGV[i] then
    redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'st', ARGV[3])
    if ARGV[4] == '1' then redis.call('DECR', KEYS[2]) end
    if ARGV[5] ~= '0' then
      redis.call('PEXPIREAT', KEYS[1], ARGV[5])
      redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
    end
    return before
  end
end
return before
";

/// Claims one entry of a key's stream for this consumer: first one a dead consumer left idle
/// past the claim timeout (scanning the pending list from a cursor), else a new one.
/// KEYS: queue. ARGV: consumer, min idle ms, cursor. Returns {cursor, entry id, task id} or
/// {cursor}.
const CLAIM_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0'} end
local auto = redis.call('XAUTOCLAIM', KEYS[1], 'fleet', ARGV[1], ARGV[2], ARGV[3], 'COUNT', 1)
local cursor = auto[1]
if #auto[2] > 0 and auto[2][1][2] then
  return {cursor, auto[2][1][1], auto[2][1][2][2]}
end
local new = redis.call('XREADGROUP', 'GROUP', 'fleet', ARGV[1], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if new and #new[1][2] > 0 then
  return {cursor, new[1][2][1][1], new[1][2][1][2][2]}
end
return {cursor}
";

/// Resets the idle time of the entries this consumer still holds (a live replica's claims are
/// never taken over); returns those it no longer holds. KEYS: queue. ARGV: consumer, ids...
const KEEP_LUA: &str = r"
local lost = {}
for i = 2, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], 'fleet', ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[1] then
    redis.call('XCLAIM', KEYS[1], 'fleet', ARGV[1], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
";

/// Acknowledges and deletes an entry; returns the entries left. KEYS: queue. ARGV: entry id.
const DONE_LUA: &str = r"
redis.call('XACK', KEYS[1], 'fleet', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return redis.call('XLEN', KEYS[1])
";

/// Removes the group's consumers that hold nothing and have been idle longer than `ARGV[2]` ms
/// (replicas gone), except `ARGV[1]` (the caller). KEYS: queue. Returns how many went.
const PRUNE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local gone = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], 'fleet')) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[1] and tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], 'fleet', f['name'])
    gone = gone + 1
  end
end
return gone
";

static PUT: LazyLock<Script> = LazyLock::new(|| Script::new(PUT_LUA));
static SUBMIT: LazyLock<Script> = LazyLock::new(|| Script::new(SUBMIT_LUA));
static SWAP: LazyLock<Script> = LazyLock::new(|| Script::new(SWAP_LUA));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
static KEEP: LazyLock<Script> = LazyLock::new(|| Script::new(KEEP_LUA));
static DONE: LazyLock<Script> = LazyLock::new(|| Script::new(DONE_LUA));
static PRUNE: LazyLock<Script> = LazyLock::new(|| Script::new(PRUNE_LUA));

/// An entry of a key's work stream, claimed by this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The stream entry's id.
    pub entry: String,
    /// The task it names.
    pub task: TaskId,
}

/// Writes waiting for the writer, with who to tell.
type Write = (Vec<Task>, oneshot::Sender<Result<(), StoreError>>);

/// The tasks of every replica of a fleet, in one Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    writes: mpsc::UnboundedSender<Write>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn redis_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Redis(e.to_string())
}

fn encode(task: &Task) -> String {
    serde_json::to_string(task).expect("a task serialises")
}

fn decode(id: &str, json: &str) -> Result<Task, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Decode {
        id: id.to_string(),
        source,
    })
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`), its keys under
    /// `prefix`; every call waits at most `timeout`. Connects lazily: an unreachable Redis makes
    /// calls fail (503 to submissions), not the start. Needs a Tokio runtime (for its writer).
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(redis_error)?;
        let (writes, rx) = mpsc::unbounded_channel();
        let store = Self {
            conn,
            prefix: format!("{prefix}:t"),
            timeout,
            writes,
        };
        tokio::spawn(store.clone().write_in_order(rx));
        Ok(store)
    }

    /// The writer: `put`s are applied in the order they were called (the trait's promise, which
    /// the scheduler relies on), those that queued meanwhile in one pipeline. It ends when the
    /// last handle of the store is dropped.
    async fn write_in_order(self, mut rx: mpsc::UnboundedReceiver<Write>) {
        // Its own copy must not hold the channel open.
        let Self {
            conn,
            prefix,
            timeout,
            writes,
        } = self;
        drop(writes);
        let (closed, _) = mpsc::unbounded_channel();
        let this = Self {
            conn,
            prefix,
            timeout,
            writes: closed,
        };
        let mut batch: Vec<Write> = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < 256
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            let tasks: Vec<Task> = batch.iter().flat_map(|(t, _)| t.iter().cloned()).collect();
            let result = this.put_all(tasks).await.map_err(|e| e.to_string());
            for (_, tell) in batch.drain(..) {
                let _ = tell.send(result.clone().map_err(StoreError::Redis));
            }
        }
    }

    fn key(&self, key_id: &str, what: &str) -> String {
        format!("{}:{{{key_id}}}:{what}", self.prefix)
    }

    fn record(&self, key_id: &str, id: TaskId) -> String {
        self.key(key_id, &format!("task:{id}"))
    }

    /// A call of `script` on `task`: its record's key, then the key's Redis keys named by
    /// `keys`; then the task's id and JSON, and (`with_status`) its status, whether it is final
    /// and its end of retention (0: none), as the scripts take them.
    fn on_task<'s>(
        &self,
        script: &'s Script,
        task: &Task,
        keys: &[&str],
        with_status: bool,
    ) -> ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        call.key(self.record(&task.key_id, task.id));
        for k in keys {
            call.key(self.key(&task.key_id, k));
        }
        call.arg(task.id.to_string()).arg(encode(task));
        if with_status {
            call.arg(task.status.as_str())
                .arg(u8::from(task.status.is_final()))
                .arg(task.expires_at.unwrap_or(0));
        }
        call
    }

    fn active_set(&self) -> String {
        format!("{}:active", self.prefix)
    }

    fn sweep_set(&self) -> String {
        format!("{}:sweep", self.prefix)
    }

    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map_err(redis_error),
            Err(_) => Err(StoreError::Redis(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Stores a new task and queues it for the fleet if its key has fewer than `max` unfinished
    /// tasks; `Ok(Err(n))`: it has `n`, and nothing was stored.
    pub async fn submit(&self, task: &Task, max: u32) -> Result<Result<(), u64>, StoreError> {
        let mut call = self.on_task(&SUBMIT, task, &["index", "open", "queue"], false);
        call.arg(max);
        let mut conn = self.conn.clone();
        let n: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        if n >= 0 {
            return Ok(Err(n as u64));
        }
        self.mark_active(&task.key_id).await?;
        Ok(Ok(()))
    }

    async fn mark_active(&self, key_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SADD");
        cmd.arg(self.active_set()).arg(key_id);
        self.bounded(cmd.query_async::<()>(&mut conn)).await
    }

    /// Writes `task` only if its stored status is one of `from`; returns the stored status
    /// (`None`: no such task). The write happened when the status returned is in `from`.
    pub async fn swap(&self, task: &Task, from: &[TaskStatus]) -> Result<Option<TaskStatus>, StoreError> {
        let mut call = self.on_task(&SWAP, task, &["open", "expiry"], true);
        for s in from {
            call.arg(s.as_str());
        }
        let mut conn = self.conn.clone();
        let before: String = self.bounded(call.invoke_async(&mut conn)).await?;
        if task.expires_at.is_some() && from.iter().any(|s| s.as_str() == before) {
            self.note_sweep(&task.key_id, task.expires_at).await?;
        }
        Ok(TaskStatus::parse(&before))
    }

    async fn note_sweep(&self, key_id: &str, at: Option<u64>) -> Result<(), StoreError> {
        let Some(at) = at else { return Ok(()) };
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.sweep_set()).arg("LT").arg(at).arg(key_id);
        // LT adds a new member too, and keeps an existing one's earliest time.
        self.bounded(cmd.query_async::<()>(&mut conn)).await
    }

    /// The unfinished tasks (queued or running) of each of `keys`, across the fleet.
    pub async fn open_counts(&self, keys: &[String]) -> Result<Vec<u64>, StoreError> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(self.key(k, "open"));
        }
        let mut conn = self.conn.clone();
        let counts: Vec<Option<i64>> = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(counts.into_iter().map(|c| c.unwrap_or(0).max(0) as u64).collect())
    }

    /// The keys whose work streams may hold entries.
    pub async fn active_keys(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.active_set());
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Claims one entry of `key_id`'s stream for `consumer`: one left idle for `min_idle` by
    /// another consumer (found from `cursor`, which is advanced), else a new one.
    pub async fn claim(
        &self,
        key_id: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: &mut String,
    ) -> Result<Option<Claim>, StoreError> {
        let mut call = CLAIM.prepare_invoke();
        call.key(self.key(key_id, "queue"))
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor.as_str());
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self.bounded(call.invoke_async(&mut conn)).await?;
        let mut it = reply.into_iter();
        *cursor = it.next().unwrap_or_else(|| "0-0".into());
        let (Some(entry), Some(task)) = (it.next(), it.next()) else {
            return Ok(None);
        };
        match task.parse() {
            Ok(task) => Ok(Some(Claim { entry, task })),
            // Not an entry this build wrote: drop it so it is not claimed forever.
            Err(()) => {
                self.done(key_id, &entry).await?;
                Ok(None)
            }
        }
    }

    /// Keeps `entries` of `key_id` claimed by `consumer` (resets their idle time); returns those
    /// another consumer has claimed meanwhile.
    pub async fn keep(
        &self,
        key_id: &str,
        consumer: &str,
        entries: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        let mut call = KEEP.prepare_invoke();
        call.key(self.key(key_id, "queue")).arg(consumer);
        for e in entries {
            call.arg(*e);
        }
        let mut conn = self.conn.clone();
        self.bounded(call.invoke_async(&mut conn)).await
    }

    /// Gives claimed entries back at once (a replica shutting down): they count as idle past any
    /// claim timeout, so the next replica to look takes them.
    pub async fn release(&self, key_id: &str, consumer: &str, entries: &[&str]) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.key(key_id, "queue")).arg(GROUP).arg(consumer).arg(0);
        for e in entries {
            cmd.arg(*e);
        }
        // Idle for 49 days: past any claim timeout.
        cmd.arg("IDLE").arg(u64::from(u32::MAX)).arg("JUSTID");
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async::<Value>(&mut conn))
            .await
            .map(|_| ())
    }

    /// The task of a claimed entry has no work left: the entry is acknowledged and deleted, and
    /// the key leaves the active set when its stream is empty.
    pub async fn done(&self, key_id: &str, entry: &str) -> Result<(), StoreError> {
        let mut call = DONE.prepare_invoke();
        call.key(self.key(key_id, "queue")).arg(entry);
        let mut conn = self.conn.clone();
        let left: u64 = self.bounded(call.invoke_async(&mut conn)).await?;
        if left == 0 {
            self.leave_active(key_id).await?;
        }
        Ok(())
    }

    /// Removes a key from the active set, then adds it back if an entry arrived meanwhile: a
    /// submission adds its key after its entry, so one of the two always sees the other.
    async fn leave_active(&self, key_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SREM");
        cmd.arg(self.active_set()).arg(key_id);
        self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(self.key(key_id, "queue"));
        let left: u64 = self.bounded(cmd.query_async(&mut conn)).await?;
        if left > 0 {
            self.mark_active(key_id).await?;
        }
        Ok(())
    }

    /// Forgets the consumers of `key_id`'s stream that hold nothing and have been idle for
    /// `idle` (replicas that are gone), keeping `consumer`; returns how many went.
    pub async fn prune(&self, key_id: &str, consumer: &str, idle: Duration) -> Result<u64, StoreError> {
        let mut call = PRUNE.prepare_invoke();
        call.key(self.key(key_id, "queue"))
            .arg(consumer)
            .arg(idle.as_millis() as u64);
        let mut conn = self.conn.clone();
        self.bounded(call.invoke_async(&mut conn)).await
    }

    /// A key whose stream was found empty: it leaves the active set (unless work arrived).
    pub async fn idle(&self, key_id: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(self.key(key_id, "queue"));
        let mut conn = self.conn.clone();
        let left: u64 = self.bounded(cmd.query_async(&mut conn)).await?;
        if left == 0 {
            self.leave_active(key_id).await?;
        }
        Ok(())
    }

    async fn put_all(&self, tasks: Vec<Task>) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        // EVALSHA in a pipeline does not load the script: load it first (cheap, idempotent), so a
        // Redis that restarted empty knows it.
        pipe.load_script(&PUT).ignore();
        let mut sweep = Vec::new();
        for task in &tasks {
            let call = self.on_task(&PUT, task, &["index", "open", "expiry"], true);
            pipe.invoke_script(&call).ignore();
            if let Some(at) = task.expires_at {
                sweep.push((task.key_id.as_str(), at));
            }
        }
        for (key_id, at) in sweep {
            pipe.cmd("ZADD")
                .arg(self.sweep_set())
                .arg("LT")
                .arg(at)
                .arg(key_id)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async::<()>(&mut conn)).await
    }

    async fn get_one(self, key_id: String, id: TaskId) -> Result<Option<Task>, StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.record(&key_id, id)).arg("rec");
        let json: Option<String> = self.bounded(cmd.query_async(&mut conn)).await?;
        json.map(|j| decode(&id.to_string(), &j)).transpose()
    }

    async fn list_page(
        self,
        key_id: String,
        after: Option<TaskId>,
        status: Option<TaskStatus>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let index = self.key(&key_id, "index");
        let mut conn = self.conn.clone();
        let start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut from = start;
        let mut gone = Vec::new();
        loop {
            let want = (limit - out.len()).clamp(1, 500);
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&index)
                .arg(&from)
                .arg("+")
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(want);
            let ids: Vec<String> = self.bounded(cmd.query_async(&mut conn)).await?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET")
                    .arg(self.key(&key_id, &format!("task:{id}")))
                    .arg("rec");
            }
            let recs: Vec<Option<String>> = self.bounded(pipe.query_async(&mut conn)).await?;
            for (id, rec) in ids.iter().zip(recs) {
                scanned += 1;
                let Some(rec) = rec else {
                    // Expired: its index entry goes too.
                    gone.push(id.clone());
                    continue;
                };
                let task = decode(id, &rec)?;
                if status.is_none_or(|s| s == task.status) {
                    out.push(task);
                }
            }
            let last: TaskId = ids.last().and_then(|l| l.parse().ok()).unwrap_or(TaskId(0));
            from = format!("({last}");
            if out.len() >= limit || scanned >= MAX_SCAN {
                if !gone.is_empty() {
                    self.forget(&index, &gone).await?;
                }
                out.truncate(limit);
                let next = out
                    .last()
                    .map(|t| t.id)
                    .filter(|_| out.len() >= limit)
                    .or(Some(last));
                return Ok((out, next));
            }
        }
        if !gone.is_empty() {
            self.forget(&index, &gone).await?;
        }
        Ok((out, None))
    }

    async fn forget(&self, index: &str, ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(index).arg(ids);
        self.bounded(cmd.query_async::<()>(&mut conn)).await
    }

    /// Trims the indexes of keys whose finished tasks' retention is over (the records expire by
    /// themselves); at most [`SWEEP_KEYS`] keys a call.
    async fn sweep(self, now_ms: u64) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.sweep_set())
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_KEYS);
        let keys: Vec<String> = self.bounded(cmd.query_async(&mut conn)).await?;
        let mut removed = 0;
        for key_id in keys {
            let expiry = self.key(&key_id, "expiry");
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&expiry)
                .arg("-inf")
                .arg(now_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_IDS);
            let ids: Vec<String> = self.bounded(cmd.query_async(&mut conn)).await?;
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                pipe.cmd("ZREM")
                    .arg(self.key(&key_id, "index"))
                    .arg(&ids)
                    .ignore();
                pipe.cmd("ZREM").arg(&expiry).arg(&ids).ignore();
                for id in &ids {
                    // The record has expired already, unless the clocks differ a little.
                    pipe.cmd("DEL")
                        .arg(self.key(&key_id, &format!("task:{id}")))
                        .ignore();
                }
                self.bounded(pipe.query_async::<()>(&mut conn)).await?;
                removed += ids.len();
            }
            // The key's next end of retention, or out of the sweep set when none is left.
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&expiry).arg(0).arg(0).arg("WITHSCORES");
            let next: Vec<(String, u64)> = self.bounded(cmd.query_async(&mut conn)).await?;
            let cmd = match next.first() {
                Some((_, at)) => {
                    let mut c = redis::cmd("ZADD");
                    c.arg(self.sweep_set()).arg(*at).arg(&key_id);
                    c
                }
                None => {
                    let mut c = redis::cmd("ZREM");
                    c.arg(self.sweep_set()).arg(&key_id);
                    c
                }
            };
            self.bounded(cmd.query_async::<()>(&mut conn)).await?;
        }
        Ok(removed)
    }
}

impl TaskStore for RedisStore {
    fn put(&self, tasks: Vec<Task>) -> BoxFuture<'static, Result<(), StoreError>> {
        let (tell, told) = oneshot::channel();
        let sent = self.writes.send((tasks, tell));
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            told.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn get(&self, key_id: &str, id: TaskId) -> BoxFuture<'static, Result<Option<Task>, StoreError>> {
        Box::pin(self.clone().get_one(key_id.to_string(), id))
    }

    fn list(
        &self,
        key_id: &str,
        after: Option<TaskId>,
        status: Option<TaskStatus>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Page, StoreError>> {
        Box::pin(self.clone().list_page(key_id.to_string(), after, status, limit))
    }

    fn open_tasks(&self, _each: &mut dyn FnMut(Task)) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn expire(&self, now_ms: u64) -> BoxFuture<'static, Result<usize, StoreError>> {
        Box::pin(self.clone().sweep(now_ms))
    }
}
