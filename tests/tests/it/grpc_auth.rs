//! Every gRPC service authenticates its callers (`docs/security.md`): an API key in
//! `authorization` decides tenant and role; the suite's own calls are signed. For every
//! service: no credentials, forged `x-tessera-*` metadata, a bad signature and an unknown
//! or revoked key are UNAUTHENTICATED; a tenant key that claims another tenant or the
//! `system` role in metadata gets its own tenant and role; a method beyond the key's role is
//! PERMISSION_DENIED. Health and reflection answer without a key.

use serde_json::json;
use tessera_gateway::{ApiKeys, Role};
use tessera_proto::wallet::v1 as pb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_store::queue::commands::RawCodec;
use tessera_tests::{TENANT, TestSuite, backend_tests};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{MetadataKey, MetadataMap};

use crate::wallet::points;

backend_tests!(every_grpc_service_authenticates_its_callers);

/// One read method of every service (the request is empty: refusals come before it is read).
const READS: [&str; 7] = [
    "/tessera.catalog.v1.CatalogService/ListRewards",
    "/tessera.eligibility.v1.EligibilityService/GetSettings",
    "/tessera.wallet.v1.WalletService/GetBalance",
    "/tessera.scheduler.v1.SchedulerService/ListCampaigns",
    "/tessera.notification.v1.NotificationService/ListEvents",
    "/tessera.ops.v1.QueueService/ListDeadItems",
    "/tessera.ops.v1.ErasureService/GetErasure",
];

/// Calls `path` with an empty request and `metadata`; the status code of the answer.
async fn call(suite: &TestSuite, path: &str, metadata: &[(&str, &str)]) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(suite.channel());
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(bytes::Bytes::new());
    add(request.metadata_mut(), metadata);
    match grpc
        .unary(
            request,
            PathAndQuery::try_from(path).expect("path"),
            RawCodec,
        )
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

fn add(md: &mut MetadataMap, metadata: &[(&str, &str)]) {
    for (key, value) in metadata {
        let key = MetadataKey::from_bytes(key.as_bytes()).expect("metadata key");
        md.insert(key, value.parse().expect("metadata value"));
    }
}

/// `message` with the context forged to `default`/`system`, sent with API key `key`.
fn as_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    add(
        request.metadata_mut(),
        &[
            ("x-tessera-tenant", TENANT),
            ("x-tessera-role", "system"),
            ("authorization", key),
        ],
    );
    request
}

async fn every_grpc_service_authenticates_its_callers(suite: TestSuite) {
    let keys = ApiKeys::new(suite.db("gateway").await);
    let acme_analyst = "tsk_grpc_auth_acme_analyst_000000000001";
    let acme_touchpoint = "tsk_grpc_auth_acme_touchpoint_0000000001";
    let revoked = "tsk_grpc_auth_revoked_00000000000000001";
    keys.insert("acme", "reports", Role::Analyst, acme_analyst)
        .await
        .expect("key");
    keys.insert("acme", "shop", Role::Touchpoint, acme_touchpoint)
        .await
        .expect("key");
    let revoked_id = keys
        .insert("acme", "old", Role::Admin, revoked)
        .await
        .expect("key");
    assert!(keys.revoke("acme", &revoked_id).await.expect("revoke"));
    let bearer = |key: &str| format!("Bearer {key}");
    let admin = bearer(&suite.admin_key);
    let analyst = bearer(acme_analyst);
    let touchpoint = bearer(acme_touchpoint);
    let forged = [
        ("x-tessera-tenant", TENANT),
        ("x-tessera-principal", "service:wallet"),
        ("x-tessera-role", "system"),
    ];

    for path in READS {
        let refused = tonic::Code::Unauthenticated;
        assert_eq!(
            call(&suite, path, &[]).await,
            refused,
            "{path}: no credentials"
        );
        assert_eq!(call(&suite, path, &forged).await, refused, "{path}: forged");
        let mut bad_signature = forged.to_vec();
        bad_signature.push(("x-tessera-signature", "v1.1.AAAA"));
        assert_eq!(
            call(&suite, path, &bad_signature).await,
            refused,
            "{path}: bad signature"
        );
        for key in ["tsk_not_a_key_at_all_000000000000000001", revoked] {
            assert_eq!(
                call(&suite, path, &[("authorization", &bearer(key))]).await,
                refused,
                "{path}: unknown or revoked key"
            );
        }
        // The admin key of `default` gets through (the empty request may then be refused
        // as invalid, which is past authentication); an analyst of acme claiming `system`
        // reads too, as an analyst (the queues and erasures are for admins only).
        let passed = |code| {
            !matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            )
        };
        let code = call(&suite, path, &[("authorization", &admin)]).await;
        assert!(passed(code), "{path}: admin key: {code:?}");
        let mut claims = forged.to_vec();
        claims.push(("authorization", &analyst));
        let code = call(&suite, path, &claims).await;
        if path.contains("QueueService") || path.contains("ErasureService") {
            assert_eq!(code, tonic::Code::PermissionDenied, "{path}: analyst");
        } else {
            assert!(
                passed(code),
                "{path}: analyst key claiming system: {code:?}"
            );
        }
    }

    // A touchpoint key of acme that claims `default` and `system` acts as acme's touchpoint:
    // the points it credits land in acme, and plumbing methods are closed to it.
    let response = suite
        .post(
            "/v1/customers/ada/points",
            Some("grpc-auth-1"),
            &json!({"amount": 70}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let mut wallet = WalletServiceClient::new(suite.channel());
    let credit = pb::CreditRequest {
        idempotency_key: "grpc-auth-credit".into(),
        customer_id: "ada".into(),
        asset: points(),
        amount: 5,
        reason: "grpc".into(),
        ..Default::default()
    };
    wallet
        .credit(as_key(&touchpoint, credit.clone()))
        .await
        .expect("a touchpoint credits");
    let balance = |key: &str| {
        as_key(
            key,
            pb::GetBalanceRequest {
                customer_id: "ada".into(),
            },
        )
    };
    let available =
        |r: pb::GetBalanceResponse| -> i64 { r.balances.iter().map(|b| b.available).sum() };
    let acme = wallet.get_balance(balance(&analyst)).await.expect("read");
    assert_eq!(available(acme.into_inner()), 5, "acme sees only its credit");
    let default = wallet.get_balance(balance(&admin)).await.expect("read");
    assert_eq!(available(default.into_inner()), 70, "default is untouched");

    let batch = wallet
        .batch_credit(as_key(
            &touchpoint,
            pb::BatchCreditRequest {
                idempotency_key: "grpc-auth-batch".into(),
                entries: vec![],
            },
        ))
        .await
        .expect_err("plumbing is closed to keys");
    assert_eq!(batch.code(), tonic::Code::PermissionDenied, "{batch:?}");
    let analyst_credit = wallet
        .credit(as_key(&analyst, credit))
        .await
        .expect_err("an analyst only reads");
    assert_eq!(analyst_credit.code(), tonic::Code::PermissionDenied);

    // Probes and reflection need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(suite.channel());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a key");
    suite.cleanup().await;
}
