//! Eligibility I: customer facts and their aggregates, rules compiled and type-checked when
//! saved (bad ones refused with the field and position, nothing written), segments whose
//! cached membership never goes stale, recompute jobs with progress, and qualification with
//! values, ranking and a reason for every incentive that does not apply.

// Amounts are written dollars_cents (`150_00` is $150.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::{Datelike, Timelike};
use prost_types::Timestamp;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually, scalar};

backend_tests!(
    facts_keep_their_aggregates_and_can_be_erased,
    bad_facts_rules_and_carts_name_the_field_and_write_nothing,
    segments_are_cached_versioned_and_recomputed,
    qualification_ranks_values_and_explains_every_rejection,
    the_issues_rule_examples_work_verbatim,
    touchpoints_qualify_over_http,
    tier_rules_read_the_wallet,
);

pub(crate) type Client = EligibilityServiceClient<Channel>;

pub(crate) fn client(suite: &TestSuite) -> Client {
    EligibilityServiceClient::new(suite.channel())
}

pub(crate) fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn ago(days: i64) -> Option<Timestamp> {
    let t = chrono::Utc::now() - chrono::Duration::days(days);
    Some(Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    })
}

pub(crate) fn violations(status: &tonic::Status) -> Vec<String> {
    tessera_runtime::Error::from_status(status)
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

fn string(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringValue(s.into())),
    }
}

pub(crate) fn percent_off(bp: u32, categories: &[&str]) -> Option<cpb::Effect> {
    Some(cpb::Effect {
        kind: Some(Kind::PercentOff(cpb::PercentOff {
            percent_bp: bp,
            selector: Some(cpb::Selector {
                categories: categories.iter().map(|c| (*c).into()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    })
}

pub(crate) fn amount_off(amount: i64) -> Option<cpb::Effect> {
    Some(cpb::Effect {
        kind: Some(Kind::AmountOff(cpb::AmountOff {
            amount,
            ..Default::default()
        })),
    })
}

pub(crate) fn campaign(id: &str, effect: Option<cpb::Effect>) -> pb::Campaign {
    pb::Campaign {
        id: id.into(),
        name: id.into(),
        status: pb::CampaignStatus::Active.into(),
        effect,
        ..Default::default()
    }
}

/// A USD cart: `(sku, category, quantity, unit price)`.
pub(crate) fn cart(lines: &[(&str, &str, i64, i64)]) -> cpb::Cart {
    cpb::Cart {
        currency: "USD".into(),
        lines: lines
            .iter()
            .enumerate()
            .map(|(i, (sku, category, quantity, unit_price))| cpb::CartLine {
                id: format!("l{i}"),
                sku: (*sku).into(),
                categories: vec![(*category).into()],
                quantity: *quantity,
                unit_price: *unit_price,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub(crate) async fn put_campaign(c: &mut Client, suite: &TestSuite, campaign: pb::Campaign) -> i64 {
    c.put_campaign(suite.ctx(TENANT).request(pb::PutCampaignRequest {
        idempotency_key: key(),
        campaign: Some(campaign),
        ..Default::default()
    }))
    .await
    .expect("put campaign")
    .into_inner()
    .version
}

pub(crate) async fn upsert(
    c: &mut Client,
    suite: &TestSuite,
    customer: pb::CustomerInput,
) -> pb::Customer {
    c.upsert_customer(suite.ctx(TENANT).request(pb::UpsertCustomerRequest {
        idempotency_key: key(),
        customer: Some(customer),
    }))
    .await
    .expect("upsert customer")
    .into_inner()
    .customer
    .expect("customer")
}

pub(crate) async fn order(
    c: &mut Client,
    suite: &TestSuite,
    id: &str,
    customer: &str,
    status: pb::OrderStatus,
    total: i64,
    days_ago: i64,
) -> i64 {
    c.record_order(suite.ctx(TENANT).request(pb::RecordOrderRequest {
        idempotency_key: key(),
        order: Some(pb::Order {
            id: id.into(),
            customer_id: customer.into(),
            status: status.into(),
            currency: "USD".into(),
            lines: vec![pb::OrderLine {
                sku: "SKU-1".into(),
                quantity: 1,
                unit_amount: total,
                ..Default::default()
            }],
            occurred_at: ago(days_ago),
            ..Default::default()
        }),
    }))
    .await
    .expect("record order")
    .into_inner()
    .facts_version
}

async fn event(c: &mut Client, suite: &TestSuite, id: &str, customer: &str, t: &str) {
    c.record_event(suite.ctx(TENANT).request(pb::RecordEventRequest {
        idempotency_key: key(),
        event: Some(pb::Event {
            id: id.into(),
            customer_id: customer.into(),
            r#type: t.into(),
            ..Default::default()
        }),
    }))
    .await
    .expect("record event");
}

async fn aggregates(c: &mut Client, suite: &TestSuite, customer: &str) -> pb::Aggregates {
    c.get_customer(suite.ctx(TENANT).request(pb::GetCustomerRequest {
        id: customer.into(),
    }))
    .await
    .expect("get customer")
    .into_inner()
    .aggregates
    .expect("aggregates")
}

pub(crate) async fn qualify(
    c: &mut Client,
    suite: &TestSuite,
    customer: &str,
    cart: cpb::Cart,
    codes: &[&str],
) -> pb::QualifyResponse {
    c.qualify(suite.ctx(TENANT).request(pb::QualifyRequest {
        customer_id: customer.into(),
        cart: Some(cart),
        codes: codes.iter().map(|c| (*c).into()).collect(),
        ..Default::default()
    }))
    .await
    .expect("qualify")
    .into_inner()
}

pub(crate) fn reasons(r: &pb::QualifyResponse) -> HashMap<String, pb::Reason> {
    r.rejected
        .iter()
        .map(|x| (x.campaign_id.clone(), x.reason()))
        .collect()
}

pub(crate) fn qualified_ids(r: &pb::QualifyResponse) -> Vec<&str> {
    r.qualified.iter().map(|q| q.campaign_id.as_str()).collect()
}

async fn facts_keep_their_aggregates_and_can_be_erased(suite: TestSuite) {
    let mut c = client(&suite);
    c.define_attribute(suite.ctx(TENANT).request(pb::DefineAttributeRequest {
        idempotency_key: key(),
        attribute: Some(pb::AttributeDefinition {
            name: "favourite_store".into(),
            r#type: pb::ValueType::String.into(),
        }),
    }))
    .await
    .expect("define attribute");
    let created = upsert(
        &mut c,
        &suite,
        pb::CustomerInput {
            id: "ann".into(),
            country: "GB".into(),
            birthday: "1990-04-01".into(),
            tags: vec!["newsletter".into()],
            attributes: [("favourite_store".to_string(), string("Leeds"))].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(created.facts_version, 1);
    // Paid 400 days ago (lifetime only), paid 100 days ago (365d), paid 10 days ago and
    // returned in part (all windows), cancelled yesterday (nothing).
    order(
        &mut c,
        &suite,
        "o1",
        "ann",
        pb::OrderStatus::Paid,
        50_00,
        400,
    )
    .await;
    order(
        &mut c,
        &suite,
        "o2",
        "ann",
        pb::OrderStatus::Paid,
        70_00,
        100,
    )
    .await;
    order(
        &mut c,
        &suite,
        "o3",
        "ann",
        pb::OrderStatus::Paid,
        30_00,
        10,
    )
    .await;
    order(&mut c, &suite, "o4", "ann", pb::OrderStatus::Paid, 99_00, 1).await;
    // o4 is cancelled after all: its spend and count go.
    let version = order(
        &mut c,
        &suite,
        "o4",
        "ann",
        pb::OrderStatus::Cancelled,
        99_00,
        1,
    )
    .await;
    assert_eq!(version, 6, "every fact bumps the version");
    let a = aggregates(&mut c, &suite, "ann").await;
    assert_eq!(a.lifetime_spend, 150_00);
    assert_eq!(
        (a.spend_30d, a.spend_90d, a.spend_365d),
        (30_00, 30_00, 100_00)
    );
    assert_eq!((a.orders_total, a.orders_30d, a.orders_365d), (3, 1, 2));
    // A full return takes the order's spend away.
    order(
        &mut c,
        &suite,
        "o3",
        "ann",
        pb::OrderStatus::Returned,
        30_00,
        10,
    )
    .await;
    let a = aggregates(&mut c, &suite, "ann").await;
    assert_eq!((a.lifetime_spend, a.spend_30d), (120_00, 0));

    // Events: a schema is enforced; counts per type per window.
    c.put_event_schema(
        suite.ctx(TENANT).request(pb::PutEventSchemaRequest {
            idempotency_key: key(),
            schema: Some(pb::EventSchema {
                r#type: "review".into(),
                properties: [(
                    "stars".to_string(),
                    pb::PropertyDefinition {
                        r#type: pb::ValueType::Number.into(),
                        required: true,
                    },
                )]
                .into(),
            }),
        }),
    )
    .await
    .expect("schema");
    let bad = c
        .record_event(suite.ctx(TENANT).request(pb::RecordEventRequest {
            idempotency_key: key(),
            event: Some(pb::Event {
                id: "e0".into(),
                customer_id: "ann".into(),
                r#type: "review".into(),
                properties: [("stars".to_string(), string("five"))].into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&bad), ["event.properties.stars"]);
    let missing = c
        .record_event(suite.ctx(TENANT).request(pb::RecordEventRequest {
            idempotency_key: key(),
            event: Some(pb::Event {
                id: "e0".into(),
                customer_id: "ann".into(),
                r#type: "review".into(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&missing), ["event.properties.stars"]);
    event(&mut c, &suite, "e1", "ann", "newsletter_signup").await;
    event(&mut c, &suite, "e2", "ann", "social_like").await;
    event(&mut c, &suite, "e3", "ann", "social_like").await;
    let a = aggregates(&mut c, &suite, "ann").await;
    assert_eq!(a.events_30d.get("social_like"), Some(&2));
    assert_eq!(a.events_365d.get("newsletter_signup"), Some(&1));

    // GDPR erasure: the profile and every fact go; an event records it.
    let erased = c
        .erase_customer(suite.ctx(TENANT).request(pb::EraseCustomerRequest {
            idempotency_key: key(),
            id: "ann".into(),
        }))
        .await
        .expect("erase")
        .into_inner();
    assert_eq!((erased.orders, erased.events), (4, 3));
    let gone = c
        .get_customer(
            suite
                .ctx(TENANT)
                .request(pb::GetCustomerRequest { id: "ann".into() }),
        )
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let db = suite.db("eligibility").await;
    for table in ["orders", "events", "customers"] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE tenant_id = $1");
        assert_eq!(scalar(&db, &sql, vec![TENANT.into()]).await, 0, "{table}");
    }
    eventually(Duration::from_secs(10), "customer.erased event", || async {
        let events = crate::events(&suite, TENANT, "customer.erased").await;
        events
            .first()
            .map(|e| crate::data(e)["customer_id"] == "ann")
            .filter(|ok| *ok)
    })
    .await;
}

async fn bad_facts_rules_and_carts_name_the_field_and_write_nothing(suite: TestSuite) {
    let mut c = client(&suite);
    // A bulk upsert with one bad row writes nothing.
    let status = c
        .bulk_upsert_customers(suite.ctx(TENANT).request(pb::BulkUpsertCustomersRequest {
            idempotency_key: key(),
            customers: vec![
                pb::CustomerInput {
                    id: "ok".into(),
                    ..Default::default()
                },
                pb::CustomerInput {
                    id: "bad".into(),
                    country: "gb".into(),
                    attributes: [("undeclared".to_string(), string("x"))].into(),
                    ..Default::default()
                },
            ],
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violations(&status),
        ["customers.1.attributes.undeclared", "customers.1.country"]
    );
    let db = suite.db("eligibility").await;
    let customers = "SELECT COUNT(*) FROM customers WHERE tenant_id = $1";
    assert_eq!(scalar(&db, customers, vec![TENANT.into()]).await, 0);
    let done = c
        .bulk_upsert_customers(
            suite.ctx(TENANT).request(pb::BulkUpsertCustomersRequest {
                idempotency_key: key(),
                customers: (0..3)
                    .map(|i| pb::CustomerInput {
                        id: format!("c{i}"),
                        ..Default::default()
                    })
                    .collect(),
            }),
        )
        .await
        .expect("bulk")
        .into_inner();
    assert_eq!((done.created, done.updated), (3, 0));

    // Rules: compile errors, wrong types and unknown attributes, with their position.
    let refuse = |campaign: pb::Campaign| {
        let mut c = c.clone();
        let ctx = suite.ctx(TENANT);
        async move {
            let status = c
                .put_campaign(ctx.request(pb::PutCampaignRequest {
                    idempotency_key: key(),
                    campaign: Some(campaign),
                    ..Default::default()
                }))
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            let err = tessera_runtime::Error::from_status(&status);
            err.field_violations
                .into_iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect::<Vec<_>>()
        }
    };
    let mut bad = campaign("c1", amount_off(500));
    bad.rule = "order.total >".into();
    let got = refuse(bad.clone()).await;
    assert!(got[0].starts_with("campaign.rule: 1:"), "{got:?}");
    bad.rule = "customer.attributes.shoe_size > 40".into();
    assert_eq!(
        refuse(bad.clone()).await,
        ["campaign.rule: 1:20: unknown attribute 'shoe_size' (declare it first)"]
    );
    bad.rule = "order.total > \"100\"".into();
    assert_eq!(
        refuse(bad.clone()).await,
        ["campaign.rule: 1:13: '>' cannot be applied to (int, string)"]
    );
    bad.rule = "order.total".into();
    assert_eq!(
        refuse(bad.clone()).await,
        ["campaign.rule: 1:6: a rule must be a bool, this one is int"]
    );
    bad.rule = String::new();
    bad.segments = vec!["nobody".into()];
    bad.windows = vec![pb::TimeWindow {
        days: vec![],
        start_minute: 600,
        end_minute: 500,
        ..Default::default()
    }];
    assert_eq!(
        refuse(bad).await,
        [
            "campaign.windows.0.end_minute: must be after start_minute and at most 1440",
            "campaign.segments.0: unknown segment 'nobody'"
        ]
    );
    let check = c
        .check_rule(suite.ctx(TENANT).request(pb::CheckRuleRequest {
            expression: "order.lines.exists(l, l.sku == 'X') && customer.country == 'GB'".into(),
        }))
        .await
        .expect("valid rule")
        .into_inner();
    assert_eq!(check.reads, ["customer", "order"]);
    let feed = "SELECT COUNT(*) FROM campaigns WHERE tenant_id = $1";
    assert_eq!(scalar(&db, feed, vec![TENANT.into()]).await, 0);

    // Carts: negative quantities and another currency.
    let mut bad_cart = cart(&[("A", "x", -1, 100)]);
    bad_cart.currency = "EUR".into();
    let status = c
        .qualify(suite.ctx(TENANT).request(pb::QualifyRequest {
            customer_id: "c1".into(),
            cart: Some(bad_cart),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violations(&status),
        ["cart.lines.0.quantity", "cart.currency"]
    );
    // An order in another currency is refused too, and writes nothing.
    let status = c
        .record_order(suite.ctx(TENANT).request(pb::RecordOrderRequest {
            idempotency_key: key(),
            order: Some(pb::Order {
                id: "o1".into(),
                customer_id: "c1".into(),
                status: pb::OrderStatus::Paid.into(),
                currency: "EUR".into(),
                lines: vec![pb::OrderLine {
                    sku: "A".into(),
                    quantity: 1,
                    unit_amount: 100,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(violations(&status), ["order.currency"]);
    let orders = "SELECT COUNT(*) FROM orders WHERE tenant_id = $1";
    assert_eq!(scalar(&db, orders, vec![TENANT.into()]).await, 0);
}

async fn segments_are_cached_versioned_and_recomputed(suite: TestSuite) {
    let mut c = client(&suite);
    for i in 0..30 {
        upsert(
            &mut c,
            &suite,
            pb::CustomerInput {
                id: format!("m{i:02}"),
                ..Default::default()
            },
        )
        .await;
    }
    // m00..m09 have two orders: the "regulars".
    for i in 0..10 {
        for n in 0..2 {
            let id = format!("o{i}-{n}");
            order(
                &mut c,
                &suite,
                &id,
                &format!("m{i:02}"),
                pb::OrderStatus::Paid,
                10_00,
                5,
            )
            .await;
        }
    }
    let create = |input: pb::SegmentInput| {
        let mut c = c.clone();
        let ctx = suite.ctx(TENANT);
        async move {
            c.create_segment(ctx.request(pb::CreateSegmentRequest {
                idempotency_key: key(),
                segment: Some(input),
            }))
            .await
        }
    };
    create(pb::SegmentInput {
        id: "regulars".into(),
        name: "Regulars".into(),
        kind: pb::SegmentKind::Dynamic.into(),
        rule: "customer.orders_90d >= 2".into(),
    })
    .await
    .expect("dynamic segment");
    create(pb::SegmentInput {
        id: "vip".into(),
        name: "VIP".into(),
        kind: pb::SegmentKind::Static.into(),
        rule: String::new(),
    })
    .await
    .expect("static segment");
    let bad = create(pb::SegmentInput {
        id: "bad".into(),
        name: "Bad".into(),
        kind: pb::SegmentKind::Dynamic.into(),
        rule: "order.total > 1".into(),
    })
    .await
    .unwrap_err();
    assert_eq!(violations(&bad), ["segment.rule"]);
    c.edit_static_segment(suite.ctx(TENANT).request(pb::EditStaticSegmentRequest {
        idempotency_key: key(),
        id: "vip".into(),
        add: vec!["m15".into(), "m16".into()],
        remove: vec![],
    }))
    .await
    .expect("static members");

    let reader = c.clone();
    let segments_of = |customer: &str| {
        let mut c = reader.clone();
        let ctx = suite.ctx(TENANT);
        let customer = customer.to_string();
        async move {
            c.get_customer_segments(ctx.request(pb::GetCustomerSegmentsRequest {
                customer_id: customer,
            }))
            .await
            .expect("segments")
            .into_inner()
        }
    };
    let first = segments_of("m01").await;
    assert_eq!(
        (first.segment_ids.clone(), first.cached),
        (vec!["regulars".to_string()], false)
    );
    let again = segments_of("m01").await;
    assert_eq!(
        (again.segment_ids, again.cached),
        (vec!["regulars".to_string()], true)
    );
    assert_eq!(segments_of("m15").await.segment_ids, ["vip"]);
    // A new fact: the cached entry is of an older facts version and is not used.
    assert!(segments_of("m20").await.segment_ids.is_empty());
    order(&mut c, &suite, "x1", "m20", pb::OrderStatus::Paid, 5_00, 1).await;
    order(&mut c, &suite, "x2", "m20", pb::OrderStatus::Paid, 5_00, 1).await;
    let after = segments_of("m20").await;
    assert_eq!(
        (after.segment_ids, after.cached),
        (vec!["regulars".to_string()], false)
    );
    // A definition change: every cached membership is of the old segment version.
    c.update_segment(suite.ctx(TENANT).request(pb::UpdateSegmentRequest {
        idempotency_key: key(),
        segment: Some(pb::SegmentInput {
            id: "regulars".into(),
            name: "Regulars".into(),
            kind: pb::SegmentKind::Dynamic.into(),
            rule: "customer.orders_90d >= 3".into(),
        }),
    }))
    .await
    .expect("update segment");
    let changed = segments_of("m01").await;
    assert!(
        changed.segment_ids.is_empty() && !changed.cached,
        "{changed:?}"
    );

    // Recompute: a job with progress, then the size and members.
    c.update_segment(suite.ctx(TENANT).request(pb::UpdateSegmentRequest {
        idempotency_key: key(),
        segment: Some(pb::SegmentInput {
            id: "regulars".into(),
            name: "Regulars".into(),
            kind: pb::SegmentKind::Dynamic.into(),
            rule: "customer.orders_90d >= 2".into(),
        }),
    }))
    .await
    .expect("update segment");
    let job = c
        .recompute_segment(suite.ctx(TENANT).request(pb::RecomputeSegmentRequest {
            idempotency_key: key(),
            id: "regulars".into(),
        }))
        .await
        .expect("recompute")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(job.total, 30);
    let done = eventually(Duration::from_secs(30), "recompute job", || {
        let mut c = c.clone();
        let ctx = suite.ctx(TENANT);
        let id = job.id.clone();
        async move {
            let job = c
                .get_segment_job(ctx.request(pb::GetSegmentJobRequest { id }))
                .await
                .expect("job")
                .into_inner()
                .job
                .expect("job");
            (job.status() != pb::JobStatus::Running).then_some(job)
        }
    })
    .await;
    assert_eq!(done.status(), pb::JobStatus::Succeeded, "{done:?}");
    assert_eq!((done.processed, done.members), (30, 11));
    let segment = c
        .get_segment(suite.ctx(TENANT).request(pb::GetSegmentRequest {
            id: "regulars".into(),
        }))
        .await
        .expect("segment")
        .into_inner()
        .segment
        .expect("segment");
    assert_eq!(segment.size, 11);
    let page = c
        .list_segment_members(suite.ctx(TENANT).request(pb::ListSegmentMembersRequest {
            id: "regulars".into(),
            page: Some(tessera_proto::common::v1::PageRequest {
                limit: 10,
                starting_after: String::new(),
            }),
        }))
        .await
        .expect("members")
        .into_inner();
    assert_eq!(page.customer_ids.len(), 10);
    assert_eq!(page.customer_ids[0], "m00");
    assert!(page.page.expect("page").has_more);

    // Erased and created again, a customer starts over at facts version 1: the entry cached
    // before (same version number once three facts are back) must not answer.
    let cached = segments_of("m01").await;
    assert_eq!(
        (cached.segment_ids, cached.facts_version),
        (vec!["regulars".to_string()], 3)
    );
    c.erase_customer(suite.ctx(TENANT).request(pb::EraseCustomerRequest {
        idempotency_key: key(),
        id: "m01".into(),
    }))
    .await
    .expect("erase");
    upsert(
        &mut c,
        &suite,
        pb::CustomerInput {
            id: "m01".into(),
            ..Default::default()
        },
    )
    .await;
    order(
        &mut c,
        &suite,
        "again",
        "m01",
        pb::OrderStatus::Paid,
        10_00,
        1,
    )
    .await;
    event(&mut c, &suite, "again-e", "m01", "visit").await;
    let reborn = segments_of("m01").await;
    assert_eq!(reborn.facts_version, 3);
    assert!(reborn.segment_ids.is_empty(), "{reborn:?}");
}

async fn qualification_ranks_values_and_explains_every_rejection(suite: TestSuite) {
    let mut c = client(&suite);
    upsert(
        &mut c,
        &suite,
        pb::CustomerInput {
            id: "bob".into(),
            country: "IT".into(),
            ..Default::default()
        },
    )
    .await;
    c.create_segment(suite.ctx(TENANT).request(pb::CreateSegmentRequest {
        idempotency_key: key(),
        segment: Some(pb::SegmentInput {
            id: "italians".into(),
            name: "Italians".into(),
            kind: pb::SegmentKind::Dynamic.into(),
            rule: "customer.country == 'IT'".into(),
        }),
    }))
    .await
    .expect("segment");
    let now = chrono::Utc::now();
    let past = Some(Timestamp {
        seconds: now.timestamp() - 3600,
        nanos: 0,
    });
    let future = Some(Timestamp {
        seconds: now.timestamp() + 3600,
        nanos: 0,
    });
    // A window that excludes the current hour (UTC), every day.
    let hour = now.hour();
    let away = (hour + 2) % 24;
    let closed = vec![pb::TimeWindow {
        days: vec![],
        start_minute: away * 60,
        end_minute: away * 60 + 59,
        ..Default::default()
    }];
    let open = vec![pb::TimeWindow {
        days: vec![now.weekday().number_from_monday() as i32],
        start_minute: 0,
        end_minute: 1440,
        ..Default::default()
    }];
    let mut campaigns = vec![
        campaign("a-ten-off", amount_off(10_00)),
        campaign("b-shoes-20pct", percent_off(2000, &["shoes"])),
        campaign("c-toys-50pct", percent_off(5000, &["toys"])),
        {
            let mut x = campaign("d-disabled", amount_off(1_00));
            x.status = pb::CampaignStatus::Disabled.into();
            x
        },
        {
            let mut x = campaign("e-ended", amount_off(1_00));
            x.starts_at = Some(Timestamp {
                seconds: now.timestamp() - 7200,
                nanos: 0,
            });
            x.ends_at = past;
            x
        },
        {
            let mut x = campaign("f-later", amount_off(1_00));
            x.starts_at = future;
            x
        },
        {
            let mut x = campaign("g-closed", amount_off(1_00));
            x.windows = closed;
            x
        },
        {
            let mut x = campaign("h-open-today", amount_off(2_00));
            x.windows = open;
            x
        },
        {
            let mut x = campaign("i-italians", amount_off(3_00));
            x.segments = vec!["italians".into()];
            x
        },
        {
            let mut x = campaign("j-code", amount_off(4_00));
            x.codes = vec!["SPRING".into()];
            x
        },
        {
            let mut x = campaign("k-budget", amount_off(1_00));
            x.limits = Some(pb::Limits {
                max_redemptions: 500,
                ..Default::default()
            });
            x
        },
        {
            let mut x = campaign("l-once", amount_off(1_00));
            x.limits = Some(pb::Limits {
                max_redemptions_per_customer: 1,
                ..Default::default()
            });
            x
        },
        {
            let mut x = campaign("m-rule", amount_off(1_00));
            x.rule = "order.total > 100000".into();
            x
        },
        {
            let mut x = campaign("n-excl-big", amount_off(40_00));
            x.exclusive = true;
            x
        },
        {
            let mut x = campaign("o-excl-small", amount_off(5_00));
            x.exclusive = true;
            x
        },
        {
            let mut x = campaign("p-free-ship-above", None);
            x.effect = Some(cpb::Effect {
                kind: Some(Kind::FreeShipping(cpb::FreeShipping {
                    threshold: 1_000_00,
                    after_discounts: false,
                })),
            });
            x
        },
    ];
    for c0 in campaigns.drain(..) {
        put_campaign(&mut c, &suite, c0).await;
    }
    // Usage counters as redemption (the next issue) writes them.
    let db = suite.db("eligibility").await;
    use sea_orm::ConnectionTrait;
    for (sql, values) in [
        (
            "INSERT INTO campaign_usage (tenant_id, campaign_id, redemptions, discount_total) \
             VALUES ($1, 'k-budget', 500, 50000)",
            vec![TENANT.into()],
        ),
        (
            "INSERT INTO customer_usage (tenant_id, customer_id, campaign_id, redemptions) \
             VALUES ($1, 'bob', 'l-once', 1)",
            vec![TENANT.into()],
        ),
    ] {
        db.conn()
            .execute_raw(tessera_store::stmt(db.conn(), sql, values))
            .await
            .expect("usage");
    }
    let mut basket = cart(&[("SHOE-1", "shoes", 2, 50_00), ("MUG-1", "home", 1, 10_00)]);
    basket.shipping = 5_00;
    let r = qualify(&mut c, &suite, "bob", basket.clone(), &[]).await;
    // Values: 40.00 (exclusive), 20.00 (20% of 100.00 shoes), 10.00, 3.00, 2.00.
    assert_eq!(
        qualified_ids(&r),
        [
            "n-excl-big",
            "b-shoes-20pct",
            "a-ten-off",
            "i-italians",
            "h-open-today"
        ]
    );
    let values: Vec<i64> = r.qualified.iter().map(|q| q.value).collect();
    assert_eq!(values, [40_00, 20_00, 10_00, 3_00, 2_00]);
    let why = reasons(&r);
    let expected = [
        ("c-toys-50pct", pb::Reason::NoMatchingItems),
        ("d-disabled", pb::Reason::Disabled),
        ("e-ended", pb::Reason::Ended),
        ("f-later", pb::Reason::NotStarted),
        ("g-closed", pb::Reason::OutsideTimeWindow),
        ("j-code", pb::Reason::CodeRequired),
        ("k-budget", pb::Reason::BudgetExhausted),
        ("l-once", pb::Reason::CustomerLimitReached),
        ("m-rule", pb::Reason::RuleFalse),
        ("o-excl-small", pb::Reason::ExcludedByStacking),
        ("p-free-ship-above", pb::Reason::NoEffect),
    ];
    for (id, reason) in expected {
        assert_eq!(why.get(id), Some(&reason), "{id}: {r:?}");
    }
    assert_eq!(
        r.qualified.len() + r.rejected.len(),
        16,
        "every campaign is accounted for"
    );
    let counted: i64 = r.reason_counts.iter().map(|c| c.count).sum();
    assert_eq!(counted, 11);

    // The code unlocks its campaign; a customer outside the segment loses that one.
    let with_code = qualify(&mut c, &suite, "bob", basket.clone(), &["SPRING"]).await;
    let j = with_code
        .qualified
        .iter()
        .find(|q| q.campaign_id == "j-code")
        .expect("code campaign qualifies");
    assert_eq!((j.code.as_str(), j.value), ("SPRING", 4_00));
    let stranger = qualify(&mut c, &suite, "nobody-known", basket.clone(), &[]).await;
    assert_eq!(
        reasons(&stranger).get("i-italians"),
        Some(&pb::Reason::NotInSegment)
    );

    // The kill switch: the very next qualification refuses it.
    let mut killed = campaign("n-excl-big", amount_off(40_00));
    killed.exclusive = true;
    killed.status = pb::CampaignStatus::Disabled.into();
    put_campaign(&mut c, &suite, killed).await;
    let after = qualify(&mut c, &suite, "bob", basket.clone(), &[]).await;
    assert_eq!(
        reasons(&after).get("n-excl-big"),
        Some(&pb::Reason::Disabled)
    );
    assert_eq!(after.qualified[0].campaign_id, "b-shoes-20pct");
    assert!(qualified_ids(&after).contains(&"o-excl-small"));

    // Counts only: the same verdicts without the list.
    let counts = c
        .qualify(suite.ctx(TENANT).request(pb::QualifyRequest {
            customer_id: "bob".into(),
            cart: Some(basket),
            explain: pb::Explain::Counts.into(),
            ..Default::default()
        }))
        .await
        .expect("qualify")
        .into_inner();
    assert!(counts.rejected.is_empty());
    assert_eq!(
        counts.reason_counts.iter().map(|c| c.count).sum::<i64>() as usize,
        16 - counts.qualified.len()
    );

    // Another tenant sees none of it.
    let other = c
        .qualify(suite.ctx("other-tenant").request(pb::QualifyRequest {
            customer_id: "bob".into(),
            cart: Some(cart(&[("SHOE-1", "shoes", 1, 50_00)])),
            ..Default::default()
        }))
        .await
        .expect("qualify")
        .into_inner();
    assert!(other.qualified.is_empty() && other.rejected.is_empty());
}

async fn the_issues_rule_examples_work_verbatim(suite: TestSuite) {
    let mut c = client(&suite);
    c.put_settings(suite.ctx(TENANT).request(pb::PutSettingsRequest {
        idempotency_key: key(),
        settings: Some(pb::Settings {
            time_zone: "Europe/Rome".into(),
            currency: "USD".into(),
            ..Default::default()
        }),
    }))
    .await
    .expect("settings");
    for (id, country) in [("uk-big", "GB"), ("uk-small", "GB"), ("fr-big", "FR")] {
        upsert(
            &mut c,
            &suite,
            pb::CustomerInput {
                id: id.into(),
                country: country.into(),
                ..Default::default()
            },
        )
        .await;
    }
    order(
        &mut c,
        &suite,
        "b1",
        "uk-big",
        pb::OrderStatus::Paid,
        600_00,
        200,
    )
    .await;
    order(
        &mut c,
        &suite,
        "b2",
        "uk-big",
        pb::OrderStatus::Paid,
        400_00,
        20,
    )
    .await;
    order(
        &mut c,
        &suite,
        "b3",
        "uk-big",
        pb::OrderStatus::Paid,
        900_00,
        500,
    )
    .await;
    order(
        &mut c,
        &suite,
        "s1",
        "uk-small",
        pb::OrderStatus::Paid,
        999_99,
        30,
    )
    .await;
    order(
        &mut c,
        &suite,
        "f1",
        "fr-big",
        pb::OrderStatus::Paid,
        2000_00,
        30,
    )
    .await;
    event(&mut c, &suite, "n1", "fr-big", "newsletter_signup").await;
    let rome = chrono::Utc::now().with_timezone(&chrono_tz::Europe::Rome);
    let friday_evening = rome.weekday() == chrono::Weekday::Fri && (17..19).contains(&rome.hour());
    let rules = [
        // Spent ≥ $1000 in the last 365 days and lives in the UK.
        (
            "uk-1000",
            r#"customer.spend_365d >= 100000 && customer.country == "GB""#,
        ),
        // Order total > $100.
        ("over-100", "order.total > 10000"),
        // Any line with SKU "IPHONE-X".
        ("iphone", r#"order.lines.exists(l, l.sku == "IPHONE-X")"#),
        // The event being handled is a newsletter sign-up.
        ("newsletter", r#"event.type == "newsletter_signup""#),
        // Friday 17:00-19:00 in Rome.
        (
            "friday",
            r#"now.getDayOfWeek("Europe/Rome") == 5 && now.getHours("Europe/Rome") >= 17 && now.getHours("Europe/Rome") < 19"#,
        ),
    ];
    for (id, rule) in rules {
        let mut x = campaign(id, amount_off(1_00));
        x.rule = rule.into();
        put_campaign(&mut c, &suite, x).await;
    }
    let small = cart(&[("CASE-1", "cases", 1, 20_00)]);
    let big = cart(&[("IPHONE-X", "phones", 1, 999_00)]);
    let ids = |r: &pb::QualifyResponse| {
        let mut ids: Vec<String> = qualified_ids(r).iter().map(|s| s.to_string()).collect();
        ids.sort();
        ids
    };
    let friday = |mut v: Vec<&str>| {
        if friday_evening {
            v.push("friday");
        }
        v.sort();
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&qualify(&mut c, &suite, "uk-big", small.clone(), &[]).await),
        friday(vec!["uk-1000"])
    );
    assert_eq!(
        ids(&qualify(&mut c, &suite, "uk-small", small.clone(), &[]).await),
        friday(vec![])
    );
    assert_eq!(
        ids(&qualify(&mut c, &suite, "fr-big", big.clone(), &[]).await),
        friday(vec!["iphone", "over-100"])
    );
    let with_event = c
        .qualify(suite.ctx(TENANT).request(pb::QualifyRequest {
            customer_id: "fr-big".into(),
            cart: Some(small),
            event: Some(pb::Event {
                r#type: "newsletter_signup".into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("qualify")
        .into_inner();
    assert_eq!(ids(&with_event), friday(vec!["newsletter"]));
    let rejected = reasons(&with_event);
    assert_eq!(rejected.get("over-100"), Some(&pb::Reason::RuleFalse));
}

async fn touchpoints_qualify_over_http(suite: TestSuite) {
    let mut c = client(&suite);
    let mut spring = campaign("spring", amount_off(5_00));
    spring.codes = vec!["SPRING".into()];
    put_campaign(&mut c, &suite, spring).await;
    let mut big = campaign("big-spender", amount_off(10_00));
    big.rule = "customer.lifetime_spend >= 50000".into();
    put_campaign(&mut c, &suite, big).await;
    let order = serde_json::json!({
        "id": "h1", "customer_id": "hal", "status": "ORDER_STATUS_PAID", "currency": "USD",
        "lines": [{"sku": "TV", "quantity": 1, "unit_amount": 60000}]
    });
    let r = suite.post("/v1/orders", Some("h1"), &order).await;
    assert_eq!(r.status(), 200);
    let profile: serde_json::Value = suite
        .get("/v1/customers/hal/profile")
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(profile["aggregates"]["lifetime_spend"], 60000);
    let ask = serde_json::json!({
        "customer_id": "hal", "codes": ["SPRING"],
        "cart": {"currency": "USD", "lines": [
            {"id": "l1", "sku": "CABLE", "categories": ["av"], "quantity": 2, "unit_price": 1500}
        ]}
    });
    let r = suite.post("/v1/qualify", None, &ask).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("JSON");
    let ids: Vec<&str> = body["qualified"]
        .as_array()
        .expect("qualified")
        .iter()
        .map(|q| q["campaign_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["big-spender", "spring"]);
    assert_eq!(body["qualified"][0]["value"], 1000);
    let mut bad = ask.clone();
    bad["cart"]["lines"][0]["quantity"] = serde_json::json!(0);
    bad["cart"]["currency"] = serde_json::json!("EUR");
    let r = suite.post("/v1/qualify", None, &bad).await;
    assert_eq!(r.status(), 400);
    let error: serde_json::Value = r.json().await.expect("JSON");
    let fields: Vec<&str> = error["error"]["field_violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| v["field"].as_str().expect("field"))
        .collect();
    assert_eq!(fields, ["cart.lines.0.quantity", "cart.currency"]);
    let unknown = suite
        .post(
            "/v1/qualify",
            None,
            &serde_json::json!({"customer_id": "hal", "basket": {}}),
        )
        .await;
    assert_eq!(unknown.status(), 400);
}

async fn tier_rules_read_the_wallet(suite: TestSuite) {
    use tessera_proto::wallet::v1 as wpb;
    let mut wallet =
        tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient::new(suite.channel());
    let level = |id: &str, threshold: i64| wpb::Tier {
        id: id.into(),
        name: id.to_uppercase(),
        threshold,
        earn_multiplier_permille: 1000,
        expiry_extension_days: 0,
    };
    wallet
        .upsert_program(suite.ctx(TENANT).request(wpb::UpsertProgramRequest {
            idempotency_key: "club".into(),
            program: Some(wpb::Program {
                id: "club".into(),
                time_zone: "UTC".into(),
                expiry: Some(wpb::ExpiryPolicy {
                    policy: Some(wpb::expiry_policy::Policy::Never(wpb::NeverExpires {})),
                }),
                tiers: Some(wpb::TierPolicy {
                    basis: wpb::TierBasis::PointsEarned as i32,
                    window_days: 365,
                    grace_days: 30,
                    levels: vec![level("base", 0), level("silver", 100)],
                }),
            }),
        }))
        .await
        .expect("programme");
    wallet
        .credit(suite.ctx(TENANT).request(wpb::CreditRequest {
            idempotency_key: "earn".into(),
            customer_id: "tom".into(),
            asset: Some(wpb::Asset {
                kind: wpb::AssetKind::Points as i32,
                code: "club".into(),
            }),
            amount: 150,
            reason: "purchase".into(),
            ..Default::default()
        }))
        .await
        .expect("credit");
    let mut c = client(&suite);
    let mut silver = campaign("silver-only", amount_off(3_00));
    silver.rule = r#"tier == "silver""#.into();
    put_campaign(&mut c, &suite, silver).await;
    let ask = |program: &str| pb::QualifyRequest {
        customer_id: "tom".into(),
        cart: Some(cart(&[("A", "x", 1, 10_00)])),
        program_id: program.into(),
        ..Default::default()
    };
    let with_tier = c
        .qualify(suite.ctx(TENANT).request(ask("club")))
        .await
        .expect("qualify")
        .into_inner();
    assert_eq!(qualified_ids(&with_tier), ["silver-only"]);
    let without = c
        .qualify(suite.ctx(TENANT).request(ask("")))
        .await
        .expect("qualify")
        .into_inner();
    assert_eq!(
        reasons(&without).get("silver-only"),
        Some(&pb::Reason::RuleFalse)
    );
}
