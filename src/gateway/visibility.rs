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

    /// Access-log lines dropped because the writer was behind.
    pub fn access_log_dropped(&self) -> u64 {
        self.access_log.as_ref().map_or(0, |l| l.dropped())
    }
}
