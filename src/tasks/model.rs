//! What a task is: its id, its state, and the JSON a customer reads.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task id: 48 bits of Unix milliseconds then 80 random bits, written as 26 characters of
/// Crockford base32 (a ULID). Sorting ids sorts by submission time; 80 random bits make an id
/// unguessable, so knowing one task's id tells nothing about another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u128);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl TaskId {
    /// A new id for a task submitted at `unix_ms`.
    pub fn new(unix_ms: u64) -> Self {
        let mut random = [0u8; 10];
        getrandom::fill(&mut random).expect("the OS random source works");
        let mut low = 0u128;
        for b in random {
            low = (low << 8) | u128::from(b);
        }
        Self((u128::from(unix_ms & 0xFFFF_FFFF_FFFF) << 80) | low)
    }

    /// The id's 16 bytes, big-endian (the order of the store's keys).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id from [`TaskId::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(u128::from_be_bytes(bytes.try_into().ok()?)))
    }

    /// Milliseconds since the Unix epoch when the task was submitted.
    pub fn unix_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 26];
        for (i, c) in out.iter_mut().enumerate() {
            let shift = 125 - 5 * i as u32;
            *c = CROCKFORD[((self.0 >> shift) & 31) as usize];
        }
        f.write_str(std::str::from_utf8(&out).expect("ascii"))
    }
}

impl std::str::FromStr for TaskId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 26 || s.as_bytes()[0] > b'7' {
            return Err(());
        }
        let mut v = 0u128;
        for b in s.bytes() {
            let d = CROCKFORD
                .iter()
                .position(|&c| c == b.to_ascii_uppercase())
                .ok_or(())?;
            v = (v << 5) | d as u128;
        }
        Ok(Self(v))
    }
}

impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|()| serde::de::Error::custom("not a task id"))
    }
}

/// Where a task is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Accepted, waiting for a slot (or for its next attempt).
    Queued,
    /// Its upstream request is in flight.
    Running,
    /// The upstream answered 2xx; `response` holds the answer.
    Completed,
    /// Attempts are used up, the upstream refused it, or its result was too large.
    Failed,
    /// Canceled by the customer before it ran.
    Canceled,
}

impl TaskStatus {
    /// Whether the task will not run again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }

    /// The status as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// Parses [`TaskStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Completed,
            Self::Failed,
            Self::Canceled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// Why a task failed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    /// Machine-readable code (`upstream_error`, `upstream_rejected`, `result_too_large`, ...).
    pub code: String,
    /// What happened, for a person.
    pub message: String,
}

/// Where a task's webhook delivery stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// The task has not finished yet, or the next attempt is scheduled.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed, or the receiver answered 410 Gone.
    Failed,
}

/// One webhook delivery attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryAttempt {
    /// Unix milliseconds when it was sent.
    pub at: u64,
    /// The receiver's status code, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed, when it did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A task's webhook and its delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Where the result is POSTed.
    pub url: String,
    /// Delivery state.
    pub status: DeliveryStatus,
    /// Attempts so far, oldest first.
    #[serde(default)]
    pub attempts: Vec<DeliveryAttempt>,
    /// Unix milliseconds of the next attempt, while one is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
}

/// A task as the store keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// `namespace/name` of the ApiKey that submitted it.
    pub key_id: String,
    /// SHA-256 (hex) of that key's token when it was submitted: how the scheduler finds the key's
    /// slots (a digest, never a token).
    pub key_digest: String,
    /// `taskType` as submitted.
    pub task_type: String,
    /// The upstream request's JSON body.
    pub payload: Value,
    /// The webhook, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Unix milliseconds before which it does not run again (a retry's backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    /// Unix milliseconds of its latest start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Unix milliseconds when it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// The upstream's status code of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// The upstream's answer: its JSON body, or its text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Unix milliseconds after which a finished task is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Task {
    /// A task just submitted: queued, never attempted.
    pub fn queued(
        id: TaskId,
        key_id: &str,
        key_digest: &[u8; 32],
        task_type: String,
        payload: Value,
        webhook: Option<Webhook>,
    ) -> Self {
        Self {
            id,
            key_id: key_id.to_string(),
            key_digest: hex::encode(key_digest),
            task_type,
            payload,
            webhook,
            status: TaskStatus::Queued,
            attempts: 0,
            not_before: None,
            started_at: None,
            finished_at: None,
            upstream_status: None,
            response: None,
            error: None,
            expires_at: None,
        }
    }

    /// Whether the store must find this task again after a restart: it has yet to run, or its
    /// webhook has yet to be delivered.
    pub fn is_open(&self) -> bool {
        !self.status.is_final()
            || self
                .webhook
                .as_ref()
                .is_some_and(|w| w.status == DeliveryStatus::Pending)
    }

    /// The task as the API shows it (`{"id", "taskType", "status", ...}`), without `response`.
    pub fn view(&self) -> Value {
        let mut v = serde_json::json!({
            "id": self.id,
            "taskType": self.task_type,
            "status": self.status.as_str(),
            "createdAt": rfc3339(self.id.unix_ms()),
            "attempts": self.attempts,
        });
        let m = v.as_object_mut().expect("an object");
        if let Some(t) = self.started_at {
            m.insert("startedAt".into(), rfc3339(t).into());
        }
        if let Some(t) = self.finished_at {
            m.insert("finishedAt".into(), rfc3339(t).into());
        }
        if let Some(s) = self.upstream_status {
            m.insert("upstreamStatus".into(), s.into());
        }
        if let Some(e) = &self.error {
            m.insert(
                "error".into(),
                serde_json::json!({"code": e.code, "message": e.message}),
            );
        }
        if let Some(w) = &self.webhook {
            let attempts: Vec<Value> = w
                .attempts
                .iter()
                .map(|a| {
                    let mut o = serde_json::json!({"at": rfc3339(a.at)});
                    if let Some(s) = a.status {
                        o["status"] = s.into();
                    }
                    if let Some(e) = &a.error {
                        o["error"] = e.clone().into();
                    }
                    o
                })
                .collect();
            let mut hook = serde_json::json!({
                "url": w.url,
                "status": w.status,
                "attempts": attempts,
            });
            if let Some(n) = w.next_attempt_at {
                hook["nextAttemptAt"] = rfc3339(n).into();
            }
            m.insert("webhook".into(), hook);
        }
        v
    }
}

/// Unix milliseconds as an RFC 3339 UTC time with milliseconds (`2026-12-03T12:00:00.123Z`).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_sort_by_time_and_differ() {
        let a = TaskId::new(1_700_000_000_000);
        let b = TaskId::new(1_700_000_000_001);
        let again = TaskId::new(1_700_000_000_000);
        assert_ne!(a, again, "80 random bits");
        assert!(a < b && again < b);
        assert_eq!(a.to_string().parse::<TaskId>(), Ok(a));
        assert_eq!(a.to_string().len(), 26);
        assert_eq!(a.unix_ms(), 1_700_000_000_000);
        assert!("not-an-id".parse::<TaskId>().is_err());
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
    }
}
