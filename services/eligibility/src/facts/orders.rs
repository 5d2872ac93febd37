//! Orders: checked, and recorded (paid, returned, cancelled under the same id).

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::{db_error, stmt};

use super::profiles::*;
use super::settings::*;

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
