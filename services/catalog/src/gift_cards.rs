//! Gift-card codes are wallet accounts: publishing a gift-card code to a customer loads the
//! card's value into the wallet's gift-card asset of that code.
//!
//! The publication writes a command row in the same transaction (so the load exists exactly
//! when the publication does); this task delivers it to the wallet's `Credit` under an
//! idempotency key derived from the command, so a retry after a crash or a lost answer never
//! loads a card twice. Failed deliveries are retried with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::grpc::Channel;
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Db, db_error, now_micros, stmt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::SERVICE;

/// Claim on a command while it is being delivered.
const LEASE_MICROS: i64 = 30_000_000;
/// Longest wait between attempts.
const MAX_BACKOFF_MICROS: i64 = 600_000_000;

/// Records the load of `value` onto card `code` for `customer` (in the publication's
/// transaction).
pub async fn enqueue_load(
    txn: &DatabaseTransaction,
    tenant: &str,
    publication_id: &str,
    customer: &str,
    code: &str,
    value: i64,
) -> Result<(), Error> {
    let now = now_micros();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO wallet_commands (tenant_id, id, customer_id, card_code, amount, attempts, \
         last_error, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 0, '', $6, $6)",
        [
            tenant.into(),
            publication_id.into(),
            customer.into(),
            code.into(),
            value.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Delivers gift-card loads to the wallet.
pub struct Loader {
    pub db: Db,
    pub wallet: WalletServiceClient<Channel>,
    pub wake: Arc<Notify>,
}

struct Command {
    tenant: String,
    id: String,
    customer: String,
    code: String,
    amount: i64,
    attempts: i32,
    due: i64,
}

impl Loader {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.run_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "gift-card loads failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Delivers the due commands; returns how many were delivered.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let conn = self.db.conn();
        let now = now_micros();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT tenant_id, id, customer_id, card_code, amount, attempts, next_attempt_at \
                 FROM wallet_commands WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT 100",
                [now.into()],
            ))
            .await
            .map_err(db_error)?;
        let mut delivered = 0;
        for row in rows {
            let command = Command {
                tenant: row.try_get_by_index(0).map_err(db_error)?,
                id: row.try_get_by_index(1).map_err(db_error)?,
                customer: row.try_get_by_index(2).map_err(db_error)?,
                code: row.try_get_by_index(3).map_err(db_error)?,
                amount: row.try_get_by_index(4).map_err(db_error)?,
                attempts: row.try_get_by_index(5).map_err(db_error)?,
                due: row.try_get_by_index(6).map_err(db_error)?,
            };
            // Claim it (another replica may be looking at the same row).
            let claimed = conn
                .execute_raw(stmt(
                    conn,
                    "UPDATE wallet_commands SET next_attempt_at = $3 \
                     WHERE tenant_id = $1 AND id = $2 AND next_attempt_at = $4",
                    [
                        command.tenant.clone().into(),
                        command.id.clone().into(),
                        (now + LEASE_MICROS).into(),
                        command.due.into(),
                    ],
                ))
                .await
                .map_err(db_error)?
                .rows_affected();
            if claimed == 1 {
                delivered += usize::from(self.deliver(&command).await?);
            }
        }
        Ok(delivered)
    }

    async fn deliver(&self, c: &Command) -> Result<bool, Error> {
        let ctx = RequestContext::system(c.tenant.clone(), SERVICE);
        let request = wpb::CreditRequest {
            idempotency_key: format!("catalog.gift-card:{}", c.id),
            customer_id: c.customer.clone(),
            asset: Some(wpb::Asset {
                kind: wpb::AssetKind::GiftCard as i32,
                code: c.code.clone(),
            }),
            amount: c.amount,
            reason: format!("gift card {} issued", c.code),
            ..Default::default()
        };
        let conn = self.db.conn();
        match self.wallet.clone().credit(ctx.request(request)).await {
            Ok(_) => {
                conn.execute_raw(stmt(
                    conn,
                    "DELETE FROM wallet_commands WHERE tenant_id = $1 AND id = $2",
                    [c.tenant.clone().into(), c.id.clone().into()],
                ))
                .await
                .map_err(db_error)?;
                Ok(true)
            }
            Err(status) => {
                let backoff = (1_000_000i64 << c.attempts.clamp(0, 20)).min(MAX_BACKOFF_MICROS);
                tracing::warn!(
                    tenant = %c.tenant, card = %c.code, attempts = c.attempts + 1,
                    error = %status.message(), "gift-card load refused or failed; will retry"
                );
                conn.execute_raw(stmt(
                    conn,
                    "UPDATE wallet_commands SET attempts = attempts + 1, last_error = $3, \
                     next_attempt_at = $4 WHERE tenant_id = $1 AND id = $2",
                    [
                        c.tenant.clone().into(),
                        c.id.clone().into(),
                        status.message().to_string().into(),
                        (now_micros() + backoff).into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
                Ok(false)
            }
        }
    }
}
