//! Publication: a reward (and a code) assigned to a customer, where it was shown, and the
//! customer's rewards with their state now.

use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::outbox::{self, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{Backend, Db, db_error, now_micros, stmt};

use crate::codes::{self, CODE_COLUMNS, code_from_row};
use crate::{gift_cards, rewards, sync};

/// What to publish.
pub struct Publish {
    pub customer_id: String,
    pub reward_id: String,
    pub code: String,
    pub pool_id: String,
    pub channel: String,
}

fn unavailable(reason: &str, message: String) -> Error {
    Error::new(Code::FailedPrecondition, message).with_reason(reason)
}

/// The next free code of a pool, locked for this transaction. On PostgreSQL concurrent
/// publishers skip each other's locked rows, so each gets a different code.
async fn next_free_code(
    txn: &DatabaseTransaction,
    backend: Backend,
    tenant: &str,
    pool_id: &str,
) -> Result<Option<String>, Error> {
    let lock = match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT code FROM codes WHERE tenant_id = $1 AND pool_id = $2 AND state = $3 \
                 AND disabled = 0 AND customer_id IS NULL AND (ends_at IS NULL OR ends_at > $4) \
                 ORDER BY code LIMIT 1{lock}"
            ),
            [
                tenant.into(),
                pool_id.into(),
                codes::ACTIVE.into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    row.map(|r| r.try_get_by_index(0).map_err(db_error))
        .transpose()
}

/// Assigns a reward (with a given code, the next free code of a pool, or none) to a customer.
pub async fn publish(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    p: Publish,
) -> Result<pb::Publication, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let code = if !p.pool_id.is_empty() {
        let pool = codes::get_pool(txn, tenant, &p.pool_id).await?;
        if pool.status != pb::PoolStatus::Active as i32 {
            return Err(unavailable(
                "POOL_DISABLED",
                format!("code pool `{}` is disabled", p.pool_id),
            ));
        }
        let code = next_free_code(txn, backend, tenant, &p.pool_id)
            .await?
            .ok_or_else(|| {
                unavailable(
                    "POOL_EXHAUSTED",
                    format!("code pool `{}` has no free code", p.pool_id),
                )
            })?;
        Some(codes::get_code(txn, tenant, &code, "").await?)
    } else if !p.code.is_empty() {
        let code = codes::get_code(txn, tenant, &p.code, backend.row_lock()).await?;
        let pool = codes::get_pool(txn, tenant, &code.pool_id).await?;
        if pool.status != pb::PoolStatus::Active as i32 {
            return Err(unavailable(
                "POOL_DISABLED",
                format!("code pool `{}` is disabled", pool.id),
            ));
        }
        if code.status != pb::CodeStatus::Active as i32 || !code.customer_id.is_empty() {
            return Err(unavailable(
                "CODE_UNAVAILABLE",
                format!("code `{}` is disabled, published or redeemed", code.code),
            ));
        }
        if code
            .ends_at
            .as_ref()
            .is_some_and(|e| timestamp_to_micros(e) <= now)
        {
            return Err(unavailable(
                "CODE_EXPIRED",
                format!("code `{}` has expired", code.code),
            ));
        }
        Some(code)
    } else {
        None
    };
    let reward_id = match &code {
        Some(c) if !p.reward_id.is_empty() && p.reward_id != c.reward_id => {
            return Err(Error::invalid_field(
                "reward_id",
                format!("is not the reward of code `{}`", c.code),
            ));
        }
        Some(c) => c.reward_id.clone(),
        None => p.reward_id.clone(),
    };
    let reward = rewards::get(txn, tenant, &reward_id).await?;
    match rewards::usable(&reward, now) {
        // A reward that starts later may be published ahead of time.
        Err(("REWARD_NOT_STARTED", _)) | Ok(()) => {}
        Err((reason, message)) => return Err(unavailable(reason, message)),
    }
    if let Some(c) = &code {
        txn.execute_raw(stmt(
            txn,
            "UPDATE codes SET state = $3, customer_id = $4 WHERE tenant_id = $1 AND code = $2",
            [
                tenant.into(),
                c.code.clone().into(),
                codes::PUBLISHED.into(),
                p.customer_id.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        sync::codes_changed(txn, tenant, std::slice::from_ref(&c.code)).await?;
    }
    let id = uuid::Uuid::now_v7().to_string();
    let code_text = code.map(|c| c.code);
    let effect = reward.definition.as_ref().and_then(|d| d.effect.as_ref());
    if let Some(pb::effect::Kind::GiftCard(card)) = effect.and_then(|e| e.kind.as_ref()) {
        let Some(code) = &code_text else {
            return Err(unavailable(
                "GIFT_CARD_NEEDS_CODE",
                format!(
                    "gift-card reward `{reward_id}` is published with a code (code or pool_id)"
                ),
            ));
        };
        gift_cards::enqueue_load(txn, tenant, &id, &p.customer_id, code, card.value).await?;
    }
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO publications (tenant_id, id, customer_id, reward_id, code, channel, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [
            tenant.into(),
            id.clone().into(),
            p.customer_id.clone().into(),
            reward_id.clone().into(),
            code_text.clone().into(),
            p.channel.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let data = serde_json::json!({
        "publication_id": id, "customer_id": p.customer_id, "reward_id": reward_id,
        "code": code_text, "channel": p.channel, "principal": ctx.principal,
    });
    outbox::enqueue(txn, tenant, "reward.published", &data).await?;
    get(txn, tenant, &id).await
}

const PUBLICATION_COLUMNS: &str =
    "p.id, p.customer_id, p.reward_id, p.code, p.channel, p.created_at";

fn publication_from_row(row: &QueryResult) -> Result<pb::Publication, Error> {
    Ok(pb::Publication {
        id: row.try_get_by_index(0).map_err(db_error)?,
        customer_id: row.try_get_by_index(1).map_err(db_error)?,
        reward_id: row.try_get_by_index(2).map_err(db_error)?,
        code: row
            .try_get_by_index::<Option<String>>(3)
            .map_err(db_error)?
            .unwrap_or_default(),
        channel: row.try_get_by_index(4).map_err(db_error)?,
        created_at: Some(micros_to_timestamp(
            row.try_get_by_index(5).map_err(db_error)?,
        )),
        shown: Vec::new(),
    })
}

/// Fills in where each publication was shown (one query).
async fn with_views<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    publications: &mut [&mut pb::Publication],
) -> Result<(), Error> {
    if publications.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "SELECT publication_id, channel, shown_at FROM publication_views WHERE tenant_id = $1 \
         AND publication_id IN ({}) ORDER BY shown_at, channel",
        Db::placeholders(2, publications.len())
    );
    let values =
        std::iter::once(tenant.into()).chain(publications.iter().map(|p| p.id.clone().into()));
    for row in conn
        .query_all_raw(stmt(conn, &sql, values))
        .await
        .map_err(db_error)?
    {
        let id: String = row.try_get_by_index(0).map_err(db_error)?;
        if let Some(p) = publications.iter_mut().find(|p| p.id == id) {
            p.shown.push(pb::ChannelView {
                channel: row.try_get_by_index(1).map_err(db_error)?,
                shown_at: Some(micros_to_timestamp(
                    row.try_get_by_index(2).map_err(db_error)?,
                )),
            });
        }
    }
    Ok(())
}

/// A publication of the tenant, or NOT_FOUND.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::Publication, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {PUBLICATION_COLUMNS} FROM publications p WHERE p.tenant_id = $1 AND p.id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("publication `{id}`")))?;
    let mut publication = publication_from_row(&row)?;
    with_views(conn, tenant, &mut [&mut publication]).await?;
    Ok(publication)
}

/// Records that a publication was shown on a channel (the first time counts).
pub async fn mark_shown(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    channel: &str,
    customer_id: &str,
) -> Result<pb::Publication, Error> {
    let publication = get(txn, &ctx.tenant_id, id).await?;
    if !customer_id.is_empty() && publication.customer_id != customer_id {
        return Err(Error::not_found(format!(
            "publication `{id}` of customer `{customer_id}`"
        )));
    }
    let added = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO publication_views (tenant_id, publication_id, channel, shown_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, publication_id, channel) DO NOTHING",
            [
                ctx.tenant_id.clone().into(),
                id.into(),
                channel.into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .rows_affected();
    if added > 0 {
        let data = serde_json::json!({
            "publication_id": id, "customer_id": publication.customer_id,
            "reward_id": publication.reward_id, "channel": channel,
        });
        outbox::enqueue(txn, &ctx.tenant_id, "reward.shown", &data).await?;
    }
    get(txn, &ctx.tenant_id, id).await
}

/// A customer's rewards, newest first, with their state at `now` (computed in SQL so the
/// status filter and the page agree).
pub async fn list_for_customer<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    status: i32,
    starting_after: &str,
    limit: u32,
) -> Result<(Vec<pb::CustomerReward>, bool), Error> {
    use pb::CustomerRewardStatus as S;
    let state_now = format!(
        "CASE \
           WHEN r.status <> 'active' OR cp.status = 'disabled' OR c.disabled = 1 THEN {disabled} \
           WHEN c.state = 'redeemed' THEN {redeemed} \
           WHEN (r.ends_at IS NOT NULL AND r.ends_at <= $3) \
             OR (c.ends_at IS NOT NULL AND c.ends_at <= $3) THEN {expired} \
           WHEN r.starts_at > $3 OR (c.starts_at IS NOT NULL AND c.starts_at > $3) THEN {scheduled} \
           ELSE {available} END",
        disabled = S::Disabled as i32,
        redeemed = S::Redeemed as i32,
        expired = S::Expired as i32,
        scheduled = S::Scheduled as i32,
        available = S::Available as i32,
    );
    let sql = format!(
        "SELECT {PUBLICATION_COLUMNS}, r.id, r.definition, r.status, r.version, r.created_at, \
         r.updated_at, {CODE_COLUMNS}, {state_now} \
         FROM publications p JOIN rewards r ON r.tenant_id = p.tenant_id AND r.id = p.reward_id \
         LEFT JOIN codes c ON c.tenant_id = p.tenant_id AND c.code = p.code \
         LEFT JOIN code_pools cp ON cp.tenant_id = c.tenant_id AND cp.id = c.pool_id \
         WHERE p.tenant_id = $1 AND p.customer_id = $2 AND ($4 = '' OR p.id < $4) \
         AND ($5 = 0 OR {state_now} = $5) ORDER BY p.id DESC LIMIT $6"
    );
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &sql,
            [
                tenant.into(),
                customer_id.into(),
                now_micros().into(),
                starting_after.into(),
                status.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let has_more = rows.len() > limit as usize;
    let mut out = Vec::new();
    for row in rows.iter().take(limit as usize) {
        let publication = publication_from_row(row)?;
        let reward = rewards::from_row_at(row, 6)?;
        let has_code: Option<String> = row.try_get_by_index(12).map_err(db_error)?;
        let code = has_code.map(|_| code_from_row(row, 12)).transpose()?;
        let state: i32 = row
            .try_get_by_index(12 + codes::CODE_COLUMN_COUNT)
            .map_err(db_error)?;
        out.push(pb::CustomerReward {
            publication: Some(publication),
            reward: Some(reward),
            code,
            status: state,
        });
    }
    let mut publications: Vec<&mut pb::Publication> = out
        .iter_mut()
        .filter_map(|r| r.publication.as_mut())
        .collect();
    with_views(conn, tenant, &mut publications).await?;
    Ok((out, has_more))
}
