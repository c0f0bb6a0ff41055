//! The task endpoints: `POST /v1/tasks` (and the seeds' `POST /v1/task`), `GET /v1/tasks/{id}`,
//! `GET /v1/tasks?status=&limit=&cursor=`, `DELETE /v1/tasks/{id}`. The gateway authenticates
//! and rate-limits the request, then hands it here with the caller's key.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use super::{
    Tasks,
    model::{DeliveryStatus, Task, TaskId, TaskStatus, Webhook, unix_ms_now},
    webhook,
};

/// Room for the envelope around a payload of the largest size.
const ENVELOPE_BYTES: usize = 64 << 10;
/// Largest page of `GET /v1/tasks`.
const MAX_PAGE: usize = 1000;

/// Whether a request path is one of the task endpoints.
pub fn is_task_path(path: &str) -> bool {
    path == "/v1/tasks"
        || path == "/v1/task"
        || path.starts_with("/v1/tasks/")
        || path.starts_with("/v1/task/")
}

/// The caller of a task endpoint, as the gateway authenticated it.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// `namespace/name` of the key.
    pub key_id: &'a str,
    /// SHA-256 of its token.
    pub digest: &'a [u8; 32],
    /// Its plan.
    pub plan: &'a str,
    /// Its concurrency slots, if limited (for a Retry-After estimate).
    pub slots: Option<u32>,
}

/// An answer of a task endpoint.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// `Location` of a created task.
    pub location: Option<String>,
    /// `Retry-After` seconds.
    pub retry_after: Option<u64>,
    /// JSON body.
    pub body: Bytes,
    /// The error code, when it is an error.
    pub code: Option<&'static str>,
}

impl Reply {
    fn json(status: StatusCode, body: &Value) -> Self {
        let mut bytes = serde_json::to_vec(body).expect("json serialises");
        bytes.push(b'\n');
        Self {
            status,
            location: None,
            retry_after: None,
            body: Bytes::from(bytes),
            code: None,
        }
    }

    fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut r = Self::json(
            status,
            &json!({"error": {"code": code, "message": message.into()}}),
        );
        r.code = Some(code);
        r
    }
}

fn invalid(message: impl Into<String>) -> Reply {
    Reply::error(StatusCode::BAD_REQUEST, "invalid_task", message)
}

fn not_found() -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        "task_not_found",
        "No task with this id belongs to this API key.",
    )
}

fn unavailable(e: impl std::fmt::Display) -> Reply {
    tracing::error!(error = %e, "task store failed");
    let mut r = Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "task_store_unavailable",
        "The task store is unavailable; nothing was stored. Retry shortly.",
    );
    r.retry_after = Some(1);
    r
}

impl Tasks {
    /// Answers one request on a task endpoint.
    pub async fn handle<B>(
        self: &Arc<Self>,
        caller: Caller<'_>,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: B,
    ) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let id_part = path
            .strip_prefix("/v1/tasks/")
            .or_else(|| path.strip_prefix("/v1/task/"))
            .filter(|s| !s.is_empty());
        match (method, id_part) {
            (&Method::POST, None) => self.submit(caller, body).await,
            (&Method::GET, None) => self.list(caller, query).await,
            (&Method::GET, Some(id)) => self.read(caller, id).await,
            (&Method::DELETE, Some(id)) => self.cancel(caller, id).await,
            _ => Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Task endpoints: POST /v1/tasks, GET /v1/tasks, GET /v1/tasks/{id}, DELETE /v1/tasks/{id}.",
            ),
        }
    }

    async fn submit<B>(self: &Arc<Self>, caller: Caller<'_>, body: B) -> Reply
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let config = self.config.load_full();
        let Some(policy) = config.plans.get(caller.plan).and_then(|p| p.tasks.clone()) else {
            return Reply::error(
                StatusCode::FORBIDDEN,
                "tasks_not_in_plan",
                format!(
                    "The {} plan does not include async tasks. Upgrade to a plan with tasks, or send the request synchronously.",
                    caller.plan
                ),
            );
        };
        let cap = self.options.max_payload_bytes;
        let too_large = || {
            Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The task's payload is larger than {cap} bytes."),
            )
        };
        let bytes = match Limited::new(body, cap + ENVELOPE_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_large(),
            Err(e) => return invalid(format!("the request body could not be read: {e}")),
        };
        let value: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return invalid(format!("the body is not JSON: {e}")),
        };
        let Value::Object(mut fields) = value else {
            return invalid("the body must be a JSON object: {\"taskType\", \"payload\", \"webhook\"}");
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !matches!(k.as_str(), "taskType" | "payload" | "webhook"))
        {
            return invalid(format!(
                "unknown field {unknown:?}: a task has taskType, payload and webhook"
            ));
        }
        let task_type = match fields.remove("taskType") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(_) => return invalid("taskType must be a non-empty string, such as \"CHATGPT\""),
            None => return invalid("taskType is required, such as \"CHATGPT\""),
        };
        if !config.task_types.contains_key(&task_type) {
            let known: Vec<&str> = config.task_types.keys().map(String::as_str).collect();
            let mut r = Reply::error(
                StatusCode::BAD_REQUEST,
                "unknown_task_type",
                format!(
                    "taskType {task_type:?} is not known; known task types: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            r.code = Some("unknown_task_type");
            return r;
        }
        let payload = fields.remove("payload").unwrap_or_else(|| json!({}));
        if serde_json::to_vec(&payload).map_or(0, |v| v.len()) > cap {
            return too_large();
        }
        let webhook = match fields.remove("webhook") {
            None | Some(Value::Null) => None,
            Some(Value::Object(mut w)) => {
                if let Some(unknown) = w.keys().find(|k| k.as_str() != "url") {
                    return invalid(format!("unknown field webhook.{unknown}: a webhook has url"));
                }
                let Some(Value::String(url)) = w.remove("url") else {
                    return invalid("webhook.url is required and must be a string");
                };
                if let Err(e) = webhook::check_url(&url, &self.options.webhook_reach) {
                    return Reply::error(StatusCode::BAD_REQUEST, "invalid_webhook_url", e.to_string());
                }
                if !self.secrets.load().contains_key(caller.key_id) {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        "webhook_secret_missing",
                        "This API key has no webhook signing secret, so its webhooks cannot be signed. Ask the API provider to set one (the `webhook-secret` entry of the key's token Secret).",
                    );
                }
                Some(Webhook {
                    url,
                    status: DeliveryStatus::Pending,
                    attempts: Vec::new(),
                    next_attempt_at: None,
                })
            }
            Some(_) => return invalid("webhook must be an object: {\"url\": \"https://...\"}"),
        };

        let digest = *caller.digest;
        let queue_full = |unfinished: usize| {
            let q = self.queues.lock().expect("queues lock");
            let excess = (unfinished + 1).saturating_sub(policy.max_queued as usize).max(1);
            let slots = policy.max_concurrent.or(caller.slots).unwrap_or(1);
            let secs = q.retry_after_secs(excess, slots);
            drop(q);
            let mut r = Reply::error(
                StatusCode::TOO_MANY_REQUESTS,
                "task_queue_full",
                format!(
                    "This key has {unfinished} unfinished tasks, the most its plan allows ({}). Retry after about {secs} s, when some have finished.",
                    policy.max_queued
                ),
            );
            r.retry_after = Some(secs);
            r
        };
        let now = unix_ms_now();
        let task = Task::queued(
            TaskId::new(now),
            caller.key_id,
            &digest,
            task_type,
            payload,
            webhook,
        );
        let view = task.view();
        let id = task.id;
        if let Some(fleet) = &self.fleet {
            // The queue's cap is checked in Redis with the write, so it holds across replicas.
            match fleet.store.submit(&task, policy.max_queued).await {
                Ok(Ok(())) => fleet.submitted(caller.key_id, digest),
                Ok(Err(unfinished)) => return queue_full(unfinished as usize),
                Err(e) => return unavailable(e),
            }
        } else {
            let reserved = self.queues.lock().expect("queues lock").reserve(
                caller.key_id,
                digest,
                policy.max_queued as usize,
            );
            if let Err(unfinished) = reserved {
                return queue_full(unfinished);
            }
            let task_type = task.task_type.clone();
            let stored = self.store.put(vec![task]).await;
            self.queues.lock().expect("queues lock").settle(
                caller.key_id,
                digest,
                stored.is_ok().then_some((id, task_type.as_str())),
            );
            if let Err(e) = stored {
                return unavailable(e);
            }
        }
        self.metrics.submitted.inc();
        self.wake.notify_one();
        let mut r = Reply::json(StatusCode::ACCEPTED, &json!({ "task": view }));
        r.location = Some(format!("/v1/tasks/{id}"));
        r
    }

    async fn owned(&self, caller: Caller<'_>, id: &str) -> Result<Task, Reply> {
        let id: TaskId = id.parse().map_err(|()| not_found())?;
        match self.store.get(caller.key_id, id).await {
            Ok(Some(t)) if t.key_id == caller.key_id => Ok(t),
            Ok(_) => Err(not_found()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read(&self, caller: Caller<'_>, id: &str) -> Reply {
        match self.owned(caller, id).await {
            Ok(t) => {
                let mut body = json!({ "task": t.view() });
                if let Some(r) = &t.response {
                    body["response"] = r.clone();
                }
                Reply::json(StatusCode::OK, &body)
            }
            Err(r) => r,
        }
    }

    async fn list(&self, caller: Caller<'_>, query: Option<&str>) -> Reply {
        let mut status = None;
        let mut limit = 100usize;
        let mut cursor = None;
        for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "status" => match TaskStatus::parse(v) {
                    Some(s) => status = Some(s),
                    None => {
                        return invalid(format!(
                            "status {v:?} is not one of queued, running, completed, failed, canceled"
                        ));
                    }
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                    _ => return invalid(format!("limit must be a number from 1 to {MAX_PAGE}")),
                },
                "cursor" => match v.parse::<TaskId>() {
                    Ok(c) => cursor = Some(c),
                    Err(()) => return invalid("cursor is not one this API returned"),
                },
                "apikey" => {}
                other => {
                    return invalid(format!(
                        "unknown query parameter {other:?}: use status, limit, cursor"
                    ));
                }
            }
        }
        match self.store.list(caller.key_id, cursor, status, limit).await {
            Ok((tasks, next)) => {
                let views: Vec<Value> = tasks.iter().map(Task::view).collect();
                Reply::json(
                    StatusCode::OK,
                    &json!({"tasks": views, "nextCursor": next.map(|c| c.to_string())}),
                )
            }
            Err(e) => unavailable(e),
        }
    }

    async fn cancel(&self, caller: Caller<'_>, id: &str) -> Reply {
        let mut task = match self.owned(caller, id).await {
            Ok(t) => t,
            Err(r) => return r,
        };
        let conflict = |status: TaskStatus| {
            Reply::error(
                StatusCode::CONFLICT,
                "task_not_cancelable",
                format!(
                    "The task is {}; only a queued task can be canceled.",
                    status.as_str()
                ),
            )
        };
        if task.status != TaskStatus::Queued {
            return conflict(task.status);
        }
        if let Some(fleet) = &self.fleet {
            // A replica may be about to start it: whichever of the two swaps the status first wins.
            let mut canceled = task.clone();
            self.finish(&mut canceled, TaskStatus::Canceled, None);
            if let Some(w) = canceled.webhook.as_mut() {
                w.status = DeliveryStatus::Failed;
            }
            return match fleet.store.swap(&canceled, &[TaskStatus::Queued]).await {
                Ok(Some(TaskStatus::Queued)) => {
                    Reply::json(StatusCode::OK, &json!({ "task": canceled.view() }))
                }
                Ok(Some(other)) => conflict(other),
                Ok(None) => not_found(),
                Err(e) => unavailable(e),
            };
        }
        match self
            .queues
            .lock()
            .expect("queues lock")
            .take_queued(caller.key_id, task.id)
        {
            Ok(()) => {}
            Err(true) => return conflict(TaskStatus::Running),
            Err(false) => return conflict(task.status),
        }
        self.finish(&mut task, TaskStatus::Canceled, None);
        // A canceled task calls no webhook.
        if let Some(w) = task.webhook.as_mut() {
            w.status = DeliveryStatus::Failed;
        }
        if let Err(e) = self.store.put(vec![task.clone()]).await {
            return unavailable(e);
        }
        Reply::json(StatusCode::OK, &json!({ "task": task.view() }))
    }
}
