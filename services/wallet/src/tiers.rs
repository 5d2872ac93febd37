//! Tiers: levels a member reaches by points earned or amount spent over a rolling window
//! (never by current balance). Every points credit records qualifying activity and, when the
//! programme has tiers, re-evaluates the member: upgrades apply at once; a member who falls
//! below their tier keeps it for the grace period, then moves down. `EvaluateTiers` does the
//! same for members nobody credited lately. Every change is recorded and emitted as
//! `tier.changed`. A tier gives an earn rate, an expiry extension, and (through catalog and
//! eligibility, which read `GetTier`) tier-only rewards.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use serde::{Deserialize, Serialize};
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::{Backend, db_error, now_micros, outbox, stmt};

const DAY: i64 = 86_400 * 1_000_000;
/// Most members one `EvaluateTiers` call re-evaluates.
const EVALUATE_BATCH: i64 = 5_000;

/// What qualifies for a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    PointsEarned,
    AmountSpent,
}

/// One level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    pub id: String,
    pub name: String,
    pub threshold: i64,
    pub earn_multiplier_permille: u32,
    pub expiry_extension_days: u32,
}

impl Level {
    fn to_proto(&self) -> pb::Tier {
        pb::Tier {
            id: self.id.clone(),
            name: self.name.clone(),
            threshold: self.threshold,
            earn_multiplier_permille: self.earn_multiplier_permille,
            expiry_extension_days: self.expiry_extension_days,
        }
    }

    /// `amount` at this level's earn rate, rounded down.
    pub fn multiply(&self, amount: i64) -> i64 {
        amount.saturating_mul(i64::from(self.earn_multiplier_permille)) / 1000
    }

    /// This level's expiry extension, in µs.
    pub fn extension(&self) -> i64 {
        i64::from(self.expiry_extension_days) * DAY
    }
}

/// A programme's tier rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPolicy {
    pub basis: Basis,
    pub window_days: u32,
    pub grace_days: u32,
    /// Ascending thresholds; the first is the base level (threshold 0).
    pub levels: Vec<Level>,
}

impl TierPolicy {
    /// Validates the API form, naming every field at fault (`field` is the policy's path).
    pub fn from_proto(v: &mut Violations, field: &str, p: &pb::TierPolicy) -> Option<Self> {
        let basis = match pb::TierBasis::try_from(p.basis).unwrap_or(pb::TierBasis::Unspecified) {
            pb::TierBasis::PointsEarned => Some(Basis::PointsEarned),
            pb::TierBasis::AmountSpent => Some(Basis::AmountSpent),
            pb::TierBasis::Unspecified => {
                v.add(
                    format!("{field}.basis"),
                    "must be POINTS_EARNED or AMOUNT_SPENT",
                );
                None
            }
        };
        if !(1..=1096).contains(&p.window_days) {
            v.add(format!("{field}.window_days"), "must be 1 to 1096 days");
        }
        if p.grace_days > 1096 {
            v.add(format!("{field}.grace_days"), "must be at most 1096 days");
        }
        if p.levels.is_empty() || p.levels.len() > 20 {
            v.add(format!("{field}.levels"), "must hold 1 to 20 tiers");
        }
        let before = v.count();
        for (i, l) in p.levels.iter().enumerate() {
            let f = |name: &str| format!("{field}.levels[{i}].{name}");
            if !crate::ledger::accounts::is_slug(&l.id) {
                v.add(f("id"), "must be 1 to 64 of a-z, 0-9, _ and -");
            } else if p.levels[..i].iter().any(|o| o.id == l.id) {
                v.add(f("id"), "must be unique");
            }
            if l.name.chars().count() > 100 {
                v.add(f("name"), "must be at most 100 characters");
            }
            if i == 0 && l.threshold != 0 {
                v.add(
                    f("threshold"),
                    "must be 0: the first tier is the base level",
                );
            } else if i > 0 && l.threshold <= p.levels[i - 1].threshold {
                v.add(
                    f("threshold"),
                    "must be above the previous tier's threshold",
                );
            }
            if !(1000..=10_000).contains(&l.earn_multiplier_permille) {
                v.add(
                    f("earn_multiplier_permille"),
                    "must be 1000 (x1) to 10000 (x10)",
                );
            }
            if l.expiry_extension_days > 3660 {
                v.add(f("expiry_extension_days"), "must be at most 3660 days");
            }
        }
        if v.count() != before {
            return None;
        }
        Some(Self {
            basis: basis?,
            window_days: p.window_days,
            grace_days: p.grace_days,
            levels: p
                .levels
                .iter()
                .map(|l| Level {
                    id: l.id.clone(),
                    name: l.name.clone(),
                    threshold: l.threshold,
                    earn_multiplier_permille: l.earn_multiplier_permille,
                    expiry_extension_days: l.expiry_extension_days,
                })
                .collect(),
        })
    }

    pub fn to_proto(&self) -> pb::TierPolicy {
        pb::TierPolicy {
            basis: match self.basis {
                Basis::PointsEarned => pb::TierBasis::PointsEarned,
                Basis::AmountSpent => pb::TierBasis::AmountSpent,
            } as i32,
            window_days: self.window_days,
            grace_days: self.grace_days,
            levels: self.levels.iter().map(Level::to_proto).collect(),
        }
    }

    /// Index of a level by id (a level removed since falls back to the base).
    fn rank(&self, id: &str) -> usize {
        self.levels.iter().position(|l| l.id == id).unwrap_or(0)
    }

    /// The highest level `qualifying` reaches.
    fn reached(&self, qualifying: i64) -> usize {
        self.levels
            .iter()
            .rposition(|l| l.threshold <= qualifying)
            .unwrap_or(0)
    }
}

/// Stores (or with None removes) a programme's tier policy.
pub async fn store_policy(
    txn: &DatabaseTransaction,
    tenant: &str,
    program_id: &str,
    policy: Option<&TierPolicy>,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "DELETE FROM program_tiers WHERE tenant_id = $1 AND program_id = $2",
        [tenant.into(), program_id.into()],
    ))
    .await
    .map_err(db_error)?;
    if let Some(policy) = policy {
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO program_tiers (tenant_id, program_id, policy) VALUES ($1, $2, $3)",
            [
                tenant.into(),
                program_id.into(),
                serde_json::to_string(policy)
                    .map_err(Error::internal)?
                    .into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// A programme's tier policy, if it has tiers.
pub async fn load_policy<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    program_id: &str,
) -> Result<Option<TierPolicy>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT policy FROM program_tiers WHERE tenant_id = $1 AND program_id = $2",
            [tenant.into(), program_id.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map(|r| decode_policy(&r.try_get_by_index::<String>(0).map_err(db_error)?))
        .transpose()
}

/// A tier policy as stored.
pub fn decode_policy(stored: &str) -> Result<TierPolicy, Error> {
    serde_json::from_str(stored).map_err(Error::internal)
}

/// A member's stored tier.
struct Member {
    tier_id: String,
    since: i64,
    grace_until: Option<i64>,
}

async fn member<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    program_id: &str,
    customer_id: &str,
    lock: &str,
) -> Result<Option<Member>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!(
                "SELECT tier_id, since, grace_until FROM member_tiers WHERE tenant_id = $1 \
                 AND program_id = $2 AND customer_id = $3{lock}"
            ),
            [tenant.into(), program_id.into(), customer_id.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map(|r| {
        Ok(Member {
            tier_id: r.try_get_by_index(0)?,
            since: r.try_get_by_index(1)?,
            grace_until: r.try_get_by_index(2)?,
        })
    })
    .transpose()
    .map_err(db_error)
}

/// The level a member holds now (the base level when never evaluated).
pub async fn current_level(
    txn: &DatabaseTransaction,
    tenant: &str,
    program_id: &str,
    policy: &TierPolicy,
    customer_id: &str,
) -> Result<Level, Error> {
    let held = member(txn, tenant, program_id, customer_id, "").await?;
    let rank = held.map_or(0, |m| policy.rank(&m.tier_id));
    Ok(policy.levels[rank].clone())
}

/// Records qualifying activity of a points credit.
pub async fn record_activity(
    txn: &DatabaseTransaction,
    tenant: &str,
    program_id: &str,
    customer_id: &str,
    points: i64,
    spent: i64,
    at: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO tier_activity (tenant_id, program_id, customer_id, points, spent, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        [
            tenant.into(),
            program_id.into(),
            customer_id.into(),
            points.into(),
            spent.into(),
            at.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Points earned or amount spent in the window ending `now`.
async fn qualifying<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    program_id: &str,
    policy: &TierPolicy,
    customer_id: &str,
    now: i64,
) -> Result<i64, Error> {
    let column = match policy.basis {
        Basis::PointsEarned => "points",
        Basis::AmountSpent => "spent",
    };
    conn.query_one_raw(stmt(
        conn,
        &format!(
            "SELECT CAST(COALESCE(SUM({column}), 0) AS BIGINT) FROM tier_activity \
             WHERE tenant_id = $1 AND program_id = $2 AND customer_id = $3 AND at > $4"
        ),
        [
            tenant.into(),
            program_id.into(),
            customer_id.into(),
            (now - i64::from(policy.window_days) * DAY).into(),
        ],
    ))
    .await
    .map_err(db_error)?
    .ok_or_else(|| Error::internal("no sum"))?
    .try_get_by_index(0)
    .map_err(db_error)
}

/// Re-evaluates one member. Returns whether their tier changed.
pub async fn evaluate(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    program_id: &str,
    policy: &TierPolicy,
    customer_id: &str,
) -> Result<bool, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let held = member(txn, tenant, program_id, customer_id, backend.row_lock()).await?;
    let qualifying = qualifying(txn, tenant, program_id, policy, customer_id, now).await?;
    let current = held.as_ref().map_or(0, |m| policy.rank(&m.tier_id));
    let target = policy.reached(qualifying);
    let grace_until = held.as_ref().and_then(|m| m.grace_until);
    // Up at once; down once any grace period has passed (it starts on the first evaluation
    // that finds the member below their tier).
    let (new_rank, new_grace) =
        if target >= current || policy.grace_days == 0 || grace_until.is_some_and(|g| g <= now) {
            (target, None)
        } else {
            (
                current,
                Some(grace_until.unwrap_or(now + i64::from(policy.grace_days) * DAY)),
            )
        };
    let changed = new_rank != current;
    if held.is_none() && !changed {
        // Still on the base level: nothing to record.
        return Ok(false);
    }
    let since = if changed {
        now
    } else {
        held.as_ref().map_or(now, |m| m.since)
    };
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO member_tiers (tenant_id, program_id, customer_id, tier_id, since, grace_until) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, program_id, customer_id) DO UPDATE \
         SET tier_id = excluded.tier_id, since = excluded.since, grace_until = excluded.grace_until",
        [
            tenant.into(),
            program_id.into(),
            customer_id.into(),
            policy.levels[new_rank].id.clone().into(),
            since.into(),
            new_grace.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    if !changed {
        return Ok(false);
    }
    let from = policy.levels[current].id.clone();
    let to = policy.levels[new_rank].id.clone();
    let direction = if new_rank > current {
        "upgrade"
    } else {
        "downgrade"
    };
    let id = uuid::Uuid::now_v7().to_string();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO tier_history (tenant_id, id, program_id, customer_id, from_tier, to_tier, \
         direction, qualifying, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            tenant.into(),
            id.clone().into(),
            program_id.into(),
            customer_id.into(),
            from.clone().into(),
            to.clone().into(),
            direction.into(),
            qualifying.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    outbox::enqueue(
        txn,
        tenant,
        "tier.changed",
        &serde_json::json!({
            "change_id": id,
            "customer_id": customer_id,
            "program_id": program_id,
            "from_tier": from,
            "to_tier": to,
            "direction": direction,
            "qualifying": qualifying,
        }),
    )
    .await?;
    Ok(true)
}

/// Re-evaluates the programme's members above the base level or in grace.
pub async fn evaluate_all(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    program_id: &str,
) -> Result<pb::EvaluateTiersResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let Some(policy) = load_policy(txn, tenant, program_id).await? else {
        return Err(Error::not_found(format!(
            "tiers of programme `{program_id}`"
        )));
    };
    let base = policy.levels[0].id.clone();
    let members = txn
        .query_all_raw(stmt(
            txn,
            "SELECT customer_id FROM member_tiers WHERE tenant_id = $1 AND program_id = $2 \
             AND (tier_id <> $3 OR grace_until IS NOT NULL) ORDER BY customer_id LIMIT $4",
            [
                tenant.into(),
                program_id.into(),
                base.into(),
                EVALUATE_BATCH.into(),
            ],
        ))
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    let mut response = pb::EvaluateTiersResponse::default();
    for customer in members {
        response.evaluated += 1;
        if evaluate(txn, ctx, backend, program_id, &policy, &customer).await? {
            response.changed += 1;
        }
    }
    Ok(response)
}

/// A member's tier as `GetTier` reports it.
pub async fn status<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    program_id: &str,
    customer_id: &str,
) -> Result<pb::GetTierResponse, Error> {
    let Some(policy) = load_policy(conn, tenant, program_id).await? else {
        return Err(Error::not_found(format!(
            "tiers of programme `{program_id}`"
        )));
    };
    let now = now_micros();
    let held = member(conn, tenant, program_id, customer_id, "").await?;
    let qualifying = qualifying(conn, tenant, program_id, &policy, customer_id, now).await?;
    let rank = held.as_ref().map_or(0, |m| policy.rank(&m.tier_id));
    let next = policy.levels.get(rank + 1);
    Ok(pb::GetTierResponse {
        customer_id: customer_id.to_string(),
        program_id: program_id.to_string(),
        tier: Some(policy.levels[rank].to_proto()),
        qualifying,
        since: held.as_ref().map(|m| outbox::micros_to_timestamp(m.since)),
        grace_until: held
            .and_then(|m| m.grace_until)
            .map(outbox::micros_to_timestamp),
        next_tier: next.map(Level::to_proto),
        to_next_tier: next.map_or(0, |l| (l.threshold - qualifying).max(0)),
    })
}

/// A page of a member's tier changes, newest first.
pub async fn history<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    program_id: &str,
    customer_id: &str,
    starting_after: &str,
    limit: u32,
) -> Result<(Vec<pb::TierChange>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT id, from_tier, to_tier, direction, qualifying, at FROM tier_history \
             WHERE tenant_id = $1 AND program_id = $2 AND customer_id = $3 \
             AND ($4 = '' OR id < $4) ORDER BY id DESC LIMIT $5",
            [
                tenant.into(),
                program_id.into(),
                customer_id.into(),
                starting_after.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let has_more = rows.len() > limit as usize;
    let changes = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            Ok(pb::TierChange {
                id: r.try_get_by_index(0)?,
                from_tier: r.try_get_by_index(1)?,
                to_tier: r.try_get_by_index(2)?,
                direction: r.try_get_by_index(3)?,
                qualifying: r.try_get_by_index(4)?,
                at: Some(outbox::micros_to_timestamp(r.try_get_by_index(5)?)),
            })
        })
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    Ok((changes, has_more))
}
