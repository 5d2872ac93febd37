//! The production shape, as the Helm chart deploys it: `tessera migrate` (the hook Job), then
//! one `tessera serve <service>` process per service, configured only through `TESSERA_*`
//! environment variables, on PostgreSQL + Redis. The points flow crosses real process
//! boundaries, each gRPC service reports SERVING, a service's metrics port answers, a
//! campaign killed through the gateway is refused by both eligibility replicas within a
//! second (a second replica of eligibility and of the scheduler run beside the first),
//! notification killed with SIGKILL in the middle of webhook deliveries loses none of the
//! events it acknowledged once restarted; the wallet killed with SIGKILL under load gives
//! 503, never 500, and each failed request, retried with its key, is credited once; and
//! every process exits cleanly on SIGTERM.
//!
//! Needs `TESSERA_TEST_DATABASE_URL` and `TESSERA_TEST_REDIS_URL`; skipped without them
//! unless `TESSERA_REQUIRE_BACKENDS=1`.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::notification::v1 as npb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const GRPC_SERVICES: [(&str, &str, &str); 5] = [
    ("catalog", "CATALOG", "tessera.catalog.v1.CatalogService"),
    (
        "eligibility",
        "ELIGIBILITY",
        "tessera.eligibility.v1.EligibilityService",
    ),
    ("wallet", "WALLET", "tessera.wallet.v1.WalletService"),
    (
        "campaign-scheduler",
        "SCHEDULER",
        "tessera.scheduler.v1.SchedulerService",
    ),
    (
        "notification",
        "NOTIFICATION",
        "tessera.notification.v1.NotificationService",
    ),
];

/// A free port below the kernel's ephemeral range (32768 and up), so no outgoing
/// connection of the processes starting meanwhile (to PostgreSQL, Redis, each other) can take
/// it as its source port before the service that owns it binds it.
fn free_port(taken: &mut Vec<u16>) -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

/// Kills the processes that are still running when the test ends, whatever happened.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
        }
    }
}

fn tessera(env: &HashMap<String, String>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
    command
        .args(args)
        .env_clear()
        .envs(env)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_processes_serve_the_points_flow_and_stop_on_sigterm() {
    let (Ok(database), Ok(redis)) = (
        std::env::var("TESSERA_TEST_DATABASE_URL"),
        std::env::var("TESSERA_TEST_REDIS_URL"),
    ) else {
        assert!(
            std::env::var("TESSERA_REQUIRE_BACKENDS").as_deref() != Ok("1"),
            "TESSERA_REQUIRE_BACKENDS=1 but the PostgreSQL/Redis URLs are not set"
        );
        eprintln!("skipped: PostgreSQL/Redis not configured");
        return;
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("p{}_", &id[..12]);
    let admin_key = format!("tsk_production_shape_{id}");
    let mut taken = Vec::new();
    let ports: HashMap<&str, u16> = GRPC_SERVICES
        .iter()
        .map(|(name, _, _)| *name)
        .chain([
            "gateway",
            "gateway-metrics",
            "metrics",
            "eligibility-2",
            "campaign-scheduler-2",
        ])
        .map(|name| (name, free_port(&mut taken)))
        .collect();
    let mut env: HashMap<String, String> = HashMap::from([
        ("TESSERA_DATABASE__URL".into(), database),
        ("TESSERA_DATABASE__SCHEMA_PREFIX".into(), prefix.clone()),
        ("TESSERA_DATABASE__MAX_CONNECTIONS".into(), "4".into()),
        ("TESSERA_CACHE__REDIS_URL".into(), redis),
        (
            "TESSERA_CACHE__KEY_PREFIX".into(),
            format!("tessera-shape-{id}"),
        ),
        ("TESSERA_BOOTSTRAP_ADMIN_KEY".into(), admin_key.clone()),
        // A request the killed wallet was running holds its key this long (30 s by
        // default), then a retry runs it.
        (
            "TESSERA_IDEMPOTENCY__IN_FLIGHT_LEASE_SECS".into(),
            "3".into(),
        ),
        // The load below is one key's: no rate limit in its way.
        (
            "TESSERA_GATEWAY__RATE_LIMIT_PER_KEY_PER_MINUTE".into(),
            "0".into(),
        ),
        (
            "TESSERA_GATEWAY__RATE_LIMIT_PER_CUSTOMER_PER_MINUTE".into(),
            "0".into(),
        ),
        // The services sign their calls to each other with it (a Secret in the chart).
        (
            "TESSERA_INTERNAL_SECRET".into(),
            format!("shape-secret-{id}-0123456789abcdef"),
        ),
        // Webhook secrets and the unsubscribe key are sealed with it (the chart's Secret).
        (
            "TESSERA_SECRETS__MASTER_KEY".into(),
            tessera_runtime::sealing::new_key_text("shape"),
        ),
        (
            "TESSERA_PEERS__GATEWAY_URL".into(),
            format!("http://127.0.0.1:{}", ports["gateway"]),
        ),
        ("TESSERA_SHUTDOWN_DRAIN_SECS".into(), "1".into()),
        ("TESSERA_TELEMETRY__LOG_FORMAT".into(), "json".into()),
        ("TESSERA_TELEMETRY__LOG_FILTER".into(), "warn".into()),
        // The test's webhook sink listens on loopback; a dead process's attempts come back
        // 7 s after they started (2 s to answer + 5 s).
        (
            "TESSERA_WEBHOOKS__ALLOWED_HOSTS".into(),
            r#"["127.0.0.1"]"#.into(),
        ),
        ("TESSERA_WEBHOOKS__TIMEOUT_SECS".into(), "2".into()),
        (
            "TESSERA_HTTP_ADDR".into(),
            format!("127.0.0.1:{}", ports["gateway"]),
        ),
    ]);
    // The test publishes events as a service of the suite would: signed with its secret.
    tessera_runtime::auth::install_secret(Some(&env["TESSERA_INTERNAL_SECRET"]))
        .expect("the test's secret");
    for (name, var, _) in GRPC_SERVICES {
        env.insert(
            format!("TESSERA_PEERS__{var}_URL"),
            format!("http://127.0.0.1:{}", ports[name]),
        );
    }

    // The migrations hook.
    let migrated = tessera(&env, &["migrate"])
        .status()
        .expect("tessera migrate runs");
    assert!(migrated.success(), "tessera migrate failed");

    let mut processes = Processes(Vec::new());
    let service_env = |name: &str| {
        let mut service_env = env.clone();
        service_env.insert(
            "TESSERA_GRPC_ADDR".into(),
            format!("127.0.0.1:{}", ports[name]),
        );
        service_env
    };
    for (name, _, _) in GRPC_SERVICES {
        let mut service_env = service_env(name);
        if name == "wallet" {
            service_env.insert(
                "TESSERA_METRICS_ADDR".into(),
                format!("127.0.0.1:{}", ports["metrics"]),
            );
        }
        let child = tessera(&service_env, &["serve", name])
            .spawn()
            .expect("spawn service");
        processes.0.push((name.to_string(), child));
    }
    // Second replicas: eligibility (not known to its peers: it must learn campaigns from the
    // database) and the scheduler (its job worker and sync share the work).
    for name in ["eligibility", "campaign-scheduler"] {
        let mut replica_env = env.clone();
        replica_env.insert(
            "TESSERA_GRPC_ADDR".into(),
            format!("127.0.0.1:{}", ports[format!("{name}-2").as_str()]),
        );
        let child = tessera(&replica_env, &["serve", name])
            .spawn()
            .expect("spawn replica");
        processes.0.push((format!("{name}-2"), child));
    }
    let mut gateway_env = env.clone();
    gateway_env.insert(
        "TESSERA_METRICS_ADDR".into(),
        format!("127.0.0.1:{}", ports["gateway-metrics"]),
    );
    let gateway = tessera(&gateway_env, &["serve", "gateway"])
        .spawn()
        .expect("spawn gateway");
    processes.0.push(("gateway".into(), gateway));

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", ports["gateway"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let replicas = [
        ("eligibility-2", "tessera.eligibility.v1.EligibilityService"),
        (
            "campaign-scheduler-2",
            "tessera.scheduler.v1.SchedulerService",
        ),
    ];
    for (name, grpc_name) in GRPC_SERVICES
        .iter()
        .map(|(name, _, grpc_name)| (*name, *grpc_name))
        .chain(replicas)
    {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ports[name]))
                .unwrap()
                .connect()
                .await
                .expect("service reachable");
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: grpc_name.into(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name}");
    }

    let credited = http
        .post(format!("{base}/v1/customers/zoe/points"))
        .bearer_auth(&admin_key)
        .header("Idempotency-Key", "shape-1")
        .json(&json!({"amount": 150, "reason": "welcome"}))
        .send()
        .await
        .unwrap();
    assert_eq!(credited.status(), 201);
    // A customer's wallet as the gateway shows it.
    let wallet_of = |customer: &str| {
        let request = http
            .get(format!("{base}/v1/customers/{customer}/wallet"))
            .bearer_auth(&admin_key);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let wallet = wallet_of("zoe").await;
    assert_eq!(wallet["balances"][0]["available"], 150);

    // The wallet process's outbox reaches the notification process.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        ports["notification"]
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut notification = NotificationServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut request = tonic::Request::new(npb::ListEventsRequest {
            r#type: "points.credited".into(),
            page: None,
        });
        // A lone service asks the gateway who the key is.
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {admin_key}").parse().unwrap(),
        );
        let events = notification
            .list_events(request)
            .await
            .unwrap()
            .into_inner()
            .events;
        if events.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the event never reached notification"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A caller that writes the context itself, without the suite's signature, is refused.
    let mut forged = tonic::Request::new(npb::ListEventsRequest {
        r#type: "points.credited".into(),
        page: None,
    });
    for (key, value) in [
        ("x-tessera-tenant", "default"),
        ("x-tessera-principal", "service:wallet"),
        ("x-tessera-role", "system"),
    ] {
        forged.metadata_mut().insert(key, value.parse().unwrap());
    }
    let refused = notification.list_events(forged).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let scrape = |port: u16| {
        let http = http.clone();
        async move {
            let answer = http.get(format!("http://127.0.0.1:{port}/metrics")).send();
            answer.await.unwrap().text().await.unwrap()
        }
    };
    let metrics = scrape(ports["metrics"]).await;
    assert!(
        metrics.contains(r#"method="Credit""#),
        "wallet metrics: {metrics}"
    );
    // The gateway's metrics are on their own port, not on its public one.
    let public = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404, "no /metrics on the public port");
    let gateway_metrics = scrape(ports["gateway-metrics"]).await;
    assert!(
        gateway_metrics.contains("# HELP tessera_http_requests_total"),
        "gateway metrics: {gateway_metrics}"
    );

    // A campaign through the gateway: both eligibility replicas apply it; killed, both
    // refuse it within a second.
    let post = |path: &str, key: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&admin_key)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let created = post(
        "/v1/campaigns",
        "shape-campaign",
        json!({"id": "shape", "name": "Shape", "type": "CAMPAIGN_TYPE_PROMOTION",
               "definition": {"effect": {"amount_off": {"amount": 100}}}}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let started = post("/v1/campaigns/shape/start", "shape-start", json!({}))
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    let bearer = format!("Bearer {admin_key}");
    let qualifies = |port: u16| {
        let bearer = bearer.clone();
        async move {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
            let mut request = tonic::Request::new(epb::QualifyRequest {
                customer_id: "zoe".into(),
                cart: Some(tessera_proto::catalog::v1::Cart {
                    currency: "USD".into(),
                    lines: vec![tessera_proto::catalog::v1::CartLine {
                        id: "l1".into(),
                        sku: "SKU".into(),
                        quantity: 1,
                        unit_price: 1000,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            });
            // A lone service asks the gateway who the key is.
            request
                .metadata_mut()
                .insert("authorization", bearer.parse().unwrap());
            EligibilityServiceClient::new(channel)
                .qualify(request)
                .await
                .unwrap()
                .into_inner()
                .qualified
                .iter()
                .any(|q| q.campaign_id == "shape")
        }
    };
    let eligibility_ports = [ports["eligibility"], ports["eligibility-2"]];
    for port in eligibility_ports {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !qualifies(port).await {
            assert!(
                Instant::now() < deadline,
                "replica on {port} never applied the campaign"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let killed = post(
        "/v1/campaigns/shape/kill",
        "shape-kill",
        json!({"reason": "kill switch drill"}),
    )
    .await
    .unwrap();
    assert_eq!(killed.status(), 200);
    let killed_at = Instant::now();
    for port in eligibility_ports {
        while qualifies(port).await {
            assert!(
                killed_at.elapsed() < Duration::from_secs(1),
                "replica on {port} still applies the killed campaign"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Notification killed with SIGKILL mid-delivery: once restarted, every event it
    // acknowledged reaches the webhook sink (in-flight attempts are sent again).
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sink = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Arc<Mutex<HashSet<String>>>>,
                 body: axum::body::Bytes| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let id = body["event_id"].as_str().unwrap_or_default().to_string();
                    seen.lock().unwrap().insert(id);
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(seen.clone());
    let sink_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_url = format!("http://{}/hook", sink_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(sink_listener, sink).await });
    let endpoint = post(
        "/v1/webhook-endpoints",
        "shape-endpoint",
        json!({"url": sink_url, "event_types": ["shape.load"], "max_concurrency": 4}),
    )
    .await
    .unwrap();
    assert_eq!(endpoint.status(), 201);
    let notification_channel = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        ports["notification"]
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut acknowledged = HashSet::new();
    for _ in 0..4 {
        let events: Vec<npb::Event> = (0..100)
            .map(|_| npb::Event {
                id: uuid::Uuid::now_v7().to_string(),
                tenant_id: "default".into(),
                r#type: "shape.load".into(),
                source: "tests".into(),
                occurred_at: Some(prost_types::Timestamp::default()),
                data: b"{}".to_vec(),
                traceparent: String::new(),
            })
            .collect();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        NotificationServiceClient::new(notification_channel.clone())
            .publish_events(
                tessera_runtime::RequestContext::system("default", "tests")
                    .request(npb::PublishEventsRequest { events }),
            )
            .await
            .expect("acknowledged");
        acknowledged.extend(ids);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().len() < 40 {
        assert!(Instant::now() < deadline, "deliveries never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, notification) = processes
        .0
        .iter_mut()
        .find(|(name, _)| name == "notification")
        .unwrap();
    notification.kill().unwrap();
    notification.wait().unwrap();
    let delivered_before_restart = seen.lock().unwrap().len();
    assert!(
        delivered_before_restart < acknowledged.len(),
        "killed mid-delivery"
    );
    *notification = tessera(&service_env("notification"), &["serve", "notification"])
        .spawn()
        .expect("restart notification");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = acknowledged.difference(&seen.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged events never delivered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The wallet killed with SIGKILL under load: requests in flight and those that follow
    // get 503 (retry), never 500; once it is back, retrying each failed request with its
    // idempotency key credits it exactly once (a request the wallet was running when it
    // died answers 409 until its in-flight lease ends).
    let (points_url, key_for_load) = (format!("{base}/v1/customers/kim/points"), admin_key.clone());
    let http_for_load = http.clone();
    let credit = move |key: String| {
        let (http, url, admin_key) = (
            http_for_load.clone(),
            points_url.clone(),
            key_for_load.clone(),
        );
        async move {
            http.post(url)
                .bearer_auth(admin_key)
                .header("Idempotency-Key", key)
                .json(&json!({"amount": 1, "reason": "load"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loaders = Vec::new();
    for client in 0..8 {
        let (credit, stop) = (credit.clone(), stop.clone());
        loaders.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("kill-{client}-{i}");
                answers.push((key.clone(), credit(key).await));
                i += 1;
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, wallet) = processes
        .0
        .iter_mut()
        .find(|(name, _)| name == "wallet")
        .unwrap();
    wallet.kill().unwrap();
    wallet.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for loader in loaders {
        answers.extend(loader.await.unwrap());
    }
    let mut by_status: std::collections::BTreeMap<u16, usize> = Default::default();
    for (_, status) in &answers {
        *by_status.entry(*status).or_default() += 1;
    }
    assert!(
        answers.iter().all(|(_, s)| matches!(s, 201 | 503)),
        "while the wallet was killed: {by_status:?}"
    );
    assert!(
        by_status.contains_key(&503),
        "the kill was seen: {by_status:?}"
    );
    eprintln!("wallet SIGKILL under load, answers by status: {by_status:?}");
    *wallet = tessera(&service_env("wallet"), &["serve", "wallet"])
        .spawn()
        .expect("restart wallet");
    let deadline = Instant::now() + Duration::from_secs(30);
    for (key, status) in &answers {
        if *status == 201 {
            continue;
        }
        loop {
            let status = credit(key.clone()).await;
            if status == 201 {
                break;
            }
            // 503 while the wallet starts; 409 while the killed request's lease holds.
            assert!(matches!(status, 409 | 503), "{key} retried: {status}");
            assert!(
                Instant::now() < deadline,
                "{key} never credited after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let wallet_view = wallet_of("kim").await;
    let balance = wallet_view["balances"][0]["available"].as_i64();
    assert_eq!(
        balance,
        Some(answers.len() as i64),
        "each request credited once: {wallet_view}"
    );

    // SIGTERM: every process drains and exits 0.
    for (_, child) in &processes.0 {
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (name, child) in &mut processes.0 {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{name} exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Clean up the schemas.
    let mut config = tessera_runtime::Config::default();
    config.database.url = env.get("TESSERA_DATABASE__URL").cloned();
    config.database.schema_prefix = prefix;
    for service in tessera::Service::ALL {
        let db = tessera_store::Db::connect(&config, service.name())
            .await
            .unwrap();
        db.drop_schema().await.unwrap();
    }
}
