//! What eligibility must know of the catalog's codes to accept them at checkout: each code's
//! pool, reward, customer, uses allowed, window and kill switch, and the kill switches of
//! pools and rewards. Every change to one of them sends its new state to eligibility's
//! `SyncCatalogCodes` through the command outbox, in the transaction of the change, with a
//! revision that only grows, so eligibility keeps the newest state whatever the order in
//! which deliveries arrive (docs/architecture.md, "Codes at checkout").

use sea_orm::{ConnectionTrait, QueryResult, Value};
use tessera_proto::eligibility::v1 as epb;
use tessera_runtime::Error;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, db_error, stmt};

/// eligibility's intake.
pub const SYNC: &str = "/tessera.eligibility.v1.EligibilityService/SyncCatalogCodes";
/// Codes per command.
pub const CHUNK: usize = 1_000;

/// The columns of a code eligibility is sent, in the order [`rows_written`] reads them.
pub const SYNCED_COLUMNS: &str =
    "code, pool_id, reward_id, customer_id, max_uses, starts_at, ends_at, disabled, rev";

fn synced_from_row(row: &QueryResult) -> Result<epb::CatalogCode, sea_orm::DbErr> {
    let disabled: i32 = row.try_get_by_index(7)?;
    Ok(epb::CatalogCode {
        code: row.try_get_by_index(0)?,
        pool_id: row.try_get_by_index(1)?,
        reward_id: row.try_get_by_index(2)?,
        customer_id: row
            .try_get_by_index::<Option<String>>(3)?
            .unwrap_or_default(),
        max_uses: row.try_get_by_index(4)?,
        starts_at: row
            .try_get_by_index::<Option<i64>>(5)?
            .map(micros_to_timestamp),
        ends_at: row
            .try_get_by_index::<Option<i64>>(6)?
            .map(micros_to_timestamp),
        disabled: disabled != 0,
        rev: row.try_get_by_index(8)?,
    })
}

/// The codes changed in this transaction: bumps their revision and sends their state.
pub async fn codes_changed<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    codes: &[String],
) -> Result<(), Error> {
    for chunk in codes.chunks(CHUNK) {
        let sql = format!(
            "UPDATE codes SET rev = rev + 1 WHERE tenant_id = $1 AND code IN ({}) \
             RETURNING {SYNCED_COLUMNS}",
            Db::placeholders(2, chunk.len())
        );
        let values = std::iter::once(Value::from(tenant.to_string()))
            .chain(chunk.iter().map(|c| Value::from(c.clone())));
        let rows = txn
            .query_all_raw(stmt(txn, &sql, values))
            .await
            .map_err(db_error)?;
        rows_written(txn, tenant, &rows).await?;
    }
    Ok(())
}

/// Sends eligibility the codes of `rows` (selected or returned as [`SYNCED_COLUMNS`]).
pub async fn rows_written<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    rows: &[QueryResult],
) -> Result<(), Error> {
    let mut synced = rows
        .iter()
        .map(synced_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    synced.sort_by(|a, b| a.code.cmp(&b.code));
    send(txn, tenant, synced, Vec::new()).await
}

/// A pool's or a reward's kill switch changed (`rev`: the pool's revision, the reward's
/// version).
pub async fn switch_changed<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    kind: epb::CatalogSwitchKind,
    id: &str,
    disabled: bool,
    rev: i64,
) -> Result<(), Error> {
    let switch = epb::CatalogSwitch {
        kind: kind.into(),
        id: id.to_string(),
        disabled,
        rev,
    };
    send(txn, tenant, Vec::new(), vec![switch]).await
}

async fn send<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    codes: Vec<epb::CatalogCode>,
    switches: Vec<epb::CatalogSwitch>,
) -> Result<(), Error> {
    if codes.is_empty() && switches.is_empty() {
        return Ok(());
    }
    // The key names this exact state: a replay of the same change is the same command.
    let key = match (codes.first(), codes.last(), switches.first()) {
        (Some(first), Some(last), _) => format!(
            "codes:{}:{}:{}:{}",
            first.code,
            last.code,
            codes.len(),
            codes.iter().map(|c| c.rev).max().unwrap_or_default()
        ),
        (_, _, Some(s)) => format!("switch:{}:{}:{}", s.kind, s.id, s.rev),
        _ => return Ok(()),
    };
    let request = epb::SyncCatalogCodesRequest {
        idempotency_key: key.clone(),
        codes,
        switches,
    };
    commands::send(
        txn,
        tenant,
        [Command {
            path: SYNC,
            key,
            request,
        }],
    )
    .await?;
    Ok(())
}

/// Sends every code never sent yet (`rev` 0: codes created before codes were synced), a
/// chunk per transaction; run at start. Returns how many.
pub async fn backfill(db: &Db) -> Result<u64, Error> {
    let mut after = (String::new(), String::new());
    let mut sent = 0;
    loop {
        let txn = db.begin_write().await?;
        let rows = txn
            .query_all_raw(stmt(
                &txn,
                "SELECT tenant_id, code, pool_id FROM codes WHERE (tenant_id, code) > ($1, $2) \
                 AND rev = 0 ORDER BY tenant_id, code LIMIT $3",
                [
                    after.0.clone().into(),
                    after.1.clone().into(),
                    (CHUNK as i64).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let Some(last) = rows.last() else {
            return Ok(sent);
        };
        after = (
            last.try_get_by_index(0).map_err(db_error)?,
            last.try_get_by_index(1).map_err(db_error)?,
        );
        let mut by_tenant: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for row in &rows {
            by_tenant
                .entry(row.try_get_by_index(0).map_err(db_error)?)
                .or_default()
                .push(row.try_get_by_index(1).map_err(db_error)?);
        }
        for (tenant, codes) in by_tenant {
            sent += codes.len() as u64;
            codes_changed(&txn, &tenant, &codes).await?;
        }
        txn.commit().await.map_err(db_error)?;
    }
}
