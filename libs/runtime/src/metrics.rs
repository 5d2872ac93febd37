//! Prometheus metrics. One recorder per process ([`install`]); every service records
//! through the `metrics` facade and the text exposition is served at `/metrics` on
//! `metrics_addr` when it is set (every process the chart runs), else on the gateway's HTTP
//! port. The metric names are
//! documented in `docs/metrics.md`.
//!
//! [`GrpcMetricsLayer`] records RED metrics for every gRPC call the server handles.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Latency buckets (seconds) for every `*_duration_seconds` histogram: 0.5 ms … 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `tessera_queue_attempts` (the claim number an item was handled on).
const ATTEMPT_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 5.0, 10.0, 20.0];

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("tessera_queue_attempts".into()),
                    ATTEMPT_BUCKETS,
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (only possible in tests embedding us): keep ours
        // rendering whatever reaches it.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// The metrics table of `docs/metrics.md`: one source for the documentation and for the
/// `# HELP` line of every metric.
const DOCUMENTED: &str = include_str!("../../../docs/metrics.md");

/// `(name, type, description)` of every metric `docs/metrics.md` lists.
fn documented() -> impl Iterator<Item = (&'static str, &'static str, String)> {
    DOCUMENTED.lines().filter_map(|line| {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| name | type | labels | what |` splits into 6 cells, the outer two empty.
        let [_, name, kind, _, what, _] = cells.as_slice() else {
            return None;
        };
        let name = name.strip_prefix('`')?.strip_suffix('`')?;
        name.starts_with("tessera_")
            .then(|| (name, *kind, what.replace('`', "")))
    })
}

/// Gives every documented metric its description (the exposition's `# HELP` line).
fn describe() {
    for (name, kind, what) in documented() {
        match kind {
            "counter" => metrics::describe_counter!(name, what),
            "gauge" => metrics::describe_gauge!(name, what),
            _ => metrics::describe_histogram!(name, what),
        }
    }
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    install().render()
}

/// The `/metrics` endpoint as an axum router (mounted by the gateway, or served alone).
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                render(),
            )
        }),
    )
}

/// Binds `addr` and serves `/metrics` there until `shutdown` (for gRPC services running
/// alone). Fails at once when the address cannot be bound.
pub async fn spawn(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = crate::bin::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router::<()>())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "metrics server failed");
        }
    }))
}

/// Tower layer for the gRPC server: counts calls by service, method and status code and
/// records their latency.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/').to_string();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
            let code = match &result {
                Ok(response) => crate::grpc::status_in_headers(response.headers()),
                Err(_) => tonic::Code::Internal,
            };
            let elapsed = started.elapsed();
            tracing::Span::current().record("rpc.grpc.status_code", code as i64);
            // The access log: one line per call at INFO (`tessera::access=off` in
            // `telemetry.log_filter` silences it); tenant and request id are the span's.
            tracing::info!(
                target: "tessera::access",
                service = %service,
                method = %method,
                status = code as i64,
                duration_ms = elapsed.as_secs_f64() * 1e3,
                "grpc call"
            );
            let labels = [
                ("service", service.to_string()),
                ("method", method.to_string()),
            ];
            metrics::counter!(
                "tessera_grpc_server_requests_total",
                &[
                    labels[0].clone(),
                    labels[1].clone(),
                    ("code", format!("{code:?}")),
                ]
            )
            .increment(1);
            metrics::histogram!("tessera_grpc_server_request_duration_seconds", &labels)
                .record(elapsed.as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_metric_is_exposed_with_help_and_type() {
        install();
        let listed: Vec<_> = documented().collect();
        assert!(listed.len() >= 15, "{listed:?}");
        for (name, kind, _) in &listed {
            assert!(
                ["counter", "gauge", "histogram"].contains(kind),
                "{name}: {kind}"
            );
            match *kind {
                "counter" => metrics::counter!(*name).increment(1),
                "gauge" => metrics::gauge!(*name).set(1.0),
                _ => metrics::histogram!(*name).record(0.001),
            }
        }
        let text = render();
        for (name, kind, what) in &listed {
            assert!(
                text.contains(&format!("# HELP {name} {what}")),
                "{name} has no HELP line in:\n{text}"
            );
            assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name}");
        }
    }
}
