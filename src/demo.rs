//! A demo upstream API: answers JSON and honours a `delay_ms` query parameter (or, for a POST, a
//! `delay_ms` field of its JSON body, which is how an async task asks for it), so a newcomer
//! (and a benchmark) can hold requests in flight and watch slots fill.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::gateway::ProxyBody;

/// Longest delay the demo honours, so a typo cannot park a connection for hours.
pub const MAX_DELAY_MS: u64 = 600_000;

/// The demo upstream as a tower `Service`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DemoUpstream;

fn delay_ms(query: Option<&str>) -> u64 {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|p| p.strip_prefix("delay_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(MAX_DELAY_MS)
}

impl tower::Service<Request<Incoming>> for DemoUpstream {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let mut delay = delay_ms(req.uri().query());
        let plan = req
            .headers()
            .get("x-slotgate-plan")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let path = req.uri().path().to_string();
        let post = req.method() == http::Method::POST;
        Box::pin(async move {
            // A POST is answered like a model's completion: a `text` field, as the seeds'
            // webhook handlers read it (`response.text.slice(0, 100)`).
            let text = if post {
                let body = http_body_util::Limited::new(req.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
                let prompt = json
                    .as_ref()
                    .and_then(|v| v.get("prompt").and_then(|p| p.as_str()).map(str::to_string));
                if let Some(ms) = json
                    .as_ref()
                    .and_then(|v| v.get("delay_ms"))
                    .and_then(|d| d.as_u64())
                {
                    delay = delay.max(ms.min(MAX_DELAY_MS));
                }
                Some(match prompt {
                    Some(p) => {
                        format!("Demo answer to {p:?}: slotgate ran this request within your key's slots.")
                    }
                    None => format!("Demo answer to a {} byte request body.", body.len()),
                })
            } else {
                None
            };
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut body = serde_json::json!({
                "ok": true,
                "path": path,
                "plan": plan,
                "delay_ms": delay,
            });
            if let Some(t) = text {
                body["text"] = t.into();
            }
            let mut bytes = serde_json::to_vec(&body).expect("json serialises");
            bytes.push(b'\n');
            let mut res = Response::new(
                http_body_util::Full::new(Bytes::from(bytes))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(res)
        })
    }
}
