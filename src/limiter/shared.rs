//! Limits shared by every gateway replica, kept in Redis.
//!
//! A server-side script reads the key's slot leases and rate bucket, decides, and (only when
//! admitting) takes both. Admissions of one key that arrive while earlier calls are out go in one
//! call, decided in order as if each had come alone (see `admit_in_batches`). A slot is a lease: a member of the key's
//! sorted set scored by its expiry. The replica that holds a request renews its leases while the
//! request is in flight, so a lease outlives the TTL as long as its request does, and the leases of
//! a replica that dies expire by themselves within the TTL. Releases are queued and sent in
//! batches off the response path; the same task renews, so a renewal can never resurrect a lease
//! released before it.
//!
//! Time is Redis's own clock (`TIME` inside the scripts), so replicas' clocks do not matter.
//! Every Redis key of one API key carries the key id as its hash tag, so the scripts also run on a
//! Redis Cluster.

use std::{
    collections::HashMap,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::{mpsc, oneshot};

use super::RateParams;

mod blocks;

/// Admits a batch of requests of one API key, in order, as if each had come alone: `KEYS[1]` the
/// key's slot leases, `KEYS[2..]` its rate buckets; `ARGV[1]` lease TTL (ms), then five values per
/// request: slot limit (-1: none), lease member, rate per second (0: none), burst, and which of
/// `KEYS` is its bucket (0: none). Answers four values per request, `{status, in_flight,
/// rate_remaining (-1: none), retry_after_us}` with status 0 admitted, 1 slots full, 2 rate
/// limited. A bucket is GCRA in microseconds, kept as one string `tat rate burst` that expires
/// when the bucket is full again, with the same rescaling on a plan change as the in-memory bucket
/// (the used fraction of the burst is kept). Leases count while their expiry is ahead (`ZCOUNT`);
/// expired ones are removed by the renewal script, which keeps this path short. Each Redis key is
/// read and written once per batch, whatever its size: that, not the round trip, is what a
/// request costs Redis.
const ADMIT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local counted, first_empty, in_flight = false, false, 0
local buckets = {}
local leases = {}
local out = {}
for b = 2, #ARGV, 5 do
  local limit = tonumber(ARGV[b])
  local rate = tonumber(ARGV[b + 2])
  local burst = tonumber(ARGV[b + 3])
  local k = tonumber(ARGV[b + 4])
  if limit >= 0 and not counted then
    in_flight = redis.call('ZCOUNT', KEYS[1], now, '+inf')
    counted, first_empty = true, in_flight == 0
  end
  local cur = 0
  if limit >= 0 then cur = in_flight end
  local status, remaining, retry = 0, -1, 0
  if rate > 0 and k > 0 then
    local interval = 1000000 / rate
    local tau = interval * burst
    local bk = buckets[k]
    if not bk then
      bk = {tat = 0, rate = rate, burst = burst, dirty = false}
      local s = redis.call('GET', KEYS[k])
      if s then
        local t0, r0, b0 = string.match(s, '^(%d+) (%d+) (%d+)$')
        bk.tat, bk.rate, bk.burst = tonumber(t0), tonumber(r0), tonumber(b0)
      end
      buckets[k] = bk
    end
    if bk.rate ~= rate or bk.burst ~= burst then
      local used = math.max(bk.tat - now, 0) / ((1000000 / bk.rate) * bk.burst)
      bk.tat = now + math.min(used, 1) * tau
      bk.rate, bk.burst, bk.dirty = rate, burst, true
    end
    local tat = math.max(bk.tat, now)
    local nxt = tat + interval
    if nxt > now + tau then
      status, remaining, retry = 2, 0, math.ceil(nxt - tau - now)
    elseif limit >= 0 and cur >= limit then
      status, remaining = 1, math.min(math.floor((now + tau - tat) / interval), burst)
    else
      bk.tat, bk.dirty = nxt, true
      remaining = math.min(math.floor((now + tau - nxt) / interval), burst)
    end
  elseif limit >= 0 and cur >= limit then
    status = 1
  end
  if status == 0 and limit >= 0 then
    leases[#leases + 1] = now + ttl * 1000
    leases[#leases + 1] = ARGV[b + 1]
    in_flight = in_flight + 1
    cur = in_flight
  end
  out[#out + 1] = status
  out[#out + 1] = cur
  out[#out + 1] = remaining
  out[#out + 1] = retry
end
for k, bk in pairs(buckets) do
  if bk.dirty then
    redis.call('SET', KEYS[k], string.format('%.0f %d %d', bk.tat, bk.rate, bk.burst), 'PX', math.ceil((bk.tat - now) / 1000) + 1000)
  end
end
if #leases > 0 then
  redis.call('ZADD', KEYS[1], unpack(leases))
  -- The renewal keeps the set alive after this; a set that had no live lease may have none.
  if first_empty then
    redis.call('PEXPIRE', KEYS[1], ttl * 2)
  end
end
return out
";

/// Renews leases still in flight: `KEYS[1]` the slot set, `ARGV[1]` TTL (ms), then members; drops
/// expired leases (a dead replica's) from the set on the way. A lease that expired meanwhile (Redis restarted, or this replica was cut off for longer than the
/// TTL) is added back: its request is still in flight, and counting it is the truth.
const RENEW_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl * 1000, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return #ARGV - 1
";

/// Heartbeat of a replica: `KEYS[1]` the replica set, `ARGV` TTL (ms) and replica id, or TTL 0 to
/// leave. Answers the number of live replicas.
const HEARTBEAT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl * 1000, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
else
  redis.call('ZREM', KEYS[1], ARGV[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
";

/// Longest request path used as is in the name of an endpoint bucket.
const MAX_PATH_IN_KEY: usize = 128;

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| Script::new(HEARTBEAT_LUA));

/// How to reach the shared state.
#[derive(Clone, Debug)]
pub struct SharedOptions {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every Redis key, so several fleets can share one Redis.
    pub prefix: String,
    /// How long a slot lease lives without renewal: a dead replica's slots come back within it.
    pub lease_ttl: Duration,
    /// How long an admission may wait for Redis before the fallback policy applies.
    pub timeout: Duration,
    /// Replicas assumed before Redis has reported how many are live.
    pub replicas_hint: u32,
}

/// Why the shared state could not be used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SharedError {
    /// The URL does not name a Redis server.
    #[error("--state {url}: not a Redis URL like redis://127.0.0.1:6379 ({reason})")]
    Url {
        /// The URL, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The limiter's background task has stopped (the gateway is shutting down).
    #[error("the shared limiter has stopped")]
    Stopped,
}

/// A URL fit for a log line: the password, if any, is replaced.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// The calls made to the shared state, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedOp {
    /// One admission.
    Admit,
    /// A batch of releases.
    Release,
    /// The periodic heartbeat and lease renewal.
    Renew,
    /// Reading or writing a shared expiring set (the bans).
    Set,
}

impl SharedOp {
    /// Every op, to export their series from the start (a rate over a series that appears only
    /// with its first error misses that error).
    pub const ALL: [SharedOp; 4] = [Self::Admit, Self::Release, Self::Renew, Self::Set];

    /// The op as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admit => "admit",
            Self::Release => "release",
            Self::Renew => "renew",
            Self::Set => "set",
        }
    }
}

/// Told about every call and every change of mode; the gateway turns these into metrics and logs.
pub trait SharedObserver: Send + Sync + 'static {
    /// A call to Redis finished (or failed, or timed out) after `elapsed`.
    fn call(&self, op: SharedOp, elapsed: Duration, error: Option<&SharedError>);
    /// Redis became reachable (`true`) or unreachable (`false`); `replicas` live as last seen.
    fn mode(&self, shared: bool, replicas: u32);
    /// The heartbeat counted `replicas` live replicas.
    fn replicas(&self, replicas: u32);
}

/// Which bucket a request draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketName<'a> {
    /// The key's own bucket.
    Key,
    /// The bucket of one endpoint (a request path).
    Endpoint(&'a str),
}

/// One admission, as the limits in force for the request define it.
#[derive(Clone, Copy, Debug)]
pub struct SharedRequest<'a> {
    /// The key's id: names its Redis keys.
    pub scope: &'a str,
    /// Slot limit, when the request's path is under the plan's concurrency patterns.
    pub slots: Option<u32>,
    /// Rate bucket and its parameters, when a rate limit applies.
    pub rate: Option<(BucketName<'a>, RateParams)>,
}

/// What the shared state decided.
#[derive(Debug)]
pub enum SharedDecision {
    /// Admitted; the lease (when a slot limit applies) is held until dropped.
    Admitted {
        /// The slot lease.
        lease: Option<SharedLease>,
        /// Requests of the key in flight across replicas, counting this one.
        in_flight: u32,
        /// Requests the bucket still admits at once, when a rate limit applies.
        rate_remaining: Option<u32>,
    },
    /// Every slot is taken (no quota was consumed).
    SlotsFull {
        /// Requests of the key in flight across replicas.
        in_flight: u32,
        /// Requests the bucket admits at once, read without consuming.
        rate_remaining: Option<u32>,
    },
    /// The rate bucket is empty.
    RateLimited {
        /// Requests of the key in flight across replicas.
        in_flight: u32,
        /// Nanoseconds until the bucket admits one request.
        retry_after_nanos: u64,
    },
}

enum Msg {
    Release(Arc<str>, u64),
    Leave(oneshot::Sender<()>),
}

/// Most admissions one script call carries (five arguments each).
const MAX_BATCH: usize = 128;
/// Rounds of admission calls in flight at once. While they are out, the requests that arrive
/// gather into the next round's batches: under load a round carries many requests per key, and
/// Redis reads and writes each key once per batch instead of once per request.
const MAX_ROUNDS: usize = 2;

/// The four numbers the admission script answers per request.
type Verdict = [i64; 4];

/// An admission waiting for its batch.
struct Pending {
    slots_key: Arc<str>,
    rate_key: Option<Arc<str>>,
    limit: i64,
    seq: u64,
    per_second: u64,
    burst: u64,
    answer: oneshot::Sender<Result<Verdict, SharedError>>,
}

/// The Redis names of one key's slot set and buckets. Each is under the key's hash tag, so one
/// script touches one Redis Cluster slot.
pub(super) struct KeyNames {
    /// `{prefix}:{<key id>}`: the stem of the names below and of endpoint buckets.
    base: Box<str>,
    /// The slot set (a sorted set of leases).
    pub(super) slots: Arc<str>,
    /// The key-wide bucket.
    rate: Arc<str>,
    /// The lease block of the key's requests that take tokens only (see [`blocks`]).
    pub(super) tokens: Arc<str>,
}

/// How many keys' names are kept; past it they are formatted afresh (the set starts over), so a
/// gateway with more active keys than this costs what every request cost before the cache.
const NAMED_KEYS: usize = 16_384;

struct Core {
    conn: ConnectionManager,
    prefix: String,
    replica: String,
    replicas_key: String,
    ttl_ms: u64,
    timeout: Duration,
    seq: AtomicU64,
    /// Leases held by this replica: sequence number to the slot set holding it.
    leases: Mutex<HashMap<u64, Arc<str>>>,
    /// Lease blocks by slot set (see [`blocks`]).
    blocks: Mutex<HashMap<Arc<str>, blocks::Block>>,
    /// The Redis names of the keys seen lately, so that a request does not format them.
    names: Mutex<HashMap<Box<str>, Arc<KeyNames>, foldhash::quality::RandomState>>,
    healthy: AtomicBool,
    replicas: AtomicU32,
    observer: Arc<dyn SharedObserver>,
    queue: mpsc::UnboundedSender<Msg>,
    admissions: mpsc::UnboundedSender<Pending>,
}

/// The shared limiter of one replica. Dropping it stops renewing: its leases then expire.
pub struct SharedLimiter {
    core: Arc<Core>,
    task: tokio::task::JoinHandle<()>,
    batches: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("replica", &self.core.replica)
            .field("shared", &self.is_shared())
            .finish_non_exhaustive()
    }
}

impl Drop for SharedLimiter {
    fn drop(&mut self) {
        self.task.abort();
        self.batches.abort();
    }
}

/// A slot lease held in Redis; dropping it queues its release (or gives it back to the block it
/// came from).
pub struct SharedLease {
    core: Arc<Core>,
    seq: u64,
    /// The slot set whose block the lease came from.
    block: Option<Arc<str>>,
}

impl std::fmt::Debug for SharedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLease").field("seq", &self.seq).finish()
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        if let Some(block) = &self.block
            && self.core.return_to_block(block, self.seq)
        {
            return;
        }
        let key = self
            .core
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.seq);
        if let Some(key) = key {
            let _ = self.core.queue.send(Msg::Release(key, self.seq));
        }
    }
}

impl SharedLimiter {
    /// Connects (one heartbeat, bounded by the timeout) and starts the task that renews leases,
    /// sends releases and probes Redis. Redis being down is not an error: the limiter starts in
    /// fallback mode and switches to shared limits when Redis answers. Needs a Tokio runtime.
    pub async fn start(
        options: SharedOptions,
        observer: Arc<dyn SharedObserver>,
    ) -> Result<Self, SharedError> {
        let url_error = |reason: String| SharedError::Url {
            url: redact_url(&options.url),
            reason,
        };
        let client = redis::Client::open(options.url.as_str()).map_err(|e| url_error(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| url_error(e.to_string()))?;
        let ttl_ms = (options.lease_ttl.as_millis() as u64).max(100);
        let (queue, rx) = mpsc::unbounded_channel();
        let (admissions, admitted) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            conn,
            replicas_key: format!("{}:replicas", options.prefix),
            prefix: options.prefix,
            replica: replica_id(),
            ttl_ms,
            timeout: options.timeout,
            seq: AtomicU64::new(0),
            leases: Mutex::default(),
            blocks: Mutex::default(),
            names: Mutex::default(),
            healthy: AtomicBool::new(false),
            replicas: AtomicU32::new(options.replicas_hint.max(1)),
            observer,
            queue,
            admissions,
        });
        core.tick(&mut Vec::new()).await;
        if !core.healthy.load(Ordering::Acquire) {
            core.observer.mode(false, core.replicas.load(Ordering::Relaxed));
        }
        let task = tokio::spawn(maintain(Arc::clone(&core), rx));
        let batches = tokio::spawn(admit_in_batches(Arc::clone(&core), admitted));
        Ok(Self { core, task, batches })
    }

    /// Whether admissions go to Redis now (false: Redis is unreachable, the fallback applies).
    pub fn is_shared(&self) -> bool {
        self.core.healthy.load(Ordering::Acquire)
    }

    /// Live replicas as last reported by Redis (at least 1).
    pub fn replicas(&self) -> u32 {
        self.core.replicas.load(Ordering::Relaxed).max(1)
    }

    /// This replica's id in Redis.
    pub fn replica(&self) -> &str {
        &self.core.replica
    }

    /// Leases this replica holds now.
    pub fn leases_held(&self) -> usize {
        self.core.leases.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Admits one request in one round trip, batched with the other requests of its key that are
    /// waiting meanwhile. An error (Redis unreachable, or slower than the timeout) switches the
    /// limiter to fallback mode until Redis answers a probe again.
    pub async fn admit(&self, req: SharedRequest<'_>) -> Result<SharedDecision, SharedError> {
        let core = &self.core;
        let names = core.names(req.scope);
        let slots_key = Arc::clone(&names.slots);
        let rate_key = req.rate.map(|(name, _)| match name {
            // A long path (a client walking random paths) is named by its digest, so a Redis key
            // stays small whatever the request.
            BucketName::Endpoint(path) if path.len() > MAX_PATH_IN_KEY => {
                use sha2::Digest;
                let digest = hex::encode(sha2::Sha256::digest(path.as_bytes()));
                format!("{}:rate:#{digest}", names.base).into()
            }
            BucketName::Endpoint(path) => format!("{}:rate:{path}", names.base).into(),
            BucketName::Key => Arc::clone(&names.rate),
        });
        if let Some(decided) = core.admit_from_block(&req, &names, rate_key.as_ref()).await {
            return decided;
        }
        let seq = core.seq.fetch_add(1, Ordering::Relaxed);
        let (per_second, burst) = req.rate.map_or((0, 0), |(_, p)| (p.per_second, p.burst));
        let (answer, verdict) = oneshot::channel();
        let pending = Pending {
            slots_key: Arc::clone(&slots_key),
            rate_key,
            limit: req.slots.map_or(-1, i64::from),
            seq,
            per_second: per_second.into(),
            burst: burst.into(),
            answer,
        };
        let started = Instant::now();
        let result = if core.admissions.send(pending).is_err() {
            Err(SharedError::Stopped)
        } else {
            match tokio::time::timeout(core.timeout, verdict).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(SharedError::Stopped),
                Err(_) => Err(SharedError::Timeout(core.timeout)),
            }
        };
        core.observer
            .call(SharedOp::Admit, started.elapsed(), result.as_ref().err());
        let [status, in_flight, remaining, retry_us] = match result {
            Ok(v) => v,
            Err(e) => {
                if req.slots.is_some() {
                    // The script may have run, or may still run, before the answer was lost:
                    // take the lease back (the batch task does too if it runs later).
                    let _ = core.queue.send(Msg::Release(slots_key, seq));
                }
                core.set_healthy(false);
                return Err(e);
            }
        };
        let in_flight = u32::try_from(in_flight).unwrap_or(0);
        let rate_remaining = u32::try_from(remaining).ok();
        Ok(match status {
            0 => SharedDecision::Admitted {
                lease: req.slots.map(|_| {
                    core.leases
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(seq, slots_key);
                    SharedLease {
                        core: Arc::clone(core),
                        seq,
                        block: None,
                    }
                }),
                in_flight,
                rate_remaining,
            },
            1 => SharedDecision::SlotsFull {
                in_flight,
                rate_remaining,
            },
            _ => SharedDecision::RateLimited {
                in_flight,
                retry_after_nanos: u64::try_from(retry_us).unwrap_or(0) * 1000,
            },
        })
    }

    /// A lease for a request this replica admitted on its own while Redis was unreachable: no
    /// call now; the first renewal that reaches Redis adds it, so from then on every replica
    /// counts the request. Dropping it releases it like any lease.
    pub fn lease_unconfirmed(&self, scope: &str) -> SharedLease {
        let core = &self.core;
        let seq = core.seq.fetch_add(1, Ordering::Relaxed);
        let slots_key = Arc::clone(&core.names(scope).slots);
        core.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, slots_key);
        SharedLease {
            core: Arc::clone(core),
            seq,
            block: None,
        }
    }

    /// Adds `member` to the shared expiring set `name` until `until_unix_ms` (wall-clock ms, which
    /// every replica reads alike), and drops members that have expired. Replicas use these sets
    /// to share what each of them decided (the bans), each reading them with [`Self::live`].
    pub async fn put_expiring(
        &self,
        name: &str,
        member: &str,
        until_unix_ms: u64,
    ) -> Result<(), SharedError> {
        let core = &self.core;
        let key = format!("{}:{name}", core.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&key).arg(until_unix_ms).arg(member).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(unix_ms())
            .ignore();
        pipe.cmd("PEXPIREAT")
            .arg(&key)
            .arg(until_unix_ms.max(unix_ms()))
            .arg("GT")
            .ignore();
        let mut conn = core.conn.clone();
        core.bounded(
            SharedOp::Set,
            core.background_timeout(),
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// The members of the shared expiring set `name` that have not expired, with their ends
    /// (wall-clock ms), at most `limit` of them, those ending last first.
    pub async fn live(&self, name: &str, limit: usize) -> Result<Vec<(String, u64)>, SharedError> {
        let core = &self.core;
        let key = format!("{}:{name}", core.prefix);
        let mut conn = core.conn.clone();
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(&key)
            .arg("+inf")
            .arg(format!("({}", unix_ms()))
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES");
        core.bounded(
            SharedOp::Set,
            core.background_timeout(),
            cmd.query_async(&mut conn),
        )
        .await
    }

    /// Removes the members of the shared expiring set `name` that `matches` picks.
    pub async fn remove_where(
        &self,
        name: &str,
        matches: impl Fn(&str) -> bool,
    ) -> Result<usize, SharedError> {
        let members: Vec<String> = self
            .live(name, usize::MAX >> 1)
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| matches(m))
            .collect();
        if members.is_empty() {
            return Ok(0);
        }
        let core = &self.core;
        let key = format!("{}:{name}", core.prefix);
        let mut conn = core.conn.clone();
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(&key).arg(&members);
        core.bounded(
            SharedOp::Set,
            core.background_timeout(),
            cmd.query_async::<usize>(&mut conn),
        )
        .await
    }

    /// Sends the releases still queued and leaves the replica set, so the others' share grows at
    /// once; call after the requests in flight have finished.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.core.queue.send(Msg::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A replica id unique across restarts and hosts: host name, process id, start time.
fn replica_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{}:{}:{:x}",
        crate::host_name(),
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

impl Core {
    /// The names of key `scope`, formatted once while the key stays among the recent ones.
    fn names(&self, scope: &str) -> Arc<KeyNames> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get(scope) {
            return Arc::clone(n);
        }
        if names.len() >= NAMED_KEYS {
            names.clear();
        }
        let base = format!("{}:{{{scope}}}", self.prefix);
        let slots: Arc<str> = format!("{base}:slots").into();
        let n = Arc::new(KeyNames {
            rate: format!("{base}:rate").into(),
            tokens: format!("{slots}|tokens").into(),
            slots,
            base: base.into(),
        });
        names.insert(scope.into(), Arc::clone(&n));
        n
    }

    fn member(&self, seq: u64) -> String {
        format!("{}:{seq}", self.replica)
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            self.observer
                .mode(healthy, self.replicas.load(Ordering::Relaxed).max(1));
        }
    }

    /// Background calls may wait a little longer than an admission: nobody is waiting on them.
    fn background_timeout(&self) -> Duration {
        self.timeout.max(Duration::from_millis(250))
    }

    /// Runs one call within `limit`, and tells the observer how it went.
    async fn bounded<T>(
        &self,
        op: SharedOp,
        limit: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SharedError::Redis(e)),
            Err(_) => Err(SharedError::Timeout(limit)),
        };
        self.observer.call(op, started.elapsed(), result.as_ref().err());
        result
    }

    /// Sends queued releases, one `ZREM` per slot set in one pipeline. A release that fails is
    /// dropped: its lease is no longer renewed, so it expires within the TTL.
    async fn flush(&self, pending: &mut Vec<(Arc<str>, u64)>) {
        if pending.is_empty() {
            return;
        }
        let mut by_key: HashMap<&str, Vec<String>> = HashMap::new();
        for (key, seq) in pending.iter() {
            by_key.entry(key).or_default().push(self.member(*seq));
        }
        let mut pipe = redis::pipe();
        for (key, members) in by_key {
            pipe.cmd("ZREM").arg(key).arg(members).ignore();
        }
        let mut conn = self.conn.clone();
        if self
            .bounded(
                SharedOp::Release,
                self.background_timeout(),
                pipe.query_async::<()>(&mut conn),
            )
            .await
            .is_err()
        {
            self.set_healthy(false);
        }
        pending.clear();
    }

    /// Releases, heartbeat (which doubles as the probe that ends fallback mode), renewals.
    async fn tick(&self, pending: &mut Vec<(Arc<str>, u64)>) {
        self.return_blocks(pending, false).await;
        self.flush(pending).await;
        let mut conn = self.conn.clone();
        let mut beat = HEARTBEAT.prepare_invoke();
        // A replica counts as live for three lease TTLs: a heartbeat late on a busy machine must
        // not shrink the count, since the fallback share is the limit divided by it (counting a
        // dead replica a little longer only makes the fallback stricter).
        beat.key(&self.replicas_key)
            .arg(self.ttl_ms * 3)
            .arg(&self.replica);
        let live = match self
            .bounded(
                SharedOp::Renew,
                self.background_timeout(),
                beat.invoke_async::<u32>(&mut conn),
            )
            .await
        {
            Ok(n) => n,
            Err(_) => {
                self.set_healthy(false);
                return;
            }
        };
        if self.replicas.swap(live.max(1), Ordering::Relaxed) != live.max(1) {
            self.observer.replicas(live.max(1));
        }
        let mut by_key: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for (seq, key) in self.leases.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            by_key.entry(Arc::clone(key)).or_default().push(self.member(*seq));
        }
        let renewals = by_key.iter().map(|(key, members)| {
            let mut conn = self.conn.clone();
            async move {
                let mut call = RENEW.prepare_invoke();
                call.key(&**key).arg(self.ttl_ms).arg(members);
                call.invoke_async::<u32>(&mut conn).await
            }
        });
        let renewed = self
            .bounded(SharedOp::Renew, self.background_timeout(), async {
                futures::future::try_join_all(renewals).await.map(|_| ())
            })
            .await;
        self.set_healthy(renewed.is_ok());
    }
}

/// Owns the release queue and the renewal tick, in one task so that a renewal is always sent
/// after every release queued before it was taken.
async fn maintain(core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let every = Duration::from_millis(core.ttl_ms / 3).min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let mut leave = None;
                let mut next = Some(msg);
                // Batch whatever else is queued into the same round trip.
                while let Some(m) = next {
                    match m {
                        Msg::Release(key, seq) => pending.push((key, seq)),
                        Msg::Leave(done) => leave = Some(done),
                    }
                    next = rx.try_recv().ok();
                }
                if leave.is_some() {
                    core.return_blocks(&mut pending, true).await;
                }
                if core.healthy.load(Ordering::Acquire) || leave.is_some() {
                    core.flush(&mut pending).await;
                }
                if let Some(done) = leave {
                    let mut conn = core.conn.clone();
                    let mut bye = HEARTBEAT.prepare_invoke();
                    bye.key(&core.replicas_key).arg(0).arg(&core.replica);
                    let _ = core.bounded(SharedOp::Renew, core.background_timeout(), bye.invoke_async::<u32>(&mut conn)).await;
                    let _ = done.send(());
                }
            }
            _ = tick.tick() => core.tick(&mut pending).await,
        }
    }
}

/// Sends admissions in rounds of one script call per API key, at most [`MAX_ROUNDS`] rounds in
/// flight. A request that arrives while Redis is idle goes out at once; under load, requests wait
/// for at most the rounds ahead of them and then share a call with the others of their key. One
/// key's requests stay in one call because the script touches only that key's Redis keys, which
/// share its hash tag (and so a Redis Cluster slot).
async fn admit_in_batches(core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut rounds = futures::stream::FuturesUnordered::new();
    let mut queued: Vec<Pending> = Vec::new();
    let mut open = true;
    loop {
        while let Ok(p) = rx.try_recv() {
            queued.push(p);
        }
        // A caller that gave up (timed out, or its client left) has already fallen back.
        queued.retain(|p| !p.answer.is_closed());
        if rounds.len() < MAX_ROUNDS && !queued.is_empty() {
            rounds.push(core.admit_round(batches_by_key(&mut queued)));
        }
        if !open && rounds.is_empty() && queued.is_empty() {
            return;
        }
        tokio::select! {
            Some(()) = futures::StreamExt::next(&mut rounds), if !rounds.is_empty() => {}
            p = rx.recv(), if open => match p {
                Some(p) => queued.push(p),
                None => open = false,
            },
        }
    }
}

/// Takes everything queued, grouped by API key in arrival order, at most [`MAX_BATCH`] a call.
fn batches_by_key(queued: &mut Vec<Pending>) -> Vec<Vec<Pending>> {
    let mut batches: Vec<Vec<Pending>> = Vec::new();
    let mut open: HashMap<Arc<str>, usize> = HashMap::new();
    for p in queued.drain(..) {
        match open.get(&p.slots_key) {
            Some(&i) if batches[i].len() < MAX_BATCH => batches[i].push(p),
            _ => {
                open.insert(Arc::clone(&p.slots_key), batches.len());
                batches.push(vec![p]);
            }
        }
    }
    batches
}

impl Core {
    /// One round: every batch's call written at once (the connection pipelines them).
    async fn admit_round(&self, batches: Vec<Vec<Pending>>) {
        futures::future::join_all(batches.into_iter().map(|b| self.admit_batch(b))).await;
    }

    /// One script call for one key's batch; every caller gets its own answer.
    async fn admit_batch(&self, batch: Vec<Pending>) {
        let mut call = ADMIT.prepare_invoke();
        call.key(&*batch[0].slots_key);
        let mut rate_keys: Vec<&str> = Vec::new();
        let mut which = Vec::with_capacity(batch.len());
        for p in &batch {
            which.push(match p.rate_key.as_deref() {
                None => 0,
                Some(k) => match rate_keys.iter().position(|r| *r == k) {
                    Some(i) => i + 2,
                    None => {
                        rate_keys.push(k);
                        call.key(k);
                        rate_keys.len() + 1
                    }
                },
            });
        }
        call.arg(self.ttl_ms);
        for (p, k) in batch.iter().zip(which) {
            call.arg(p.limit)
                .arg(self.member(p.seq))
                .arg(p.per_second)
                .arg(p.burst)
                .arg(k);
        }
        let mut conn = self.conn.clone();
        let limit = self.background_timeout();
        let answers = match tokio::time::timeout(limit, call.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(v)) if v.len() == 4 * batch.len() => Ok(v),
            Ok(Ok(v)) => Err(SharedError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "admission script answered",
                format!("{} numbers for {} requests", v.len(), batch.len()),
            )))),
            Ok(Err(e)) => Err(SharedError::Redis(e)),
            Err(_) => Err(SharedError::Timeout(limit)),
        };
        for (i, p) in batch.into_iter().enumerate() {
            let verdict = match &answers {
                Ok(v) => Ok([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]]),
                Err(e) => Err(e.clone()),
            };
            // Taken, or perhaps taken, for a caller that is no longer waiting: give it back
            // (after the script on the same connection, so the release cannot come first).
            let maybe_taken = p.limit >= 0 && verdict.as_ref().map_or(true, |v| v[0] == 0);
            if p.answer.send(verdict).is_err() && maybe_taken {
                let _ = self.queue.send(Msg::Release(p.slots_key, p.seq));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
