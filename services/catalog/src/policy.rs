//! The tenant's access policy and the catalog's own role checks. The gateway refuses a role
//! a route does not serve; the catalog checks the role again (defence in depth) and applies
//! what only the tenant's policy knows: how much a junior marketer's effect may give, and
//! which rewards a support agent may hand to a customer (the "sorry" rewards).

use prost::Message;
use sea_orm::ConnectionTrait;
use tessera_effects::wire::MAX_AMOUNT;
use tessera_proto::catalog::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::outbox::{self, micros_to_timestamp};
use tessera_store::{db_error, stmt};

use tessera_store::api::check_id;

/// Roles that write rewards, pools and codes.
pub const AUTHORS: [&str; 3] = ["admin", "marketer", "junior_marketer"];
/// Roles that hand rewards to customers.
pub const PUBLISHERS: [&str; 4] = ["admin", "marketer", "support_agent", "touchpoint"];
const JUNIOR: &str = "junior_marketer";
const SUPPORT: &str = "support_agent";
/// Most rewards on the support agents' list.
const MAX_SUPPORT_REWARDS: usize = 100;

/// The policy of a tenant that stored none.
pub fn default_policy() -> pb::AccessPolicy {
    pb::AccessPolicy {
        junior_max_percent_bp: 5000,
        junior_max_amount: 0,
        support_reward_ids: Vec::new(),
        updated_at: None,
    }
}

/// Checks a policy to store.
pub fn check(v: &mut Violations, field: &str, policy: Option<&pb::AccessPolicy>) {
    let Some(p) = policy else {
        v.add(field, "is required");
        return;
    };
    if p.junior_max_percent_bp > 10_000 {
        v.add(
            format!("{field}.junior_max_percent_bp"),
            "must be 0 to 10000 (basis points)",
        );
    }
    if !(0..=MAX_AMOUNT).contains(&p.junior_max_amount) {
        v.add(
            format!("{field}.junior_max_amount"),
            format!("must be 0 to {MAX_AMOUNT} (minor units)"),
        );
    }
    if p.support_reward_ids.len() > MAX_SUPPORT_REWARDS {
        v.add(
            format!("{field}.support_reward_ids"),
            format!("must list at most {MAX_SUPPORT_REWARDS} rewards"),
        );
    }
    for (i, id) in p.support_reward_ids.iter().enumerate() {
        check_id(v, &format!("{field}.support_reward_ids.{i}"), id);
    }
}

/// The tenant's policy (the default when none was stored).
pub async fn get<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<pb::AccessPolicy, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT policy, updated_at FROM access_policies WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(default_policy());
    };
    let bytes: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let updated_at: i64 = row.try_get_by_index(1).map_err(db_error)?;
    let mut policy = pb::AccessPolicy::decode(bytes.as_slice())
        .map_err(|e| Error::internal(format!("stored access policy: {e}")))?;
    policy.updated_at = Some(micros_to_timestamp(updated_at));
    Ok(policy)
}

/// Replaces the tenant's policy, with its `access_policy.updated` event.
pub async fn put<C: ConnectionTrait>(
    conn: &C,
    ctx: &RequestContext,
    mut policy: pb::AccessPolicy,
    now: i64,
) -> Result<pb::AccessPolicy, Error> {
    policy.updated_at = None;
    policy.support_reward_ids.sort();
    policy.support_reward_ids.dedup();
    conn.execute_raw(stmt(
        conn,
        "INSERT INTO access_policies (tenant_id, policy, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id) DO UPDATE SET policy = excluded.policy, \
         updated_at = excluded.updated_at",
        [
            ctx.tenant_id.clone().into(),
            policy.encode_to_vec().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let event = serde_json::json!({
        "junior_max_percent_bp": policy.junior_max_percent_bp,
        "junior_max_amount": policy.junior_max_amount,
        "support_reward_ids": policy.support_reward_ids,
        "principal": ctx.principal,
    });
    outbox::enqueue(conn, &ctx.tenant_id, "access_policy.updated", &event).await?;
    policy.updated_at = Some(micros_to_timestamp(now));
    Ok(policy)
}

/// Refuses an effect a junior marketer may not write under the tenant's policy (other
/// roles write any); `field` is the effect's path.
pub async fn check_author<C: ConnectionTrait>(
    conn: &C,
    ctx: &RequestContext,
    field: &str,
    effect: Option<&pb::Effect>,
) -> Result<(), Error> {
    if ctx.role != JUNIOR {
        return Ok(());
    }
    tessera_effects::ceiling::check_junior(&get(conn, &ctx.tenant_id).await?, field, effect)
}

/// Refuses a publication a support agent may not make: only a reward on the policy's list,
/// by its id (not a code or a pool).
pub async fn check_publisher<C: ConnectionTrait>(
    conn: &C,
    ctx: &RequestContext,
    request: &pb::PublishRewardRequest,
) -> Result<(), Error> {
    if ctx.role != SUPPORT {
        return Ok(());
    }
    let policy = get(conn, &ctx.tenant_id).await?;
    let allowed = request.code.is_empty()
        && request.pool_id.is_empty()
        && policy.support_reward_ids.contains(&request.reward_id);
    if allowed {
        return Ok(());
    }
    let mut v = Violations::new();
    v.add(
        "reward_id",
        "a support agent may publish only the rewards the tenant's access policy lists",
    );
    v.finish_as(
        Code::PermissionDenied,
        "not one of the rewards support agents may hand out",
        "NOT_A_SUPPORT_REWARD",
    )
}
