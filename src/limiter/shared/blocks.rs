//! Lease blocks: for a key with many slots and a large burst, a replica takes slots and rate
//! tokens from Redis a block at a time and admits from the block in memory, so most requests of a
//! busy key cost no round trip.
//!
//! Exactness is kept where it matters: the slots of a block are leases like any other (renewed
//! while held, expired within the TTL if the replica dies), so the fleet never has more requests
//! in flight than the limit; the price is that a slot idle in one replica's block is not
//! available to another replica until the block shrinks or is given back (within a second of
//! the key going idle on that replica), and tokens a block holds are spent only by that replica
//! (given back to the bucket with the block). Keys with few slots or a small burst, and endpoint
//! buckets, never use blocks: every request of theirs is decided in Redis, exactly.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, atomic::Ordering},
    time::{Duration, Instant},
};

use redis::Script;

use super::{
    BucketName, Core, KeyNames, Msg, SharedDecision, SharedError, SharedLease, SharedOp, SharedRequest,
};

/// Fewest slots, and smallest burst, of a key whose requests may come from blocks: below, one
/// replica's idle block would be a noticeable share of the limit.
pub(super) const MIN_SLOTS: u32 = 64;
/// See [`MIN_SLOTS`].
pub(super) const MIN_BURST: u32 = 64;
/// A block is this fraction of the limit (slots) or burst (tokens)...
const SHARE: u32 = 32;
/// ... and at most this many slots or tokens.
const MAX_SLOTS: u32 = 32;
const MAX_TOKENS: u32 = 1024;
/// A block holding this many blocks' worth of free slots gives the excess back (down to half of
/// it): other replicas may need them, and the hysteresis keeps a busy key from churning.
const MOST_FREE: usize = 4;
/// A replica's block is given back once the key has been idle on it this long.
pub(super) const IDLE: Duration = Duration::from_secs(1);

/// Takes up to the slots and tokens asked for. `KEYS[1]` the slot set, `KEYS[2]` the bucket;
/// `ARGV`: lease TTL (ms), slot limit, rate per second (0: none), burst, tokens wanted, then one
/// lease member per slot wanted. A block never takes tokens while the slots are full, nor slots
/// while the bucket is empty, as a single request would not. Answers `{slots granted, in flight
/// after, tokens granted, tokens left in the bucket (-1: none), microseconds until a token}`.
const BLOCK_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local want_t = tonumber(ARGV[5])
local want_s = #ARGV - 5
local in_flight = 0
local free = want_s
if want_s > 0 then
  in_flight = redis.call('ZCOUNT', KEYS[1], now, '+inf')
  free = math.min(want_s, math.max(limit - in_flight, 0))
end
local gt, left, retry = 0, -1, 0
local bk, tat, interval, tau
if rate > 0 then
  interval = 1000000 / rate
  tau = interval * burst
  bk = {tat = 0, rate = rate, burst = burst}
  local s = redis.call('GET', KEYS[2])
  if s then
    local t0, r0, b0 = string.match(s, '^(%d+) (%d+) (%d+)$')
    bk.tat, bk.rate, bk.burst = tonumber(t0), tonumber(r0), tonumber(b0)
  end
  if bk.rate ~= rate or bk.burst ~= burst then
    local used = math.max(bk.tat - now, 0) / ((1000000 / bk.rate) * bk.burst)
    bk.tat = now + math.min(used, 1) * tau
  end
  tat = math.max(bk.tat, now)
  local avail = math.floor((now + tau - tat) / interval)
  -- Only a refill that wants tokens depends on the bucket: one for slots alone holds tokens.
  if want_t > 0 then
    if avail <= 0 then
      free = 0
      retry = math.ceil(tat + interval - tau - now)
    elseif want_s == 0 or free > 0 then
      gt = math.min(want_t, avail)
    end
  end
end
if gt > 0 then
  tat = tat + gt * interval
  redis.call('SET', KEYS[2], string.format('%.0f %d %d', tat, rate, burst), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if rate > 0 then
  left = math.max(math.floor((now + tau - tat) / interval), 0)
end
if free > 0 then
  local leases = {}
  for i = 1, free do
    leases[#leases + 1] = now + ttl * 1000
    leases[#leases + 1] = ARGV[5 + i]
  end
  redis.call('ZADD', KEYS[1], unpack(leases))
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
end
return {free, in_flight + free, gt, left, retry}
";

/// Gives unspent tokens back to a bucket (its clock moves back, never before now), unless the
/// bucket's parameters changed meanwhile. `KEYS[1]` the bucket; `ARGV`: tokens, rate, burst.
const RETURN_LUA: &str = r"
local s = redis.call('GET', KEYS[1])
if not s then return 0 end
local t0, r0, b0 = string.match(s, '^(%d+) (%d+) (%d+)$')
if tonumber(r0) ~= tonumber(ARGV[2]) or tonumber(b0) ~= tonumber(ARGV[3]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = math.max(tonumber(t0) - tonumber(ARGV[1]) * (1000000 / tonumber(r0)), now)
redis.call('SET', KEYS[1], string.format('%.0f %s %s', tat, r0, b0), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 1
";

static BLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(BLOCK_LUA));
static RETURN: LazyLock<Script> = LazyLock::new(|| Script::new(RETURN_LUA));

/// The limits a block was taken under; a plan change makes the block stale.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Terms {
    limit: Option<u32>,
    /// Bucket key, per second, burst.
    rate: Option<(Arc<str>, u64, u64)>,
}

/// One key's block on this replica.
#[derive(Debug)]
pub(super) struct Block {
    terms: Terms,
    /// Leases held in Redis and not tied to a request: the slots this replica may hand out.
    free: Vec<u64>,
    /// Requests admitted from the block still in flight.
    in_use: u32,
    /// Rate tokens taken from the bucket and not spent.
    tokens: u32,
    /// In flight across replicas, and tokens left in the bucket, as of the last refill.
    fleet_in_flight: u32,
    bucket_left: Option<u32>,
    last_used: Instant,
    refilling: bool,
    stale: bool,
}

/// What a refill of `b` asks for: a block of slots and of tokens where it has none, or (`early`)
/// fewer than a quarter of a block.
fn wants(b: &Block, slot_block: u32, token_block: u32, early: bool) -> (u32, u32) {
    let low = |have: usize, block: u32| {
        if early {
            have < (block / 4).max(1) as usize
        } else {
            have == 0
        }
    };
    let slots = b.terms.limit.is_some() && low(b.free.len(), slot_block);
    let tokens = b.terms.rate.is_some() && low(b.tokens as usize, token_block);
    (
        if slots { slot_block } else { 0 },
        if tokens { token_block } else { 0 },
    )
}

/// The slots and tokens a block of this request's key is made of; `None`: the request is decided
/// in Redis alone.
fn sizes(req: &SharedRequest<'_>) -> Option<(u32, u32)> {
    let slots = match req.slots {
        None => 0,
        Some(l) if l >= MIN_SLOTS => (l / SHARE).clamp(1, MAX_SLOTS),
        Some(_) => return None,
    };
    let tokens = match req.rate {
        None => 0,
        Some((BucketName::Key, p)) if p.burst >= MIN_BURST => (p.burst / SHARE).clamp(1, MAX_TOKENS),
        Some(_) => return None,
    };
    (slots + tokens > 0).then_some((slots, tokens))
}

impl Core {
    /// Admits from (or refills) the key's block; `None`: the request goes the per-request way.
    pub(super) async fn admit_from_block(
        self: &Arc<Self>,
        req: &SharedRequest<'_>,
        names: &KeyNames,
        rate_key: Option<&Arc<str>>,
    ) -> Option<Result<SharedDecision, SharedError>> {
        let (slot_block, token_block) = sizes(req)?;
        if !self.healthy.load(Ordering::Acquire) {
            return None;
        }
        let slots_key = &names.slots;
        // A key's requests outside its concurrency paths take tokens only: a block of their own,
        // so they do not make the slot block's terms flip.
        let block_key = if req.slots.is_some() {
            slots_key
        } else {
            &names.tokens
        };
        let terms = Terms {
            limit: req.slots,
            rate: req
                .rate
                .zip(rate_key)
                .map(|((_, p), k)| (Arc::clone(k), u64::from(p.per_second), u64::from(p.burst))),
        };
        let (want_slots, want_tokens) = {
            let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
            let b = blocks.entry(Arc::clone(block_key)).or_insert_with(|| Block {
                terms: terms.clone(),
                free: Vec::new(),
                in_use: 0,
                tokens: 0,
                fleet_in_flight: 0,
                bucket_left: None,
                last_used: Instant::now(),
                refilling: false,
                stale: false,
            });
            if b.terms != terms {
                b.stale = true;
            }
            if b.stale {
                return None;
            }
            if let Some(d) = self.take(block_key, b) {
                // Running low: refill in the background, so that requests seldom find it dry.
                let (slots, tokens) = wants(b, slot_block, token_block, true);
                if !b.refilling && slots + tokens > 0 {
                    b.refilling = true;
                    tokio::spawn(Arc::clone(self).refill_later(
                        Arc::clone(block_key),
                        Arc::clone(slots_key),
                        terms,
                        slots,
                        tokens,
                    ));
                }
                return Some(Ok(d));
            }
            if b.refilling {
                return None;
            }
            b.refilling = true;
            wants(b, slot_block, token_block, false)
        };
        let seqs = self.seqs(want_slots);
        let answer = self.refill(&terms, slots_key, &seqs, want_tokens).await;
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let b = blocks.get_mut(block_key)?;
        let retry_us = match self.merge(b, slots_key, &seqs, answer) {
            Ok(retry_us) => retry_us,
            Err(e) => return Some(Err(e)),
        };
        if let Some(d) = self.take(block_key, b) {
            return Some(Ok(d));
        }
        let in_flight = b.fleet_in_flight;
        // Nothing to take: the key's slots are full, or its bucket is empty.
        Some(Ok(if b.terms.rate.is_some() && b.tokens == 0 && retry_us > 0 {
            SharedDecision::RateLimited {
                in_flight,
                retry_after_nanos: u64::try_from(retry_us).unwrap_or(0) * 1000,
            }
        } else {
            SharedDecision::SlotsFull {
                in_flight,
                rate_remaining: b.bucket_left.map(|l| l + b.tokens),
            }
        }))
    }

    fn seqs(&self, n: u32) -> Vec<u64> {
        (0..n).map(|_| self.seq.fetch_add(1, Ordering::Relaxed)).collect()
    }

    /// A refill made while the block still serves.
    async fn refill_later(
        self: Arc<Self>,
        block_key: Arc<str>,
        slots_key: Arc<str>,
        terms: Terms,
        slots: u32,
        tokens: u32,
    ) {
        let seqs = self.seqs(slots);
        let answer = self.refill(&terms, &slots_key, &seqs, tokens).await;
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        match blocks.get_mut(&block_key) {
            Some(b) => {
                let _ = self.merge(b, &slots_key, &seqs, answer);
            }
            // Cannot happen (a refilling block is kept), but leased slots must not leak.
            None => {
                for s in seqs {
                    let _ = self.queue.send(Msg::Release(Arc::clone(&slots_key), s));
                }
            }
        }
    }

    /// Adds what a refill got to the block; the microseconds until a token when it got none.
    fn merge(
        &self,
        b: &mut Block,
        slots_key: &Arc<str>,
        seqs: &[u64],
        answer: Result<[i64; 5], SharedError>,
    ) -> Result<i64, SharedError> {
        b.refilling = false;
        let [granted, in_flight, tokens, left, retry_us] = match answer {
            Ok(v) => v,
            Err(e) => {
                // Perhaps taken: give the slots back (after the call on the same connection).
                for s in seqs {
                    let _ = self.queue.send(Msg::Release(Arc::clone(slots_key), *s));
                }
                self.set_healthy(false);
                return Err(e);
            }
        };
        let granted = usize::try_from(granted).unwrap_or(0).min(seqs.len());
        {
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            for s in &seqs[..granted] {
                leases.insert(*s, Arc::clone(slots_key));
            }
        }
        b.free.extend_from_slice(&seqs[..granted]);
        b.tokens += u32::try_from(tokens).unwrap_or(0);
        if !seqs.is_empty() {
            b.fleet_in_flight = u32::try_from(in_flight).unwrap_or(0);
        }
        if let Ok(left) = u32::try_from(left) {
            b.bucket_left = Some(left);
        }
        Ok(retry_us)
    }

    /// One request from the block, if it holds what the request needs.
    fn take(self: &Arc<Self>, key: &Arc<str>, b: &mut Block) -> Option<SharedDecision> {
        let need_slot = b.terms.limit.is_some();
        let need_token = b.terms.rate.is_some();
        if (need_slot && b.free.is_empty()) || (need_token && b.tokens == 0) {
            return None;
        }
        let seq = if need_slot { b.free.pop() } else { None };
        if need_token {
            b.tokens -= 1;
        }
        if seq.is_some() {
            b.in_use += 1;
        }
        b.last_used = Instant::now();
        // The fleet's count at the refill had every slot of the block as taken.
        let in_flight = b
            .fleet_in_flight
            .saturating_sub(u32::try_from(b.free.len()).unwrap_or(u32::MAX));
        Some(SharedDecision::Admitted {
            lease: seq.map(|seq| SharedLease {
                core: Arc::clone(self),
                seq,
                block: Some(Arc::clone(key)),
            }),
            in_flight,
            rate_remaining: b.bucket_left.map(|l| l + b.tokens),
        })
    }

    async fn refill(
        &self,
        terms: &Terms,
        slots_key: &str,
        seqs: &[u64],
        tokens: u32,
    ) -> Result<[i64; 5], SharedError> {
        let mut call = BLOCK.prepare_invoke();
        call.key(slots_key);
        let (rate_key, per_second, burst) = match &terms.rate {
            Some((key, per_second, burst)) => (&**key, *per_second, *burst),
            None => (slots_key, 0, 0),
        };
        call.key(rate_key);
        call.arg(self.ttl_ms)
            .arg(terms.limit.map_or(-1, i64::from))
            .arg(per_second)
            .arg(burst)
            .arg(tokens);
        for s in seqs {
            call.arg(self.member(*s));
        }
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .bounded(SharedOp::Admit, self.timeout, call.invoke_async(&mut conn))
            .await?;
        match v[..] {
            [a, b, c, d, e] => Ok([a, b, c, d, e]),
            _ => Err(SharedError::Redis(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "block script answered",
                format!("{} numbers", v.len()),
            )))),
        }
    }

    /// A request admitted from a block ended: its slot goes back to the block, unless the block
    /// is gone or stale. A block with [`MOST_FREE`] blocks' worth free gives half of them back,
    /// so other replicas can have them.
    pub(super) fn return_to_block(&self, key: &Arc<str>, seq: u64) -> bool {
        let excess: Vec<u64> = {
            let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
            let Some(b) = blocks.get_mut(key) else {
                return false;
            };
            b.in_use = b.in_use.saturating_sub(1);
            if b.stale {
                return false;
            }
            b.free.push(seq);
            let block = b.terms.limit.map_or(0, |l| (l / SHARE).clamp(1, MAX_SLOTS)) as usize;
            if b.free.len() < MOST_FREE * block {
                return true;
            }
            let keep = MOST_FREE * block / 2;
            b.free.drain(keep..).collect()
        };
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        for s in excess {
            leases.remove(&s);
            let _ = self.queue.send(Msg::Release(Arc::clone(key), s));
        }
        true
    }

    /// Gives back the blocks of keys idle on this replica for [`IDLE`] (all of them when
    /// `all`), and those a plan change made stale: their slots are released with the other
    /// releases, their tokens returned to the buckets.
    pub(super) async fn return_blocks(&self, pending: &mut Vec<(Arc<str>, u64)>, all: bool) {
        let mut tokens = Vec::new();
        {
            let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            blocks.retain(|key, b| {
                if b.refilling || !(all || b.stale || b.last_used.elapsed() >= IDLE) {
                    return true;
                }
                for s in b.free.drain(..) {
                    leases.remove(&s);
                    pending.push((Arc::clone(key), s));
                }
                if let Some(rate) = b.terms.rate.clone().filter(|_| b.tokens > 0) {
                    tokens.push((rate, b.tokens));
                }
                b.tokens = 0;
                // Requests still in flight from it release their own leases when they end.
                b.in_use > 0 && !all && !b.stale
            });
        }
        let mut by_key: HashMap<Arc<str>, (u64, u64, u64)> = HashMap::new();
        for ((key, per_second, burst), n) in tokens {
            by_key.entry(key).or_insert((0, per_second, burst)).0 += u64::from(n);
        }
        for (key, (n, per_second, burst)) in by_key {
            let mut call = RETURN.prepare_invoke();
            call.key(&*key).arg(n).arg(per_second).arg(burst);
            let mut conn = self.conn.clone();
            // Lost tokens only make the bucket stricter for a moment: no retry.
            let _ = self
                .bounded(
                    SharedOp::Release,
                    self.background_timeout(),
                    call.invoke_async::<i64>(&mut conn),
                )
                .await;
        }
    }
}
