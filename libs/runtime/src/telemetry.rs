//! Logs, traces (and the metrics recorder) for every service, set up once per process by [`init`] (or
//! [`init_for_tests`], which records spans in memory). A tracer provider is always installed,
//! so every request gets a trace id that is logged and propagated; spans are exported over
//! OTLP only when an endpoint is configured. W3C trace context crosses process boundaries in
//! gRPC metadata ([`TracedClient`], [`server_span`]) and HTTP headers ([`extract_headers`]).

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};

/// Flushes and shuts the tracer provider down when dropped (end of `main`).
#[must_use = "dropping the guard shuts telemetry down"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.force_flush() {
            eprintln!("telemetry: flush failed: {err}");
        }
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry: shutdown failed: {err}");
        }
    }
}

fn resource(service: &str) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .with_attributes([
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            // The pod (Kubernetes sets HOSTNAME to its name) and the process.
            opentelemetry::KeyValue::new(
                "service.instance.id",
                format!(
                    "{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
                    std::process::id()
                ),
            ),
        ])
        .build()
}

/// Installs the global subscriber: env filter, fmt (pretty or JSON) and the OpenTelemetry
/// layer. `service` becomes the `service.name` resource attribute.
pub fn init(config: &TelemetryConfig, service: &str) -> anyhow::Result<TelemetryGuard> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service));
    if let Some(endpoint) = &config.otlp_endpoint {
        builder = builder.with_batch_exporter(otlp_exporter(endpoint, config)?);
    }
    let provider = builder.build();
    let tracer = provider.tracer("tessera");
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log_filter))?;
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match config.log_format {
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().compact())
            .try_init()?,
        LogFormat::Json => {
            let (layer, dispatch) = json_layer(std::io::stdout);
            registry.with(layer).try_init()?;
            tracing::dispatcher::get_default(|d| dispatch.set(d.downgrade()).ok());
        }
    }
    opentelemetry::global::set_tracer_provider(provider.clone());
    crate::metrics::install();
    Ok(TelemetryGuard { provider })
}

/// The OTLP/gRPC span exporter for `endpoint`: over TLS for `https://` (Mozilla's roots, and
/// `telemetry.otlp_ca_file` when set), in the clear for `http://`.
fn otlp_exporter(
    endpoint: &str,
    config: &TelemetryConfig,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.to_string());
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &config.otlp_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "telemetry.otlp_ca_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        exporter = exporter.with_tls_config(tls);
    }
    Ok(exporter.build()?)
}

/// The JSON log layer: one object per line, the event's fields flattened, the current
/// span's fields, and, inside a traced span, its `trace_id` and `span_id`, read through the
/// dispatch set in the returned slot once the subscriber is built.
fn json_layer<S, W>(writer: W) -> (impl tracing_subscriber::Layer<S>, DispatchSlot)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let json = tracing_subscriber::fmt::format()
        .json()
        .flatten_event(true)
        .with_current_span(true);
    let slot = DispatchSlot::default();
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .event_format(TraceIds {
            inner: json,
            dispatch: slot.clone(),
        })
        .with_writer(writer);
    (layer, slot)
}

/// The subscriber a [`TraceIds`] formatter belongs to: while an event is being written,
/// `tracing` answers no dispatch to code asking for the current one, so the formatter keeps
/// its own (weak, as the subscriber owns the formatter).
type DispatchSlot = std::sync::Arc<OnceLock<tracing::dispatcher::WeakDispatch>>;

/// Adds `trace_id` and `span_id` (W3C hex) to the JSON object another formatter writes,
/// from the OpenTelemetry context of the span the event happened in, so a log line leads
/// to its trace.
struct TraceIds<F> {
    inner: F,
    dispatch: DispatchSlot,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let dispatch = self.dispatch.get().and_then(|d| d.upgrade());
        let ids = ctx
            .lookup_current()
            .zip(dispatch)
            .and_then(|(span, dispatch)| {
                tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)
            });
        let ids = ids.map(|cx| cx.span().span_context().clone());
        match (ids, line.strip_prefix('{')) {
            (Some(ids), Some(rest)) if ids.is_valid() => std::fmt::Write::write_fmt(
                &mut writer,
                format_args!(
                    "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                    ids.trace_id(),
                    ids.span_id()
                ),
            ),
            _ => std::fmt::Write::write_str(&mut writer, &line),
        }
    }
}

/// Test mode: installs (once per process) a subscriber whose spans are exported
/// synchronously to an in-memory exporter, and returns that exporter. Logs go to the test
/// writer at the level `RUST_LOG` asks for (default: warnings).
#[cfg(feature = "testing")]
pub fn init_for_tests() -> opentelemetry_sdk::trace::InMemorySpanExporter {
    static EXPORTER: OnceLock<opentelemetry_sdk::trace::InMemorySpanExporter> = OnceLock::new();
    EXPORTER
        .get_or_init(|| {
            let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_resource(resource("tessera-tests"))
                .with_simple_exporter(exporter.clone())
                .build();
            let tracer = provider.tracer("tessera");
            let filter =
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
            // The OTel layer sees every span (its own filter), logs are filtered separately.
            let otel = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            let fmt = tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(filter);
            use tracing_subscriber::Layer as _;
            let _ = tracing_subscriber::registry()
                .with(otel)
                .with(fmt)
                .try_init();
            crate::metrics::install();
            opentelemetry::global::set_tracer_provider(provider.clone());
            // Keep the provider alive for the whole process.
            std::mem::forget(provider);
            exporter
        })
        .clone()
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the current span's trace context into HTTP headers (responses, webhooks).
pub fn inject_headers(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    propagator().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Reads a W3C trace context from HTTP headers (gRPC metadata travels as HTTP/2 headers).
pub fn extract_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// The current span's context as a `traceparent` value, for storing with an outbox event.
pub fn current_traceparent() -> String {
    let mut headers = http::HeaderMap::new();
    inject_headers(&mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The trace context in a stored `traceparent` (empty or malformed: an empty context).
fn context_of_traceparent(traceparent: &str) -> opentelemetry::Context {
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", value);
    }
    extract_headers(&headers)
}

/// Makes `span` a child of the context in a stored `traceparent` (empty: left as is).
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    set_remote_parent(span, context_of_traceparent(traceparent));
}

/// Most links a batch's span carries (the rest of a large batch's requests are not linked).
const MAX_LINKS: usize = 64;

/// Puts `span`, work done for several requests at once (one wallet call for many
/// redemptions, one outbox delivery for many requests' events), in the trace of the first
/// request, linked to the others' (each trace once, at most [`MAX_LINKS`]).
pub fn batch_parent<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    let mut traceparents = traceparents.into_iter();
    let Some(first) = traceparents.next() else {
        return;
    };
    set_parent_from_traceparent(span, first);
    let mut linked = std::collections::HashSet::from([first]);
    for other in traceparents {
        if linked.len() > MAX_LINKS {
            break;
        }
        if linked.insert(other) {
            let linked = context_of_traceparent(other).span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
    }
}

/// Sets a remote parent, ignoring contexts without a valid span (no incoming trace).
pub fn set_remote_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    if cx.span().span_context().is_valid() {
        // Fails only when the span is disabled, in which case there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// The span for one incoming gRPC request (used as tonic's `trace_fn`): named after the
/// method, parented to the caller's trace context.
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    // Probes and reflection are not traced: a kubelet's checks would be most of the traces.
    if service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    set_remote_parent(&span, extract_headers(request.headers()));
    span
}

/// Records one database statement that just ran (`elapsed`, `failed`) as a CLIENT span of
/// the current span, per OpenTelemetry's database conventions (`db.system.name`,
/// `db.namespace`, `db.operation.name`, `db.query.text`: the SQL with its placeholders, never
/// the values). Statements outside a traced span (background polling) make none.
pub fn db_span(
    system: &'static str,
    namespace: &str,
    sql: &str,
    elapsed: std::time::Duration,
    failed: bool,
) {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
    let parent = tracing::Span::current().context();
    if !parent.span().span_context().is_valid() {
        return;
    }
    let end = std::time::SystemTime::now();
    let operation = sql
        .split_whitespace()
        .next()
        .unwrap_or("SQL")
        .to_ascii_uppercase();
    let text: String = sql.chars().take(2_000).collect();
    let tracer = opentelemetry::global::tracer("tessera");
    let mut span = tracer
        .span_builder(format!("{operation} {namespace}"))
        .with_kind(SpanKind::Client)
        .with_start_time(end.checked_sub(elapsed).unwrap_or(end))
        .with_attributes([
            KeyValue::new("db.system.name", system),
            KeyValue::new("db.system", system),
            KeyValue::new("db.namespace", namespace.to_string()),
            KeyValue::new("db.operation.name", operation),
            KeyValue::new("db.query.text", text),
        ])
        .start_with_context(&tracer, &parent);
    if failed {
        span.set_status(Status::error("the statement failed"));
    }
    span.end_with_timestamp(end);
}

/// A gRPC client service that makes a CLIENT span per call (`grpc.client`, with the
/// `rpc.*` attributes and the status code), child of the caller's span, and sends that
/// span's W3C trace context, so the server's span is its child.
#[derive(Debug, Clone)]
pub struct TracedClient<S> {
    inner: S,
}

impl<S> TracedClient<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower::Service<http::Request<tonic::body::Body>> for TracedClient<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        use tracing::Instrument;
        let path = request.uri().path().trim_start_matches('/').to_string();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %path,
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            server.address = request.uri().host().unwrap_or_default(),
            rpc.grpc.status_code = tracing::field::Empty,
        );
        propagator().inject_context(&span.context(), &mut HeaderInjector(request.headers_mut()));
        let future = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = future.await;
            if let Ok(response) = &result {
                let code = crate::grpc::status_in_headers(response.headers()) as i64;
                span.record("rpc.grpc.status_code", code);
            }
            result
        })
    }
}
