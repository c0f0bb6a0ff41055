//! Where the request path feeds [`crate::usage`]: each request counted against its key, and its
//! access-log line, queued when the gateway answers itself or, for a forwarded request, when its
//! response's last byte is sent (so the line knows how long the slot was held and how many
//! bytes went out).

use std::{net::IpAddr, sync::Arc, time::Instant};

use http::request::Parts;

use crate::{
    limiter::shared::unix_ms,
    usage::{AccessLog, KeyUsage, Record},
};

use super::{Gateway, metrics::ErrorCode, table::KeyView};

/// The usage last reported to the controller (key id to the last minute's requests and
/// refusals), and when it was taken.
/// When the report's usage was last taken, the usage (`[requests, refused]`) and the async
/// tasks (`[queued, running]`) by key id.
pub(super) type UsageSnapshot = (
    Option<Instant>,
    std::collections::BTreeMap<String, [u64; 2]>,
    std::collections::BTreeMap<String, [u64; 2]>,
    std::collections::BTreeMap<String, u64>,
);

/// The access-log line of an admitted request, finished when its hold ends.
#[derive(Debug)]
pub(super) struct PendingLog {
    pub record: Record,
    log: Arc<AccessLog>,
}

impl PendingLog {
    /// Queues the line, with the slot's held time if the request held one.
    pub(super) fn finish(mut self, started: Instant, held_slot: bool) {
        if held_slot {
            self.record.slot_wait_ms = Some(0.0);
            self.record.slot_held_ms = Some(millis(started.elapsed()));
        }
        self.log.log(self.record);
    }
}

/// Milliseconds, to the microsecond.
pub(super) fn millis(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1_000.0
}

impl Gateway {
    fn log_record(&self, parts: &Parts, entry: Option<&KeyView<'_>>, client: Option<IpAddr>) -> Record {
        let mut r = Record {
            at_ms: unix_ms(),
            client: client.map(|c| c.to_string()),
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            ..Record::default()
        };
        if let Some(e) = entry {
            r.set_key(&e.id, e.plan);
        }
        r
    }

    /// Counts a request the gateway answered itself with `code`, and logs it.
    pub(super) fn note_refusal(
        &self,
        parts: &Parts,
        entry: Option<&KeyView<'_>>,
        code: ErrorCode,
        client: Option<IpAddr>,
    ) {
        if let Some(e) = entry {
            self.usage.count(&e.id, Some(code.as_str()), self.abuse_now());
        }
        if let Some(log) = &self.access_log {
            let mut r = self.log_record(parts, entry, client);
            r.status = code.status().as_u16();
            r.code = Some(code.as_str());
            log.log(r);
        }
    }

    /// Counts an admitted request; its access-log line, to finish when it ends.
    pub(super) fn note_admitted(
        &self,
        parts: &Parts,
        entry: &KeyView<'_>,
        client: Option<IpAddr>,
    ) -> Option<PendingLog> {
        self.usage.count(&entry.id, None, self.abuse_now());
        let log = self.access_log.as_ref()?;
        Some(PendingLog {
            record: self.log_record(parts, Some(entry), client),
            log: Arc::clone(log),
        })
    }

    /// What the key `id` (`namespace/name`) did, and its requests in flight now; `None` if no
    /// such key is admitted.
    pub fn usage_of(&self, id: &str) -> Option<(KeyUsage, u32)> {
        let table = self.table.load();
        let entry = table.entries().find(|e| &*e.id == id)?;
        let usage = self.usage.of(id, self.abuse_now()).unwrap_or_default();
        Some((usage, entry.state.in_flight()))
    }

    /// Every key that sent something, with what it did.
    pub fn all_usage(&self) -> Vec<(Arc<str>, KeyUsage)> {
        self.usage.all(self.abuse_now())
    }

    /// What keys did, for the report the controller reads: the last minute's usage of the
    /// `limit` most active keys and the async tasks of the `limit` keys with the most (both
    /// snapshotted at most every 30 s, so that statuses are not rewritten on every heartbeat),
    /// and the key bans in force now.
    pub fn activity(&self, limit: usize) -> crate::config::pieces::Activity {
        let now = self.abuse_now();
        let mut snapshot = self.usage_report.lock().unwrap_or_else(|e| e.into_inner());
        // Every 30 s at most; but the first activity after a quiet spell goes out at once.
        let stale = snapshot
            .0
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(30));
        let open_now = self.tasks.get().map(|t| t.open_by_key()).unwrap_or_default();
        // The fleet's task counts are read every few seconds: the first ones go out at once too.
        if stale || snapshot.1.is_empty() || (snapshot.3.is_empty() && !open_now.is_empty()) {
            let mut active: Vec<(Arc<str>, KeyUsage)> = self
                .usage
                .all(now)
                .into_iter()
                .filter(|(_, u)| u.last_minute.requests > 0)
                .collect();
            active.sort_by_key(|(_, u)| std::cmp::Reverse(u.last_minute.requests));
            active.truncate(limit);
            snapshot.1 = active
                .into_iter()
                .map(|(id, u)| (id.to_string(), [u.last_minute.requests, u.last_minute.refused]))
                .collect();
            // The same bound as usage: the keys with the most tasks queued and running.
            let mut tasks = self.tasks.get().map(|t| t.counts_by_key()).unwrap_or_default();
            tasks.sort_by_key(|(_, [q, r])| std::cmp::Reverse(q + r));
            tasks.truncate(limit);
            snapshot.2 = tasks.into_iter().map(|(id, c)| (id.to_string(), c)).collect();
            let mut open = open_now;
            open.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            open.truncate(limit);
            snapshot.3 = open.into_iter().map(|(id, n)| (id.to_string(), n)).collect();
            snapshot.0 = Some(Instant::now());
        }
        let unix = unix_ms() / 1_000;
        let bans = self
            .guard
            .active(now)
            .into_iter()
            .filter_map(|(s, b)| match s {
                crate::abuse::Subject::Key(id) => Some((
                    id.to_string(),
                    [unix + b.remaining_ms(now).div_ceil(1_000), u64::from(b.strike)],
                )),
                crate::abuse::Subject::Ip(_) => None,
            })
            .take(limit)
            .collect();
        let target_tls = self
            .target_states()
            .into_iter()
            .filter_map(|t| {
                // Bounded: one rustls message names the host and the reason, nothing of a request.
                let mut why = t.last_tls_error?;
                let cut = (0..=why.len().min(512)).rev().find(|&i| why.is_char_boundary(i));
                why.truncate(cut.unwrap_or(0));
                Some((t.name, why))
            })
            .collect();
        crate::config::pieces::Activity {
            usage: snapshot.1.clone(),
            bans,
            tasks: snapshot.2.clone(),
            target_tls,
            open_tasks: snapshot.3.clone(),
        }
    }

    /// Access-log lines dropped because the writer was behind.
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.as_ref().map_or(0, |l| l.dropped())
    }
}
