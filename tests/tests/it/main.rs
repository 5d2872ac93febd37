//! End-to-end tests of the foundation, each run on SQLite + in-process cache and on
//! PostgreSQL + Redis (see `tessera_tests::backend_tests!`).

mod access;
mod auth;
mod catalog;
mod catalog_http;
mod earning;
mod eligibility;
mod grpc_auth;
mod health;
mod idempotency;
mod input;
mod jobs;
mod layers;
mod messages;
mod metrics;
mod outbox;
mod policy;
mod pool_codes;
mod privacy;
mod queue;
mod redemption;
mod retention;
mod scheduler;
mod segment_cache;
mod slice;
mod source_scans;
mod tender;
mod trace;
mod wallet;
mod wallet_flows;
mod wallet_http;
mod wallet_props;
mod wallet_tiers;
mod webhooks;

use serde_json::Value;
use tessera_proto::notification::v1 as npb;
use tessera_proto::notification::v1::notification_service_client::NotificationServiceClient;
use tessera_tests::{TENANT, TestSuite, scalar};

/// Events of `event_type` that notification has received for `tenant`.
pub async fn events(suite: &TestSuite, tenant: &str, event_type: &str) -> Vec<npb::Event> {
    let mut client = NotificationServiceClient::new(suite.channel());
    client
        .list_events(suite.ctx(tenant).request(npb::ListEventsRequest {
            r#type: event_type.into(),
            page: Some(tessera_proto::common::v1::PageRequest {
                limit: 100,
                starting_after: String::new(),
            }),
        }))
        .await
        .expect("list events")
        .into_inner()
        .events
}

/// Every event notification has received for `tenant` matches the catalogue: its type is
/// listed and its payload validates against the type's current JSON Schema.
pub async fn check_catalogue(suite: &TestSuite, tenant: &str) {
    let mut client = NotificationServiceClient::new(suite.channel());
    let catalogue = client
        .list_event_types(suite.ctx(tenant).request(npb::ListEventTypesRequest {}))
        .await
        .expect("catalogue")
        .into_inner()
        .event_types;
    let validators: std::collections::HashMap<String, jsonschema::Validator> = catalogue
        .iter()
        .map(|t| {
            let schema: Value =
                serde_json::from_str(&t.schemas.last().expect("a version").json_schema)
                    .expect("schema is JSON");
            let validator = jsonschema::validator_for(&schema).expect("schema compiles");
            (t.name.clone(), validator)
        })
        .collect();
    let mut after = String::new();
    let mut checked = 0;
    loop {
        let page = client
            .list_events(suite.ctx(tenant).request(npb::ListEventsRequest {
                r#type: String::new(),
                page: Some(tessera_proto::common::v1::PageRequest {
                    limit: 100,
                    starting_after: after.clone(),
                }),
            }))
            .await
            .expect("events")
            .into_inner();
        for e in &page.events {
            let validator = validators
                .get(&e.r#type)
                .unwrap_or_else(|| panic!("`{}` is not in the event catalogue", e.r#type));
            let payload = data(e);
            let errors: Vec<String> = validator
                .iter_errors(&payload)
                .map(|err| format!("{} at {}", err, err.instance_path))
                .collect();
            assert!(
                errors.is_empty(),
                "`{}` does not match its schema: {errors:?}\n{payload}",
                e.r#type
            );
            checked += 1;
        }
        match page.page {
            Some(p) if p.has_more => after = p.next_cursor,
            _ => break,
        }
    }
    eprintln!("event catalogue: {checked} events checked");
}

/// The JSON payload of an event.
pub fn data(event: &npb::Event) -> Value {
    serde_json::from_slice(&event.data).expect("event data is JSON")
}

/// Points balance of `customer` in the default programme, via the gateway.
pub async fn points(suite: &TestSuite, customer: &str) -> i64 {
    let body: Value = suite
        .get(&format!("/v1/customers/{customer}/wallet"))
        .await
        .json()
        .await
        .expect("wallet JSON");
    body["balances"]
        .as_array()
        .expect("balances")
        .iter()
        .find(|b| b["asset"]["kind"] == "points" && b["asset"]["code"] == "default")
        .map_or(0, |b| b["available"].as_i64().expect("integer"))
}

/// The ledger's invariants: every transaction's postings sum to zero; every customer balance
/// equals its postings and its lots' remainder and is never negative; every lot's remainder is
/// what it earned less what was taken plus what was given back, within `0..=amount`; nothing
/// gives back more of a lot than its source took; the `holds` and `pending` accounts hold
/// exactly the active holds and pending credits, and so does every customer account's `held`
/// and `pending`.
pub async fn assert_ledger_invariants(suite: &TestSuite) {
    assert_tenant_ledger(&suite.db("wallet").await, TENANT).await;
}

/// [`assert_ledger_invariants`] for one tenant of a wallet database.
pub async fn assert_tenant_ledger(db: &tessera_store::Db, tenant: &str) {
    let checks = [
        (
            "transactions whose postings do not sum to zero",
            "SELECT COUNT(*) FROM (SELECT transaction_id FROM postings WHERE tenant_id = $1 \
             GROUP BY transaction_id HAVING SUM(amount) <> 0) t",
        ),
        (
            "customer balances off their postings or lots, or negative",
            "SELECT COUNT(*) FROM accounts a WHERE a.tenant_id = $1 AND a.owner_kind = 'customer' AND (\
             a.balance <> (SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) FROM postings p \
                           WHERE p.tenant_id = a.tenant_id AND p.account_id = a.id) OR \
             a.balance <> (SELECT CAST(COALESCE(SUM(l.remaining), 0) AS BIGINT) FROM lots l \
                           WHERE l.tenant_id = a.tenant_id AND l.account_id = a.id) OR a.balance < 0)",
        ),
        (
            "lots whose remainder is not earned - taken + given back, or out of range",
            "SELECT COUNT(*) FROM lots l WHERE l.tenant_id = $1 AND (l.remaining < 0 \
             OR l.remaining > l.amount OR l.remaining <> l.amount \
             - (SELECT CAST(COALESCE(SUM(c.amount), 0) AS BIGINT) FROM lot_consumptions c \
                WHERE c.tenant_id = l.tenant_id AND c.lot_id = l.id) \
             + (SELECT CAST(COALESCE(SUM(r.amount), 0) AS BIGINT) FROM lot_restorations r \
                WHERE r.tenant_id = l.tenant_id AND r.lot_id = l.id))",
        ),
        (
            "restorations exceeding what their source took",
            "SELECT COUNT(*) FROM (SELECT r.source_transaction_id, r.lot_id, SUM(r.amount) AS given \
             FROM lot_restorations r WHERE r.tenant_id = $1 \
             GROUP BY r.source_transaction_id, r.lot_id) g WHERE g.given > \
             (SELECT CAST(COALESCE(SUM(c.amount), 0) AS BIGINT) FROM lot_consumptions c \
              WHERE c.tenant_id = $1 AND c.transaction_id = g.source_transaction_id AND c.lot_id = g.lot_id)",
        ),
        (
            "holds account off the active holds",
            "SELECT (SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) FROM postings p JOIN accounts a \
               ON a.tenant_id = p.tenant_id AND a.id = p.account_id \
               WHERE p.tenant_id = $1 AND a.owner_kind = 'system' AND a.owner_id = 'holds') \
             - (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM holds \
               WHERE tenant_id = $1 AND status = 'active')",
        ),
        (
            "pending account off the pending credits",
            "SELECT (SELECT CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) FROM postings p JOIN accounts a \
               ON a.tenant_id = p.tenant_id AND a.id = p.account_id \
               WHERE p.tenant_id = $1 AND a.owner_kind = 'system' AND a.owner_id = 'pending') \
             - (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM pending_credits \
               WHERE tenant_id = $1 AND status = 'pending')",
        ),
        (
            "customer accounts whose held or pending total is off their holds or credits",
            "SELECT COUNT(*) FROM accounts a WHERE a.tenant_id = $1 AND a.owner_kind = 'customer' AND (\
             a.held <> (SELECT CAST(COALESCE(SUM(h.amount), 0) AS BIGINT) FROM holds h \
                        WHERE h.tenant_id = a.tenant_id AND h.account_id = a.id AND h.status = 'active') OR \
             a.pending <> (SELECT CAST(COALESCE(SUM(c.amount), 0) AS BIGINT) FROM pending_credits c \
                        WHERE c.tenant_id = a.tenant_id AND c.account_id = a.id AND c.status = 'pending'))",
        ),
    ];
    for (what, sql) in checks {
        assert_eq!(scalar(db, sql, vec![tenant.into()]).await, 0, "{what}");
    }
}
