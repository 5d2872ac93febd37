//! Eligibility's copy of the catalog's codes (`catalog_codes`) and of the kill switches of
//! pools and rewards (`catalog_switches`), each row at the newest revision it was sent.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, Value};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_store::outbox::timestamp_to_micros;
use tessera_store::{Db, db_error, insert_rows, stmt};

use super::core::PoolCode;

/// The codes of `codes` the tenant has, with their pool's and reward's switches and the
/// uses counted.
pub async fn lookup<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    codes: &[String],
) -> Result<HashMap<String, PoolCode>, Error> {
    if codes.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT c.code, c.pool_id, c.reward_id, c.customer_id, c.max_uses, c.starts_at, \
         c.ends_at, c.disabled, COALESCE(p.disabled, 0), COALESCE(r.disabled, 0), \
         COALESCE(u.uses, 0) \
         FROM catalog_codes c \
         LEFT JOIN catalog_switches p ON p.tenant_id = c.tenant_id AND p.kind = 'pool' \
           AND p.id = c.pool_id \
         LEFT JOIN catalog_switches r ON r.tenant_id = c.tenant_id AND r.kind = 'reward' \
           AND r.id = c.reward_id \
         LEFT JOIN code_usage u ON u.tenant_id = c.tenant_id AND u.code = c.code \
         WHERE c.tenant_id = $1 AND c.code IN ({})",
        Db::placeholders(2, codes.len())
    );
    let values = std::iter::once(Value::from(tenant.to_string()))
        .chain(codes.iter().map(|c| Value::from(c.clone())));
    let rows = conn
        .query_all_raw(stmt(conn, &sql, values))
        .await
        .map_err(db_error)?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in &rows {
        let flag = |i: usize| -> Result<bool, Error> {
            Ok(row.try_get_by_index::<i32>(i).map_err(db_error)? != 0)
        };
        let code = PoolCode {
            code: row.try_get_by_index(0).map_err(db_error)?,
            pool_id: row.try_get_by_index(1).map_err(db_error)?,
            reward_id: row.try_get_by_index(2).map_err(db_error)?,
            customer_id: row.try_get_by_index(3).map_err(db_error)?,
            max_uses: row.try_get_by_index(4).map_err(db_error)?,
            starts_at: row.try_get_by_index(5).map_err(db_error)?,
            ends_at: row.try_get_by_index(6).map_err(db_error)?,
            disabled: flag(7)?,
            pool_disabled: flag(8)?,
            reward_disabled: flag(9)?,
            uses: row.try_get_by_index(10).map_err(db_error)?,
        };
        out.insert(code.code.clone(), code);
    }
    Ok(out)
}

/// Stores what the catalog sent, keeping for each row the state of the highest revision.
/// Returns how many codes and switches changed.
pub async fn apply<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    codes: &[pb::CatalogCode],
    switches: &[pb::CatalogSwitch],
) -> Result<(u64, u64), Error> {
    let rows = codes
        .iter()
        .map(|c| {
            vec![
                tenant.into(),
                c.code.clone().into(),
                c.pool_id.clone().into(),
                c.reward_id.clone().into(),
                c.customer_id.clone().into(),
                c.max_uses.max(1).into(),
                c.starts_at.as_ref().map(timestamp_to_micros).into(),
                c.ends_at.as_ref().map(timestamp_to_micros).into(),
                i32::from(c.disabled).into(),
                c.rev.into(),
            ]
        })
        .collect();
    let codes_applied = insert_rows(
        txn,
        "INSERT INTO catalog_codes (tenant_id, code, pool_id, reward_id, customer_id, max_uses, \
         starts_at, ends_at, disabled, rev)",
        "ON CONFLICT (tenant_id, code) DO UPDATE SET pool_id = excluded.pool_id, \
         reward_id = excluded.reward_id, customer_id = excluded.customer_id, \
         max_uses = excluded.max_uses, starts_at = excluded.starts_at, \
         ends_at = excluded.ends_at, disabled = excluded.disabled, rev = excluded.rev \
         WHERE catalog_codes.rev < excluded.rev",
        rows,
    )
    .await?;
    let rows = switches
        .iter()
        .map(|s| {
            let kind = match s.kind() {
                pb::CatalogSwitchKind::Reward => "reward",
                _ => "pool",
            };
            vec![
                tenant.into(),
                kind.into(),
                s.id.clone().into(),
                i32::from(s.disabled).into(),
                s.rev.into(),
            ]
        })
        .collect();
    let switches_applied = insert_rows(
        txn,
        "INSERT INTO catalog_switches (tenant_id, kind, id, disabled, rev)",
        "ON CONFLICT (tenant_id, kind, id) DO UPDATE SET disabled = excluded.disabled, \
         rev = excluded.rev WHERE catalog_switches.rev < excluded.rev",
        rows,
    )
    .await?;
    Ok((codes_applied, switches_applied))
}
