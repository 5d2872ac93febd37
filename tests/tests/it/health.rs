//! Health and reflection: every gRPC service reports SERVING on the standard health
//! service and is listed by reflection; on shutdown health flips to NOT_SERVING before the
//! listener closes; the HTTP probes answer. Services refuse calls without a tenant. With
//! the database cut (PostgreSQL through a proxy), readiness says so within a second or two,
//! naming the database, and recovers when it is back.

use std::time::Duration;

use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_tests::{Backend, Proxy, TestSuite, backend_tests, eventually, test_config};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

backend_tests!(
    every_service_is_serving_and_flips_on_shutdown,
    a_shutdown_under_load_refuses_no_connection_while_it_drains
);

const SERVICES: [&str; 5] = [
    "tessera.catalog.v1.CatalogService",
    "tessera.eligibility.v1.EligibilityService",
    "tessera.wallet.v1.WalletService",
    "tessera.scheduler.v1.SchedulerService",
    "tessera.notification.v1.NotificationService",
];

async fn status(suite: &TestSuite, service: &str) -> ServingStatus {
    HealthClient::new(suite.channel())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

async fn every_service_is_serving_and_flips_on_shutdown(mut suite: TestSuite) {
    for service in SERVICES.iter().copied().chain([""]) {
        assert_eq!(
            status(&suite, service).await,
            ServingStatus::Serving,
            "{service}"
        );
    }

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(suite.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("list services response expected")
    };
    let listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES {
        assert!(
            listed.iter().any(|l| l == service),
            "{service} in {listed:?}"
        );
    }

    let unauthenticated = WalletServiceClient::new(suite.channel())
        .get_balance(pb::GetBalanceRequest {
            customer_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    for (path, expected) in [("/healthz", 200), ("/readyz", 200)] {
        let response = suite
            .http
            .get(format!("{}{path}", suite.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{path}");
    }

    // Restart with a drain period, trigger shutdown, and watch health flip before the
    // listener goes away.
    suite.stop().await;
    let mut config = suite.config.clone();
    config.shutdown_drain_secs = 2;
    let mut draining = TestSuite::start_with(suite.backend, config, false).await;
    assert_eq!(status(&draining, SERVICES[2]).await, ServingStatus::Serving);
    draining.shutdown_token().cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for service in SERVICES.iter().copied().chain([""]) {
        assert_eq!(
            status(&draining, service).await,
            ServingStatus::NotServing,
            "{service}"
        );
    }
    // The gateway too: its port still answers during the drain, and readiness says 503.
    let ready = draining
        .http
        .get(format!("{}/readyz", draining.base_url))
        .send()
        .await
        .expect("the gateway still answers while it drains");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("JSON");
    assert_eq!(body["checks"]["shutdown"], "draining");
    draining.take_suite().unwrap().wait().await.unwrap();
    suite.cleanup().await;
}

/// `/readyz` once: its status, its body and how long it took.
async fn readyz(suite: &TestSuite) -> (u16, serde_json::Value, Duration) {
    let started = std::time::Instant::now();
    let response = suite
        .http
        .get(format!("{}/readyz", suite.base_url))
        .send()
        .await
        .expect("readiness answers");
    let status = response.status().as_u16();
    let body = response.json().await.expect("JSON");
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_cut_makes_every_service_unready_and_says_so() {
    let Some(mut config) = test_config(Backend::Production) else {
        return;
    };
    let url = config.database.url.clone().expect("database url");
    let rest = url.split_once("://").expect("scheme").1;
    let after_at = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let target = after_at
        .split(['/', '?'])
        .next()
        .expect("host:port")
        .to_string();
    let proxy = Proxy::start(target.clone()).await;
    config.database.url = Some(url.replace(&target, &format!("127.0.0.1:{}", proxy.port)));
    let suite = TestSuite::start_with(Backend::Production, config, false).await;
    let (code, body, _) = readyz(&suite).await;
    assert_eq!(code, 200, "{body}");
    for check in [
        "database",
        "wallet",
        "catalog",
        "eligibility",
        "notification",
        "campaign-scheduler",
    ] {
        assert_eq!(body["checks"][check], "ok", "{check}: {body}");
    }

    proxy.cut().await;
    let (code, body, took) = eventually(Duration::from_secs(10), "readiness turns 503", || async {
        let answer = readyz(&suite).await;
        (answer.0 == 503 && answer.1["checks"]["database"] != "ok").then_some(answer)
    })
    .await;
    assert_eq!(code, 503);
    assert_eq!(body["status"], "not_ready");
    let database = body["checks"]["database"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!database.is_empty() && database != "ok", "{body}");
    // Asked while down, it still answers at once (each dependency gets under a second).
    assert!(took < Duration::from_secs(5), "readiness took {took:?}");
    eprintln!("readiness with the database cut, in {took:?}: {body}");
    // The gRPC services' own readiness names the database too.
    eventually(Duration::from_secs(10), "wallet NOT_SERVING", || async {
        (status(&suite, SERVICES[2]).await == ServingStatus::NotServing).then_some(())
    })
    .await;
    let (_, body, _) = readyz(&suite).await;
    assert!(
        body["checks"]["wallet"]
            .as_str()
            .is_some_and(|w| w.contains("NOT_SERVING")),
        "{body}"
    );

    proxy.restore().await;
    eventually(Duration::from_secs(20), "ready again", || async {
        let (code, _, _) = readyz(&suite).await;
        (code == 200).then_some(())
    })
    .await;
    assert_eq!(status(&suite, SERVICES[2]).await, ServingStatus::Serving);
    suite.cleanup().await;
}

/// SIGTERM under load (the shutdown token is what the signal cancels): clients hammering
/// the gateway see no refused connection and no failed request until the drain period
/// ends; readiness turns 503 at once.
async fn a_shutdown_under_load_refuses_no_connection_while_it_drains(mut suite: TestSuite) {
    suite.stop().await;
    let mut config = suite.config.clone();
    config.shutdown_drain_secs = 3;
    let mut draining = TestSuite::start_with(suite.backend, config, false).await;
    let (base, http) = (draining.base_url.clone(), draining.http.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cancelled_at = std::sync::Arc::new(std::sync::OnceLock::<std::time::Instant>::new());
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (base, http, stop, cancelled_at) = (
            base.clone(),
            http.clone(),
            stop.clone(),
            cancelled_at.clone(),
        );
        clients.push(tokio::spawn(async move {
            // (time since the shutdown began, when it had; what the request got)
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = http.get(format!("{base}/healthz")).send().await;
                let ok = answer.as_ref().is_ok_and(|r| r.status() == 200);
                let at = cancelled_at.get().map(std::time::Instant::elapsed);
                seen.push((at, ok, answer.err().map(|e| e.to_string())));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancelled_at.set(std::time::Instant::now()).unwrap();
    draining.shutdown_token().cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, _, _) = readyz(&draining).await;
    assert_eq!(code, 503, "readiness turns at once");
    // Keep hammering through most of the drain, then stop the clients.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = 0;
    for client in clients {
        for (at, ok, error) in client.await.unwrap() {
            if at.is_some_and(|at| at < Duration::from_millis(2_500)) {
                during += 1;
                assert!(ok, "a request {at:?} into the drain failed: {error:?}");
            }
        }
    }
    assert!(during > 50, "only {during} requests during the drain");
    eprintln!("{during} requests served during the drain, none refused");
    draining.take_suite().unwrap().wait().await.unwrap();
    suite.cleanup().await;
}
