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

use super::{Gateway, proxy::ProxyBody};

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
    let mut res = Response::new(super::proxy::full(Bytes::from(body)));
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
            "/metrics" => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                g.metrics.render(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                plain,
                "not found: try /healthz, /readyz or /metrics\n".into(),
            ),
        };
        ready(Ok(res))
    }
}
