//! Customer facts: tenant settings, declared attributes, profiles, orders and custom events,
//! and the aggregates rules read (rolling windows computed from the facts themselves, so
//! they are exact at any moment). Every change to a customer's facts bumps its
//! `facts_version`, which versions the cached segment membership.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, FixedOffset, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::outbox::{micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, stmt};

use crate::rules::AttrType;

pub const DAY_MICROS: i64 = 86_400_000_000;

/// Tenant settings with defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub time_zone: Tz,
    pub currency: String,
    /// Most incentives on one order (0: no limit).
    pub max_incentives_per_order: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            time_zone: chrono_tz::UTC,
            currency: "USD".into(),
            max_incentives_per_order: 0,
        }
    }
}

impl Settings {
    pub fn to_proto(&self) -> pb::Settings {
        pb::Settings {
            time_zone: self.time_zone.name().to_string(),
            currency: self.currency.clone(),
            max_incentives_per_order: self.max_incentives_per_order,
        }
    }

    /// `now` at the tenant's UTC offset (what rules see as `now`).
    pub fn local(&self, micros: i64) -> DateTime<FixedOffset> {
        let utc = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
        let offset = self
            .time_zone
            .offset_from_utc_datetime(&utc.naive_utc())
            .fix();
        utc.with_timezone(&offset)
    }
}

pub fn check_currency(v: &mut Violations, field: &str, currency: &str) {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        v.add(field, "must be an ISO 4217 code in upper case, e.g. EUR");
    }
}

pub fn check_settings(v: &mut Violations, s: Option<&pb::Settings>) -> Option<Settings> {
    let Some(s) = s else {
        v.add("settings", "is required");
        return None;
    };
    check_currency(v, "settings.currency", &s.currency);
    let zone = s.time_zone.parse::<Tz>().ok();
    if zone.is_none() {
        v.add(
            "settings.time_zone",
            "must be an IANA time zone, e.g. Europe/Rome",
        );
    }
    if s.max_incentives_per_order > 1000 {
        v.add("settings.max_incentives_per_order", "must be at most 1000");
    }
    Some(Settings {
        time_zone: zone?,
        currency: s.currency.clone(),
        max_incentives_per_order: s.max_incentives_per_order,
    })
}

pub async fn settings<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<Settings, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT time_zone, currency, max_incentives_per_order FROM settings \
             WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(Settings::default());
    };
    let zone: String = row.try_get_by_index(0).map_err(db_error)?;
    Ok(Settings {
        time_zone: zone.parse().map_err(Error::internal)?,
        currency: row.try_get_by_index(1).map_err(db_error)?,
        max_incentives_per_order: row
            .try_get_by_index::<i64>(2)
            .map_err(db_error)?
            .clamp(0, 1000) as u32,
    })
}

pub async fn put_settings(
    txn: &DatabaseTransaction,
    tenant: &str,
    s: &Settings,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO settings (tenant_id, time_zone, currency, max_incentives_per_order) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant_id) DO UPDATE SET time_zone = excluded.time_zone, \
         currency = excluded.currency, \
         max_incentives_per_order = excluded.max_incentives_per_order",
        [
            tenant.into(),
            s.time_zone.name().into(),
            s.currency.clone().into(),
            i64::from(s.max_incentives_per_order).into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Attributes.

pub fn attr_type(t: pb::ValueType) -> Option<AttrType> {
    match t {
        pb::ValueType::String => Some(AttrType::String),
        pb::ValueType::Number => Some(AttrType::Number),
        pb::ValueType::Bool => Some(AttrType::Bool),
        pb::ValueType::Date => Some(AttrType::Date),
        pb::ValueType::List => Some(AttrType::List),
        pb::ValueType::Unspecified => None,
    }
}

fn attr_name(t: AttrType) -> &'static str {
    match t {
        AttrType::String => "string",
        AttrType::Number => "number",
        AttrType::Bool => "bool",
        AttrType::Date => "date",
        AttrType::List => "list",
    }
}

fn attr_from_name(name: &str) -> Option<AttrType> {
    [
        AttrType::String,
        AttrType::Number,
        AttrType::Bool,
        AttrType::Date,
        AttrType::List,
    ]
    .into_iter()
    .find(|t| attr_name(*t) == name)
}

pub fn proto_type(t: AttrType) -> pb::ValueType {
    match t {
        AttrType::String => pb::ValueType::String,
        AttrType::Number => pb::ValueType::Number,
        AttrType::Bool => pb::ValueType::Bool,
        AttrType::Date => pb::ValueType::Date,
        AttrType::List => pb::ValueType::List,
    }
}

/// A name rules can use as a field: a-z first, then a-z, 0-9 and `_`, at most 64.
pub fn check_name(v: &mut Violations, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        v.add(
            field,
            "must start with a-z and hold only a-z, 0-9 and _ (at most 64)",
        );
    }
}

pub async fn attributes<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
) -> Result<BTreeMap<String, AttrType>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT name, type FROM attributes WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    let mut out = BTreeMap::new();
    for row in rows {
        let name: String = row.try_get_by_index(0).map_err(db_error)?;
        let t: String = row.try_get_by_index(1).map_err(db_error)?;
        out.insert(
            name,
            attr_from_name(&t).ok_or_else(|| Error::internal("unknown attribute type"))?,
        );
    }
    Ok(out)
}

/// Declares an attribute; its type cannot change.
pub async fn define_attribute(
    txn: &DatabaseTransaction,
    tenant: &str,
    name: &str,
    t: AttrType,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO attributes (tenant_id, name, type) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id, name) DO NOTHING",
        [tenant.into(), name.into(), attr_name(t).into()],
    ))
    .await
    .map_err(db_error)?;
    let existing = attributes(txn, tenant).await?;
    if existing.get(name) != Some(&t) {
        return Err(Error::new(
            tessera_runtime::Code::FailedPrecondition,
            format!("attribute '{name}' is declared with another type"),
        )
        .with_reason("ATTRIBUTE_TYPE_FIXED"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Values.

pub fn parse_date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Checks that `value` is of type `t`.
pub fn check_value(v: &mut Violations, field: &str, value: &pb::Value, t: AttrType) {
    use pb::value::Kind;
    let ok = match (&value.kind, t) {
        (Some(Kind::StringValue(s)), AttrType::String) => {
            if s.chars().count() > 1000 {
                v.add(field, "must be at most 1000 characters");
            }
            true
        }
        (Some(Kind::NumberValue(n)), AttrType::Number) => {
            if !n.is_finite() {
                v.add(field, "must be a finite number");
            }
            true
        }
        (Some(Kind::BoolValue(_)), AttrType::Bool) => true,
        (Some(Kind::DateValue(d)), AttrType::Date) => {
            if parse_date(d).is_none() {
                v.add(field, "must be a date, YYYY-MM-DD");
            }
            true
        }
        (Some(Kind::ListValue(l)), AttrType::List) => {
            if l.values.len() > 100 {
                v.add(field, "must hold at most 100 items");
            }
            true
        }
        _ => false,
    };
    if !ok {
        v.add(field, format!("must be a {} value", attr_name(t)));
    }
}

pub fn date_value(d: NaiveDate) -> cel::Value {
    let dt = d
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .fixed_offset();
    cel::Value::Timestamp(dt)
}

pub fn micros_value(micros: i64) -> cel::Value {
    cel::Value::Timestamp(
        DateTime::<Utc>::from_timestamp_micros(micros)
            .unwrap_or_default()
            .fixed_offset(),
    )
}

pub fn cel_value(value: &pb::Value) -> cel::Value {
    use pb::value::Kind;
    match &value.kind {
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::NumberValue(n)) => cel::Value::Float(*n),
        Some(Kind::BoolValue(b)) => cel::Value::Bool(*b),
        Some(Kind::DateValue(d)) => parse_date(d).map_or(cel::Value::Null, date_value),
        Some(Kind::ListValue(l)) => l.values.clone().into(),
        None => cel::Value::Null,
    }
}

// ---------------------------------------------------------------------------------------
// Customers.

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

// ---------------------------------------------------------------------------------------
// Orders and events.

pub fn check_order(v: &mut Violations, o: Option<&pb::Order>, settings: &Settings) {
    let Some(o) = o else {
        v.add("order", "is required");
        return;
    };
    if o.id.is_empty() || o.id.len() > 128 || !o.id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add("order.id", "must be 1 to 128 visible ASCII characters");
    }
    tessera_store::api::check_customer_id(v, "order.customer_id", &o.customer_id);
    if o.status() == pb::OrderStatus::Unspecified {
        v.add("order.status", "is required (PAID, RETURNED or CANCELLED)");
    }
    check_currency(v, "order.currency", &o.currency);
    if v.count() == 0 && o.currency != settings.currency {
        v.add(
            "order.currency",
            format!("must be the tenant's currency, {}", settings.currency),
        );
    }
    if o.lines.is_empty() || o.lines.len() > 500 {
        v.add("order.lines", "must hold 1 to 500 lines");
    }
    for (i, l) in o.lines.iter().enumerate() {
        if l.sku.is_empty() || l.sku.len() > 128 {
            v.add(
                format!("order.lines.{i}.sku"),
                "must be 1 to 128 characters",
            );
        }
        if !(1..=1_000_000).contains(&l.quantity) {
            v.add(
                format!("order.lines.{i}.quantity"),
                "must be 1 to 1,000,000",
            );
        }
        if !(0..=1_000_000_000_000).contains(&l.unit_amount) {
            v.add(
                format!("order.lines.{i}.unit_amount"),
                "must be 0 to 10^12 minor units",
            );
        }
    }
    use tessera_effects::wire::{MAX_CART_TOTAL, exact_total};
    if !(0..=MAX_CART_TOTAL).contains(&o.total) {
        v.add(
            "order.total",
            format!("must be 0 to {MAX_CART_TOTAL} minor units"),
        );
    }
    if !(0..=MAX_CART_TOTAL).contains(&o.returned_amount) {
        v.add(
            "order.returned_amount",
            format!("must be 0 to {MAX_CART_TOTAL} minor units"),
        );
    }
    if exact_total(o.lines.iter().map(|l| (l.quantity, l.unit_amount)), 0)
        > i128::from(MAX_CART_TOTAL)
    {
        v.add(
            "order.lines",
            format!("the order's total must be at most {MAX_CART_TOTAL} minor units"),
        );
    }
}

/// The order's total (given, or the lines') and what it adds to spend.
pub fn order_spend(o: &pb::Order) -> (i64, i64, bool) {
    let total = if o.total > 0 {
        o.total
    } else {
        o.lines
            .iter()
            .map(|l| l.unit_amount.saturating_mul(l.quantity))
            .sum()
    };
    match o.status() {
        pb::OrderStatus::Paid => (total, total - o.returned_amount.min(total), true),
        pb::OrderStatus::Returned => {
            let returned = if o.returned_amount == 0 {
                total
            } else {
                o.returned_amount.min(total)
            };
            (total, total - returned, true)
        }
        _ => (total, 0, false),
    }
}

/// Records an order (or its new status); returns the customer's facts version.
pub async fn record_order(
    txn: &DatabaseTransaction,
    tenant: &str,
    order: &pb::Order,
    now: i64,
) -> Result<i64, Error> {
    let previous = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT customer_id, spend, counts FROM orders WHERE tenant_id = $1 AND id = $2{}",
                tessera_store::Backend::of(txn).row_lock()
            ),
            [tenant.into(), order.id.clone().into()],
        ))
        .await
        .map_err(db_error)?;
    let (old_spend, old_counts) = match previous {
        Some(row) => {
            let customer: String = row.try_get_by_index(0).map_err(db_error)?;
            if customer != order.customer_id {
                return Err(Error::invalid_field(
                    "order.customer_id",
                    "differs from the customer this order was recorded for",
                ));
            }
            let spend: i64 = row.try_get_by_index(1).map_err(db_error)?;
            let counts: i32 = row.try_get_by_index(2).map_err(db_error)?;
            (spend, i64::from(counts))
        }
        None => (0, 0),
    };
    let (_, spend, counts) = order_spend(order);
    let occurred = order.occurred_at.as_ref().map_or(now, timestamp_to_micros);
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO orders (tenant_id, id, customer_id, status, body, spend, counts, \
         occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (tenant_id, id) DO UPDATE SET status = excluded.status, \
         body = excluded.body, spend = excluded.spend, counts = excluded.counts, \
         occurred_at = excluded.occurred_at",
        [
            tenant.into(),
            order.id.clone().into(),
            order.customer_id.clone().into(),
            order.status().as_str_name().into(),
            order.encode_to_vec().into(),
            spend.into(),
            i32::from(counts).into(),
            occurred.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    touch(
        txn,
        tenant,
        &order.customer_id,
        now,
        spend - old_spend,
        i64::from(counts) - old_counts,
    )
    .await
}

pub fn check_event_type(v: &mut Violations, field: &str, t: &str) {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !ok {
        v.add(field, "must be 1 to 64 of a-z, 0-9, _ and .");
    }
}

pub fn check_schema(v: &mut Violations, s: Option<&pb::EventSchema>) {
    let Some(s) = s else {
        v.add("schema", "is required");
        return;
    };
    check_event_type(v, "schema.type", &s.r#type);
    if s.properties.len() > 100 {
        v.add("schema.properties", "must hold at most 100 properties");
    }
    for (name, p) in &s.properties {
        check_name(v, &format!("schema.properties.{name}"), name);
        if p.r#type() == pb::ValueType::Unspecified {
            v.add(format!("schema.properties.{name}.type"), "is required");
        }
    }
}

pub async fn event_schema<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    event_type: &str,
) -> Result<Option<pb::EventSchema>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT definition FROM event_schemas WHERE tenant_id = $1 AND type = $2",
            [tenant.into(), event_type.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map(|row| {
        let bytes: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
        pb::EventSchema::decode(bytes.as_slice()).map_err(Error::internal)
    })
    .transpose()
}

pub async fn put_event_schema(
    txn: &DatabaseTransaction,
    tenant: &str,
    schema: &pb::EventSchema,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO event_schemas (tenant_id, type, definition) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id, type) DO UPDATE SET definition = excluded.definition",
        [
            tenant.into(),
            schema.r#type.clone().into(),
            schema.encode_to_vec().into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Checks an event's shape, and its properties against the type's schema if there is one.
pub fn check_event(
    v: &mut Violations,
    field: &str,
    e: Option<&pb::Event>,
    schema: Option<&pb::EventSchema>,
    recorded: bool,
) {
    let Some(e) = e else {
        v.add(field, "is required");
        return;
    };
    let f = |n: &str| format!("{field}.{n}");
    if recorded && (e.id.is_empty() || e.id.len() > 128) {
        v.add(f("id"), "must be 1 to 128 characters");
    }
    if recorded {
        tessera_store::api::check_customer_id(v, &f("customer_id"), &e.customer_id);
    }
    check_event_type(v, &f("type"), &e.r#type);
    if e.properties.len() > 100 {
        v.add(f("properties"), "must hold at most 100 properties");
    }
    if let Some(schema) = schema {
        for (name, value) in &e.properties {
            match schema.properties.get(name) {
                Some(p) => {
                    if let Some(t) = attr_type(p.r#type()) {
                        check_value(v, &f(&format!("properties.{name}")), value, t);
                    }
                }
                None => v.add(
                    f(&format!("properties.{name}")),
                    format!("is not in the schema of '{}'", e.r#type),
                ),
            }
        }
        for (name, p) in &schema.properties {
            if p.required && !e.properties.contains_key(name) {
                v.add(
                    f(&format!("properties.{name}")),
                    "is required by the schema",
                );
            }
        }
    } else {
        for (name, value) in &e.properties {
            if value.kind.is_none() {
                v.add(f(&format!("properties.{name}")), "has no value");
            }
        }
    }
}

/// Records an event (a replayed id is the same event); returns the facts version.
pub async fn record_event(
    txn: &DatabaseTransaction,
    tenant: &str,
    event: &pb::Event,
    now: i64,
) -> Result<i64, Error> {
    let occurred = event.occurred_at.as_ref().map_or(now, timestamp_to_micros);
    let inserted = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO events (tenant_id, id, customer_id, type, body, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, id) DO NOTHING",
            [
                tenant.into(),
                event.id.clone().into(),
                event.customer_id.clone().into(),
                event.r#type.clone().into(),
                event.encode_to_vec().into(),
                occurred.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 0 {
        return Err(Error::new(
            tessera_runtime::Code::AlreadyExists,
            format!("event '{}' was recorded already", event.id),
        )
        .with_reason("EVENT_RECORDED"));
    }
    touch(txn, tenant, &event.customer_id, now, 0, 0).await
}

// ---------------------------------------------------------------------------------------
// Aggregates.

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

/// The `event` variable (an empty event when none is given).
pub fn event_value(e: Option<&pb::Event>, now: i64) -> cel::Value {
    let properties: HashMap<String, cel::Value> = e
        .map(|e| {
            e.properties
                .iter()
                .map(|(k, v)| (k.clone(), cel_value(v)))
                .collect()
        })
        .unwrap_or_default();
    HashMap::from([
        (
            "type",
            e.map(|e| e.r#type.clone()).unwrap_or_default().into(),
        ),
        ("properties", properties.into()),
        (
            "occurred_at",
            micros_value(
                e.and_then(|e| e.occurred_at.as_ref())
                    .map_or(now, timestamp_to_micros),
            ),
        ),
    ])
    .into()
}
