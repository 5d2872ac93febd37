//! Tenant-wide wallet rules. Today one: where the law forbids gift-card value to expire, a
//! gift-card credit with an expiry is refused and turning the rule on clears the expiry of
//! every gift-card lot with value left.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::{Code, Error};
use tessera_store::{db_error, stmt};

use crate::ledger::accounts::Asset;

/// The tenant's rules (defaults when never set).
pub async fn get<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<pb::WalletRules, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT forbid_gift_card_expiry FROM tenant_rules WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    Ok(pb::WalletRules {
        forbid_gift_card_expiry: row
            .map(|r| r.try_get_by_index::<i32>(0))
            .transpose()
            .map_err(db_error)?
            .is_some_and(|v| v != 0),
    })
}

/// Replaces the tenant's rules, applying them to the value already held.
pub async fn set(
    txn: &DatabaseTransaction,
    tenant: &str,
    rules: &pb::WalletRules,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO tenant_rules (tenant_id, forbid_gift_card_expiry) VALUES ($1, $2) \
         ON CONFLICT (tenant_id) DO UPDATE SET forbid_gift_card_expiry = excluded.forbid_gift_card_expiry",
        [
            tenant.into(),
            i32::from(rules.forbid_gift_card_expiry).into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    if rules.forbid_gift_card_expiry {
        txn.execute_raw(stmt(
            txn,
            "UPDATE lots SET expires_at = NULL WHERE tenant_id = $1 AND remaining > 0 \
             AND expires_at IS NOT NULL AND account_id IN (SELECT id FROM accounts \
             WHERE tenant_id = $1 AND asset_kind = $2)",
            [tenant.into(), (pb::AssetKind::GiftCard as i32).into()],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Refuses an expiring gift-card credit where the tenant forbids it.
pub async fn check_expiry(
    txn: &DatabaseTransaction,
    tenant: &str,
    asset: &Asset,
    expires_at: Option<i64>,
    field: &str,
) -> Result<(), Error> {
    if asset.kind != pb::AssetKind::GiftCard || expires_at.is_none() {
        return Ok(());
    }
    if get(txn, tenant).await?.forbid_gift_card_expiry {
        let mut err = Error::new(
            Code::FailedPrecondition,
            format!("{field}: this tenant's gift-card value may not expire"),
        )
        .with_reason("GIFT_CARD_EXPIRY_FORBIDDEN");
        err.field_violations
            .push(tessera_runtime::error::FieldViolation::new(
                field,
                "must be unset: gift-card value may not expire for this tenant",
            ));
        return Err(err);
    }
    Ok(())
}
