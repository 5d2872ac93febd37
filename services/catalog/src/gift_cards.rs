//! Gift-card codes are wallet accounts: publishing a gift-card code to a customer loads the
//! card's value into the wallet's gift-card asset of that code.
//!
//! The publication sends the wallet's `Credit` through the command outbox in its own
//! transaction (so the load exists exactly when the publication does), under an
//! idempotency key derived from the publication, so a retry after a crash or a lost answer
//! never loads a card twice.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as wpb;
use tessera_runtime::Error;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, db_error, stmt};

/// The wallet's credit.
const CREDIT: &str = "/tessera.wallet.v1.WalletService/Credit";

fn load(
    publication_id: &str,
    customer: &str,
    code: &str,
    value: i64,
) -> Command<wpb::CreditRequest> {
    let key = format!("catalog.gift-card:{publication_id}");
    Command {
        path: CREDIT,
        key: key.clone(),
        request: wpb::CreditRequest {
            idempotency_key: key,
            customer_id: customer.to_string(),
            asset: Some(wpb::Asset {
                kind: wpb::AssetKind::GiftCard as i32,
                code: code.to_string(),
            }),
            amount: value,
            reason: format!("gift card {code} issued"),
            ..Default::default()
        },
    }
}

/// Sends the load of `value` onto card `code` for `customer` (in the publication's
/// transaction).
pub async fn enqueue_load(
    txn: &DatabaseTransaction,
    tenant: &str,
    publication_id: &str,
    customer: &str,
    code: &str,
    value: i64,
) -> Result<(), Error> {
    commands::send(txn, tenant, [load(publication_id, customer, code, value)]).await?;
    Ok(())
}

/// Moves the loads an older version left in its own table (`wallet_commands`) onto the
/// command outbox, with the same idempotency keys; run at start.
pub async fn adopt_waiting_loads(db: &Db) -> Result<u64, Error> {
    let txn = db.begin_write().await?;
    let rows = txn
        .query_all_raw(stmt(
            &txn,
            "SELECT tenant_id, id, customer_id, card_code, amount FROM wallet_commands",
            [],
        ))
        .await
        .map_err(db_error)?;
    let mut moved = 0;
    for row in &rows {
        let tenant: String = row.try_get_by_index(0).map_err(db_error)?;
        let id: String = row.try_get_by_index(1).map_err(db_error)?;
        let customer: String = row.try_get_by_index(2).map_err(db_error)?;
        let code: String = row.try_get_by_index(3).map_err(db_error)?;
        let amount: i64 = row.try_get_by_index(4).map_err(db_error)?;
        moved += commands::send(&txn, &tenant, [load(&id, &customer, &code, amount)]).await?;
        txn.execute_raw(stmt(
            &txn,
            "DELETE FROM wallet_commands WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    }
    txn.commit().await.map_err(db_error)?;
    Ok(moved)
}
