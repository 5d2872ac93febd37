//! Code pools and codes: pools, the kill switch of a pool or a code, CSV import and export.
//! Generation jobs live in [`crate::jobs`].

use std::collections::HashMap;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, FieldViolation, RequestContext};
use tessera_store::outbox::{self, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{Db, db_error, now_micros, stmt};

use crate::pattern::{self, Pattern};
use crate::{rewards, sync};

pub const ACTIVE: &str = "active";
pub const PUBLISHED: &str = "published";
pub const REDEEMED: &str = "redeemed";
pub const DISABLED: &str = "disabled";

/// Most uses one code may allow.
pub const MAX_USES: u32 = 1_000_000;

/// Checks a pool definition; returns its pattern.
pub fn check_pool(v: &mut Violations, input: Option<&pb::CodePoolInput>) -> Option<Pattern> {
    let Some(input) = input else {
        v.add("pool", "is required");
        return None;
    };
    tessera_store::api::check_id(v, "pool.reward_id", &input.reward_id);
    if input.name.trim().is_empty() || input.name.chars().count() > 200 {
        v.add("pool.name", "must be 1 to 200 characters");
    }
    if input.max_uses > MAX_USES {
        v.add("pool.max_uses", format!("must be 0 to {MAX_USES}"));
    }
    let starts = input.starts_at.as_ref().map(timestamp_to_micros);
    let ends = input.ends_at.as_ref().map(timestamp_to_micros);
    if let (Some(s), Some(e)) = (starts, ends)
        && e <= s
    {
        v.add("pool.ends_at", "must be after starts_at");
    }
    Pattern::parse(v, "pool.pattern", input.pattern.as_ref())
}

const POOL_COLUMNS: &str = "p.id, p.definition, p.status, p.created_at, \
     (SELECT COUNT(*) FROM codes c WHERE c.tenant_id = p.tenant_id AND c.pool_id = p.id)";

fn pool_from_row(row: &QueryResult) -> Result<pb::CodePool, Error> {
    let definition: Vec<u8> = row.try_get_by_index(1).map_err(db_error)?;
    let status: String = row.try_get_by_index(2).map_err(db_error)?;
    Ok(pb::CodePool {
        id: row.try_get_by_index(0).map_err(db_error)?,
        definition: Some(
            pb::CodePoolInput::decode(definition.as_slice()).map_err(Error::internal)?,
        ),
        status: if status == ACTIVE {
            pb::PoolStatus::Active
        } else {
            pb::PoolStatus::Disabled
        }
        .into(),
        created_at: Some(micros_to_timestamp(
            row.try_get_by_index(3).map_err(db_error)?,
        )),
        code_count: row.try_get_by_index(4).map_err(db_error)?,
    })
}

/// A pool of the tenant, or NOT_FOUND.
pub async fn get_pool<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::CodePool, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "SELECT {POOL_COLUMNS} FROM code_pools p WHERE p.tenant_id = $1 AND p.id = $2"
            ),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("code pool `{id}`")))?;
    pool_from_row(&row)
}

/// Pools, newest first.
pub async fn list_pools<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    reward_id: &str,
    starting_after: &str,
    limit: u32,
) -> Result<(Vec<pb::CodePool>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {POOL_COLUMNS} FROM code_pools p WHERE p.tenant_id = $1 \
                 AND ($2 = '' OR p.reward_id = $2) AND ($3 = '' OR p.id < $3) \
                 ORDER BY p.id DESC LIMIT $4"
            ),
            [
                tenant.into(),
                reward_id.into(),
                starting_after.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut pools = rows
        .iter()
        .map(pool_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let has_more = pools.len() > limit as usize;
    pools.truncate(limit as usize);
    Ok((pools, has_more))
}

/// Creates a pool for an existing reward of the tenant.
pub async fn create_pool(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    mut input: pb::CodePoolInput,
) -> Result<pb::CodePool, Error> {
    rewards::get(txn, &ctx.tenant_id, &input.reward_id).await?;
    input.max_uses = input.max_uses.max(1);
    let id = uuid::Uuid::now_v7().to_string();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO code_pools (tenant_id, id, reward_id, definition, status, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            ctx.tenant_id.clone().into(),
            id.clone().into(),
            input.reward_id.clone().into(),
            input.encode_to_vec().into(),
            ACTIVE.into(),
            now_micros().into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let pool = get_pool(txn, &ctx.tenant_id, &id).await?;
    let data = serde_json::json!({
        "pool_id": id, "reward_id": input.reward_id, "name": input.name, "principal": ctx.principal,
    });
    outbox::enqueue(txn, &ctx.tenant_id, "code_pool.created", &data).await?;
    Ok(pool)
}

/// Replaces a pool's definition; its reward cannot change.
pub async fn update_pool(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    mut input: pb::CodePoolInput,
) -> Result<pb::CodePool, Error> {
    let current = get_pool(txn, &ctx.tenant_id, id).await?;
    let reward_id = current.definition.unwrap_or_default().reward_id;
    if input.reward_id != reward_id {
        return Err(Error::invalid_field(
            "pool.reward_id",
            format!("must stay `{reward_id}`: a pool's codes give one reward"),
        ));
    }
    input.max_uses = input.max_uses.max(1);
    txn.execute_raw(stmt(
        txn,
        "UPDATE code_pools SET definition = $3 WHERE tenant_id = $1 AND id = $2",
        [
            ctx.tenant_id.clone().into(),
            id.into(),
            input.encode_to_vec().into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let data = serde_json::json!({"pool_id": id, "name": input.name, "principal": ctx.principal});
    outbox::enqueue(txn, &ctx.tenant_id, "code_pool.updated", &data).await?;
    get_pool(txn, &ctx.tenant_id, id).await
}

/// The kill switch of a pool.
pub async fn set_pool_status(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    status: &'static str,
) -> Result<pb::CodePool, Error> {
    let changed = txn
        .query_one_raw(stmt(
            txn,
            "UPDATE code_pools SET status = $3, rev = rev + 1 \
             WHERE tenant_id = $1 AND id = $2 AND status <> $3 RETURNING rev",
            [ctx.tenant_id.clone().into(), id.into(), status.into()],
        ))
        .await
        .map_err(db_error)?;
    let pool = get_pool(txn, &ctx.tenant_id, id).await?;
    if let Some(row) = &changed {
        let rev: i64 = row.try_get_by_index(0).map_err(db_error)?;
        let kind = tessera_proto::eligibility::v1::CatalogSwitchKind::Pool;
        sync::switch_changed(txn, &ctx.tenant_id, kind, id, status == DISABLED, rev).await?;
        let data = serde_json::json!({"pool_id": id, "status": status, "principal": ctx.principal});
        outbox::enqueue(txn, &ctx.tenant_id, "code_pool.status_changed", &data).await?;
    }
    Ok(pool)
}

pub(crate) const CODE_COLUMNS: &str = "c.code, c.pool_id, c.reward_id, c.state, c.disabled, \
     c.redemptions, c.max_uses, c.customer_id, c.starts_at, c.ends_at, c.redeemed_by, \
     c.order_id, c.redeemed_at, c.redemption_id";
/// How many columns [`CODE_COLUMNS`] selects.
pub(crate) const CODE_COLUMN_COUNT: usize = 14;

/// A code from the columns [`CODE_COLUMNS`], starting at index `at`.
pub(crate) fn code_from_row(row: &QueryResult, at: usize) -> Result<pb::Code, Error> {
    let get_str =
        |i: usize| -> Result<String, Error> { row.try_get_by_index(at + i).map_err(db_error) };
    let state = get_str(3)?;
    let disabled: i32 = row.try_get_by_index(at + 4).map_err(db_error)?;
    let text = |i: usize| -> Result<String, Error> {
        Ok(row
            .try_get_by_index::<Option<String>>(at + i)
            .map_err(db_error)?
            .unwrap_or_default())
    };
    let time = |i: usize| -> Result<Option<prost_types::Timestamp>, Error> {
        let t: Option<i64> = row.try_get_by_index(at + i).map_err(db_error)?;
        Ok(t.map(micros_to_timestamp))
    };
    Ok(pb::Code {
        code: get_str(0)?,
        pool_id: get_str(1)?,
        reward_id: get_str(2)?,
        status: code_status(&state, disabled != 0).into(),
        redemptions: row.try_get_by_index(at + 5).map_err(db_error)?,
        max_uses: row.try_get_by_index(at + 6).map_err(db_error)?,
        customer_id: row
            .try_get_by_index::<Option<String>>(at + 7)
            .map_err(db_error)?
            .unwrap_or_default(),
        starts_at: time(8)?,
        ends_at: time(9)?,
        redeemed_by: text(10)?,
        order_id: text(11)?,
        redeemed_at: time(12)?,
        redemption_id: text(13)?,
    })
}

fn code_status(state: &str, disabled: bool) -> pb::CodeStatus {
    match state {
        _ if disabled => pb::CodeStatus::Disabled,
        PUBLISHED => pb::CodeStatus::Published,
        REDEEMED => pb::CodeStatus::Redeemed,
        _ => pb::CodeStatus::Active,
    }
}

/// A code of the tenant (any case), or NOT_FOUND.
pub async fn get_code<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    code: &str,
    lock: &str,
) -> Result<pb::Code, Error> {
    let code = pattern::normalize(code);
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "SELECT {CODE_COLUMNS} FROM codes c WHERE c.tenant_id = $1 AND c.code = $2{lock}"
            ),
            [tenant.into(), code.clone().into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("code `{code}`")))?;
    code_from_row(&row, 0)
}

/// The kill switch of one code: DISABLED, or ACTIVE (back to its lifecycle state).
pub async fn set_code_status(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    code: &str,
    disabled: bool,
) -> Result<pb::Code, Error> {
    let code = pattern::normalize(code);
    let changed = txn
        .execute_raw(stmt(
            txn,
            "UPDATE codes SET disabled = $3 WHERE tenant_id = $1 AND code = $2 AND disabled <> $3",
            [
                ctx.tenant_id.clone().into(),
                code.clone().into(),
                i32::from(disabled).into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .rows_affected();
    if changed > 0 {
        sync::codes_changed(txn, &ctx.tenant_id, std::slice::from_ref(&code)).await?;
    }
    let current = get_code(txn, &ctx.tenant_id, &code, "").await?;
    if changed > 0 {
        let data = serde_json::json!({
            "code": code, "pool_id": current.pool_id, "disabled": disabled, "principal": ctx.principal,
        });
        outbox::enqueue(txn, &ctx.tenant_id, "code.status_changed", &data).await?;
    }
    Ok(current)
}

/// Applies the uses eligibility counted (`delta` +1: a redemption or reservation took one;
/// -1: given back), in order: the code's count, its state (redeemed when no use is left;
/// back to published or active when one is given back) and its last redemption.
pub async fn record_uses(
    txn: &DatabaseTransaction,
    tenant: &str,
    uses: &[pb::CodeUse],
) -> Result<Vec<pb::Code>, Error> {
    let mut out = Vec::with_capacity(uses.len());
    for u in uses {
        let code = pattern::normalize(&u.code);
        let at = u.at.as_ref().map_or_else(now_micros, timestamp_to_micros);
        txn.execute_raw(stmt(
            txn,
            "UPDATE codes SET \
                 redemptions = CASE WHEN redemptions + $3 < 0 THEN 0 ELSE redemptions + $3 END, \
                 state = CASE WHEN $8 = 0 AND redemptions + $3 >= max_uses THEN 'redeemed' \
                   WHEN customer_id IS NOT NULL THEN 'published' ELSE 'active' END, \
                 redeemed_by = CASE WHEN $3 > 0 THEN $4 WHEN redemptions + $3 <= 0 THEN NULL \
                   ELSE redeemed_by END, \
                 order_id = CASE WHEN $3 > 0 THEN $5 WHEN redemptions + $3 <= 0 THEN NULL \
                   ELSE order_id END, \
                 redeemed_at = CASE WHEN $3 > 0 THEN $6 WHEN redemptions + $3 <= 0 THEN NULL \
                   ELSE redeemed_at END, \
                 redemption_id = CASE WHEN $3 > 0 THEN $7 WHEN redemptions + $3 <= 0 THEN NULL \
                   ELSE redemption_id END \
                 WHERE tenant_id = $1 AND code = $2",
            [
                tenant.into(),
                code.clone().into(),
                i64::from(u.delta).into(),
                u.customer_id.clone().into(),
                u.order_id.clone().into(),
                at.into(),
                u.redemption_id.clone().into(),
                // A multi-use gift card's uses do not use it up.
                i32::from(u.spends_value).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        out.push(get_code(txn, tenant, &code, "").await?);
    }
    Ok(out)
}

/// A new code row for [`insert_codes`]: code, pool, reward, max uses, window, job.
pub(crate) fn code_row(
    tenant: &str,
    pool: &pb::CodePool,
    code: String,
    max_uses: i64,
    window: (Option<i64>, Option<i64>),
    job_id: Option<&str>,
    now: i64,
) -> Vec<sea_orm::Value> {
    let definition = pool.definition.clone().unwrap_or_default();
    vec![
        tenant.into(),
        code.into(),
        pool.id.clone().into(),
        definition.reward_id.into(),
        ACTIVE.into(),
        0i32.into(),
        0i64.into(),
        max_uses.into(),
        window.0.into(),
        window.1.into(),
        job_id.map(str::to_owned).into(),
        now.into(),
        // The first revision eligibility is sent.
        1i64.into(),
    ]
}

/// Inserts the codes built by [`code_row`], skipping codes the tenant already has, and
/// sends the new ones to eligibility ([`sync`]), a chunk per statement (the insert returns
/// what it wrote). Returns how many were new.
pub(crate) async fn insert_codes<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    codes: Vec<String>,
    row: impl Fn(String) -> Vec<sea_orm::Value>,
) -> Result<u64, Error> {
    let mut inserted = 0;
    for chunk in codes.chunks(sync::CHUNK) {
        let rows: Vec<Vec<sea_orm::Value>> = chunk.iter().cloned().map(&row).collect();
        let arity = rows.first().map_or(0, Vec::len);
        let sql = format!(
            "INSERT INTO codes (tenant_id, code, pool_id, reward_id, state, disabled, \
             redemptions, max_uses, starts_at, ends_at, job_id, created_at, rev) VALUES {} \
             ON CONFLICT (tenant_id, code) DO NOTHING RETURNING {}",
            tessera_store::tuples(1, arity, rows.len()),
            sync::SYNCED_COLUMNS,
        );
        let written = conn
            .query_all_raw(stmt(conn, &sql, rows.into_iter().flatten()))
            .await
            .map_err(db_error)?;
        inserted += written.len() as u64;
        sync::rows_written(conn, tenant, &written).await?;
    }
    Ok(inserted)
}

/// A pool's own validity window, which its codes carry (µs).
pub(crate) fn pool_window(pool: &pb::CodePool) -> (Option<i64>, Option<i64>) {
    let d = pool.definition.clone().unwrap_or_default();
    (
        d.starts_at.as_ref().map(timestamp_to_micros),
        d.ends_at.as_ref().map(timestamp_to_micros),
    )
}

/// Most bytes one import may carry.
pub const MAX_IMPORT_BYTES: usize = 64 * 1024 * 1024;
/// Most row errors reported.
const MAX_ROW_ERRORS: usize = 100;

struct ImportRow {
    row: i64,
    code: String,
    max_uses: i64,
    window: (Option<i64>, Option<i64>),
}

fn parse_time(value: &str) -> Result<Option<i64>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| Some(t.timestamp_micros()))
        .map_err(|_| "must be an RFC 3339 time, e.g. 2026-12-24T00:00:00Z".to_string())
}

/// Parses the CSV: good rows and row errors (row 1 is the first after the header).
fn parse_csv(
    csv_bytes: &[u8],
    pool: &pb::CodePool,
) -> Result<(Vec<ImportRow>, Vec<pb::RowError>), Error> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(csv_bytes);
    let headers = reader
        .headers()
        .map_err(|e| Error::invalid_field("csv", format!("has no readable header row: {e}")))?
        .clone();
    let mut column = HashMap::new();
    for (i, name) in headers.iter().enumerate() {
        match name {
            "code" | "max_uses" | "starts_at" | "ends_at" => {
                if column.insert(name.to_string(), i).is_some() {
                    return Err(Error::invalid_field(
                        "csv.header",
                        format!("repeats `{name}`"),
                    ));
                }
            }
            other => {
                return Err(Error::invalid_field(
                    "csv.header",
                    format!("has unknown column `{other}`: use code, max_uses, starts_at, ends_at"),
                ));
            }
        }
    }
    if !column.contains_key("code") {
        return Err(Error::invalid_field("csv.header", "needs a `code` column"));
    }
    let default_uses = i64::from(pool.definition.as_ref().map_or(1, |d| d.max_uses.max(1)));
    let (pool_start, pool_end) = pool_window(pool);
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, i64> = HashMap::new();
    for (i, record) in reader.records().enumerate() {
        let row = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        let mut problems: Vec<(&str, String)> = Vec::new();
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                errors.push(pb::RowError {
                    row,
                    field: "row".into(),
                    description: format!("is not valid CSV: {e}"),
                });
                continue;
            }
        };
        let cell = |name: &str| column.get(name).and_then(|&i| record.get(i)).unwrap_or("");
        let code = pattern::normalize(cell("code"));
        if !pattern::is_code(&code) {
            problems.push(("code", "must be 1 to 64 of A-Z, 0-9, - and _".into()));
        } else if let Some(first) = seen.get(&code) {
            problems.push(("code", format!("repeats row {first}")));
        }
        let max_uses = match cell("max_uses") {
            "" => default_uses,
            s => match s.parse::<i64>() {
                Ok(n) if (1..=i64::from(MAX_USES)).contains(&n) => n,
                _ => {
                    problems.push(("max_uses", format!("must be 1 to {MAX_USES}")));
                    0
                }
            },
        };
        let mut time = |name: &'static str, default: Option<i64>| match parse_time(cell(name)) {
            Ok(t) => t.or(default),
            Err(e) => {
                problems.push((name, e));
                None
            }
        };
        let window = (time("starts_at", pool_start), time("ends_at", pool_end));
        if let (Some(s), Some(e)) = window
            && e <= s
        {
            problems.push(("ends_at", "must be after starts_at".into()));
        }
        if problems.is_empty() {
            seen.insert(code.clone(), row);
            rows.push(ImportRow {
                row,
                code,
                max_uses,
                window,
            });
        }
        errors.extend(
            problems
                .into_iter()
                .map(|(field, description)| pb::RowError {
                    row,
                    field: field.into(),
                    description,
                }),
        );
    }
    Ok((rows, errors))
}

/// Imports CSV codes into a pool in one transaction: every row, or (unless
/// `allow_partial`) none when a row is bad or its code exists already in the tenant.
pub async fn import(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    pool_id: &str,
    csv_bytes: &[u8],
    allow_partial: bool,
) -> Result<pb::ImportCodesResponse, Error> {
    let pool = get_pool(txn, &ctx.tenant_id, pool_id).await?;
    let (mut rows, mut errors) = parse_csv(csv_bytes, &pool)?;
    // Codes the tenant has already (in any pool).
    let mut existing = std::collections::HashSet::new();
    for chunk in rows.chunks(1_000) {
        let sql = format!(
            "SELECT code FROM codes WHERE tenant_id = $1 AND code IN ({})",
            Db::placeholders(2, chunk.len())
        );
        let values = std::iter::once(ctx.tenant_id.clone().into())
            .chain(chunk.iter().map(|r| r.code.clone().into()));
        for row in txn
            .query_all_raw(stmt(txn, &sql, values))
            .await
            .map_err(db_error)?
        {
            existing.insert(row.try_get_by_index::<String>(0).map_err(db_error)?);
        }
    }
    rows.retain(|r| {
        let exists = existing.contains(&r.code);
        if exists {
            errors.push(pb::RowError {
                row: r.row,
                field: "code".into(),
                description: "exists already".into(),
            });
        }
        !exists
    });
    errors.sort_by_key(|e| e.row);
    if !errors.is_empty() && !allow_partial {
        let total = errors.len();
        let mut err = Error::invalid(
            errors
                .iter()
                .take(MAX_ROW_ERRORS)
                .map(|e| {
                    FieldViolation::new(
                        format!("rows.{}.{}", e.row, e.field),
                        e.description.clone(),
                    )
                })
                .collect(),
        );
        err.message = format!("{total} bad rows; nothing was imported");
        return Err(err.with_reason("BAD_ROWS"));
    }
    let now = now_micros();
    let wanted = rows.len() as u64;
    let mut windows = HashMap::with_capacity(rows.len());
    let texts = rows
        .into_iter()
        .map(|r| {
            windows.insert(r.code.clone(), (r.max_uses, r.window));
            r.code
        })
        .collect();
    let imported = insert_codes(txn, &ctx.tenant_id, texts, |code| {
        let (max_uses, window) = windows[&code];
        code_row(&ctx.tenant_id, &pool, code, max_uses, window, None, now)
    })
    .await?;
    if imported < wanted && !allow_partial {
        return Err(Error::new(
            Code::Aborted,
            "some codes were created by another request meanwhile; retry the import",
        )
        .with_reason("CONCURRENT_IMPORT"));
    }
    let data = serde_json::json!({
        "pool_id": pool_id, "imported": imported, "refused": errors.len(), "principal": ctx.principal,
    });
    outbox::enqueue(txn, &ctx.tenant_id, "code_pool.imported", &data).await?;
    errors.truncate(MAX_ROW_ERRORS);
    Ok(pb::ImportCodesResponse {
        imported: i64::try_from(imported).unwrap_or(i64::MAX),
        errors,
    })
}

/// Rows per exported chunk.
pub const EXPORT_PAGE: i64 = 5_000;

/// One chunk of a pool's CSV export after `after` (a code; empty for the first chunk, which
/// also carries the header). Returns the bytes and the last code, `None` when done.
pub async fn export_page<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    pool_id: &str,
    after: &str,
) -> Result<(Vec<u8>, Option<String>), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {CODE_COLUMNS} FROM codes c WHERE c.tenant_id = $1 AND c.pool_id = $2 \
                 AND c.code > $3 ORDER BY c.code LIMIT $4"
            ),
            [
                tenant.into(),
                pool_id.into(),
                after.into(),
                EXPORT_PAGE.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut out = csv::Writer::from_writer(Vec::new());
    if after.is_empty() {
        out.write_record([
            "code",
            "status",
            "redemptions",
            "max_uses",
            "customer_id",
            "starts_at",
            "ends_at",
            "redeemed_by",
            "order_id",
            "redeemed_at",
        ])
        .map_err(Error::internal)?;
    }
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp_micros(timestamp_to_micros(t)))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            .unwrap_or_default()
    };
    let mut last = None;
    for row in &rows {
        let c = code_from_row(row, 0)?;
        let status = match c.status() {
            pb::CodeStatus::Published => PUBLISHED,
            pb::CodeStatus::Redeemed => REDEEMED,
            pb::CodeStatus::Disabled => DISABLED,
            _ => ACTIVE,
        };
        out.write_record([
            c.code.as_str(),
            status,
            &c.redemptions.to_string(),
            &c.max_uses.to_string(),
            &c.customer_id,
            &time(&c.starts_at),
            &time(&c.ends_at),
            &c.redeemed_by,
            &c.order_id,
            &time(&c.redeemed_at),
        ])
        .map_err(Error::internal)?;
        last = Some(c.code);
    }
    let bytes = out.into_inner().map_err(Error::internal)?;
    let more = rows.len() as i64 == EXPORT_PAGE;
    Ok((bytes, last.filter(|_| more)))
}

/// What an import's idempotency key is bound to: the header and a digest of the bytes.
pub fn import_fingerprint(header: &pb::ImportHeader, csv_bytes: &[u8]) -> pb::ImportCodesRequest {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(header.encode_to_vec());
    hasher.update(csv_bytes);
    pb::ImportCodesRequest {
        part: Some(pb::import_codes_request::Part::Chunk(
            hasher.finalize().to_vec(),
        )),
    }
}
