//! Custom events with optional schemas per type: checked and recorded.

use std::collections::HashMap;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::{db_error, stmt};

use super::attributes::*;
use super::profiles::*;

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
