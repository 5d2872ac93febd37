//! Per-request observability: a server span parented to the caller's `traceparent`, a
//! request id (taken from `X-Request-Id` or generated), both returned in the response
//! headers, RED metrics per route, an access-log line (target `tessera::access`), the
//! rate-limit headers of the request's key, and the
//! final rendering of errors with that request id.

use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tessera_runtime::telemetry;
use tracing::Instrument;

use crate::error::{PendingError, render};
use crate::keys::Principal;
use crate::ratelimit::Info;

/// Who the request's key turned out to be and its rate-limit state: the key is
/// authenticated inside the handler (the `Principal` extractor), and the audit log and the
/// response headers need both afterwards.
#[derive(Debug, Clone, Default)]
pub struct Caller(Arc<Mutex<(Option<Principal>, Option<Info>)>>);

impl Caller {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Principal>, Option<Info>)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set(&self, principal: Principal, limits: Option<Info>) {
        *self.lock() = (Some(principal), limits);
    }

    pub fn principal(&self) -> Option<Principal> {
        self.lock().0.clone()
    }

    pub fn limits(&self) -> Option<Info> {
        self.lock().1
    }
}

/// The request id of the current request.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub async fn observe(mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || format!("req_{}", uuid::Uuid::new_v4().simple()),
            str::to_owned,
        );
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "http.server",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
        tenant = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, telemetry::extract_headers(req.headers()));
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let caller = Caller::default();
    req.extensions_mut().insert(caller.clone());
    let started = std::time::Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    if let Some(PendingError(error)) = response.extensions_mut().remove::<PendingError>() {
        response = render(&error, &request_id);
    }
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    let labels = [("method", method.to_string()), ("route", route.clone())];
    metrics::counter!(
        "tessera_http_requests_total",
        &[
            labels[0].clone(),
            labels[1].clone(),
            ("status", status.as_u16().to_string())
        ]
    )
    .increment(1);
    metrics::histogram!("tessera_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    let tenant = caller.principal().map(|p| p.tenant_id).unwrap_or_default();
    span.record("tenant", tenant.as_str());
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::error!(%status, "request failed");
        }
        // The access log: one line per request at INFO (`tessera::access=off` in
        // `telemetry.log_filter` silences it).
        tracing::info!(
            target: "tessera::access",
            method = %method,
            route = %route,
            status = status.as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            tenant = %tenant,
            request_id = %request_id,
            "http request"
        );
        telemetry::inject_headers(response.headers_mut());
    });
    if let Some(info) = caller.limits() {
        crate::ratelimit::write_headers(&info, response.headers_mut());
    }
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
