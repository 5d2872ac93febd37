//! Serving and calling gRPC. [`serve`] (normally reached through
//! [`crate::component::serve`]) runs a set of routes with the standard health service
//! (one entry per registered service, flipped to NOT_SERVING on shutdown) and reflection (v1
//! and v1alpha), a server span per request parented to the caller's trace, and graceful
//! shutdown. [`channel`] opens a lazily connecting client channel that makes a CLIENT span
//! per call, propagates its trace context and applies the configured deadline.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;

use crate::telemetry::{TracedClient, server_span};

/// HTTP/2 flow-control window per stream (the connection gets twice as much).
const WINDOW: u32 = 1 << 20;

/// A client channel: every call gets a CLIENT span, whose W3C trace context it carries.
pub type Channel = TracedClient<tonic::transport::Channel>;

/// The status of a gRPC response from its headers: an error travels in a trailers-only
/// response, so its `grpc-status` is a header; a success puts it in the trailers (code 0).
pub(crate) fn status_in_headers(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// A lazily connecting channel to `url` (connects on first use, reconnects as needed), with
/// `timeout` as the deadline of every call.
pub fn channel(url: &str, timeout: Duration) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())?
        .timeout(timeout)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Larger answers (a qualification lists every incentive) arrive without waiting for
        // window updates at HTTP/2's 64 KiB default.
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(2 * WINDOW))
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(TracedClient::new(endpoint.connect_lazy()))
}

/// Serves `routes` on `listener` until `shutdown` is cancelled. `health_names` are the fully
/// qualified gRPC service names reported on the health service (the overall "" entry is
/// added). On shutdown every entry flips to NOT_SERVING, the server waits `drain`, then
/// stops accepting and lets in-flight calls finish.
pub async fn serve<H>(
    listener: TcpListener,
    routes: Routes,
    (reporter, health_service): (HealthReporter, HealthServer<H>),
    health_names: Vec<String>,
    auth: crate::auth::AuthLayer,
    drain: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    H: tonic_health::pb::health_server::Health,
{
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for name in &health_names {
        reporter
            .set_service_status(name.as_str(), ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let addr = listener.local_addr()?;
    tracing::info!(%addr, services = ?health_names, "gRPC server listening");
    let stop = async move {
        shutdown.cancelled().await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &health_names {
            reporter
                .set_service_status(name.as_str(), ServingStatus::NotServing)
                .await;
        }
        tracing::info!(?drain, "health NOT_SERVING; draining");
        tokio::time::sleep(drain).await;
    };
    // Answers larger than one segment would otherwise wait out Nagle's algorithm against
    // the client's delayed ACK (~40 ms): a given incoming stream gets no socket options.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        if let Ok(stream) = &stream {
            let _ = stream.set_nodelay(true);
        }
        stream
    });
    Server::builder()
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(2 * WINDOW))
        .trace_fn(server_span)
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(auth)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    tracing::info!(%addr, "gRPC server stopped");
    Ok(())
}
