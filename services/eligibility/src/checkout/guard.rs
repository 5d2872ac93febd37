//! Brute-force guard: failed code attempts are counted per customer and per caller in a
//! sliding window, and a caller past the limit is refused before any code is looked at.

use sea_orm::ConnectionTrait;
use serde_json::json;
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::{Code, Error};
use tessera_store::outbox::{self};
use tessera_store::{Db, db_error, stmt};

/// Unknown codes one customer may try in [`ATTEMPT_WINDOW_MICROS`].
pub const MAX_FAILED_ATTEMPTS_PER_CUSTOMER: i64 = 10;

/// Unknown codes one caller (API key, principal) may try in the window, all customers.
pub const MAX_FAILED_ATTEMPTS_PER_PRINCIPAL: i64 = 100;

/// The window of [`MAX_FAILED_ATTEMPTS`]: 15 minutes.
pub const ATTEMPT_WINDOW_MICROS: i64 = 15 * 60 * 1_000_000;

/// Refuses a customer or caller that tried too many unknown codes lately (guessing).
pub async fn check_attempts<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    subjects: &[String],
    now: i64,
) -> Result<(), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT subject, COUNT(*) FROM code_failures WHERE tenant_id = $1 AND at > $2 \
                 AND reason = 'CODE_NOT_FOUND' AND subject IN ({}) GROUP BY subject",
                Db::placeholders(3, subjects.len())
            ),
            [tenant.into(), (now - ATTEMPT_WINDOW_MICROS).into()]
                .into_iter()
                .chain(subjects.iter().map(|s| s.clone().into())),
        ))
        .await
        .map_err(db_error)?;
    for row in rows {
        let subject: String = row.try_get_by_index(0).map_err(db_error)?;
        let failures: i64 = row.try_get_by_index(1).map_err(db_error)?;
        let max = if subject.starts_with("customer:") {
            MAX_FAILED_ATTEMPTS_PER_CUSTOMER
        } else {
            MAX_FAILED_ATTEMPTS_PER_PRINCIPAL
        };
        if failures >= max {
            return Err(Error::new(
                Code::ResourceExhausted,
                "too many unknown codes tried; try again in 15 minutes",
            )
            .with_reason("CODE_ATTEMPTS_EXCEEDED"));
        }
    }
    Ok(())
}

/// Records a failed code attempt (for the limit and the audit log) and the failure event.
pub async fn record_failure(
    db: &Db,
    tenant: &str,
    subjects: &[String],
    checkout: &pb::Checkout,
    err: &Error,
    now: i64,
) -> Result<(), Error> {
    let txn = db.begin_write().await?;
    if !checkout.codes.is_empty() {
        for subject in subjects {
            txn.execute_raw(stmt(
                &txn,
                "INSERT INTO code_failures (tenant_id, subject, code, reason, at) \
                 VALUES ($1, $2, $3, $4, $5)",
                [
                    tenant.into(),
                    subject.clone().into(),
                    checkout.codes.join(",").into(),
                    err.reason.clone().unwrap_or_default().into(),
                    now.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        }
    }
    outbox::enqueue(
        &txn,
        tenant,
        "redemption.failed",
        &json!({
            "customer_id": checkout.customer_id,
            "order_id": checkout.order_id,
            "codes": checkout.codes,
            "campaign_ids": checkout.campaign_ids,
            "reason": err.reason,
            "message": err.message,
        }),
    )
    .await?;
    txn.commit().await.map_err(db_error)
}
