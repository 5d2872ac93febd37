//! Webhook delivery: events published to notification (as a relay does) fan out to one
//! endpoint, a local HTTP sink that answers 200. Reports signed deliveries per second and
//! the time from an event's arrival to its first attempt reaching the sink.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::RequestContext;
use tessera_tests::{TENANT, TestSuite};

/// Events of the burst.
const BURST: usize = 10_000;
/// Events of the steady run (1,000/s for 10 s).
const STEADY: usize = 10_000;

/// When the sink saw each event (by the `event_id` of the body).
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

async fn sink() -> (Seen, String) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 body: axum::body::Bytes| async move {
                    let at = Instant::now();
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let id = body["event_id"].as_str().unwrap_or_default().to_string();
                    seen.lock().expect("sink").push((id, at));
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (seen, url)
}

/// Publishes `events` in batches of `batch`, one batch every `every` (none: at once), and
/// waits until the sink has them all. Returns the deliveries per second and each event's
/// time from acceptance to its first attempt reaching the sink.
async fn run(
    client: &mut NotificationServiceClient<tessera_runtime::grpc::Channel>,
    seen: &Seen,
    events: usize,
    batch: usize,
    every: Option<Duration>,
) -> (f64, Vec<Duration>) {
    seen.lock().expect("sink").clear();
    let started = Instant::now();
    let mut published = HashMap::with_capacity(events);
    let mut tick = every.map(tokio::time::interval);
    for _ in 0..events / batch {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        let events: Vec<pb::Event> = (0..batch)
            .map(|_| pb::Event {
                id: uuid::Uuid::now_v7().to_string(),
                tenant_id: TENANT.into(),
                r#type: "points.credited".into(),
                source: "bench".into(),
                occurred_at: Some(prost_types::Timestamp::default()),
                data: br#"{"customer_id": "bench", "amount": 10}"#.to_vec(),
                traceparent: String::new(),
            })
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        client
            .publish_events(
                RequestContext::system(TENANT, "bench")
                    .request(pb::PublishEventsRequest { events }),
            )
            .await
            .expect("publish");
        // Accepted (stored with its delivery) when the call returns.
        let accepted = Instant::now();
        published.extend(ids.into_iter().map(|id| (id, accepted)));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().expect("sink").len() < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let mut first = HashMap::new();
    for (id, at) in seen.lock().expect("sink").iter() {
        first.entry(id.clone()).or_insert(*at);
    }
    let mut latencies: Vec<Duration> = first
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*published.get(id)?)))
        .collect();
    latencies.sort();
    (latencies.len() as f64 / elapsed.as_secs_f64(), latencies)
}

pub async fn deliveries(suite: &TestSuite, label: &str) {
    let (seen, url) = sink().await;
    let mut client = NotificationServiceClient::new(suite.channel());
    client
        .create_webhook_endpoint(suite.ctx(TENANT).request(pb::CreateWebhookEndpointRequest {
            idempotency_key: "bench-endpoint".into(),
            url,
            description: "bench sink".into(),
            event_types: Vec::new(),
            max_concurrency: 64,
        }))
        .await
        .expect("endpoint");
    // A burst, for throughput.
    let (rate, _) = run(&mut client, &seen, BURST, 500, None).await;
    println!(
        "  {label:<28} {:<22} {rate:>8.0}/s  ({BURST} events at once)",
        "Webhook deliveries"
    );
    // A steady 1,000 events/s, for the time to the first attempt.
    let (_, latencies) = run(
        &mut client,
        &seen,
        STEADY,
        50,
        Some(Duration::from_millis(50)),
    )
    .await;
    println!(
        "  {label:<28} {:<22} enqueue → first attempt at 1,000/s: p50 {:>7.2} ms  p99 {:>7.2} ms  ({} of {STEADY})",
        "Webhook latency",
        super::percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        super::percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.len(),
    );
}
