//! Reward definitions: checked, stored with their protobuf encoding (so a new effect kind
//! needs no migration) and read back. The status is the kill switch: it is read on every
//! request, never cached, so switching off takes effect on the next one.

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};
use tessera_effects::wire;
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::outbox::{self, micros_to_timestamp, timestamp_to_micros};
use tessera_store::{db_error, now_micros, stmt};

use crate::sync;

pub const ACTIVE: &str = "active";
pub const DISABLED: &str = "disabled";

const COLUMNS: &str = "id, definition, status, version, created_at, updated_at";

/// Checks a reward definition; returns its effect kind and validity window (µs).
pub fn check(
    v: &mut Violations,
    field: &str,
    input: Option<&pb::RewardInput>,
    now: i64,
) -> Option<(&'static str, i64, Option<i64>)> {
    let Some(input) = input else {
        v.add(field, "is required");
        return None;
    };
    let f = |name: &str| format!("{field}.{name}");
    let name = input.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        v.add(f("name"), "must be 1 to 200 characters");
    }
    check_metadata(v, &f("metadata"), &input.metadata);
    if input.currency.len() != 3 || !input.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        v.add(
            f("currency"),
            "must be an ISO 4217 code in upper case, e.g. EUR",
        );
    }
    wire::effect(v, &f("effect"), input.effect.as_ref());
    let starts_at = input.starts_at.as_ref().map_or(now, timestamp_to_micros);
    let ends_at = input.ends_at.as_ref().map(timestamp_to_micros);
    if ends_at.is_some_and(|end| end <= starts_at) {
        v.add(f("ends_at"), "must be after starts_at");
    }
    let kind = input
        .effect
        .as_ref()
        .and_then(|e| e.kind.as_ref())
        .map(wire::kind_name)?;
    Some((kind, starts_at, ends_at))
}

/// At most 50 entries; keys 1 to 40 characters, values at most 500.
pub fn check_metadata(
    v: &mut Violations,
    field: &str,
    metadata: &std::collections::BTreeMap<String, String>,
) {
    if metadata.len() > 50 {
        v.add(field, "must have at most 50 entries");
    }
    for (key, value) in metadata {
        if key.is_empty() || key.chars().count() > 40 {
            v.add(format!("{field}.{key}"), "keys must be 1 to 40 characters");
        } else if value.chars().count() > 500 {
            v.add(format!("{field}.{key}"), "must be at most 500 characters");
        }
    }
}

fn from_row(row: &QueryResult) -> Result<pb::Reward, Error> {
    from_row_at(row, 0)
}

/// A reward from the columns `id, definition, status, version, created_at, updated_at`,
/// starting at index `at`.
pub(crate) fn from_row_at(row: &QueryResult, at: usize) -> Result<pb::Reward, Error> {
    let definition: Vec<u8> = row.try_get_by_index(at + 1).map_err(db_error)?;
    let status: String = row.try_get_by_index(at + 2).map_err(db_error)?;
    let time = |i: usize| -> Result<_, Error> {
        Ok(Some(micros_to_timestamp(
            row.try_get_by_index(at + i).map_err(db_error)?,
        )))
    };
    Ok(pb::Reward {
        id: row.try_get_by_index(at).map_err(db_error)?,
        definition: Some(pb::RewardInput::decode(definition.as_slice()).map_err(Error::internal)?),
        status: status_of(&status).into(),
        version: row.try_get_by_index(at + 3).map_err(db_error)?,
        created_at: time(4)?,
        updated_at: time(5)?,
    })
}

fn status_of(status: &str) -> pb::RewardStatus {
    if status == ACTIVE {
        pb::RewardStatus::Active
    } else {
        pb::RewardStatus::Disabled
    }
}

/// A reward of the tenant, or NOT_FOUND.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::Reward, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM rewards WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("reward `{id}`")))?;
    from_row(&row)
}

/// Rewards of the tenant by id (those that exist).
pub async fn get_many<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    ids: &[String],
) -> Result<Vec<pb::Reward>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM rewards WHERE tenant_id = $1 AND id IN ({})",
        tessera_store::Db::placeholders(2, ids.len())
    );
    let values = std::iter::once(tenant.into()).chain(ids.iter().map(|id| id.clone().into()));
    let rows = conn
        .query_all_raw(stmt(conn, &sql, values))
        .await
        .map_err(db_error)?;
    rows.iter().map(from_row).collect()
}

/// What a list asks for.
pub struct Filter {
    pub status: Option<&'static str>,
    pub effect_kind: String,
    pub starting_after: String,
    pub limit: u32,
}

/// Rewards, newest first (ids are time-ordered UUIDs).
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    filter: &Filter,
) -> Result<(Vec<pb::Reward>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM rewards WHERE tenant_id = $1 \
                 AND ($2 = '' OR status = $2) AND ($3 = '' OR effect_kind = $3) \
                 AND ($4 = '' OR id < $4) ORDER BY id DESC LIMIT $5"
            ),
            [
                tenant.into(),
                filter.status.unwrap_or_default().into(),
                filter.effect_kind.clone().into(),
                filter.starting_after.clone().into(),
                i64::from(filter.limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut rewards = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    let has_more = rewards.len() > filter.limit as usize;
    rewards.truncate(filter.limit as usize);
    Ok((rewards, has_more))
}

/// Stores a new reward and its `reward.created` event.
pub async fn create(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    input: pb::RewardInput,
    kind: &str,
    starts_at: i64,
    ends_at: Option<i64>,
) -> Result<pb::Reward, Error> {
    let now = now_micros();
    let id = uuid::Uuid::now_v7().to_string();
    let mut input = input;
    input.starts_at = Some(micros_to_timestamp(starts_at));
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO rewards (tenant_id, id, definition, effect_kind, status, starts_at, ends_at, \
         version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8)",
        [
            ctx.tenant_id.clone().into(),
            id.clone().into(),
            input.encode_to_vec().into(),
            kind.into(),
            ACTIVE.into(),
            starts_at.into(),
            ends_at.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let reward = get(txn, &ctx.tenant_id, &id).await?;
    emit(txn, ctx, "reward.created", &reward, None).await?;
    Ok(reward)
}

/// Replaces a reward's definition, optionally only at `expected_version`.
pub async fn update(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    input: pb::RewardInput,
    (kind, starts_at, ends_at): (&str, i64, Option<i64>),
    expected_version: i64,
) -> Result<pb::Reward, Error> {
    let current = get(txn, &ctx.tenant_id, id).await?;
    if expected_version != 0 && current.version != expected_version {
        return Err(Error::new(
            Code::Aborted,
            format!(
                "reward `{id}` is at version {}, not {expected_version}",
                current.version
            ),
        )
        .with_reason("VERSION_MISMATCH"));
    }
    let mut input = input;
    input.starts_at = Some(micros_to_timestamp(starts_at));
    txn.execute_raw(stmt(
        txn,
        "UPDATE rewards SET definition = $3, effect_kind = $4, starts_at = $5, ends_at = $6, \
         version = version + 1, updated_at = $7 WHERE tenant_id = $1 AND id = $2",
        [
            ctx.tenant_id.clone().into(),
            id.into(),
            input.encode_to_vec().into(),
            kind.into(),
            starts_at.into(),
            ends_at.into(),
            now_micros().into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let reward = get(txn, &ctx.tenant_id, id).await?;
    emit(txn, ctx, "reward.updated", &reward, None).await?;
    Ok(reward)
}

/// The kill switch.
pub async fn set_status(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    id: &str,
    status: &'static str,
    reason: &str,
) -> Result<pb::Reward, Error> {
    let changed = txn
        .execute_raw(stmt(
            txn,
            "UPDATE rewards SET status = $3, version = version + 1, updated_at = $4 \
             WHERE tenant_id = $1 AND id = $2 AND status <> $3",
            [
                ctx.tenant_id.clone().into(),
                id.into(),
                status.into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .rows_affected();
    let reward = get(txn, &ctx.tenant_id, id).await?;
    if changed > 0 {
        let kind = tessera_proto::eligibility::v1::CatalogSwitchKind::Reward;
        let off = status == DISABLED;
        sync::switch_changed(txn, &ctx.tenant_id, kind, id, off, reward.version).await?;
        emit(txn, ctx, "reward.status_changed", &reward, Some(reason)).await?;
    }
    Ok(reward)
}

async fn emit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    event_type: &str,
    reward: &pb::Reward,
    reason: Option<&str>,
) -> Result<(), Error> {
    let definition = reward.definition.as_ref();
    let data = serde_json::json!({
        "reward_id": reward.id,
        "name": definition.map(|d| d.name.clone()),
        "effect_kind": definition
            .and_then(|d| d.effect.as_ref())
            .and_then(|e| e.kind.as_ref())
            .map(wire::kind_name),
        "status": if reward.status == pb::RewardStatus::Active as i32 { ACTIVE } else { DISABLED },
        "version": reward.version,
        "reason": reason,
        "principal": ctx.principal,
    });
    outbox::enqueue(txn, &ctx.tenant_id, event_type, &data).await?;
    Ok(())
}

/// Whether a reward can be used at `now`: active and inside its validity; else why not.
pub fn usable(reward: &pb::Reward, now: i64) -> Result<(), (&'static str, String)> {
    let d = reward.definition.clone().unwrap_or_default();
    if reward.status != pb::RewardStatus::Active as i32 {
        return Err((
            "REWARD_DISABLED",
            format!("reward `{}` is disabled", reward.id),
        ));
    }
    if d.starts_at
        .as_ref()
        .is_some_and(|s| timestamp_to_micros(s) > now)
    {
        return Err((
            "REWARD_NOT_STARTED",
            format!("reward `{}` is not valid yet", reward.id),
        ));
    }
    if d.ends_at
        .as_ref()
        .is_some_and(|e| timestamp_to_micros(e) <= now)
    {
        return Err((
            "REWARD_EXPIRED",
            format!("reward `{}` has expired", reward.id),
        ));
    }
    Ok(())
}
