//! The durable work queue of `libs/store` on a real database: concurrent claims take
//! different items, a lapsed claim is fenced off, failures back off and are dead-lettered
//! with their reason, dead items are listed per tenant and replayed; and a command that a
//! service refused is visible and replayable through the gateway, then delivered once.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tessera_proto::catalog::v1 as cpb;
use tessera_store::queue::commands::{self, Command};
use tessera_store::queue::{DeadLetters, Failure, Groups, NewItem, Queue, RetryPolicy, push};
use tessera_tests::{TENANT, TestSuite, backend_tests, eventually};

backend_tests!(
    claims_are_fenced_retried_and_dead_lettered,
    a_grouped_claim_keeps_each_group_within_its_cap,
    the_lag_counts_only_what_is_due,
    a_refused_command_is_replayed_over_http,
);

fn item(queue: &'static str, key: impl Into<String>) -> NewItem {
    NewItem {
        queue,
        tenant: TENANT.into(),
        key: key.into(),
        kind: "test".into(),
        payload: b"x".to_vec(),
        not_before: None,
        group: String::new(),
    }
}

async fn claims_are_fenced_retried_and_dead_lettered(suite: TestSuite) {
    // The wallet runs no worker: the queue is the test's alone.
    let db = suite.db("wallet").await;
    let quick = RetryPolicy {
        max_attempts: 2,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(5),
        schedule: Vec::new(),
    };

    // Three workers claiming at once take different items, and all of them.
    push(db.conn(), (0..300).map(|i| item("spread", format!("k{i}"))))
        .await
        .unwrap();
    assert_eq!(
        push(db.conn(), [item("spread", "k0")]).await.unwrap(),
        0,
        "a waiting key is not added twice"
    );
    let q = Queue::new(db.clone(), "wallet", "spread", quick.clone());
    let lease = Duration::from_secs(60);
    let (a, b, c) = tokio::join!(
        q.claim(120, lease),
        q.claim(120, lease),
        q.claim(120, lease)
    );
    let mut seen = HashSet::new();
    for (_, items) in [a.unwrap(), b.unwrap(), c.unwrap()] {
        for i in items {
            assert!(seen.insert(i.id), "item {} claimed twice", i.id);
        }
    }
    assert_eq!(seen.len(), 300);

    // A claim whose lease ran out is taken over, and the first owner can settle nothing.
    push(db.conn(), [item("fenced", "only")]).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "fenced", quick.clone());
    let (old, first) = q.claim(10, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 1);
    let (new, second) = q.claim(10, lease).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempts, 2);
    assert_eq!(q.complete(&old, &[first[0].id]).await.unwrap(), 0);
    q.fail(&old, &first[0], &Failure::Permanent("late".into()))
        .await
        .unwrap();
    assert_eq!(q.complete(&new, &[second[0].id]).await.unwrap(), 1);

    // A failure comes back after its backoff; the last attempt is dead-lettered.
    push(db.conn(), [item("retried", "r")]).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "retried", quick.clone());
    let (token, items) = q.claim(10, lease).await.unwrap();
    q.fail(&token, &items[0], &Failure::Retry("busy".into()))
        .await
        .unwrap();
    let again = eventually(Duration::from_secs(5), "retried item due", || async {
        let (token, items) = q.claim(10, lease).await.unwrap();
        (!items.is_empty()).then_some((token, items))
    })
    .await;
    assert_eq!(again.1[0].attempts, 2);
    q.fail(&again.0, &again.1[0], &Failure::Retry("still busy".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(q.claim(10, lease).await.unwrap().1.is_empty(), "dead");
    let letters = DeadLetters::new(db.clone(), "wallet");
    let dead = letters.dead(TENANT, "retried", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].attempts, dead[0].error.as_str()),
        (2, "still busy")
    );
    assert!(
        letters
            .dead("other", "retried", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(letters.replay("other", "retried", &[]).await.unwrap(), 0);
    assert_eq!(letters.replay(TENANT, "retried", &[]).await.unwrap(), 1);
    let (_, back) = q.claim(10, lease).await.unwrap();
    assert_eq!(back[0].attempts, 1, "a replayed item starts over");

    // A permanent failure is dead at once.
    push(db.conn(), [item("permanent", "p")]).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "permanent", RetryPolicy::default());
    let (token, items) = q.claim(10, lease).await.unwrap();
    q.fail(&token, &items[0], &Failure::Permanent("bad request".into()))
        .await
        .unwrap();
    let dead = letters.dead(TENANT, "permanent", 0, 10).await.unwrap();
    assert_eq!(dead[0].attempts, 1);

    // An unfinished item (a slice of long work done) is due again at once and its claims do
    // not use up its attempts, however many slices it takes.
    push(db.conn(), [item("sliced", "s")]).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "sliced", quick);
    for _ in 0..5 {
        let (token, items) = q.claim(10, lease).await.unwrap();
        assert_eq!(items.len(), 1, "due again at once");
        assert_eq!(items[0].attempts, 1);
        q.fail(&token, &items[0], &Failure::Unfinished)
            .await
            .unwrap();
    }
    let (token, items) = q.claim(10, lease).await.unwrap();
    assert_eq!(q.complete(&token, &[items[0].id]).await.unwrap(), 1);
    assert!(
        letters
            .dead(TENANT, "sliced", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    suite.cleanup().await;
}

async fn a_grouped_claim_keeps_each_group_within_its_cap(suite: TestSuite) {
    use sea_orm::ConnectionTrait;
    let db = suite.db("wallet").await;
    db.conn()
        .execute_unprepared(
            "CREATE TABLE test_groups (tenant_id TEXT NOT NULL, grp TEXT NOT NULL, cap INTEGER NOT NULL)",
        )
        .await
        .unwrap();
    let caps = |sql: &'static str| async { db.conn().execute_unprepared(sql).await.unwrap() };
    caps("INSERT INTO test_groups VALUES ('default', 'a', 1), ('default', 'b', 2)").await;
    let groups = Groups {
        relation: "SELECT tenant_id, grp, cap FROM test_groups",
    };
    let items = ["a", "b", "c"].into_iter().flat_map(|g| {
        (0..5).map(move |i| NewItem {
            group: g.to_string(),
            ..item("grouped", format!("{g}{i}"))
        })
    });
    push(db.conn(), items).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "grouped", RetryPolicy::default());
    let lease = Duration::from_secs(60);
    let groups_of = |items: &[tessera_store::queue::Item]| {
        let mut g: Vec<String> = items.iter().map(|i| i.group.clone()).collect();
        g.sort();
        g
    };

    // Each group up to its cap, oldest first; nothing of `c`, which has no cap (paused).
    let (token, first) = q.claim_grouped(100, lease, &groups, &[]).await.unwrap();
    assert_eq!(groups_of(&first), ["a", "b", "b"]);
    assert_eq!(first[0].key, "a0");
    // What is in flight here counts against the cap.
    let busy = vec![("a".to_string(), 1), ("b".to_string(), 2)];
    let (_, none) = q.claim_grouped(100, lease, &groups, &busy).await.unwrap();
    assert!(none.is_empty(), "{none:?}");
    q.complete(&token, &[first[0].id]).await.unwrap();
    let busy = vec![("b".to_string(), 2)];
    let (_, next) = q.claim_grouped(100, lease, &groups, &busy).await.unwrap();
    assert_eq!(groups_of(&next), ["a"]);
    assert_eq!(next[0].key, "a1");

    // `c` gets a cap: its items go too, within it.
    caps("INSERT INTO test_groups VALUES ('default', 'c', 3)").await;
    let busy = vec![("a".to_string(), 1), ("b".to_string(), 2)];
    let (_, c) = q.claim_grouped(100, lease, &groups, &busy).await.unwrap();
    assert_eq!(groups_of(&c), ["c", "c", "c"]);
    suite.cleanup().await;
}

async fn the_lag_counts_only_what_is_due(suite: TestSuite) {
    let db = suite.db("wallet").await;
    let now = tessera_store::now_micros();
    let at = |key: &str, offset: i64| NewItem {
        not_before: Some(now + offset),
        ..item("lagging", key)
    };
    // Due in an hour (a scheduled job): waiting, not late.
    push(db.conn(), [at("later", 3_600_000_000)]).await.unwrap();
    let q = Queue::new(db.clone(), "wallet", "lagging", RetryPolicy::default());
    let (depth, lag, dead) = q.report().await.unwrap();
    assert_eq!((depth, dead), (1, 0));
    assert!(lag < 1.0, "{lag}");
    // Due 30 s ago and not yet handled: 30 s late.
    push(db.conn(), [at("late", -30_000_000)]).await.unwrap();
    let (depth, lag, _) = q.report().await.unwrap();
    assert_eq!(depth, 2);
    assert!((30.0..40.0).contains(&lag), "{lag}");
    suite.cleanup().await;
}

async fn a_refused_command_is_replayed_over_http(suite: TestSuite) {
    // Eligibility reports a use of a code the catalog does not have (yet): refused, dead.
    let db = suite.db("eligibility").await;
    let request = cpb::RecordCodeUsesRequest {
        idempotency_key: "late-use".into(),
        uses: vec![cpb::CodeUse {
            code: "LATE-1".into(),
            delta: 1,
            customer_id: "alice".into(),
            order_id: "o-1".into(),
            redemption_id: "r-1".into(),
            at: None,
            spends_value: false,
        }],
    };
    commands::send(
        db.conn(),
        TENANT,
        [Command {
            path: "/tessera.catalog.v1.CatalogService/RecordCodeUses",
            key: "late-use".into(),
            request,
        }],
    )
    .await
    .unwrap();
    let dead = eventually(Duration::from_secs(10), "command dead-lettered", || async {
        let body: serde_json::Value = suite
            .get("/v1/queues/eligibility/dead")
            .await
            .json()
            .await
            .unwrap();
        (body["items"].as_array().map(Vec::len) == Some(1)).then_some(body)
    })
    .await;
    let first = &dead["items"][0];
    assert_eq!(
        first["kind"],
        "/tessera.catalog.v1.CatalogService/RecordCodeUses"
    );
    assert!(
        first["error"].as_str().unwrap().contains("LATE-1"),
        "{first}"
    );
    let (status, body) = suite
        .call(
            "GET",
            "/v1/queues/billing/dead",
            &serde_json::Value::Null,
            Some(&suite.admin_key),
        )
        .await;
    assert_eq!(status, 400, "{body}");

    // The code arrives; the command is replayed and delivered once.
    let reward = suite
        .post(
            "/v1/rewards",
            Some("late-reward"),
            &json!({"name": "Late", "currency": "USD", "effect": {"amount_off": {"amount": 100}}}),
        )
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let pool = suite
        .post(
            "/v1/code-pools",
            Some("late-pool"),
            &json!({"reward_id": reward["id"], "name": "late", "pattern": {"pattern": "L-####"}}),
        )
        .await
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let imported = suite
        .http
        .post(format!(
            "{}/v1/code-pools/{}/codes.csv",
            suite.base_url,
            pool["id"].as_str().unwrap()
        ))
        .bearer_auth(&suite.admin_key)
        .header("Idempotency-Key", "late-import")
        .header("Content-Type", "text/csv")
        .body("code\nLATE-1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);
    let replayed = suite
        .post(
            "/v1/queues/eligibility/replay",
            Some("replay-1"),
            &json!({}),
        )
        .await;
    assert_eq!(replayed.status(), 200);
    let replayed: serde_json::Value = replayed.json().await.unwrap();
    assert_eq!(replayed["replayed"], 1);
    let code = eventually(Duration::from_secs(10), "use recorded", || async {
        let code: serde_json::Value = suite.get("/v1/codes/LATE-1").await.json().await.unwrap();
        (code["status"] == "CODE_STATUS_REDEEMED").then_some(code)
    })
    .await;
    assert_eq!(
        (
            code["redeemed_by"].as_str(),
            code["order_id"].as_str(),
            code["redemptions"].as_i64()
        ),
        (Some("alice"), Some("o-1"), Some(1))
    );
    let after: serde_json::Value = suite
        .get("/v1/queues/eligibility/dead")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        after["items"].as_array().is_none_or(Vec::is_empty),
        "{after}"
    );
    suite.cleanup().await;
}
