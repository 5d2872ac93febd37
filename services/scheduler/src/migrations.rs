//! The campaign-scheduler's tables: campaigns (the source of truth, stored as protobuf with
//! their state and versions), their history, and the durable jobs with their run log.

use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tessera_store::migrate::{AddColumns, DropColumns, Migration, col, index, plumbing, table};

/// The campaign-scheduler's migrations, in order.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = plumbing();
        all.push(Box::new(Migration {
            name: "m0400_campaigns",
            tables: || {
                vec![
                    // `version` moves with every change; `synced_version` is the version
                    // eligibility has applied; `sync_pending` (1 while it is behind) is what
                    // the sync looks for.
                    table(
                        "campaigns",
                        vec![
                            col::text("tenant_id"),
                            col::text("id"),
                            col::text("state"),
                            col::big("version"),
                            col::big("synced_version"),
                            col::int("sync_pending"),
                            col::blob("campaign"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["tenant_id", "id"],
                    ),
                    table(
                        "campaign_transitions",
                        vec![
                            col::text("tenant_id"),
                            col::text("campaign_id"),
                            col::big("seq"),
                            col::text("from_state"),
                            col::text("to_state"),
                            col::text("action"),
                            col::text("reason"),
                            col::text("principal"),
                            col::big("at"),
                        ],
                        &["tenant_id", "campaign_id", "seq"],
                    ),
                    // A job is a row, due at `due_at`; `job_key` names it in the tenant (one
                    // start job per campaign, one sweep per programme). Its lease columns
                    // went when jobs moved onto the shared work queue (m0404).
                    table(
                        "jobs",
                        vec![
                            col::text("id"),
                            col::text("tenant_id"),
                            col::text("job_key"),
                            col::text("kind"),
                            col::text("campaign_id"),
                            col::blob("payload"),
                            col::big("due_at"),
                            col::text("status"),
                            col::int("attempts"),
                            col::text("lease_owner"),
                            col::big("lease_until"),
                            col::big("fence"),
                            col::text("last_error"),
                            col::big("runs"),
                            col::big("created_at"),
                            col::big("updated_at"),
                        ],
                        &["id"],
                    ),
                    // One row per completed execution, written in the execution's own
                    // transaction: the audit of what ran, when, where and at which attempt.
                    table(
                        "job_runs",
                        vec![
                            col::serial("seq"),
                            col::text("job_id"),
                            col::text("tenant_id"),
                            col::text("kind"),
                            col::text("owner"),
                            col::big("fence"),
                            col::big("due_at"),
                            col::big("ran_at"),
                        ],
                        &[],
                    ),
                ]
            },
            indexes: || {
                vec![
                    index(
                        "campaigns_by_state",
                        "campaigns",
                        &["tenant_id", "state", "id"],
                        false,
                    ),
                    index("campaigns_unsynced", "campaigns", &["sync_pending"], false),
                    index("jobs_by_key", "jobs", &["tenant_id", "job_key"], true),
                    index("jobs_due", "jobs", &["status", "due_at"], false),
                    index(
                        "jobs_by_campaign",
                        "jobs",
                        &["tenant_id", "campaign_id", "due_at"],
                        false,
                    ),
                    index("job_runs_by_job", "job_runs", &["job_id"], false),
                ]
            },
        }));
        all.push(Box::new(Migration {
            name: "m0401_issues",
            tables: || {
                // An incentive issued to a customer: once per campaign and customer (and
                // occasion: a birthday campaign issues once a year).
                vec![table(
                    "issues",
                    vec![
                        col::text("tenant_id"),
                        col::text("campaign_id"),
                        col::text("customer_id"),
                        col::text("occasion"),
                        col::text("publication_id"),
                        col::text("code"),
                        col::text("cause"),
                        col::big("issued_at"),
                        col::int("reminders"),
                    ],
                    &["tenant_id", "campaign_id", "customer_id", "occasion"],
                )]
            },
            indexes: Vec::new,
        }));
        all.push(Box::new(Migration {
            name: "m0402_distributions",
            tables: || {
                vec![table(
                    "distributions",
                    vec![
                        col::text("tenant_id"),
                        col::text("id"),
                        col::text("campaign_id"),
                        col::text("segment_id"),
                        col::text("state"),
                        col::big("total"),
                        col::big("processed"),
                        col::big("issued"),
                        col::big("already_issued"),
                        col::big("failed"),
                        col::text("failures"),
                        col::text("error"),
                        col::text("cursor"),
                        col::text("principal"),
                        col::big("created_at"),
                        col::big("finished_at"),
                    ],
                    &["tenant_id", "id"],
                )]
            },
            indexes: Vec::new,
        }));
        // What retention purges by age (`tessera_store::retention`).
        all.push(Box::new(Migration {
            name: "m0403_retention",
            tables: Vec::new,
            indexes: || {
                vec![index(
                    "job_runs_age",
                    "job_runs",
                    &["tenant_id", "ran_at"],
                    false,
                )]
            },
        }));
        // Jobs run on the shared work queue (`jobs::QUEUE`): its items carry the lease and
        // the fence, so the job's own lease columns go; a run records its attempt instead
        // of its token.
        all.push(Box::new(DropColumns {
            name: "m0404_jobs_on_queue",
            columns: &[
                ("jobs", "lease_owner"),
                ("jobs", "lease_until"),
                ("jobs", "fence"),
                ("job_runs", "fence"),
            ],
        }));
        all.push(Box::new(AddColumns {
            name: "m0405_job_run_attempt",
            columns: || vec![("job_runs", col::big_zero("attempt"))],
        }));
        all
    }
}
