//! What eligibility keeps about a customer, for export and erasure (GDPR): the profile and
//! facts go; redemptions, earnings and code uses stay under the pseudonym (budgets, limits
//! and the wallet's ledger count them), their stored records rewritten to it too.

use std::sync::Arc;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_store::privacy::{CustomerData, Erase, Personal};
use tessera_store::{Db, db_error, stmt};

/// The tables and what erasure does to each.
fn tables() -> Vec<Personal> {
    use Erase::{Delete, Pseudonymize};
    vec![
        Personal::new(
            "customers",
            "id",
            "id, lifetime_spend, orders_total, created_at, updated_at",
            Delete,
        ),
        Personal::new(
            "orders",
            "customer_id",
            "id, status, spend, occurred_at",
            Delete,
        ),
        Personal::new("events", "customer_id", "id, type, occurred_at", Delete),
        Personal::new("segment_members", "customer_id", "segment_id", Delete),
        Personal::new(
            "customer_usage",
            "customer_id",
            "campaign_id, redemptions",
            Delete,
        ),
        Personal::new(
            "customer_period_usage",
            "customer_id",
            "campaign_id, period_start, redemptions",
            Delete,
        ),
        Personal::new(
            "earning_caps",
            "customer_id",
            "campaign_id, rule_id, points",
            Delete,
        ),
        Personal::new(
            "redemptions",
            "customer_id",
            "id, order_id, status, created_at",
            Pseudonymize,
        ),
        Personal::new(
            "redemption_spends",
            "customer_id",
            "redemption_id, asset_code, amount",
            Pseudonymize,
        ),
        Personal::new(
            "earnings",
            "customer_id",
            "source_id, campaign_id, program_id, points, created_at",
            Pseudonymize,
        ),
        Personal::new(
            "trigger_firings",
            "customer_id",
            "campaign_id, trigger_id, fired_at",
            Pseudonymize,
        ),
        Personal::new(
            "catalog_codes",
            "customer_id",
            "code, pool_id, reward_id",
            Pseudonymize,
        ),
    ]
}

/// Eligibility's personal data: the tables, plus the profile (exported in full) and the
/// redemption records (which carry the customer id inside them).
pub fn customer_data(db: Db) -> Arc<dyn tessera_runtime::ops::CustomerData> {
    Arc::new(Eligibility {
        profile_db: db.clone(),
        tables: CustomerData::new(db, tables()).with_hook(Arc::new(|txn, tenant, _, pseudonym| {
            Box::pin(rewrite_records(txn, tenant, pseudonym))
        })),
    })
}

type Fut<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send + 'a>>;

struct Eligibility {
    profile_db: Db,
    tables: CustomerData,
}

impl tessera_runtime::ops::CustomerData for Eligibility {
    fn export<'a>(&'a self, tenant: &'a str, customer: &'a str) -> Fut<'a, serde_json::Value> {
        Box::pin(async move {
            let mut data = self.tables.export(tenant, customer).await?;
            if let Some(profile) = profile(&self.profile_db, tenant, customer).await? {
                data["profile"] = profile;
            }
            Ok(data)
        })
    }

    fn erase<'a>(
        &'a self,
        tenant: &'a str,
        customer: &'a str,
        pseudonym: &'a str,
    ) -> Fut<'a, (u64, u64)> {
        Box::pin(self.tables.erase(tenant, customer, pseudonym))
    }
}

/// The customer's stored profile as JSON.
async fn profile(
    db: &Db,
    tenant: &str,
    customer: &str,
) -> Result<Option<serde_json::Value>, Error> {
    let conn = db.conn();
    let Some(row) = conn
        .query_one_raw(stmt(
            conn,
            "SELECT profile FROM customers WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?
    else {
        return Ok(None);
    };
    let bytes: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let p = pb::CustomerInput::decode(bytes.as_slice()).map_err(Error::internal)?;
    let attributes: serde_json::Map<String, serde_json::Value> = p
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect();
    Ok(Some(serde_json::json!({
        "email": p.email,
        "phone": p.phone,
        "push_token": p.push_token,
        "locale": p.locale,
        "country": p.country,
        "city": p.city,
        "birthday": p.birthday,
        "tags": p.tags,
        "consents": p.consents,
        "attributes": attributes,
    })))
}

fn value_json(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s) | Kind::DateValue(s)) => s.clone().into(),
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::ListValue(l)) => l.values.clone().into(),
        None => serde_json::Value::Null,
    }
}

/// Rewrites the stored records of the redemptions now under `pseudonym` to name it.
async fn rewrite_records(
    txn: &DatabaseTransaction,
    tenant: &str,
    pseudonym: &str,
) -> Result<u64, Error> {
    let rows = txn
        .query_all_raw(stmt(
            txn,
            "SELECT id, record FROM redemptions WHERE tenant_id = $1 AND customer_id = $2",
            [tenant.into(), pseudonym.into()],
        ))
        .await
        .map_err(db_error)?;
    for row in &rows {
        let id: String = row.try_get_by_index(0).map_err(db_error)?;
        let record: Vec<u8> = row.try_get_by_index(1).map_err(db_error)?;
        let mut r = pb::Redemption::decode(record.as_slice()).map_err(Error::internal)?;
        r.customer_id = pseudonym.to_string();
        txn.execute_raw(stmt(
            txn,
            "UPDATE redemptions SET record = $3 WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into(), r.encode_to_vec().into()],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(0)
}
