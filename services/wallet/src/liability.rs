//! The tenant's liability, read from the postings: balances of the customer, `holds` and
//! `pending` accounts at the end of the range, and what moved through the `issuance`,
//! `adjustment`, `redemption`, `expiry` and `payout` accounts within it.

use std::collections::BTreeMap;

use sea_orm::ConnectionTrait;
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::Error;
use tessera_store::{db_error, stmt};

/// Liability per asset over `[from, until)` (µs since the epoch).
pub async fn liability<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    from: i64,
    until: i64,
) -> Result<Vec<pb::Liability>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT a.asset_kind, a.asset_code, \
             CASE WHEN a.owner_kind = 'customer' THEN '' ELSE a.owner_id END AS owner, \
             CAST(COALESCE(SUM(p.amount), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN p.created_at >= $2 THEN p.amount ELSE 0 END), 0) AS BIGINT) \
             FROM postings p JOIN accounts a ON a.tenant_id = p.tenant_id AND a.id = p.account_id \
             WHERE p.tenant_id = $1 AND p.created_at < $3 \
             GROUP BY a.asset_kind, a.asset_code, \
             CASE WHEN a.owner_kind = 'customer' THEN '' ELSE a.owner_id END",
            [tenant.into(), from.into(), until.into()],
        ))
        .await
        .map_err(db_error)?;
    let mut assets: BTreeMap<(i32, String), pb::Liability> = BTreeMap::new();
    for row in rows {
        let kind: i32 = row.try_get_by_index(0).map_err(db_error)?;
        let code: String = row.try_get_by_index(1).map_err(db_error)?;
        let owner: String = row.try_get_by_index(2).map_err(db_error)?;
        let closing: i64 = row.try_get_by_index(3).map_err(db_error)?;
        let moved: i64 = row.try_get_by_index(4).map_err(db_error)?;
        let entry = assets
            .entry((kind, code.clone()))
            .or_insert_with(|| pb::Liability {
                asset: Some(pb::Asset { kind, code }),
                ..Default::default()
            });
        match owner.as_str() {
            "" => entry.outstanding += closing,
            "holds" => {
                entry.outstanding += closing;
                entry.held += closing;
            }
            "pending" => entry.pending += closing,
            // Value leaving the issuer's accounts is issued value.
            "issuance" | "adjustment" => entry.issued -= moved,
            "redemption" => entry.redeemed += moved,
            "expiry" => entry.expired += moved,
            "payout" => entry.paid_out += moved,
            // `transfer` nets to zero within every transfer.
            _ => {}
        }
    }
    Ok(assets.into_values().collect())
}
