//! The stored read model: campaign snapshots from the scheduler, the feed version, budgets
//! against usage, and each replica's in-memory index of them ([`Campaigns`]).

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::{Db, db_error, stmt};

use super::compile::*;
use super::index::*;
use crate::readmodel::ReadModel;

/// The per-tenant indexes of one replica.
pub struct Campaigns {
    db: Db,
    indexes: ReadModel<Index>,
}

impl Campaigns {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            indexes: ReadModel::default(),
        }
    }

    /// Forgets a tenant's index (after this replica changed it).
    pub fn forget(&self, tenant: &str) {
        self.indexes.forget(tenant);
    }

    /// The tenant's index, at most [`crate::readmodel::FRESHNESS`] old.
    pub async fn index(&self, tenant: &str) -> Result<Arc<Index>, Error> {
        if let Some(index) = self.indexes.fresh(tenant) {
            return Ok(index);
        }
        self.current(tenant).await
    }

    /// The tenant's index at the feed's current version (one query when nothing changed):
    /// redemption uses it, so a kill switch refuses the very next redemption.
    pub async fn current(&self, tenant: &str) -> Result<Arc<Index>, Error> {
        let version = feed_version(self.db.conn(), tenant).await?;
        let previous = self.indexes.stale(tenant);
        let index = match previous {
            Some(index) if index.version == version => index,
            previous => Arc::new(self.rebuild(tenant, version, previous).await?),
        };
        self.indexes.store(tenant, index.clone());
        Ok(index)
    }

    async fn rebuild(
        &self,
        tenant: &str,
        version: i64,
        previous: Option<Arc<Index>>,
    ) -> Result<Index, Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT id, version, definition FROM campaigns WHERE tenant_id = $1",
                [tenant.into()],
            ))
            .await
            .map_err(db_error)?;
        let reuse: HashMap<(String, i64), Arc<Compiled>> = previous
            .map(|p| {
                p.campaigns
                    .iter()
                    .map(|c| ((c.def.id.clone(), c.version), c.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let attributes = crate::facts::attributes(conn, tenant).await?;
        let mut campaigns = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get_by_index(0).map_err(db_error)?;
            let v: i64 = row.try_get_by_index(1).map_err(db_error)?;
            if let Some(c) = reuse.get(&(id.clone(), v)) {
                campaigns.push(c.clone());
                continue;
            }
            let bytes: Vec<u8> = row.try_get_by_index(2).map_err(db_error)?;
            let def = pb::Campaign::decode(bytes.as_slice()).map_err(Error::internal)?;
            let mut violations = Violations::new();
            match compile(&mut violations, &def, v, &attributes, None, 0) {
                Some(c) if violations.count() == 0 => campaigns.push(Arc::new(c)),
                _ => tracing::error!(campaign = %id, "stored campaign no longer compiles"),
            }
        }
        Ok(Index::build(version, campaigns))
    }
}

pub async fn feed_version<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<i64, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT version FROM campaign_feed WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map_or(Ok(0), |r| r.try_get_by_index(0).map_err(db_error))
}

/// Bumps the tenant's feed version; returns the new one.
pub async fn bump(txn: &DatabaseTransaction, tenant: &str) -> Result<i64, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            "INSERT INTO campaign_feed (tenant_id, version) VALUES ($1, 1) \
             ON CONFLICT (tenant_id) DO UPDATE SET version = campaign_feed.version + 1 \
             RETURNING version",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("no feed version"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// Stores a campaign; with a `source_version` (> 0), only over an older one. Returns the
/// read-model version after the change, or None when a newer source version was stored.
pub async fn put(
    txn: &DatabaseTransaction,
    tenant: &str,
    c: &pb::Campaign,
    source_version: i64,
) -> Result<Option<i64>, Error> {
    let stored = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO campaigns (tenant_id, id, definition, version, source_version) \
             VALUES ($1, $2, $3, 0, $4) \
             ON CONFLICT (tenant_id, id) DO UPDATE SET definition = excluded.definition, \
             source_version = excluded.source_version \
             WHERE excluded.source_version = 0 \
             OR campaigns.source_version < excluded.source_version",
            [
                tenant.into(),
                c.id.clone().into(),
                c.encode_to_vec().into(),
                source_version.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if stored.rows_affected() == 0 {
        return Ok(None);
    }
    let version = bump(txn, tenant).await?;
    txn.execute_raw(stmt(
        txn,
        "UPDATE campaigns SET version = $3 WHERE tenant_id = $1 AND id = $2",
        [tenant.into(), c.id.clone().into(), version.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(Some(version))
}

/// Refuses (FAILED_PRECONDITION, naming the limit) a campaign-wide budget below what the
/// campaign has already used.
pub async fn check_budget_not_below_usage<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    c: &pb::Campaign,
) -> Result<(), Error> {
    let Some(limits) = &c.limits else {
        return Ok(());
    };
    let usage = usage(conn, tenant, &[c.id.as_str()]).await?;
    let Some(used) = usage.get(&c.id) else {
        return Ok(());
    };
    let mut below = Vec::new();
    for (field, limit, used) in [
        ("max_redemptions", limits.max_redemptions, used.redemptions),
        (
            "max_discount_total",
            limits.max_discount_total,
            used.discount_total,
        ),
        (
            "max_order_value_total",
            limits.max_order_value_total,
            used.order_value_total,
        ),
    ] {
        if limit > 0 && limit < used {
            below.push(tessera_runtime::error::FieldViolation::new(
                format!("campaign.limits.{field}"),
                format!("is below what the campaign has already used ({used})"),
            ));
        }
    }
    if below.is_empty() {
        return Ok(());
    }
    let mut err = Error::new(
        tessera_runtime::error::Code::FailedPrecondition,
        "a budget is below what the campaign has already used",
    )
    .with_reason("BUDGET_BELOW_USAGE");
    err.field_violations = below;
    Err(err)
}

pub async fn remove(txn: &DatabaseTransaction, tenant: &str, id: &str) -> Result<i64, Error> {
    let removed = txn
        .execute_raw(stmt(
            txn,
            "DELETE FROM campaigns WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    if removed.rows_affected() == 0 {
        return Err(Error::not_found(format!("campaign `{id}`")));
    }
    bump(txn, tenant).await
}

/// Usage counters of some campaigns: the campaign's row and its shards, added up here with
/// saturation (a database's SUM would fail past the largest BIGINT).
pub async fn usage<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    ids: &[&str],
) -> Result<crate::counters::core::UsageMap, Error> {
    let mut out: crate::counters::core::UsageMap = HashMap::new();
    for chunk in ids.chunks(500) {
        let ids = Db::placeholders(2, chunk.len());
        let sql = format!(
            "SELECT campaign_id, redemptions, discount_total, order_value_total \
             FROM campaign_usage WHERE tenant_id = $1 AND campaign_id IN ({ids}) \
             UNION ALL SELECT campaign_id, redemptions, discount_total, order_value_total \
             FROM campaign_usage_shards WHERE tenant_id = $1 AND campaign_id IN ({ids})"
        );
        let values = std::iter::once(tenant.into()).chain(chunk.iter().map(|id| (*id).into()));
        let rows = conn
            .query_all_raw(stmt(conn, &sql, values))
            .await
            .map_err(db_error)?;
        for row in rows {
            let count = |i| row.try_get_by_index::<i64>(i).map_err(db_error);
            let usage = out
                .entry(row.try_get_by_index(0).map_err(db_error)?)
                .or_default();
            usage.redemptions = usage.redemptions.saturating_add(count(1)?);
            usage.discount_total = usage.discount_total.saturating_add(count(2)?);
            usage.order_value_total = usage.order_value_total.saturating_add(count(3)?);
        }
    }
    Ok(out)
}
