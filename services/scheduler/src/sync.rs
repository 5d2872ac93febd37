//! Campaign snapshots to eligibility, through the command outbox. Every change of a
//! campaign that is not a draft writes, in its own transaction, a `PutCampaign` command
//! carrying the new snapshot and its version ([`send`]); the queue delivers it (at once when
//! the request commits, so a kill lands within a second; with backoff while eligibility is
//! down; dead-lettered with the reason when eligibility refuses it, and replayable from
//! `/v1/queues/campaign-scheduler/dead`). Eligibility ignores a version older than the one
//! it has, so deliveries from several replicas, in any order, converge on the newest.
//! [`Delivered`] notes the version eligibility took (`synced_version`, `sync_pending`).

use std::sync::Arc;

use sea_orm::ConnectionTrait;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::scheduler::v1 as pb;
use tessera_runtime::{Error, RequestContext, grpc};
use tessera_store::queue::commands::{self, Command, Relay};
use tessera_store::queue::{Failure, Handler, Item};
use tessera_store::{Db, db_error, stmt};

use tessera_proto::scheduler::v1::CampaignState;

/// The method campaign snapshots are delivered to.
pub const PUT_CAMPAIGN: &str = "/tessera.eligibility.v1.EligibilityService/PutCampaign";

/// Asks eligibility to check a campaign (compile its rules, check budgets against usage)
/// without storing it: part of the request that changes it, so not a queued command.
pub async fn validate(
    eligibility: &EligibilityServiceClient<grpc::Channel>,
    tenant: &str,
    c: &epb::Campaign,
) -> Result<(), Error> {
    let ctx = RequestContext::system(tenant.to_string(), crate::SERVICE);
    eligibility
        .clone()
        .put_campaign(ctx.request(epb::PutCampaignRequest {
            idempotency_key: "validate".into(),
            campaign: Some(c.clone()),
            source_version: 0,
            validate_only: true,
        }))
        .await
        .map_err(|s| crate::campaigns::core::rename_fields(Error::from_status(&s)))?;
    Ok(())
}

/// Sends campaign `c` (as just written, in `txn`) to eligibility; drafts stay here.
/// Returns whether a snapshot was sent.
pub async fn send<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    c: &pb::Campaign,
) -> Result<bool, Error> {
    if c.state() == CampaignState::Draft {
        return Ok(false);
    }
    let key = format!("campaign-sync-{}-v{}", c.id, c.version);
    commands::send(
        txn,
        tenant,
        [Command {
            path: PUT_CAMPAIGN,
            key: key.clone(),
            request: epb::PutCampaignRequest {
                idempotency_key: key,
                campaign: Some(crate::campaigns::core::projection(c)),
                source_version: c.version,
                validate_only: false,
            },
        }],
    )
    .await?;
    Ok(true)
}

/// Campaigns marked behind by an earlier version of the scheduler (which pushed them from a
/// loop) are sent through the queue once, at start. Returns how many.
pub async fn adopt_pending(db: &Db) -> Result<usize, Error> {
    let txn = db.begin_write().await?;
    let rows = txn
        .query_all_raw(stmt(
            &txn,
            "SELECT tenant_id, id FROM campaigns WHERE sync_pending = 1",
            [],
        ))
        .await
        .map_err(db_error)?;
    let mut sent = 0;
    for row in rows {
        let tenant: String = row.try_get_by_index(0).map_err(db_error)?;
        let id: String = row.try_get_by_index(1).map_err(db_error)?;
        let c = crate::campaigns::store::get(&txn, &tenant, &id).await?;
        if send(&txn, &tenant, &c).await? {
            sent += 1;
        } else {
            delivered(&txn, &tenant, &id, c.version).await?;
        }
    }
    txn.commit().await.map_err(db_error)?;
    Ok(sent)
}

/// Eligibility has version `version` of campaign `id` (or a later one).
async fn delivered<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    version: i64,
) -> Result<(), Error> {
    conn.execute_raw(stmt(
        conn,
        "UPDATE campaigns SET synced_version = $3, \
         sync_pending = CASE WHEN version = $3 THEN 0 ELSE sync_pending END \
         WHERE tenant_id = $1 AND id = $2 AND synced_version < $3",
        [tenant.into(), id.into(), version.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The command relay, noting each campaign version eligibility accepted.
pub struct Delivered {
    pub relay: Relay,
    pub db: Db,
}

impl Delivered {
    pub fn wrap(db: Db) -> impl FnOnce(Relay) -> Arc<dyn Handler> {
        move |relay| Arc::new(Self { relay, db })
    }
}

#[async_trait::async_trait]
impl Handler for Delivered {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        self.relay.handle(item).await?;
        if item.kind == PUT_CAMPAIGN {
            use prost::Message;
            let request = epb::PutCampaignRequest::decode(item.payload.as_slice())
                .map_err(|e| Failure::Permanent(format!("undecodable snapshot: {e}")))?;
            let id = request.campaign.map(|c| c.id).unwrap_or_default();
            // Delivered; noting it is only bookkeeping, retried with the item if it fails.
            delivered(self.db.conn(), &item.tenant, &id, request.source_version)
                .await
                .map_err(|e| Failure::Retry(e.message))?;
        }
        Ok(())
    }
}
