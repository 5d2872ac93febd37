//! An eligibility process killed (SIGKILL) after it committed a redemption of a catalog code
//! but before the catalog heard of it: the follow-up (`RecordCodeUses`, written in the
//! redemption's transaction to the command outbox) is delivered once the process is back,
//! exactly once. The catalog is unreachable from the first eligibility process, so the kill
//! always falls between the commit and the follow-up. On SQLite and, when configured,
//! PostgreSQL; catalog and eligibility run as their own `tessera serve` processes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tonic::transport::Channel;

mod common;

use common::{channel, free_port, serve};

fn request<T>(message: T) -> tonic::Request<T> {
    common::request("admin", message)
}

fn checkout(code: &str) -> pb::Checkout {
    pb::Checkout {
        customer_id: "kim".into(),
        order_id: "kill-order-1".into(),
        codes: vec![code.into()],
        cart: Some(cpb::Cart {
            currency: "USD".into(),
            lines: vec![cpb::CartLine {
                id: "l1".into(),
                sku: "TEE".into(),
                quantity: 1,
                unit_price: 2000,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn code_state(catalog: &mut CatalogServiceClient<Channel>, code: &str) -> cpb::Code {
    catalog
        .get_code(request(cpb::GetCodeRequest { code: code.into() }))
        .await
        .expect("code")
        .into_inner()
        .code
        .expect("code")
}

async fn run(backend: &str, mut env: HashMap<String, String>) {
    let (catalog_port, eligibility_port) = (free_port(), free_port());
    env.insert("TESSERA_TELEMETRY__LOG_FILTER".into(), "off".into());
    // Events stay in the outboxes: notification is not running.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    env.insert("TESSERA_PEERS__NOTIFICATION_URL".into(), nowhere.clone());
    env.insert(
        "TESSERA_PEERS__ELIGIBILITY_URL".into(),
        format!("http://127.0.0.1:{eligibility_port}"),
    );
    let mut catalog_env = env.clone();
    catalog_env.insert(
        "TESSERA_GRPC_ADDR".into(),
        format!("127.0.0.1:{catalog_port}"),
    );
    let mut eligibility_env = env.clone();
    eligibility_env.insert(
        "TESSERA_GRPC_ADDR".into(),
        format!("127.0.0.1:{eligibility_port}"),
    );
    // The first eligibility process cannot reach the catalog.
    let mut cut_off = eligibility_env.clone();
    cut_off.insert("TESSERA_PEERS__CATALOG_URL".into(), nowhere);
    eligibility_env.insert(
        "TESSERA_PEERS__CATALOG_URL".into(),
        format!("http://127.0.0.1:{catalog_port}"),
    );
    let _catalog_process = serve("catalog", &catalog_env);
    let mut eligibility_process = serve("eligibility", &cut_off);
    let mut catalog = CatalogServiceClient::new(channel(catalog_port).await);
    let mut eligibility = EligibilityServiceClient::new(channel(eligibility_port).await);

    let reward = catalog
        .create_reward(request(cpb::CreateRewardRequest {
            idempotency_key: "kill-reward".into(),
            reward: Some(cpb::RewardInput {
                name: "kill".into(),
                currency: "USD".into(),
                effect: Some(cpb::Effect {
                    kind: Some(cpb::effect::Kind::AmountOff(cpb::AmountOff {
                        amount: 500,
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
        }))
        .await
        .expect("reward")
        .into_inner()
        .reward
        .expect("reward");
    let pool = catalog
        .create_code_pool(request(cpb::CreateCodePoolRequest {
            idempotency_key: "kill-pool".into(),
            pool: Some(cpb::CodePoolInput {
                reward_id: reward.id,
                name: "kill".into(),
                pattern: Some(cpb::CodePattern {
                    pattern: "K-######".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }))
        .await
        .expect("pool")
        .into_inner()
        .pool
        .expect("pool");
    let header = cpb::ImportHeader {
        pool_id: pool.id.clone(),
        idempotency_key: "kill-import".into(),
        allow_partial: false,
    };
    let parts = vec![
        cpb::ImportCodesRequest {
            part: Some(cpb::import_codes_request::Part::Header(header)),
        },
        cpb::ImportCodesRequest {
            part: Some(cpb::import_codes_request::Part::Chunk(
                b"code\nKILL-1\n".to_vec(),
            )),
        },
    ];
    catalog
        .import_codes(request(futures::stream::iter(parts)))
        .await
        .expect("import");
    eligibility
        .put_campaign(request(pb::PutCampaignRequest {
            idempotency_key: "kill-campaign".into(),
            campaign: Some(pb::Campaign {
                id: "kill".into(),
                name: "kill".into(),
                status: pb::CampaignStatus::Active.into(),
                effect: Some(cpb::Effect {
                    kind: Some(cpb::effect::Kind::AmountOff(cpb::AmountOff {
                        amount: 500,
                        ..Default::default()
                    })),
                }),
                pool_ids: vec![pool.id.clone()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("campaign");
    // The code reaches eligibility (catalog → eligibility works).
    let deadline = Instant::now() + Duration::from_secs(20);
    while eligibility
        .validate(request(pb::ValidateRequest {
            checkout: Some(checkout("KILL-1")),
        }))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{backend}: code never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let redeemed = eligibility
        .redeem(request(pb::RedeemRequest {
            idempotency_key: "kill-redeem".into(),
            checkout: Some(checkout("KILL-1")),
        }))
        .await
        .expect("redeem")
        .into_inner()
        .redemption
        .expect("redemption");
    // Committed, and the catalog has not heard of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(code_state(&mut catalog, "KILL-1").await.redemptions, 0);
    eligibility_process.kill();

    let _eligibility_again = serve("eligibility", &eligibility_env);
    let mut eligibility = EligibilityServiceClient::new(channel(eligibility_port).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let code = code_state(&mut catalog, "KILL-1").await;
        if code.redemptions > 0 {
            assert_eq!(code.redemption_id, redeemed.id);
            assert_eq!(code.status(), cpb::CodeStatus::Redeemed);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: the use never reached the catalog"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly once, and the redemption replays to the same answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(code_state(&mut catalog, "KILL-1").await.redemptions, 1);
    let replay = eligibility
        .redeem(request(pb::RedeemRequest {
            idempotency_key: "kill-redeem".into(),
            checkout: Some(checkout("KILL-1")),
        }))
        .await
        .expect("replay")
        .into_inner()
        .redemption
        .expect("redemption");
    assert_eq!(replay.id, redeemed.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_survives_a_kill_between_commit_and_delivery() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("tessera-follow-{id}"));
    run(
        "sqlite",
        HashMap::from([("TESSERA_DATA_DIR".to_string(), dir.display().to_string())]),
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);

    let Ok(database) = std::env::var("TESSERA_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("TESSERA_REQUIRE_BACKENDS").as_deref() != Ok("1"),
            "TESSERA_REQUIRE_BACKENDS=1 but TESSERA_TEST_DATABASE_URL is not set"
        );
        return;
    };
    let prefix = format!("f{}_", &id[..12]);
    run(
        "postgres",
        HashMap::from([
            ("TESSERA_DATABASE__URL".to_string(), database),
            ("TESSERA_DATABASE__SCHEMA_PREFIX".to_string(), prefix),
        ]),
    )
    .await;
}
