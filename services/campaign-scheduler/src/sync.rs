//! Campaign snapshots to eligibility. Every change marks the campaign `sync_pending`; the
//! request that made it pushes the new snapshot at once (so a kill lands within a second),
//! and a loop pushes whatever is still behind (eligibility was down, the process died). A
//! push carries the campaign's version: eligibility ignores one older than what it has, so
//! pushes from several replicas, in any order, converge on the newest. Drafts are not pushed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_runtime::{Error, RequestContext, grpc};
use tessera_store::{Db, db_error, stmt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::campaigns;
use tessera_proto::scheduler::v1::CampaignState;

/// How long a campaign eligibility refused (it no longer compiles there) waits before the
/// loop pushes it again; a new change pushes it at once.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Sync {
    db: Db,
    eligibility: EligibilityServiceClient<grpc::Channel>,
    wake: Arc<Notify>,
    /// Campaigns eligibility refused, and when the loop tries them again.
    refused: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

impl Sync {
    pub fn new(db: Db, eligibility: EligibilityServiceClient<grpc::Channel>) -> Self {
        Self {
            db,
            eligibility,
            wake: Arc::new(Notify::new()),
            refused: Arc::default(),
        }
    }

    /// Asks eligibility to check a campaign (compile its rules, check budgets against
    /// usage) without storing it.
    pub async fn validate(&self, tenant: &str, c: &epb::Campaign) -> Result<(), Error> {
        let ctx = RequestContext::system(tenant.to_string(), crate::SERVICE);
        self.eligibility
            .clone()
            .put_campaign(ctx.request(epb::PutCampaignRequest {
                idempotency_key: "validate".into(),
                campaign: Some(c.clone()),
                source_version: 0,
                validate_only: true,
            }))
            .await
            .map_err(|s| campaigns::rename_fields(Error::from_status(&s)))?;
        Ok(())
    }

    /// Pushes one campaign now; on failure the loop retries it.
    pub async fn push_now(&self, tenant: &str, id: &str) {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.to_string(), id.to_string()));
        if let Err(e) = self.push(tenant, id).await {
            tracing::warn!(campaign = %id, error = %e, "campaign push failed; the sync retries");
            self.wake.notify_one();
        }
    }

    async fn push(&self, tenant: &str, id: &str) -> Result<(), Error> {
        let c = campaigns::get(self.db.conn(), tenant, id).await?;
        if c.state() != CampaignState::Draft {
            let ctx = RequestContext::system(tenant.to_string(), crate::SERVICE);
            self.eligibility
                .clone()
                .put_campaign(ctx.request(epb::PutCampaignRequest {
                    idempotency_key: format!("campaign-sync-{}-v{}", c.id, c.version),
                    campaign: Some(campaigns::projection(&c)),
                    source_version: c.version,
                    validate_only: false,
                }))
                .await
                .map_err(|s| Error::from_status(&s))?;
        }
        let conn = self.db.conn();
        conn.execute_raw(stmt(
            conn,
            "UPDATE campaigns SET synced_version = $3, \
             sync_pending = CASE WHEN version = $3 THEN 0 ELSE sync_pending END \
             WHERE tenant_id = $1 AND id = $2 AND synced_version < $3",
            [tenant.into(), id.into(), c.version.into()],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Pushes every campaign that is behind; returns how many it pushed.
    pub async fn push_pending(&self) -> Result<usize, Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT tenant_id, id FROM campaigns WHERE sync_pending = 1 LIMIT 100",
                [],
            ))
            .await
            .map_err(db_error)?;
        let mut pushed = 0;
        for row in rows {
            let tenant: String = row.try_get_by_index(0).map_err(db_error)?;
            let id: String = row.try_get_by_index(1).map_err(db_error)?;
            let key = (tenant, id);
            let waiting = self
                .refused
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)
                .is_some_and(|at| Instant::now() < *at);
            if waiting {
                continue;
            }
            match self.push(&key.0, &key.1).await {
                Ok(()) => pushed += 1,
                Err(e) => {
                    tracing::warn!(campaign = %key.1, error = %e, "campaign push failed");
                    if e.is_deterministic() {
                        self.refused
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(key, Instant::now() + REFUSED_RETRY);
                    }
                }
            }
        }
        Ok(pushed)
    }

    /// Wakes the loop (a job changed a campaign).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Pushes what is behind every `interval` (or when woken) until `shutdown`.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.push_pending().await {
                tracing::warn!(error = %e, "campaign sync waits for eligibility");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
