//! The catalog: rewards with their kill switch and versions, bad definitions refused with the
//! field named and nothing written, previews through the cart-effect engine, code generation
//! jobs with progress, CSV import (all or nothing, or partial) and export, publication to
//! customers (concurrent publishers get distinct codes), and tenant isolation throughout.

use std::collections::HashSet;
use std::time::Duration;

use tessera_proto::catalog::v1 as pb;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

use crate::{data, events};

backend_tests!(
    rewards_have_versions_a_kill_switch_and_tenants,
    bad_rewards_name_the_field_and_write_nothing,
    previews_apply_stored_and_inline_effects,
    codes_are_generated_by_a_job_with_progress,
    csv_import_is_all_or_nothing_and_export_round_trips,
    publication_assigns_distinct_codes_under_concurrency,
    gift_card_codes_load_their_wallet_account,
);

type Client = CatalogServiceClient<Channel>;

pub(crate) fn percent_off(bp: u32) -> Option<pb::Effect> {
    Some(pb::Effect {
        kind: Some(Kind::PercentOff(pb::PercentOff {
            percent_bp: bp,
            ..Default::default()
        })),
    })
}

pub(crate) fn reward_input(name: &str, effect: Option<pb::Effect>) -> pb::RewardInput {
    pb::RewardInput {
        name: name.into(),
        effect,
        currency: "EUR".into(),
        ..Default::default()
    }
}

pub(crate) async fn create_reward(
    catalog: &mut Client,
    suite: &TestSuite,
    key: &str,
    input: pb::RewardInput,
) -> pb::Reward {
    catalog
        .create_reward(suite.ctx(TENANT).request(pb::CreateRewardRequest {
            idempotency_key: key.into(),
            reward: Some(input),
        }))
        .await
        .expect("create reward")
        .into_inner()
        .reward
        .expect("reward")
}

async fn create_pool(
    catalog: &mut Client,
    suite: &TestSuite,
    key: &str,
    reward_id: &str,
    pattern: pb::CodePattern,
) -> pb::CodePool {
    catalog
        .create_code_pool(suite.ctx(TENANT).request(pb::CreateCodePoolRequest {
            idempotency_key: key.into(),
            pool: Some(pb::CodePoolInput {
                reward_id: reward_id.into(),
                name: "pool".into(),
                pattern: Some(pattern),
                ..Default::default()
            }),
        }))
        .await
        .expect("create pool")
        .into_inner()
        .pool
        .expect("pool")
}

fn violations(status: &tonic::Status) -> Vec<String> {
    tessera_runtime::Error::from_status(status)
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

fn cart(lines: &[(&str, &str, i64, i64)]) -> pb::Cart {
    pb::Cart {
        currency: "EUR".into(),
        lines: lines
            .iter()
            .map(|(id, category, quantity, unit_price)| pb::CartLine {
                id: (*id).into(),
                sku: format!("SKU-{id}"),
                categories: vec![(*category).into()],
                quantity: *quantity,
                unit_price: *unit_price,
                ..Default::default()
            })
            .collect(),
        shipping: 500,
        points_balance: 0,
    }
}

async fn rewards_have_versions_a_kill_switch_and_tenants(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let reward = create_reward(
        &mut catalog,
        &suite,
        "r1",
        reward_input("Ten off", percent_off(1000)),
    )
    .await;
    assert_eq!(reward.version, 1);
    assert_eq!(reward.status(), pb::RewardStatus::Active);
    // A replay returns the same reward, not a second one.
    let again = create_reward(
        &mut catalog,
        &suite,
        "r1",
        reward_input("Ten off", percent_off(1000)),
    )
    .await;
    assert_eq!(again.id, reward.id);

    let update = |version, name: &str| pb::UpdateRewardRequest {
        idempotency_key: format!("u-{version}"),
        id: reward.id.clone(),
        reward: Some(reward_input(name, percent_off(1500))),
        expected_version: version,
    };
    let stale = catalog
        .update_reward(suite.ctx(TENANT).request(update(7, "stale")))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted);
    let updated = catalog
        .update_reward(suite.ctx(TENANT).request(update(1, "Fifteen off")))
        .await
        .unwrap()
        .into_inner()
        .reward
        .unwrap();
    assert_eq!(
        (updated.version, updated.definition.unwrap().name.as_str()),
        (2, "Fifteen off")
    );

    let second = create_reward(
        &mut catalog,
        &suite,
        "r2",
        reward_input(
            "Ship free",
            Some(pb::Effect {
                kind: Some(Kind::FreeShipping(pb::FreeShipping {
                    threshold: 5000,
                    after_discounts: false,
                })),
            }),
        ),
    )
    .await;
    // The kill switch.
    let disabled = catalog
        .set_reward_status(suite.ctx(TENANT).request(pb::SetRewardStatusRequest {
            idempotency_key: "off".into(),
            id: reward.id.clone(),
            status: pb::RewardStatus::Disabled as i32,
            reason: "leaked on a forum".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .reward
        .unwrap();
    assert_eq!(disabled.status(), pb::RewardStatus::Disabled);

    let list = |status: pb::RewardStatus, kind: &str, after: &str| pb::ListRewardsRequest {
        page: Some(tessera_proto::common::v1::PageRequest {
            limit: 1,
            starting_after: after.into(),
        }),
        status: status as i32,
        effect_kind: kind.into(),
    };
    let page = catalog
        .list_rewards(
            suite
                .ctx(TENANT)
                .request(list(pb::RewardStatus::Unspecified, "", "")),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.rewards[0].id, second.id, "newest first");
    let next = page.page.unwrap();
    assert!(next.has_more);
    let rest = catalog
        .list_rewards(suite.ctx(TENANT).request(list(
            pb::RewardStatus::Unspecified,
            "",
            &next.next_cursor,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.rewards[0].id, reward.id);
    assert!(!rest.page.unwrap().has_more);
    let active = catalog
        .list_rewards(
            suite
                .ctx(TENANT)
                .request(list(pb::RewardStatus::Active, "", "")),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        active
            .rewards
            .iter()
            .map(|r| r.id.as_str())
            .collect::<Vec<_>>(),
        [second.id.as_str()]
    );
    let by_kind = catalog
        .list_rewards(suite.ctx(TENANT).request(list(
            pb::RewardStatus::Unspecified,
            "percent_off",
            "",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_kind.rewards[0].id, reward.id);

    // Another tenant sees nothing of it.
    let hidden = catalog
        .get_reward(suite.ctx("other").request(pb::GetRewardRequest {
            id: reward.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), tonic::Code::NotFound);

    let changes = eventually(Duration::from_secs(10), "reward events", || async {
        let e = events(&suite, TENANT, "reward.status_changed").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    let event = data(&changes[0]);
    assert_eq!(event["reward_id"], reward.id.as_str());
    assert_eq!(event["status"], "disabled");
    assert_eq!(event["reason"], "leaked on a forum");
    assert_eq!(events(&suite, TENANT, "reward.created").await.len(), 2);
}

async fn bad_rewards_name_the_field_and_write_nothing(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let refuse = |input: pb::RewardInput| {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        async move {
            let status = catalog
                .create_reward(ctx.request(pb::CreateRewardRequest {
                    idempotency_key: uuid::Uuid::new_v4().to_string(),
                    reward: Some(input),
                }))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            violations(&status)
        }
    };
    assert_eq!(
        refuse(reward_input("Too much", percent_off(10_001))).await,
        ["reward.effect.percent_off.percent_bp"]
    );
    let negative = Some(pb::Effect {
        kind: Some(Kind::AmountOff(pb::AmountOff {
            amount: -5,
            ..Default::default()
        })),
    });
    assert_eq!(
        refuse(reward_input("Negative", negative)).await,
        ["reward.effect.amount_off.amount"]
    );
    assert_eq!(
        refuse(reward_input("Nothing", None)).await,
        ["reward.effect"]
    );
    let mut bad = reward_input("", percent_off(500));
    bad.currency = "eur".into();
    assert_eq!(refuse(bad).await, ["reward.name", "reward.currency"]);
    let nested = Some(pb::Effect {
        kind: Some(Kind::PointsExchange(Box::new(pb::PointsExchange {
            cost_points: 100,
            reward: Some(Box::new(pb::Effect {
                kind: Some(Kind::BuyXGetY(pb::BuyXGetY {
                    buy_quantity: 0,
                    get_quantity: 1,
                    percent_bp: 10_000,
                    ..Default::default()
                })),
            })),
        }))),
    });
    assert_eq!(
        refuse(reward_input("Nested", nested)).await,
        ["reward.effect.points_exchange.reward.buy_x_get_y.buy_quantity"]
    );
    let extension = Some(pb::Effect {
        kind: Some(Kind::Extension(pb::Extension {
            kind: "double_stamp".into(),
            params_json: "[1]".into(),
        })),
    });
    assert_eq!(
        refuse(reward_input("Ext", extension)).await,
        ["reward.effect.extension.params_json"]
    );

    let listed = catalog
        .list_rewards(suite.ctx(TENANT).request(pb::ListRewardsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.rewards.is_empty(), "nothing was written");
    // A well-formed extension kind is stored and returned as given.
    let ok = Some(pb::Effect {
        kind: Some(Kind::Extension(pb::Extension {
            kind: "double_stamp".into(),
            params_json: r#"{"stamps":2}"#.into(),
        })),
    });
    let stored = create_reward(&mut catalog, &suite, "ext", reward_input("Ext", ok.clone())).await;
    assert_eq!(stored.definition.unwrap().effect, ok);
}

async fn previews_apply_stored_and_inline_effects(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let ten = create_reward(
        &mut catalog,
        &suite,
        "ten",
        reward_input("Ten off", percent_off(1000)),
    )
    .await;
    let mut shipping = reward_input(
        "Free shipping",
        Some(pb::Effect {
            kind: Some(Kind::FreeShipping(pb::FreeShipping {
                threshold: 5000,
                after_discounts: true,
            })),
        }),
    );
    shipping.priority = 5;
    let ship = create_reward(&mut catalog, &suite, "ship", shipping).await;
    let mut dollars = reward_input("USD", percent_off(500));
    dollars.currency = "USD".into();
    let usd = create_reward(&mut catalog, &suite, "usd", dollars).await;

    let preview = |reward_ids: Vec<String>, effects: Vec<pb::InlineEffect>| {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        async move {
            catalog
                .preview_effects(ctx.request(pb::PreviewEffectsRequest {
                    reward_ids,
                    effects,
                    cart: Some(cart(&[("a", "shoes", 1, 4000), ("b", "socks", 3, 700)])),
                }))
                .await
                .unwrap()
                .into_inner()
                .outcome
                .unwrap()
        }
    };
    let bogo = pb::InlineEffect {
        label: "socks-3for2".into(),
        priority: 10,
        effect: Some(pb::Effect {
            kind: Some(Kind::BuyXGetY(pb::BuyXGetY {
                buy: Some(pb::Selector {
                    categories: vec!["socks".into()],
                    ..Default::default()
                }),
                buy_quantity: 2,
                get: Some(pb::Selector {
                    categories: vec!["socks".into()],
                    ..Default::default()
                }),
                get_quantity: 1,
                percent_bp: 10_000,
                ..Default::default()
            })),
        }),
    };
    let o = preview(
        vec![ten.id.clone(), ship.id.clone(), usd.id.clone()],
        vec![bogo],
    )
    .await;
    // Socks 3 for 2 first (700 off), then 10% of 4000 + 1400 = 540; 6100 - 1240 = 4860 < 5000:
    // shipping is paid. The USD reward does not apply to a EUR cart.
    assert_eq!(o.subtotal, 6100);
    assert_eq!(o.discount, 700 + 540);
    assert_eq!(o.shipping_discount, 0);
    assert_eq!(o.total_due, 6100 - 1240 + 500);
    assert_eq!(o.adjustments[0].reward_id, "socks-3for2");
    let reasons: Vec<&str> = o.skipped.iter().map(|s| s.reward_id.as_str()).collect();
    assert!(
        reasons.contains(&usd.id.as_str()) && reasons.contains(&ship.id.as_str()),
        "{o:?}"
    );

    // Switched off: skipped on the very next request.
    let mut admin = CatalogServiceClient::new(suite.channel());
    admin
        .set_reward_status(suite.ctx(TENANT).request(pb::SetRewardStatusRequest {
            idempotency_key: "kill".into(),
            id: ten.id.clone(),
            status: pb::RewardStatus::Disabled as i32,
            reason: String::new(),
        }))
        .await
        .unwrap();
    let o = preview(vec![ten.id.clone()], vec![]).await;
    assert_eq!(o.discount, 0);
    assert!(o.skipped[0].reason.contains("disabled"), "{o:?}");

    let unknown = catalog
        .preview_effects(suite.ctx("other").request(pb::PreviewEffectsRequest {
            reward_ids: vec![ship.id.clone()],
            effects: vec![],
            cart: Some(cart(&[("a", "x", 1, 100)])),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let bad_cart = catalog
        .preview_effects(suite.ctx(TENANT).request(pb::PreviewEffectsRequest {
            reward_ids: vec![ship.id.clone()],
            effects: vec![],
            cart: Some(cart(&[("a", "x", 0, 100)])),
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&bad_cart), ["cart.lines.0.quantity"]);
}

async fn wait_for_job(catalog: &mut Client, suite: &TestSuite, id: &str) -> pb::GenerationJob {
    eventually(Duration::from_secs(60), "generation job", || {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        let id = id.to_string();
        async move {
            let job = catalog
                .get_generation_job(ctx.request(pb::GetGenerationJobRequest { id }))
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap();
            (job.status() != pb::JobStatus::Running).then_some(job)
        }
    })
    .await
}

async fn codes_are_generated_by_a_job_with_progress(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let reward = create_reward(
        &mut catalog,
        &suite,
        "r",
        reward_input("Xmas", percent_off(2000)),
    )
    .await;
    let pool = create_pool(
        &mut catalog,
        &suite,
        "p",
        &reward.id,
        pb::CodePattern {
            pattern: "XMAS-####-?".into(),
            ..Default::default()
        },
    )
    .await;
    let generate = |key: &str, count: i64| pb::GenerateCodesRequest {
        idempotency_key: key.into(),
        pool_id: pool.id.clone(),
        count,
    };
    // 8^4 × 23 = 94,208 codes: more than half of them cannot be drawn reliably.
    let too_many = catalog
        .generate_codes(suite.ctx(TENANT).request(generate("g0", 50_000)))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(violations(&too_many), ["count"]);
    let started = catalog
        .generate_codes(suite.ctx(TENANT).request(generate("g1", 25_000)))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let job = wait_for_job(&mut catalog, &suite, &started.id).await;
    assert_eq!(job.status(), pb::JobStatus::Succeeded, "{job:?}");
    assert_eq!((job.requested, job.generated), (25_000, 25_000));
    let pool_now = catalog
        .get_code_pool(suite.ctx(TENANT).request(pb::GetCodePoolRequest {
            id: pool.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!(pool_now.code_count, 25_000);
    // A replay of the request returns the same job and generates nothing more.
    let replay = catalog
        .generate_codes(suite.ctx(TENANT).request(generate("g1", 25_000)))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(replay.id, started.id);

    let mut stream = catalog
        .export_codes(suite.ctx(TENANT).request(pb::ExportCodesRequest {
            pool_id: pool.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        csv.extend(chunk.chunk);
        chunks += 1;
    }
    assert!(chunks >= 5, "streamed in chunks, got {chunks}");
    let text = String::from_utf8(csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            "code,status,redemptions,max_uses,customer_id,starts_at,ends_at,redeemed_by,order_id,redeemed_at"
        )
    );
    let codes: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(codes.len(), 25_000);
    assert_eq!(
        codes.iter().collect::<HashSet<_>>().len(),
        25_000,
        "codes are unique"
    );
    let re_ok = |c: &&str| {
        let b = c.as_bytes();
        c.len() == 11
            && c.starts_with("XMAS-")
            && b[5..9].iter().all(|d| (b'2'..=b'9').contains(d))
            && b[9] == b'-'
            && b[10..]
                .iter()
                .all(|l| l.is_ascii_uppercase() && !b"IOL".contains(l))
    };
    assert!(codes.iter().all(re_ok), "codes follow the pattern");
    let done = eventually(Duration::from_secs(10), "code_pool.generated", || async {
        let e = events(&suite, TENANT, "code_pool.generated").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(data(&done[0])["generated"], 25_000);
}

async fn import(
    catalog: &mut Client,
    suite: &TestSuite,
    key: &str,
    pool_id: &str,
    csv: &str,
    allow_partial: bool,
) -> Result<pb::ImportCodesResponse, tonic::Status> {
    let header = pb::ImportCodesRequest {
        part: Some(pb::import_codes_request::Part::Header(pb::ImportHeader {
            idempotency_key: key.into(),
            pool_id: pool_id.into(),
            allow_partial,
        })),
    };
    // Chunks split rows anywhere.
    let chunks = csv.as_bytes().chunks(7).map(|c| pb::ImportCodesRequest {
        part: Some(pb::import_codes_request::Part::Chunk(c.to_vec())),
    });
    let messages: Vec<_> = std::iter::once(header).chain(chunks).collect();
    catalog
        .import_codes(suite.ctx(TENANT).request(futures::stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

async fn csv_import_is_all_or_nothing_and_export_round_trips(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let reward = create_reward(
        &mut catalog,
        &suite,
        "r",
        reward_input("Imported", percent_off(500)),
    )
    .await;
    let pattern = pb::CodePattern {
        length: 8,
        ..Default::default()
    };
    let pool = create_pool(&mut catalog, &suite, "p", &reward.id, pattern.clone()).await;
    let other = create_pool(&mut catalog, &suite, "p2", &reward.id, pattern).await;
    // A pool keeps its reward; its name, pattern and uses can change.
    let mut definition = other.definition.clone().unwrap();
    definition.max_uses = 2;
    let updated = catalog
        .update_code_pool(suite.ctx(TENANT).request(pb::UpdateCodePoolRequest {
            idempotency_key: "up-1".into(),
            id: other.id.clone(),
            pool: Some(definition.clone()),
        }))
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!(updated.definition.unwrap().max_uses, 2);
    definition.reward_id = uuid::Uuid::now_v7().to_string();
    let moved = catalog
        .update_code_pool(suite.ctx(TENANT).request(pb::UpdateCodePoolRequest {
            idempotency_key: "up-2".into(),
            id: other.id.clone(),
            pool: Some(definition),
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&moved), ["pool.reward_id"]);
    import(
        &mut catalog,
        &suite,
        "seed",
        &other.id,
        "code\nTAKEN-1\n",
        false,
    )
    .await
    .unwrap();

    let csv = "code,max_uses,ends_at\n\
               summer-1,3,2030-01-01T00:00:00Z\n\
               BAD CODE,1,\n\
               SUMMER-2,,\n\
               summer-1,1,\n\
               SUMMER-3,0,not-a-time\n\
               taken-1,,\n";
    let refused = import(&mut catalog, &suite, "i1", &pool.id, csv, false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violations(&refused),
        [
            "rows.2.code",
            "rows.4.code",
            "rows.5.max_uses",
            "rows.5.ends_at",
            "rows.6.code"
        ]
    );
    let pool_now = |catalog: &mut Client| {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        let id = pool.id.clone();
        async move {
            catalog
                .get_code_pool(ctx.request(pb::GetCodePoolRequest { id }))
                .await
                .unwrap()
                .into_inner()
                .pool
                .unwrap()
                .code_count
        }
    };
    assert_eq!(pool_now(&mut catalog).await, 0, "nothing was imported");

    let partial = import(&mut catalog, &suite, "i2", &pool.id, csv, true)
        .await
        .unwrap();
    assert_eq!(partial.imported, 2);
    assert_eq!(
        partial.errors.iter().map(|e| e.row).collect::<Vec<_>>(),
        [2, 4, 5, 5, 6]
    );
    assert_eq!(pool_now(&mut catalog).await, 2);
    // Same key, same file: the stored answer; same key, another file: refused.
    let replay = import(&mut catalog, &suite, "i2", &pool.id, csv, true)
        .await
        .unwrap();
    assert_eq!(replay, partial);
    let reused = import(&mut catalog, &suite, "i2", &pool.id, "code\nNEW-1\n", true)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition);
    let unknown_column = import(
        &mut catalog,
        &suite,
        "i3",
        &pool.id,
        "code,colour\nA-1,red\n",
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(violations(&unknown_column), ["csv.header"]);

    let code = catalog
        .get_code(suite.ctx(TENANT).request(pb::GetCodeRequest {
            code: "Summer-1".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .code
        .unwrap();
    assert_eq!(
        (code.code.as_str(), code.max_uses, code.status()),
        ("SUMMER-1", 3, pb::CodeStatus::Active)
    );
    assert!(code.ends_at.is_some());
    // Codes of one tenant do not exist for another.
    let elsewhere = catalog
        .get_code(suite.ctx("other").request(pb::GetCodeRequest {
            code: "SUMMER-1".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::NotFound);

    let mut stream = catalog
        .export_codes(suite.ctx(TENANT).request(pb::ExportCodesRequest {
            pool_id: pool.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut csv_out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        csv_out.extend(chunk.chunk);
    }
    assert_eq!(
        String::from_utf8(csv_out).unwrap(),
        "code,status,redemptions,max_uses,customer_id,starts_at,ends_at,redeemed_by,order_id,\
         redeemed_at\n\
         SUMMER-1,active,0,3,,,2030-01-01T00:00:00Z,,,\n\
         SUMMER-2,active,0,1,,,,,,\n"
    );
}

async fn publication_assigns_distinct_codes_under_concurrency(suite: TestSuite) {
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let reward = create_reward(
        &mut catalog,
        &suite,
        "r",
        reward_input("Welcome", percent_off(1000)),
    )
    .await;
    let pool = create_pool(
        &mut catalog,
        &suite,
        "p",
        &reward.id,
        pb::CodePattern {
            length: 10,
            ..Default::default()
        },
    )
    .await;
    let job = catalog
        .generate_codes(suite.ctx(TENANT).request(pb::GenerateCodesRequest {
            idempotency_key: "g".into(),
            pool_id: pool.id.clone(),
            count: 30,
        }))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    wait_for_job(&mut catalog, &suite, &job.id).await;

    let publish = |key: String, customer: String| {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        let pool_id = pool.id.clone();
        async move {
            catalog
                .publish_reward(ctx.request(pb::PublishRewardRequest {
                    idempotency_key: key,
                    customer_id: customer,
                    pool_id,
                    channel: "email".into(),
                    ..Default::default()
                }))
                .await
                .map(|r| r.into_inner().publication.unwrap())
        }
    };
    let results = futures::future::join_all(
        (0..40).map(|i| publish(format!("pub-{i}"), format!("cust-{}", i % 5))),
    )
    .await;
    let published: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        published.len(),
        30,
        "every code once, then the pool is exhausted"
    );
    let distinct: HashSet<_> = published.iter().map(|p| p.code.clone()).collect();
    assert_eq!(distinct.len(), 30);
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("no free code"),
            "{}",
            refused.message()
        );
    }

    let customer = published[0].customer_id.clone();
    let mine: Vec<_> = published
        .iter()
        .filter(|p| p.customer_id == customer)
        .collect();
    let first = mine[0];
    let shown = catalog
        .mark_shown(suite.ctx(TENANT).request(pb::MarkShownRequest {
            idempotency_key: "seen".into(),
            publication_id: first.id.clone(),
            channel: "app".into(),
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .publication
        .unwrap();
    assert_eq!(
        shown
            .shown
            .iter()
            .map(|s| s.channel.as_str())
            .collect::<Vec<_>>(),
        ["app"]
    );
    // Switch one code off: the customer's list says so.
    catalog
        .set_code_status(suite.ctx(TENANT).request(pb::SetCodeStatusRequest {
            idempotency_key: "code-off".into(),
            code: first.code.clone(),
            status: pb::CodeStatus::Disabled as i32,
        }))
        .await
        .unwrap();
    let list = |status: pb::CustomerRewardStatus| {
        let mut catalog = catalog.clone();
        let ctx = suite.ctx(TENANT);
        let customer = customer.clone();
        async move {
            catalog
                .list_customer_rewards(ctx.request(pb::ListCustomerRewardsRequest {
                    customer_id: customer.clone(),
                    status: status as i32,
                    page: None,
                }))
                .await
                .unwrap()
                .into_inner()
                .rewards
        }
    };
    let all = list(pb::CustomerRewardStatus::Unspecified).await;
    assert_eq!(all.len(), mine.len());
    let disabled = list(pb::CustomerRewardStatus::Disabled).await;
    assert_eq!(disabled.len(), 1);
    let entry = &disabled[0];
    assert_eq!(entry.code.as_ref().unwrap().code, first.code);
    assert_eq!(entry.publication.as_ref().unwrap().shown.len(), 1);
    assert_eq!(entry.reward.as_ref().unwrap().id, reward.id);
    assert_eq!(
        list(pb::CustomerRewardStatus::Available).await.len(),
        mine.len() - 1
    );

    // A published code cannot be published again; the whole reward can be switched off.
    let mut admin = CatalogServiceClient::new(suite.channel());
    let again = admin
        .publish_reward(suite.ctx(TENANT).request(pb::PublishRewardRequest {
            idempotency_key: "again".into(),
            customer_id: "cust-9".into(),
            code: published[1].code.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    admin
        .set_reward_status(suite.ctx(TENANT).request(pb::SetRewardStatusRequest {
            idempotency_key: "reward-off".into(),
            id: reward.id.clone(),
            status: pb::RewardStatus::Disabled as i32,
            reason: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(list(pb::CustomerRewardStatus::Available).await.len(), 0);
    let published_events = eventually(Duration::from_secs(10), "reward.published", || async {
        let e = events(&suite, TENANT, "reward.published").await;
        (e.len() >= 30).then_some(e)
    })
    .await;
    assert_eq!(published_events.len(), 30);
}

async fn gift_card_codes_load_their_wallet_account(suite: TestSuite) {
    use tessera_proto::wallet::v1 as wpb;
    let mut catalog = CatalogServiceClient::new(suite.channel());
    let card = Some(pb::Effect {
        kind: Some(Kind::GiftCard(pb::GiftCard {
            value: 5_000,
            multi_use: true,
        })),
    });
    let reward = create_reward(
        &mut catalog,
        &suite,
        "r",
        reward_input("Gift card 50", card),
    )
    .await;
    let pool = create_pool(
        &mut catalog,
        &suite,
        "p",
        &reward.id,
        pb::CodePattern {
            length: 12,
            ..Default::default()
        },
    )
    .await;
    import(
        &mut catalog,
        &suite,
        "i",
        &pool.id,
        "code\nGIFT-0001\n",
        false,
    )
    .await
    .unwrap();
    let publish = |key: &str, code: &str| pb::PublishRewardRequest {
        idempotency_key: key.into(),
        customer_id: "gina".into(),
        reward_id: reward.id.clone(),
        code: code.into(),
        ..Default::default()
    };
    let no_code = catalog
        .publish_reward(suite.ctx(TENANT).request(publish("p0", "")))
        .await
        .unwrap_err();
    assert_eq!(no_code.code(), tonic::Code::FailedPrecondition);
    // The first publication is traced: the card's load reaches the wallet in its trace.
    let root = tracing::info_span!("test.publish");
    let (trace_id, root_id) = {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let cx = root.context();
        let ids = cx.span().span_context().clone();
        (ids.trace_id(), ids.span_id())
    };
    for span in [root, tracing::Span::none()] {
        use tracing::Instrument;
        // The second time is a replay: the card is loaded once.
        catalog
            .publish_reward(suite.ctx(TENANT).request(publish("p1", "GIFT-0001")))
            .instrument(span)
            .await
            .unwrap();
    }
    let mut wallet =
        tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient::new(suite.channel());
    let balance = eventually(Duration::from_secs(10), "gift card loaded", || {
        let mut wallet = wallet.clone();
        let ctx = suite.ctx(TENANT);
        async move {
            let balances = wallet
                .get_balance(ctx.request(wpb::GetBalanceRequest {
                    customer_id: "gina".into(),
                }))
                .await
                .unwrap()
                .into_inner()
                .balances;
            balances.into_iter().find(|b| {
                b.asset.as_ref().is_some_and(|a| {
                    a.kind == wpb::AssetKind::GiftCard as i32 && a.code == "GIFT-0001"
                })
            })
        }
    })
    .await;
    assert_eq!(balance.available, 5_000);
    let exporter = tessera_runtime::telemetry::init_for_tests();
    eventually(
        Duration::from_secs(10),
        "the load in the trace, no orphans",
        || async {
            let spans = crate::trace::spans_of(&exporter, trace_id);
            let credit = "tessera.wallet.v1.WalletService/Credit";
            let loaded =
                crate::trace::find_kind(&spans, credit, opentelemetry::trace::SpanKind::Server);
            (loaded.is_some() && crate::trace::orphans(&spans, root_id).is_empty()).then_some(())
        },
    )
    .await;
    let catalog_db = suite.db("catalog").await;
    let waiting = eventually(Duration::from_secs(10), "command delivered", || async {
        let n = scalar(&catalog_db, "SELECT COUNT(*) FROM wallet_commands", vec![]).await;
        (n == 0).then_some(n)
    })
    .await;
    assert_eq!(waiting, 0);
    let history = wallet
        .list_transactions(suite.ctx(TENANT).request(wpb::ListTransactionsRequest {
            customer_id: "gina".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(history.len(), 1, "loaded exactly once");
}
