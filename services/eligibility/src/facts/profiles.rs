//! Customer profiles: checked, created or merged, read, listed by occasion, erased; every
//! change bumps the customer's `facts_version`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::outbox::{micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

use super::attributes::*;
use crate::rules::AttrType;

/// Checks a profile against the declared attributes.
pub fn check_customer(
    v: &mut Violations,
    field: &str,
    c: &pb::CustomerInput,
    attrs: &BTreeMap<String, AttrType>,
) {
    let f = |n: &str| format!("{field}.{n}");
    tessera_store::api::check_customer_id(v, &f("id"), &c.id);
    for (name, value) in &c.attributes {
        match attrs.get(name) {
            Some(t) => check_value(v, &f(&format!("attributes.{name}")), value, *t),
            None => v.add(
                f(&format!("attributes.{name}")),
                "is not a declared attribute (DefineAttribute first)",
            ),
        }
    }
    if !c.country.is_empty()
        && (c.country.len() != 2 || !c.country.bytes().all(|b| b.is_ascii_uppercase()))
    {
        v.add(
            f("country"),
            "must be an ISO 3166-1 alpha-2 code in upper case, e.g. GB",
        );
    }
    if c.city.chars().count() > 200 {
        v.add(f("city"), "must be at most 200 characters");
    }
    if !c.birthday.is_empty() && parse_date(&c.birthday).is_none() {
        v.add(f("birthday"), "must be a date, YYYY-MM-DD");
    }
    if c.tags.len() > 100 {
        v.add(f("tags"), "must hold at most 100 tags");
    }
    for (i, tag) in c.tags.iter().enumerate() {
        if tag.is_empty() || tag.chars().count() > 100 {
            v.add(f(&format!("tags.{i}")), "must be 1 to 100 characters");
        }
    }
    if c.consents.len() > 50 {
        v.add(f("consents"), "must hold at most 50 purposes");
    }
    if !c.email.is_empty() && !is_email(&c.email) {
        v.add(
            f("email"),
            "must be an e-mail address, e.g. ada@example.com",
        );
    }
    if !c.phone.is_empty() && !is_e164(&c.phone) {
        v.add(f("phone"), "must be in E.164 form, e.g. +393331234567");
    }
    if c.push_token.len() > 4096 {
        v.add(f("push_token"), "must be at most 4096 bytes");
    }
    if !c.locale.is_empty() && !tessera_store::api::is_locale(&c.locale) {
        v.add(f("locale"), "must be a language tag, e.g. it or it-IT");
    }
}

/// One `@` between a local part and a dotted domain, no spaces, at most 254 bytes.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `+` and 8 to 15 digits, the first not 0.
fn is_e164(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| {
        (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

/// Bumps a customer's facts version, creating an empty profile if there is none; returns
/// the new version.
pub async fn touch(
    txn: &DatabaseTransaction,
    tenant: &str,
    customer: &str,
    now: i64,
    spend_delta: i64,
    orders_delta: i64,
) -> Result<i64, Error> {
    let empty = pb::CustomerInput {
        id: customer.to_string(),
        created_at: Some(micros_to_timestamp(now)),
        ..Default::default()
    };
    let row = txn
        .query_one_raw(stmt(
            txn,
            "INSERT INTO customers (tenant_id, id, profile, facts_version, lifetime_spend, \
             orders_total, created_at, updated_at) VALUES ($1, $2, $3, 1, $4, $5, $6, $6) \
             ON CONFLICT (tenant_id, id) DO UPDATE SET \
             facts_version = customers.facts_version + 1, \
             lifetime_spend = customers.lifetime_spend + excluded.lifetime_spend, \
             orders_total = customers.orders_total + excluded.orders_total, \
             updated_at = excluded.updated_at \
             RETURNING facts_version",
            [
                tenant.into(),
                customer.into(),
                empty.encode_to_vec().into(),
                spend_delta.into(),
                orders_delta.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("upsert returned no row"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// A page of the customers whose `column` (`birthday_md` or `joined_md`) is `md` (`MM-DD`).
pub async fn customers_on<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    column: &str,
    md: &str,
    joined_before: i64,
    after: &str,
    limit: u32,
) -> Result<(Vec<String>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT id FROM customers WHERE tenant_id = $1 AND {column} = $2 AND id > $3 \
                 AND created_at < $5 ORDER BY id LIMIT $4"
            ),
            [
                tenant.into(),
                md.into(),
                after.into(),
                i64::from(limit + 1).into(),
                joined_before.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut ids = rows
        .iter()
        .map(|r| r.try_get_by_index(0))
        .collect::<Result<Vec<String>, _>>()
        .map_err(db_error)?;
    let more = ids.len() > limit as usize;
    ids.truncate(limit as usize);
    Ok((ids, more))
}

/// Creates or replaces a profile; returns it and whether it was created.
pub async fn upsert_customer(
    txn: &DatabaseTransaction,
    tenant: &str,
    input: &pb::CustomerInput,
    zone: Tz,
    now: i64,
) -> Result<(pb::Customer, bool), Error> {
    let existing = get_customer(txn, tenant, &input.id).await?;
    let mut profile = input.clone();
    profile.created_at = profile
        .created_at
        .or_else(|| {
            existing
                .as_ref()
                .and_then(|c| c.profile.as_ref()?.created_at)
        })
        .or(Some(micros_to_timestamp(now)));
    let created_at = profile.created_at.as_ref().map_or(now, timestamp_to_micros);
    let row = txn
        .query_one_raw(stmt(
            txn,
            "INSERT INTO customers (tenant_id, id, profile, facts_version, lifetime_spend, \
             orders_total, created_at, updated_at, birthday_md, joined_md) \
             VALUES ($1, $2, $3, 1, 0, 0, $4, $5, $6, $7) \
             ON CONFLICT (tenant_id, id) DO UPDATE SET profile = excluded.profile, \
             facts_version = customers.facts_version + 1, created_at = excluded.created_at, \
             updated_at = excluded.updated_at, birthday_md = excluded.birthday_md, \
             joined_md = excluded.joined_md \
             RETURNING facts_version",
            [
                tenant.into(),
                input.id.clone().into(),
                profile.encode_to_vec().into(),
                created_at.into(),
                now.into(),
                profile.birthday.get(5..).unwrap_or_default().into(),
                DateTime::<Utc>::from_timestamp_micros(created_at)
                    .unwrap_or_default()
                    .with_timezone(&zone)
                    .format("%m-%d")
                    .to_string()
                    .into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("upsert returned no row"))?;
    let version: i64 = row.try_get_by_index(0).map_err(db_error)?;
    if existing.is_none() {
        tessera_store::outbox::enqueue(
            txn,
            tenant,
            "customer.joined",
            &serde_json::json!({
                "customer_id": input.id,
                "joined_at": DateTime::<Utc>::from_timestamp_micros(created_at),
                "country": profile.country,
            }),
        )
        .await?;
    }
    Ok((
        pb::Customer {
            profile: Some(profile),
            facts_version: version,
            updated_at: Some(micros_to_timestamp(now)),
        },
        existing.is_none(),
    ))
}

pub async fn get_customer<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<Option<pb::Customer>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT profile, facts_version, updated_at FROM customers \
             WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let profile: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let updated: i64 = row.try_get_by_index(2).map_err(db_error)?;
    Ok(Some(pb::Customer {
        profile: Some(pb::CustomerInput::decode(profile.as_slice()).map_err(Error::internal)?),
        facts_version: row.try_get_by_index(1).map_err(db_error)?,
        updated_at: Some(micros_to_timestamp(updated)),
    }))
}

/// Erases a customer's facts; returns (orders, events) erased, or `None` if unknown.
pub async fn erase_customer(
    txn: &DatabaseTransaction,
    tenant: &str,
    id: &str,
) -> Result<Option<(u64, u64)>, Error> {
    let mut counts = [0u64; 4];
    for (i, sql) in [
        "DELETE FROM customers WHERE tenant_id = $1 AND id = $2",
        "DELETE FROM orders WHERE tenant_id = $1 AND customer_id = $2",
        "DELETE FROM events WHERE tenant_id = $1 AND customer_id = $2",
        "DELETE FROM segment_members WHERE tenant_id = $1 AND customer_id = $2",
    ]
    .into_iter()
    .enumerate()
    {
        counts[i] = txn
            .execute_raw(stmt(txn, sql, [tenant.into(), id.into()]))
            .await
            .map_err(db_error)?
            .rows_affected();
    }
    txn.execute_raw(stmt(
        txn,
        "DELETE FROM customer_usage WHERE tenant_id = $1 AND customer_id = $2",
        [tenant.into(), id.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok((counts.iter().any(|c| *c > 0)).then_some((counts[1], counts[2])))
}
