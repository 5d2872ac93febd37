//! Webhooks: events reach a real HTTP sink in this process, signed per the Standard
//! Webhooks specification (verified by the sink); failures are retried under the same
//! `webhook-id`, then dead-lettered and replayed; every attempt is logged; a rotated secret
//! and the old one both sign during the overlap; internal addresses are refused; a slow
//! endpoint does not delay another.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use sea_orm::ConnectionTrait;
use tessera_proto::notification::v1 as pb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_runtime::RequestContext;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

use crate::eligibility::{key, violations};

backend_tests!(
    a_delivery_continues_the_trace_of_its_event,
    signed_deliveries_are_retried_dead_lettered_and_replayed,
    an_endpoint_back_gets_its_waiting_deliveries_at_once,
    rotation_filters_guard_and_slow_endpoints,
    webhooks_are_managed_over_http,
);

type Client = NotificationServiceClient<Channel>;

/// One request the sink received.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    /// What the sink answered.
    answered: u16,
    timestamp: i64,
    signature: String,
    /// The W3C trace context the delivery carried.
    traceparent: String,
    body: Vec<u8>,
}

/// An HTTP sink: records what it gets, answers `status` after `delay_ms`.
#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl Sink {
    async fn start() -> (Self, String) {
        let sink = Sink::default();
        sink.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (sink, url)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("sink").clone()
    }
}

async fn receive(
    State(sink): State<Sink>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let answered = sink.status.load(Ordering::SeqCst);
    sink.received.lock().expect("sink").push(Received {
        id: header("webhook-id"),
        answered,
        timestamp: header("webhook-timestamp").parse().unwrap_or_default(),
        signature: header("webhook-signature"),
        traceparent: header("traceparent"),
        body: body.to_vec(),
    });
    let delay = sink.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    axum::http::StatusCode::from_u16(answered).unwrap_or(axum::http::StatusCode::OK)
}

async fn endpoint(
    c: &mut Client,
    suite: &TestSuite,
    url: &str,
    types: &[&str],
    concurrency: u32,
) -> Result<pb::CreateWebhookEndpointResponse, tonic::Status> {
    c.create_webhook_endpoint(suite.ctx(TENANT).request(pb::CreateWebhookEndpointRequest {
        idempotency_key: key(),
        url: url.into(),
        description: "test sink".into(),
        event_types: types.iter().map(|t| (*t).into()).collect(),
        max_concurrency: concurrency,
    }))
    .await
    .map(|r| r.into_inner())
}

/// Publishes events as a service would (its outbox relay).
async fn publish(c: &mut Client, types: &[&str]) -> Vec<String> {
    let events: Vec<pb::Event> = types
        .iter()
        .map(|t| pb::Event {
            id: uuid::Uuid::now_v7().to_string(),
            tenant_id: TENANT.into(),
            r#type: (*t).into(),
            source: "tests".into(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            data: br#"{"amount": 150}"#.to_vec(),
            traceparent: String::new(),
        })
        .collect();
    let ids = events.iter().map(|e| e.id.clone()).collect();
    c.publish_events(
        RequestContext::system(TENANT, "tests").request(pb::PublishEventsRequest { events }),
    )
    .await
    .expect("publish");
    ids
}

async fn deliveries(
    suite: &TestSuite,
    endpoint: &str,
    status: pb::DeliveryStatus,
) -> Vec<pb::Delivery> {
    Client::new(suite.channel())
        .list_deliveries(suite.ctx(TENANT).request(pb::ListDeliveriesRequest {
            endpoint_id: endpoint.into(),
            status: status.into(),
            page: None,
        }))
        .await
        .expect("deliveries")
        .into_inner()
        .deliveries
}

/// Replays an endpoint ("it is back"); how many deliveries went back in the queue.
async fn replay_endpoint(c: &mut Client, suite: &TestSuite, id: &str) -> u32 {
    c.replay_deliveries(suite.ctx(TENANT).request(pb::ReplayDeliveriesRequest {
        idempotency_key: key(),
        delivery_ids: Vec::new(),
        endpoint_id: id.to_string(),
    }))
    .await
    .expect("replay")
    .into_inner()
    .replayed
}

/// The delivery is a CLIENT span in the trace of the request that published its event, and
/// the receiver gets that trace as `traceparent`.
async fn a_delivery_continues_the_trace_of_its_event(suite: TestSuite) {
    use opentelemetry::trace::TraceContextExt;
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let exporter = tessera_runtime::telemetry::init_for_tests();
    let mut c = Client::new(suite.channel());
    let (sink, url) = Sink::start().await;
    endpoint(&mut c, &suite, &url, &["points.*"], 0)
        .await
        .expect("endpoint");
    let root = tracing::info_span!("test.publish");
    let trace_id = root.context().span().span_context().trace_id();
    publish(&mut c, &["points.credited"])
        .instrument(root.clone())
        .await;
    drop(root);
    let received = eventually(Duration::from_secs(5), "the delivery", || async {
        sink.received().pop()
    })
    .await;
    let carried = received.traceparent.split('-').nth(1).unwrap_or_default();
    assert_eq!(carried, trace_id.to_string(), "{received:?}");
    let span = eventually(Duration::from_secs(5), "the delivery's span", || async {
        exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| s.name == "POST" && s.span_context.trace_id() == trace_id)
    })
    .await;
    assert_eq!(span.span_kind, opentelemetry::trace::SpanKind::Client);
    assert_eq!(
        span.span_context.span_id().to_string(),
        received.traceparent.split('-').nth(2).unwrap_or_default(),
        "the receiver's parent is the delivery's span"
    );
    suite.cleanup().await;
}

async fn an_endpoint_back_gets_its_waiting_deliveries_at_once(suite: TestSuite) {
    use sea_orm::ConnectionTrait;
    let mut c = Client::new(suite.channel());
    let (sink, url) = Sink::start().await;
    let id = endpoint(&mut c, &suite, &url, &["points.*"], 0)
        .await
        .expect("endpoint")
        .endpoint
        .expect("endpoint")
        .id;
    // The endpoint is down: the first attempt fails, the next retry would be an hour away.
    sink.status.store(503, Ordering::SeqCst);
    publish(&mut c, &["points.credited"]).await;
    eventually(Duration::from_secs(5), "the failed attempt", || async {
        (!sink.received().is_empty()).then_some(())
    })
    .await;
    let db = suite.db("notification").await;
    let later: [sea_orm::Value; 1] = [(tessera_store::now_micros() + 3_600_000_000).into()];
    db.conn()
        .execute_raw(tessera_store::stmt(
            db.conn(),
            "UPDATE work_queue SET next_attempt_at = $1 WHERE queue = 'webhooks'",
            later,
        ))
        .await
        .expect("an hour away");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tried = sink.received().len();

    // It is back: the operator says so, and the waiting delivery goes now, same webhook-id.
    sink.status.store(200, Ordering::SeqCst);
    let replayed = replay_endpoint(&mut c, &suite, &id).await;
    assert_eq!(replayed, 1, "the pending delivery brought forward");
    let delivered = eventually(Duration::from_secs(5), "the delivery", || async {
        deliveries(&suite, &id, pb::DeliveryStatus::Succeeded)
            .await
            .pop()
    })
    .await;
    let received = sink.received();
    assert_eq!(received.len(), tried + 1);
    assert!(received.iter().all(|r| r.id == delivered.id));
    suite.cleanup().await;
}

async fn signed_deliveries_are_retried_dead_lettered_and_replayed(suite: TestSuite) {
    let mut c = Client::new(suite.channel());
    let (sink, url) = Sink::start().await;
    let created = endpoint(&mut c, &suite, &url, &["points.*"], 0)
        .await
        .expect("endpoint");
    let (secret, id) = (created.secret, created.endpoint.expect("endpoint").id);
    assert!(secret.starts_with("whsec_"));

    // Delivered, signed; another type is not.
    let events = publish(&mut c, &["points.credited", "tier.changed"]).await;
    eventually(Duration::from_secs(5), "the delivery", || async {
        (sink.received().len() == 1).then_some(())
    })
    .await;
    let got = &sink.received()[0];
    assert!(got.id.starts_with("msg_"));
    assert!(
        tessera_notification::signing::verify(
            &secret,
            &got.id,
            got.timestamp,
            &got.body,
            &got.signature
        ),
        "the sink verifies the signature"
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
    assert_eq!(body["type"], "points.credited");
    assert_eq!(body["event_id"], events[0].as_str());
    assert_eq!(body["data"]["amount"], 150);

    // The sink fails: retried under the same webhook-id (the test schedule: 4 attempts, a
    // second apart), then dead; every attempt is logged.
    sink.status.store(503, Ordering::SeqCst);
    publish(&mut c, &["points.debited"]).await;
    let dead = eventually(Duration::from_secs(15), "the dead letter", || async {
        deliveries(&suite, &id, pb::DeliveryStatus::Dead)
            .await
            .pop()
    })
    .await;
    let attempts: Vec<Received> = sink
        .received()
        .into_iter()
        .filter(|r| r.id == dead.id)
        .collect();
    assert_eq!(attempts.len(), 4, "every attempt reached the sink");
    let detail = c
        .get_delivery(suite.ctx(TENANT).request(pb::GetDeliveryRequest {
            id: dead.id.clone(),
        }))
        .await
        .expect("delivery")
        .into_inner()
        .delivery
        .expect("delivery");
    let codes: Vec<i32> = detail.history.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [503, 503, 503, 503]);

    // Back up: a replay of the endpoint's dead letters delivers it, same webhook-id.
    sink.status.store(200, Ordering::SeqCst);
    let replayed = replay_endpoint(&mut c, &suite, &id).await;
    assert_eq!(replayed, 1);
    eventually(Duration::from_secs(5), "the replayed delivery", || async {
        let d = Client::new(suite.channel())
            .get_delivery(suite.ctx(TENANT).request(pb::GetDeliveryRequest {
                id: dead.id.clone(),
            }))
            .await
            .expect("delivery")
            .into_inner()
            .delivery
            .expect("delivery");
        (d.status() == pb::DeliveryStatus::Succeeded).then_some(d)
    })
    .await;
    assert_eq!(
        sink.received().iter().filter(|r| r.id == dead.id).count(),
        5
    );
    // A redelivered event (a relay retry) is not delivered twice.
    let before = sink.received().len();
    let mut again = publish(&mut c, &["points.expired"]).await;
    let id_again = again.pop().expect("id");
    c.publish_events(
        RequestContext::system(TENANT, "tests").request(pb::PublishEventsRequest {
            events: vec![pb::Event {
                id: id_again,
                tenant_id: TENANT.into(),
                r#type: "points.expired".into(),
                source: "tests".into(),
                occurred_at: Some(prost_types::Timestamp::default()),
                data: b"{}".to_vec(),
                traceparent: String::new(),
            }],
        }),
    )
    .await
    .expect("redelivered");
    eventually(Duration::from_secs(5), "one more delivery", || async {
        (sink.received().len() == before + 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.received().len(), before + 1);
    suite.cleanup().await;
}

async fn rotation_filters_guard_and_slow_endpoints(suite: TestSuite) {
    let mut c = Client::new(suite.channel());
    // The SSRF guard: metadata, private and link-local addresses are refused.
    for url in [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://[::1]:8080/hook",
        "ftp://example.com/hook",
    ] {
        let err = endpoint(&mut c, &suite, url, &[], 0).await.expect_err(url);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{url}");
        assert_eq!(violations(&err), ["url"], "{url}");
    }

    // Rotation: during the overlap both secrets sign.
    let (sink, url) = Sink::start().await;
    let created = endpoint(&mut c, &suite, &url, &["campaign.*"], 0)
        .await
        .expect("endpoint");
    let (old, id) = (created.secret, created.endpoint.expect("endpoint").id);
    let rotation = pb::RotateWebhookSecretRequest {
        idempotency_key: key(),
        id: id.clone(),
        overlap_seconds: 3600,
    };
    let new = c
        .rotate_webhook_secret(suite.ctx(TENANT).request(rotation.clone()))
        .await
        .expect("rotate")
        .into_inner()
        .secret;
    assert_ne!(new, old);
    // A replay gives the same secret back from the stored (sealed) answer.
    let replayed = c
        .rotate_webhook_secret(suite.ctx(TENANT).request(rotation))
        .await
        .expect("rotate replayed")
        .into_inner()
        .secret;
    assert_eq!(replayed, new);
    // Neither secret is in the database in the clear: not in the endpoint's row, not in the
    // stored answers of the creation and the rotation.
    let db = suite.db("notification").await;
    let conn = db.conn();
    let rows = conn
        .query_all_raw(tessera_store::stmt(
            conn,
            "SELECT secret, previous_secret FROM webhook_endpoints",
            [],
        ))
        .await
        .expect("endpoints");
    for row in &rows {
        for i in 0..2 {
            let stored: String = row.try_get_by_index(i).expect("secret column");
            assert!(
                stored.is_empty() || stored.starts_with("sealed:v1:"),
                "{stored}"
            );
            assert!(!stored.contains(&old) && !stored.contains(&new));
        }
    }
    let answers = conn
        .query_all_raw(tessera_store::stmt(
            conn,
            "SELECT response FROM idempotency_keys",
            [],
        ))
        .await
        .expect("answers");
    assert!(!answers.is_empty());
    for row in &answers {
        let body: Option<Vec<u8>> = row.try_get_by_index(0).expect("response");
        let body = String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned();
        assert!(
            !body.contains(&old) && !body.contains(&new),
            "a secret in the clear"
        );
    }
    publish(&mut c, &["campaign.started"]).await;
    eventually(Duration::from_secs(5), "the delivery", || async {
        (sink.received().len() == 1).then_some(())
    })
    .await;
    let got = &sink.received()[0];
    for secret in [&old, &new] {
        assert!(tessera_notification::signing::verify(
            secret,
            &got.id,
            got.timestamp,
            &got.body,
            &got.signature
        ));
    }

    // Disabled: nothing is sent until it is enabled again.
    let disabled = c
        .update_webhook_endpoint(suite.ctx(TENANT).request(pb::UpdateWebhookEndpointRequest {
            idempotency_key: key(),
            id: id.clone(),
            url: url.clone(),
            description: String::new(),
            event_types: vec!["campaign.*".into()],
            enabled: false,
            max_concurrency: 0,
        }))
        .await
        .expect("disable")
        .into_inner()
        .endpoint
        .expect("endpoint");
    assert!(!disabled.enabled);
    publish(&mut c, &["campaign.killed"]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sink.received().len(), 1);

    // A slow endpoint (one delivery at a time, 1.5 s each) does not delay a fast one.
    let (slow, slow_url) = Sink::start().await;
    slow.delay_ms.store(1500, Ordering::SeqCst);
    let (fast, fast_url) = Sink::start().await;
    endpoint(&mut c, &suite, &slow_url, &["order.*"], 1)
        .await
        .expect("slow");
    endpoint(&mut c, &suite, &fast_url, &["order.*"], 0)
        .await
        .expect("fast");
    let started = Instant::now();
    publish(&mut c, &["order.recorded"; 5]).await;
    eventually(
        Duration::from_secs(5),
        "the fast endpoint has all five",
        || async { (fast.received().len() == 5).then_some(()) },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "the fast endpoint waited for the slow one: {:?}",
        started.elapsed()
    );
    assert!(
        slow.received().len() <= 1,
        "one at a time on the slow endpoint"
    );
    suite.cleanup().await;
}

async fn webhooks_are_managed_over_http(suite: TestSuite) {
    let (sink, url) = Sink::start().await;
    let created = suite
        .post(
            "/v1/webhook-endpoints",
            Some(&key()),
            &serde_json::json!({"url": url, "event_types": ["points.*"]}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.expect("json");
    let secret = created["secret"].as_str().expect("secret").to_string();
    let id = created["endpoint"]["id"].as_str().expect("id").to_string();
    let refused = suite
        .post(
            "/v1/webhook-endpoints",
            Some(&key()),
            &serde_json::json!({"url": "http://169.254.169.254/"}),
        )
        .await;
    assert_eq!(refused.status(), 400);

    // A credit through the gateway reaches the sink, signed.
    let credited = suite
        .post(
            "/v1/customers/zed/points",
            Some(&key()),
            &serde_json::json!({"amount": 25, "reason": "welcome"}),
        )
        .await;
    assert_eq!(credited.status(), 201);
    eventually(Duration::from_secs(5), "the webhook", || async {
        (sink.received().len() == 1).then_some(())
    })
    .await;
    let got = &sink.received()[0];
    assert!(tessera_notification::signing::verify(
        &secret,
        &got.id,
        got.timestamp,
        &got.body,
        &got.signature
    ));
    // The sink has the body before the attempt's outcome is written.
    let listed: serde_json::Value = eventually(Duration::from_secs(5), "settled", || async {
        let listed: serde_json::Value = suite
            .get(&format!("/v1/deliveries?endpoint_id={id}&status=succeeded"))
            .await
            .json()
            .await
            .expect("json");
        (listed["data"][0]["id"] == got.id.as_str()).then_some(listed)
    })
    .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1));
    let detail: serde_json::Value = suite
        .get(&format!("/v1/deliveries/{}", got.id))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(detail["history"][0]["status_code"], 200);
    let endpoints: serde_json::Value = suite
        .get("/v1/webhook-endpoints")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(endpoints["data"][0]["id"], id.as_str());
    assert!(
        endpoints["data"][0].get("secret").is_none(),
        "the secret is never listed"
    );
    suite.cleanup().await;
}

mod sink_down {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        a_sink_down_for_a_minute_loses_nothing(tessera_tests::Backend::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        a_sink_down_for_a_minute_loses_nothing(tessera_tests::Backend::Production).await;
    }
}

/// The sink answers 503 for 60 s while events arrive, then comes back: every event is
/// delivered, and the only duplicates are retries of one `webhook-id` (one 2xx each). The
/// retry schedule here is the production one compressed (0, 5, 10, 20, 40, 80 s). By
/// default (see `full_size`) time runs four times faster: down 15 s, retries after 0, 1, 2,
/// 5, 10 and 20 s; the shape of the outage against the schedule is the same.
async fn a_sink_down_for_a_minute_loses_nothing(backend: tessera_tests::Backend) {
    let Some(mut config) = tessera_tests::test_config(backend) else {
        return;
    };
    let (down_for, schedule) = if tessera_tests::full_size() {
        (60, vec![0, 5, 10, 20, 40, 80])
    } else {
        (15, vec![0, 1, 2, 5, 10, 20])
    };
    config.webhooks.retry_schedule_secs = schedule;
    let suite = TestSuite::start_with(backend, config, false).await;
    let mut c = Client::new(suite.channel());
    let (sink, url) = Sink::start().await;
    endpoint(&mut c, &suite, &url, &[], 0)
        .await
        .expect("endpoint");
    sink.status.store(503, Ordering::SeqCst);
    let down_at = Instant::now();
    let mut published = std::collections::HashSet::new();
    for _ in 0..20 {
        published.extend(publish(&mut c, &["points.credited"; 10]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(down_for).saturating_sub(down_at.elapsed())).await;
    assert!(
        !sink.received().is_empty() && sink.received().iter().all(|r| r.answered == 503),
        "attempts were made while the sink was down"
    );
    sink.status.store(200, Ordering::SeqCst);
    let delivered = eventually(
        Duration::from_secs(100),
        "every event delivered",
        || async {
            let ok: Vec<Received> = sink
                .received()
                .into_iter()
                .filter(|r| r.answered == 200)
                .collect();
            (ok.len() >= published.len()).then_some(ok)
        },
    )
    .await;
    let mut events = std::collections::HashMap::new();
    for r in &delivered {
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        let event = body["event_id"].as_str().expect("event id").to_string();
        assert!(
            events.insert(event, r.id.clone()).is_none(),
            "one 2xx per event"
        );
    }
    let got: std::collections::HashSet<String> = events.keys().cloned().collect();
    assert_eq!(got, published, "every event, none lost");
    // Every request the sink ever saw is an attempt of one of these webhook-ids.
    let ids: std::collections::HashSet<&String> = events.values().collect();
    assert!(sink.received().iter().all(|r| ids.contains(&r.id)));
    suite.cleanup().await;
}
