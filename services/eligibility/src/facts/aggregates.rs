//! What rules read about a customer: the profile with the aggregates over rolling windows
//! (spend, orders, events, redemptions), computed from the facts themselves, so they are
//! exact at any moment.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use sea_orm::ConnectionTrait;
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::{Error, RequestContext};
use tessera_store::outbox::{micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

use super::attributes::*;
use super::settings::*;

/// A customer's facts as rules see them.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub profile: pb::CustomerInput,
    pub aggregates: pb::Aggregates,
    pub facts_version: i64,
    pub known: bool,
}

/// Reads a customer's profile and aggregates as of `now` (three queries).
pub async fn load<C: ConnectionTrait>(
    conn: &C,
    ctx: &RequestContext,
    customer: &str,
    now: i64,
) -> Result<Facts, Error> {
    let tenant = ctx.tenant_id.as_str();
    let Some(row) = conn
        .query_one_raw(stmt(
            conn,
            "SELECT profile, facts_version, lifetime_spend, orders_total FROM customers \
             WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?
    else {
        return Ok(Facts {
            profile: pb::CustomerInput {
                id: customer.to_string(),
                ..Default::default()
            },
            ..Default::default()
        });
    };
    let profile: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let mut aggregates = pb::Aggregates {
        lifetime_spend: row.try_get_by_index(2).map_err(db_error)?,
        orders_total: row.try_get_by_index(3).map_err(db_error)?,
        ..Default::default()
    };
    let since = |days: i64| now - days * DAY_MICROS;
    let windows = conn
        .query_one_raw(stmt(
            conn,
            "SELECT \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $3 THEN spend ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $4 THEN spend ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $5 THEN spend ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $3 THEN counts ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $4 THEN counts ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN occurred_at >= $5 THEN counts ELSE 0 END), 0) AS BIGINT), \
             MAX(CASE WHEN counts = 1 THEN occurred_at END) \
             FROM orders WHERE tenant_id = $1 AND customer_id = $2",
            [
                tenant.into(),
                customer.into(),
                since(30).into(),
                since(90).into(),
                since(365).into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("aggregate returned no row"))?;
    let big = |i: usize| -> Result<i64, Error> {
        windows
            .try_get_by_index::<Option<i64>>(i)
            .map(Option::unwrap_or_default)
            .map_err(db_error)
    };
    aggregates.spend_30d = big(0)?;
    aggregates.spend_90d = big(1)?;
    aggregates.spend_365d = big(2)?;
    aggregates.orders_30d = big(3)?;
    aggregates.orders_90d = big(4)?;
    aggregates.orders_365d = big(5)?;
    aggregates.last_order_at = windows
        .try_get_by_index::<Option<i64>>(6)
        .map_err(db_error)?
        .map(micros_to_timestamp);
    let events = conn
        .query_all_raw(stmt(
            conn,
            "SELECT type, \
             CAST(SUM(CASE WHEN occurred_at >= $3 THEN 1 ELSE 0 END) AS BIGINT), \
             CAST(SUM(CASE WHEN occurred_at >= $4 THEN 1 ELSE 0 END) AS BIGINT), \
             CAST(COUNT(*) AS BIGINT) \
             FROM events WHERE tenant_id = $1 AND customer_id = $2 AND occurred_at >= $5 \
             GROUP BY type",
            [
                tenant.into(),
                customer.into(),
                since(30).into(),
                since(90).into(),
                since(365).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    for row in events {
        let t: String = row.try_get_by_index(0).map_err(db_error)?;
        let n = |i: usize| -> Result<i64, Error> {
            row.try_get_by_index::<Option<i64>>(i)
                .map(Option::unwrap_or_default)
                .map_err(db_error)
        };
        aggregates.events_30d.insert(t.clone(), n(1)?);
        aggregates.events_90d.insert(t.clone(), n(2)?);
        aggregates.events_365d.insert(t, n(3)?);
    }
    let usage = conn
        .query_all_raw(stmt(
            conn,
            "SELECT campaign_id, redemptions FROM customer_usage \
             WHERE tenant_id = $1 AND customer_id = $2",
            [tenant.into(), customer.into()],
        ))
        .await
        .map_err(db_error)?;
    for row in usage {
        aggregates.redemptions.insert(
            row.try_get_by_index(0).map_err(db_error)?,
            row.try_get_by_index(1).map_err(db_error)?,
        );
    }
    Ok(Facts {
        profile: pb::CustomerInput::decode(profile.as_slice()).map_err(Error::internal)?,
        aggregates,
        facts_version: row.try_get_by_index(1).map_err(db_error)?,
        known: true,
    })
}

fn counts(map: &BTreeMap<String, i64>) -> cel::Value {
    map.iter()
        .map(|(k, v)| (k.clone(), cel::Value::Int(*v)))
        .collect::<HashMap<String, cel::Value>>()
        .into()
}

impl Facts {
    /// The `customer` variable.
    pub fn customer_value(&self) -> cel::Value {
        let p = &self.profile;
        let a = &self.aggregates;
        let epoch = || micros_value(0);
        let attributes: HashMap<String, cel::Value> = p
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), cel_value(v)))
            .collect();
        let consents: HashMap<String, cel::Value> = p
            .consents
            .iter()
            .map(|(k, v)| (k.clone(), cel::Value::Bool(*v)))
            .collect();
        let fields: HashMap<&str, cel::Value> = HashMap::from([
            ("id", p.id.clone().into()),
            ("country", p.country.clone().into()),
            ("city", p.city.clone().into()),
            (
                "birthday",
                parse_date(&p.birthday).map_or_else(epoch, date_value),
            ),
            ("tags", p.tags.clone().into()),
            ("consents", consents.into()),
            (
                "created_at",
                p.created_at
                    .as_ref()
                    .map_or_else(epoch, |t| micros_value(timestamp_to_micros(t))),
            ),
            ("attributes", attributes.into()),
            ("lifetime_spend", cel::Value::Int(a.lifetime_spend)),
            ("spend_30d", cel::Value::Int(a.spend_30d)),
            ("spend_90d", cel::Value::Int(a.spend_90d)),
            ("spend_365d", cel::Value::Int(a.spend_365d)),
            ("orders_total", cel::Value::Int(a.orders_total)),
            ("orders_30d", cel::Value::Int(a.orders_30d)),
            ("orders_90d", cel::Value::Int(a.orders_90d)),
            ("orders_365d", cel::Value::Int(a.orders_365d)),
            (
                "last_order_at",
                a.last_order_at
                    .as_ref()
                    .map_or_else(epoch, |t| micros_value(timestamp_to_micros(t))),
            ),
            ("events_30d", counts(&a.events_30d)),
            ("events_90d", counts(&a.events_90d)),
            ("events_365d", counts(&a.events_365d)),
            ("redemptions", counts(&a.redemptions)),
        ]);
        fields.into()
    }
}
