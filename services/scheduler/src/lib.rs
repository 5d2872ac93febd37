//! The campaign-scheduler service: campaigns as the source of truth (their definition,
//! state machine and history), their sync to eligibility (versioned snapshots through the
//! command outbox, delivered before a change answers), and durable time-based jobs
//! (campaign starts and ends, the wallet's expiry and tier sweeps) that run once however
//! many replicas share the database.

pub mod campaigns;
mod distributions;
mod issues;
pub mod jobs;
mod migrations;
mod service;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::DatabaseTransaction;
use tessera_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use tessera_proto::eligibility::v1 as epb;
use tessera_proto::eligibility::v1::eligibility_service_client::EligibilityServiceClient;
use tessera_proto::scheduler::v1 as pb;
use tessera_proto::scheduler::v1::scheduler_service_server::SchedulerServiceServer;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::component::{self, Component};
use tessera_runtime::{Config, Error, RequestContext, grpc};
use tessera_store::Db;
use tessera_store::idempotency::Idempotency;
use tessera_store::outbox::{NotificationPublisher, Relay};
use tessera_store::queue::commands;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::jobs::{Clock, Executor, Job, Outcome, SystemClock, Worker, WorkerConfig};
pub use migrations::Migrator;

/// Service name: SQLite file / PostgreSQL schema and log label.
pub const SERVICE: &str = "campaign-scheduler";
/// Fully qualified gRPC service name.
pub const GRPC_NAME: &str = "tessera.scheduler.v1.SchedulerService";

/// How often the wallet's points-expiry sweep runs for a tenant with earning campaigns.
const EXPIRE_EVERY: Duration = Duration::from_secs(15 * 60);
/// How often a tenant's pending credits whose activation date came are confirmed.
const ACTIVATE_EVERY: Duration = Duration::from_secs(60);
/// How often tiers are re-evaluated per programme (they also move on every credit).
const TIERS_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// How often a segment a live campaign targets is recomputed.
const SEGMENTS_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

/// Applies the campaign-scheduler's migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Db::open::<Migrator>(config, SERVICE).await.map(|_| ())
}

/// The scheduler's own jobs.
struct CampaignJobs {
    db: Db,
    wallet: WalletServiceClient<grpc::Channel>,
    catalog: CatalogServiceClient<grpc::Channel>,
    eligibility: EligibilityServiceClient<grpc::Channel>,
    /// Wakes the command relay (a job changed a campaign: its snapshot is queued).
    commands: Arc<tokio::sync::Notify>,
}

fn after(now: i64, every: Duration) -> i64 {
    now + i64::try_from(every.as_micros()).unwrap_or(i64::MAX)
}

fn remote_error(s: &tonic::Status) -> Error {
    Error::from_status(s)
}

impl Executor for CampaignJobs {
    fn remote<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<serde_json::Value, Error>> {
        Box::pin(async move {
            let ctx = RequestContext::system(job.tenant_id.clone(), SERVICE);
            let payload = || String::from_utf8_lossy(&job.payload).into_owned();
            match job.kind.as_str() {
                campaigns::EXPIRE_JOB => {
                    let r = self
                        .wallet
                        .clone()
                        .expire_due(ctx.request(wpb::ExpireDueRequest {
                            idempotency_key: job.run_key(),
                        }))
                        .await
                        .map_err(|s| remote_error(&s))?
                        .into_inner();
                    tracing::info!(tenant = %job.tenant_id, lots = r.lots_expired, amount = r.amount_expired, "points expiry sweep");
                    Ok(serde_json::Value::Null)
                }
                campaigns::ACTIVATE_JOB => {
                    let r = self
                        .wallet
                        .clone()
                        .activate_due(ctx.request(wpb::ActivateDueRequest {
                            idempotency_key: job.run_key(),
                        }))
                        .await
                        .map_err(|s| remote_error(&s))?
                        .into_inner();
                    if r.activated > 0 {
                        tracing::info!(tenant = %job.tenant_id, activated = r.activated, "pending credits confirmed");
                    }
                    Ok(serde_json::Value::Null)
                }
                campaigns::TIERS_JOB => {
                    let asked = self
                        .wallet
                        .clone()
                        .evaluate_tiers(ctx.request(wpb::EvaluateTiersRequest {
                            idempotency_key: job.run_key(),
                            program_id: payload(),
                        }))
                        .await;
                    match asked {
                        Ok(r) => {
                            let r = r.into_inner();
                            tracing::info!(tenant = %job.tenant_id, evaluated = r.evaluated, changed = r.changed, "tier re-evaluation");
                        }
                        // A programme without tiers (yet): nothing to evaluate this time.
                        Err(s)
                            if matches!(
                                s.code(),
                                tonic::Code::NotFound | tonic::Code::FailedPrecondition
                            ) => {}
                        Err(s) => return Err(remote_error(&s)),
                    }
                    Ok(serde_json::Value::Null)
                }
                campaigns::SEGMENT_JOB => {
                    let asked = self
                        .eligibility
                        .clone()
                        .recompute_segment(ctx.request(epb::RecomputeSegmentRequest {
                            idempotency_key: job.run_key(),
                            id: payload(),
                        }))
                        .await;
                    match asked {
                        Ok(_) => Ok(serde_json::Value::Null),
                        // A static segment (nothing to recompute) or one deleted: stop.
                        Err(s)
                            if matches!(
                                s.code(),
                                tonic::Code::FailedPrecondition | tonic::Code::NotFound
                            ) =>
                        {
                            Ok(serde_json::json!({"stop": true}))
                        }
                        Err(s) => Err(remote_error(&s)),
                    }
                }
                issues::OCCASION_JOB => {
                    let now = tessera_store::now_micros();
                    let issued =
                        issues::run_occasion(&self.db, &self.catalog, &self.eligibility, job, now)
                            .await?;
                    if issued > 0 {
                        tracing::info!(campaign = %job.campaign_id, issued, "occasion incentives issued");
                    }
                    Ok(serde_json::Value::Null)
                }
                distributions::JOB => {
                    let now = tessera_store::now_micros();
                    distributions::run_page(&self.db, &self.catalog, &self.eligibility, job, now)
                        .await
                }
                issues::REMINDER_JOB => {
                    let payload: serde_json::Value =
                        serde_json::from_slice(&job.payload).map_err(Error::internal)?;
                    let customer = payload["customer_id"].as_str().unwrap_or_default();
                    let found = self
                        .eligibility
                        .clone()
                        .get_customer(ctx.request(epb::GetCustomerRequest {
                            id: customer.to_string(),
                        }))
                        .await;
                    let redeemed = match found {
                        Ok(r) => r.into_inner().aggregates.is_some_and(|a| {
                            a.redemptions.get(&job.campaign_id).is_some_and(|n| *n > 0)
                        }),
                        Err(s) if s.code() == tonic::Code::NotFound => false,
                        Err(s) => return Err(remote_error(&s)),
                    };
                    Ok(serde_json::json!({ "redeemed": redeemed }))
                }
                _ => Ok(serde_json::Value::Null),
            }
        })
    }

    fn local<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        job: &'a Job,
        remote: serde_json::Value,
        now: i64,
    ) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(async move {
            match job.kind.as_str() {
                campaigns::START_JOB | campaigns::END_JOB => {
                    campaigns::run_job(txn, job, now).await?;
                    Ok(Outcome::Done)
                }
                issues::REMINDER_JOB => issues::remind(txn, job, &remote).await,
                distributions::JOB => distributions::settle(txn, job, &remote, now).await,
                issues::OCCASION_JOB => {
                    match campaigns::get(txn, &job.tenant_id, &job.campaign_id).await {
                        Ok(c)
                            if c.occasion.is_some()
                                && !matches!(
                                    c.state(),
                                    pb::CampaignState::Ended | pb::CampaignState::Killed
                                ) =>
                        {
                            Ok(Outcome::Again(issues::next_occasion_run(&c, now)))
                        }
                        _ => Ok(Outcome::Done),
                    }
                }
                campaigns::EXPIRE_JOB => Ok(Outcome::Again(after(now, EXPIRE_EVERY))),
                campaigns::ACTIVATE_JOB => Ok(Outcome::Again(after(now, ACTIVATE_EVERY))),
                campaigns::TIERS_JOB => Ok(Outcome::Again(after(now, TIERS_EVERY))),
                campaigns::SEGMENT_JOB if remote["stop"].as_bool() == Some(true) => {
                    Ok(Outcome::Done)
                }
                campaigns::SEGMENT_JOB => Ok(Outcome::Again(after(now, SEGMENTS_EVERY))),
                other => Err(Error::internal(format!("unknown job kind `{other}`"))),
            }
        })
    }

    fn committed(&self, job: &Job) {
        if matches!(job.kind.as_str(), campaigns::START_JOB | campaigns::END_JOB) {
            self.commands.notify_one();
        }
    }
}

/// Connects, migrates and assembles the campaign-scheduler; its workers stop on `shutdown`.
pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Component> {
    let db = Db::open::<Migrator>(config, SERVICE).await?;
    let publisher = NotificationPublisher::new(grpc::channel(
        &config.peers.notification_url,
        config.peer_timeout(),
    )?);
    let relay = Relay::new(
        db.clone(),
        SERVICE,
        Arc::new(publisher),
        config.outbox.clone(),
    );
    let eligibility = EligibilityServiceClient::new(grpc::channel(
        &config.peers.eligibility_url,
        config.peer_timeout(),
    )?);
    let wallet = WalletServiceClient::new(grpc::channel(
        &config.peers.wallet_url,
        config.peer_timeout(),
    )?);
    let catalog = CatalogServiceClient::new(grpc::channel(
        &config.peers.catalog_url,
        config.peer_timeout(),
    )?);
    // Snapshots (and anything else the scheduler must tell a peer) leave through the
    // command outbox; a second handle lets a request deliver its own change before answering.
    let commands = commands::worker_with(
        db.clone(),
        SERVICE,
        config,
        sync::Delivered::wrap(db.clone()),
    )?;
    let deliver_now = commands.clone();
    let adopted = sync::adopt_pending(&db).await?;
    if adopted > 0 {
        tracing::info!(
            adopted,
            "campaigns behind eligibility moved onto the command outbox"
        );
    }
    let adopted = jobs::adopt(&db).await?;
    if adopted > 0 {
        tracing::info!(adopted, "pending jobs moved onto the shared work queue");
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let worker = Worker::new(
        db.clone(),
        format!("{SERVICE}-{}", uuid::Uuid::new_v4().simple()),
        clock.clone(),
        Arc::new(CampaignJobs {
            db: db.clone(),
            wallet,
            catalog: catalog.clone(),
            eligibility: eligibility.clone(),
            commands: commands.waker(),
        }),
        WorkerConfig {
            lease: Duration::from_secs(config.scheduler.job_lease_secs),
            poll: Duration::from_millis(config.scheduler.job_poll_ms),
            ..WorkerConfig::default()
        },
    );
    let service = service::Scheduler {
        db: db.clone(),
        idempotency: Idempotency::new(
            db.clone(),
            Duration::from_secs(config.idempotency.in_flight_lease_secs),
        )
        .waking(relay.waker())
        .waking(commands.waker()),
        commands: Arc::new(deliver_now),
        catalog,
        eligibility,
        clock,
        jobs_wake: worker.waker(),
    };
    let retention = tessera_store::retention::Purger::start(
        db.clone(),
        SERVICE,
        vec![tessera_store::retention::Rule::new(
            "job_runs",
            "ran_at",
            "",
            tessera_runtime::config::Kept::Jobs,
        )],
        &config.retention,
    )
    .await?;
    Ok(Component::new(SERVICE)
        .customer_data(customer_data(db.clone()))
        .dead_letters(Arc::new(tessera_store::queue::DeadLetters::new(
            db.clone(),
            SERVICE,
        )))
        .grpc(GRPC_NAME, |routes| {
            routes.add_service(SchedulerServiceServer::new(service));
        })
        .task(tokio::spawn(retention.run(shutdown.clone())))
        .task(tokio::spawn(worker.run(shutdown.clone())))
        .task(tokio::spawn(commands.run(shutdown.clone())))
        .task(tokio::spawn(relay.run(shutdown)))
        .probe(db.probe()))
}

/// What the scheduler keeps about a customer (GDPR): the incentives issued to them, kept
/// under the pseudonym on erasure.
fn customer_data(db: Db) -> Arc<dyn tessera_runtime::ops::CustomerData> {
    use tessera_store::privacy::{CustomerData, Erase::Pseudonymize, Personal};
    Arc::new(CustomerData::new(
        db,
        vec![Personal::new(
            "issues",
            "customer_id",
            "campaign_id, occasion, publication_id, code, cause, issued_at",
            Pseudonymize,
        )],
    ))
}

/// Runs the campaign-scheduler alone on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let component = build(&config, shutdown.clone()).await?;
    component::serve_one(&config, listener, component, shutdown).await
}
