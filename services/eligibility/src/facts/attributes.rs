//! Declared profile attributes and their typed values, as rules see them (CEL values).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::{db_error, stmt};

use crate::rules::AttrType;

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
