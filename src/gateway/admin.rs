//! The admin listener: `/healthz`, `/readyz`, `/metrics`. On its own port so that it is never
//! limited and never exposed with the API.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header::CONTENT_TYPE};
use hyper::body::Incoming;

use super::{
    Gateway,
    body::{ProxyBody, full},
};

/// The admin endpoints as a tower `Service`.
#[derive(Clone, Debug)]
pub struct AdminService {
    gateway: Arc<Gateway>,
}

/// The admin service of a gateway.
pub fn admin_service(gateway: Arc<Gateway>) -> AdminService {
    AdminService { gateway }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut res = Response::new(full(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

impl tower::Service<Request<Incoming>> for AdminService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        hyper::service::Service::call(self, req)
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<ProxyBody>, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let g = &self.gateway;
        let plain = "text/plain; charset=utf-8";
        if let Some(res) = bans(g, &req) {
            return ready(Ok(res));
        }
        if req.uri().path() == "/usage" {
            return ready(Ok(usage(g, req.uri().query())));
        }
        let res = match req.uri().path() {
            "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
            "/readyz" if g.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                plain,
                "not ready: shutting down, finishing requests in flight\n".into(),
            ),
            "/readyz" if g.is_ready() => text(
                StatusCode::OK,
                plain,
                format!("ready: configuration {}\n", g.table().config.version),
            ),
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                plain,
                "not ready: no configuration loaded yet\n".into(),
            ),
            "/targets" => text(
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "targets": g.target_states() }).to_string() + "\n",
            ),
            "/metrics" => {
                let (dropped, c) = (g.access_log_dropped(), &g.metrics.access_log_dropped);
                c.inc_by(dropped.saturating_sub(c.get()));
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    g.metrics.render(),
                )
            }
            _ => text(
                StatusCode::NOT_FOUND,
                plain,
                "not found: try /healthz, /readyz, /metrics, /bans, /targets or /usage?key=<namespace>/<name>\n".into(),
            ),
        };
        ready(Ok(res))
    }
}

/// `GET /bans`: the bans in force, as JSON. `DELETE /bans/<subject>` (`ip:203.0.113.7`,
/// `key:team-a/acme`): lifts one.
fn bans(g: &Gateway, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let path = req.uri().path();
    let json = "application/json";
    if path == "/bans" && req.method() == http::Method::GET {
        let bans: Vec<serde_json::Value> = g
            .bans()
            .into_iter()
            .map(|(subject, ban, remaining_ms)| {
                serde_json::json!({
                    "subject": subject.to_string(),
                    "reason": ban.reason.as_str(),
                    "strike": ban.strike,
                    "remainingMs": remaining_ms,
                    "retryAfterSeconds": remaining_ms.div_ceil(1_000),
                })
            })
            .collect();
        let body = serde_json::json!({ "bans": bans }).to_string();
        return Some(text(StatusCode::OK, json, body + "\n"));
    }
    let subject = path.strip_prefix("/bans/")?;
    if req.method() != http::Method::DELETE {
        return Some(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use DELETE /bans/<subject> to lift a ban, GET /bans to list them\n".into(),
        ));
    }
    let res = match subject.parse::<crate::abuse::Subject>() {
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
        Ok(s) if g.lift_ban(&s) => text(
            StatusCode::OK,
            json,
            serde_json::json!({ "lifted": s.to_string() }).to_string() + "\n",
        ),
        Ok(s) => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("{s} is not banned\n"),
        ),
    };
    Some(res)
}

/// `GET /usage?key=<namespace>/<name>`: what the key did (requests, admitted, refused by code,
/// the last minute) and its requests in flight now. Without `key`: every key that sent something.
fn usage(g: &Gateway, query: Option<&str>) -> Response<ProxyBody> {
    let json = "application/json";
    let key = query.and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "key")
            .map(|(_, v)| v.replace("%2F", "/").replace("%2f", "/"))
    });
    let Some(key) = key else {
        let all: serde_json::Map<String, serde_json::Value> = g
            .all_usage()
            .into_iter()
            .map(|(id, u)| (id.to_string(), serde_json::to_value(u).unwrap_or_default()))
            .collect();
        return text(
            StatusCode::OK,
            json,
            serde_json::json!({ "keys": all }).to_string() + "\n",
        );
    };
    match g.usage_of(&key) {
        Some((u, in_flight)) => {
            let mut v = serde_json::to_value(u).unwrap_or_default();
            v["key"] = key.into();
            v["inFlight"] = in_flight.into();
            text(StatusCode::OK, json, v.to_string() + "\n")
        }
        None => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("no key {key:?} is admitted (give it as <namespace>/<name>)\n"),
        ),
    }
}
