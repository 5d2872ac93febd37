//! Segments: dynamic (a rule over the customer) and static (uploaded members).
//!
//! A customer's membership is computed from their facts (dynamic) and the member table
//! (static), and cached in the segment cache under a key that carries the tenant's segment
//! version, with the facts version inside the entry: an entry is only used when both match
//! the database, so a stale entry can never answer after a change, even if an invalidation
//! was lost while Redis was down. When the cache fails, membership is computed directly
//! (slower, still exact) and the component reports the cache as degraded.
//!
//! A recompute job evaluates a dynamic segment for every customer, page by page, storing the
//! members (for the segment's size and member listing) and its progress.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_cache::{Membership, SegmentCache};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, insert_rows, now_micros, stmt};

use crate::facts::{self, Facts};
use crate::readmodel::ReadModel;
use crate::rules::{self, Rule, Schema, Scope};

pub const STATIC: &str = "static";
pub const DYNAMIC: &str = "dynamic";
const PAGE: usize = 500;
/// A running job whose heartbeat is older than this was interrupted.
const STALE_JOB_MICROS: i64 = 60_000_000;

/// A tenant's segments, compiled.
#[derive(Debug, Default)]
pub struct SegmentSet {
    pub version: i64,
    pub ids: HashSet<String>,
    pub dynamic: Vec<(String, Arc<Rule>)>,
    pub has_static: bool,
}

pub fn check_segment_id(v: &mut Violations, field: &str, id: &str) {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        v.add(field, "must be 1 to 64 of a-z, 0-9, _ and -");
    }
}

/// Checks a definition; compiles its rule (dynamic) against the tenant's attributes.
pub fn check(
    v: &mut Violations,
    s: Option<&pb::SegmentInput>,
    attributes: &std::collections::BTreeMap<String, rules::AttrType>,
) {
    let Some(s) = s else {
        v.add("segment", "is required");
        return;
    };
    check_segment_id(v, "segment.id", &s.id);
    if s.name.trim().is_empty() || s.name.chars().count() > 200 {
        v.add("segment.name", "must be 1 to 200 characters");
    }
    match s.kind() {
        pb::SegmentKind::Dynamic => {
            if let Err(e) = rules::compile(&s.rule, &Schema::new(attributes, Scope::Segment)) {
                v.add("segment.rule", e.to_string());
            }
        }
        pb::SegmentKind::Static => {
            if !s.rule.is_empty() {
                v.add("segment.rule", "must be empty for a static segment");
            }
        }
        pb::SegmentKind::Unspecified => v.add("segment.kind", "is required"),
    }
}

fn kind_name(k: pb::SegmentKind) -> &'static str {
    if k == pb::SegmentKind::Static {
        STATIC
    } else {
        DYNAMIC
    }
}

/// Moves the tenant's segment version: every cached membership of the tenant retires.
pub async fn bump(txn: &DatabaseTransaction, tenant: &str) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO segment_feed (tenant_id, version) VALUES ($1, 1) \
         ON CONFLICT (tenant_id) DO UPDATE SET version = segment_feed.version + 1",
        [tenant.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

pub async fn feed_version<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<i64, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT version FROM segment_feed WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    row.map_or(Ok(0), |r| r.try_get_by_index(0).map_err(db_error))
}

const COLUMNS: &str = "definition, version, size, computed_at";

fn from_row(row: &sea_orm::QueryResult) -> Result<pb::Segment, Error> {
    let bytes: Vec<u8> = row.try_get_by_index(0).map_err(db_error)?;
    let computed: Option<i64> = row.try_get_by_index(3).map_err(db_error)?;
    Ok(pb::Segment {
        definition: Some(pb::SegmentInput::decode(bytes.as_slice()).map_err(Error::internal)?),
        version: row.try_get_by_index(1).map_err(db_error)?,
        size: row.try_get_by_index(2).map_err(db_error)?,
        computed_at: computed.map(micros_to_timestamp),
    })
}

pub async fn get<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::Segment, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM segments WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("segment `{id}`")))?;
    from_row(&row)
}

pub async fn list<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<Vec<pb::Segment>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM segments WHERE tenant_id = $1 ORDER BY id"),
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    rows.iter().map(from_row).collect()
}

pub async fn create(
    txn: &DatabaseTransaction,
    tenant: &str,
    s: &pb::SegmentInput,
) -> Result<pb::Segment, Error> {
    let inserted = txn
        .execute_raw(stmt(
            txn,
            "INSERT INTO segments (tenant_id, id, definition, kind, version, size, computed_at) \
             VALUES ($1, $2, $3, $4, 1, 0, NULL) ON CONFLICT (tenant_id, id) DO NOTHING",
            [
                tenant.into(),
                s.id.clone().into(),
                s.encode_to_vec().into(),
                kind_name(s.kind()).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if inserted.rows_affected() == 0 {
        return Err(Error::new(
            Code::AlreadyExists,
            format!("segment `{}` exists already", s.id),
        ));
    }
    bump(txn, tenant).await?;
    get(txn, tenant, &s.id).await
}

pub async fn update(
    txn: &DatabaseTransaction,
    tenant: &str,
    s: &pb::SegmentInput,
) -> Result<pb::Segment, Error> {
    let current = get(txn, tenant, &s.id).await?;
    let was = current.definition.unwrap_or_default();
    if was.kind() != s.kind() {
        return Err(Error::invalid_field(
            "segment.kind",
            "cannot change; create another segment",
        ));
    }
    txn.execute_raw(stmt(
        txn,
        "UPDATE segments SET definition = $3, version = version + 1 \
         WHERE tenant_id = $1 AND id = $2",
        [tenant.into(), s.id.clone().into(), s.encode_to_vec().into()],
    ))
    .await
    .map_err(db_error)?;
    bump(txn, tenant).await?;
    get(txn, tenant, &s.id).await
}

/// Adds and removes static members; returns the segment.
pub async fn edit_static(
    txn: &DatabaseTransaction,
    tenant: &str,
    id: &str,
    add: &[String],
    remove: &[String],
) -> Result<pb::Segment, Error> {
    let segment = get(txn, tenant, id).await?;
    if segment.definition.as_ref().map(|d| d.kind()) != Some(pb::SegmentKind::Static) {
        return Err(Error::invalid_field("id", "is not a static segment"));
    }
    let rows = add
        .iter()
        .map(|c| vec![tenant.into(), id.into(), c.clone().into()])
        .collect();
    insert_rows(
        txn,
        "INSERT INTO segment_members (tenant_id, segment_id, customer_id)",
        "ON CONFLICT DO NOTHING",
        rows,
    )
    .await?;
    for chunk in remove.chunks(500) {
        let sql = format!(
            "DELETE FROM segment_members WHERE tenant_id = $1 AND segment_id = $2 \
             AND customer_id IN ({})",
            Db::placeholders(3, chunk.len())
        );
        let values = [tenant.into(), id.into()]
            .into_iter()
            .chain(chunk.iter().map(|c| c.clone().into()));
        txn.execute_raw(stmt(txn, &sql, values))
            .await
            .map_err(db_error)?;
    }
    txn.execute_raw(stmt(
        txn,
        "UPDATE segments SET size = (SELECT COUNT(*) FROM segment_members \
         WHERE tenant_id = $1 AND segment_id = $2), computed_at = $3 \
         WHERE tenant_id = $1 AND id = $2",
        [tenant.into(), id.into(), now_micros().into()],
    ))
    .await
    .map_err(db_error)?;
    bump(txn, tenant).await?;
    get(txn, tenant, id).await
}

pub async fn members<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    limit: u32,
    after: &str,
) -> Result<(Vec<String>, bool), Error> {
    get(conn, tenant, id).await?;
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT customer_id FROM segment_members WHERE tenant_id = $1 AND segment_id = $2 \
             AND customer_id > $3 ORDER BY customer_id LIMIT $4",
            [
                tenant.into(),
                id.into(),
                after.into(),
                i64::from(limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get_by_index(0).map_err(db_error))
        .collect::<Result<_, _>>()?;
    let more = ids.len() > limit as usize;
    ids.truncate(limit as usize);
    Ok((ids, more))
}

/// Segment sets per tenant, and membership through the cache.
pub struct Segments {
    pub db: Db,
    pub cache: Arc<dyn SegmentCache>,
    sets: ReadModel<SegmentSet>,
    /// Set while the cache fails; cleared by the next success.
    pub degraded: Arc<AtomicBool>,
}

impl Segments {
    pub fn new(db: Db, cache: Arc<dyn SegmentCache>) -> Self {
        Self {
            db,
            cache,
            sets: ReadModel::default(),
            degraded: Arc::default(),
        }
    }

    pub fn forget(&self, tenant: &str) {
        self.sets.forget(tenant);
    }

    /// The tenant's segments, compiled, at most [`crate::readmodel::FRESHNESS`] old.
    pub async fn set(&self, tenant: &str) -> Result<Arc<SegmentSet>, Error> {
        if let Some(set) = self.sets.fresh(tenant) {
            return Ok(set);
        }
        let conn = self.db.conn();
        let version = feed_version(conn, tenant).await?;
        if let Some(set) = self.sets.stale(tenant).filter(|s| s.version == version) {
            self.sets.store(tenant, set.clone());
            return Ok(set);
        }
        let attributes = facts::attributes(conn, tenant).await?;
        let schema = Schema::new(&attributes, Scope::Segment);
        let mut set = SegmentSet {
            version,
            ..Default::default()
        };
        for s in list(conn, tenant).await? {
            let def = s.definition.unwrap_or_default();
            set.ids.insert(def.id.clone());
            if def.kind() == pb::SegmentKind::Static {
                set.has_static = true;
            } else {
                let rule = rules::compile(&def.rule, &schema).map_err(Error::internal)?;
                set.dynamic.push((def.id, Arc::new(rule)));
            }
        }
        let set = Arc::new(set);
        self.sets.store(tenant, set.clone());
        Ok(set)
    }

    fn cache_key(customer: &str, version: i64) -> String {
        format!("{customer}@{version}")
    }

    /// Frees a customer's cached membership (best effort: entries are versioned anyway).
    pub async fn invalidate(&self, tenant: &str, customer: &str) {
        if let Ok(set) = self.set(tenant).await {
            let key = Self::cache_key(customer, set.version);
            let _ = self.cache.invalidate(tenant, &key).await;
        }
    }

    fn cache_result<T>(&self, r: Result<T, tessera_cache::CacheError>) -> Option<T> {
        match r {
            Ok(v) => {
                self.degraded.store(false, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "segment cache unavailable, computing directly");
                }
                None
            }
        }
    }

    /// The customer's segments: `(ids, from the cache)`.
    pub async fn membership(
        &self,
        ctx: &RequestContext,
        facts: &Facts,
        now: i64,
        settings: &facts::Settings,
    ) -> Result<(BTreeSet<String>, bool), Error> {
        let tenant = ctx.tenant_id.as_str();
        let set = self.set(tenant).await?;
        if set.ids.is_empty() {
            return Ok((BTreeSet::new(), false));
        }
        let key = Self::cache_key(&facts.profile.id, set.version);
        let version = u64::try_from(facts.facts_version).unwrap_or(0);
        if let Some(Some(m)) = self.cache_result(self.cache.get(tenant, &key).await)
            && m.facts_version == version
        {
            return Ok((m.segments, true));
        }
        let segments = self.compute(tenant, &set, facts, now, settings).await?;
        self.cache_result(
            self.cache
                .put(
                    tenant,
                    &key,
                    &Membership {
                        facts_version: version,
                        segments: segments.clone(),
                    },
                )
                .await,
        );
        Ok((segments, false))
    }

    /// Membership computed from the facts and the member table.
    pub async fn compute(
        &self,
        tenant: &str,
        set: &SegmentSet,
        facts: &Facts,
        now: i64,
        settings: &facts::Settings,
    ) -> Result<BTreeSet<String>, Error> {
        let mut out = BTreeSet::new();
        if set.has_static {
            let conn = self.db.conn();
            let rows = conn
                .query_all_raw(stmt(
                    conn,
                    "SELECT m.segment_id FROM segment_members m JOIN segments s \
                     ON s.tenant_id = m.tenant_id AND s.id = m.segment_id \
                     WHERE m.tenant_id = $1 AND m.customer_id = $2 AND s.kind = $3",
                    [
                        tenant.into(),
                        facts.profile.id.clone().into(),
                        STATIC.into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
            for row in rows {
                out.insert(row.try_get_by_index(0).map_err(db_error)?);
            }
        }
        if !set.dynamic.is_empty() && facts.known {
            let mut context = cel::Context::with_env(rules::ENV.clone());
            context.add_variable_from_value("customer", facts.customer_value());
            context.add_variable_from_value("now", cel::Value::Timestamp(settings.local(now)));
            for (id, rule) in &set.dynamic {
                if matches!(rule.program.execute(&context), Ok(cel::Value::Bool(true))) {
                    out.insert(id.clone());
                }
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Recompute jobs.

fn job_from_row(row: &sea_orm::QueryResult, now: i64) -> Result<pb::SegmentJob, Error> {
    let status: String = row.try_get_by_index(4).map_err(db_error)?;
    let heartbeat: i64 = row.try_get_by_index(11).map_err(db_error)?;
    let finished: Option<i64> = row.try_get_by_index(10).map_err(db_error)?;
    let created: i64 = row.try_get_by_index(9).map_err(db_error)?;
    let mut error: String = row.try_get_by_index(8).map_err(db_error)?;
    let mut status = match status.as_str() {
        "running" => pb::JobStatus::Running,
        "succeeded" => pb::JobStatus::Succeeded,
        _ => pb::JobStatus::Failed,
    };
    if status == pb::JobStatus::Running && now - heartbeat > STALE_JOB_MICROS {
        status = pb::JobStatus::Failed;
        error = "interrupted (the process stopped); recompute again".into();
    }
    Ok(pb::SegmentJob {
        id: row.try_get_by_index(0).map_err(db_error)?,
        segment_id: row.try_get_by_index(1).map_err(db_error)?,
        segment_version: row.try_get_by_index(2).map_err(db_error)?,
        status: status.into(),
        total: row.try_get_by_index(5).map_err(db_error)?,
        processed: row.try_get_by_index(6).map_err(db_error)?,
        members: row.try_get_by_index(7).map_err(db_error)?,
        error,
        created_at: Some(micros_to_timestamp(created)),
        finished_at: finished.map(micros_to_timestamp),
    })
}

pub async fn get_job<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<pb::SegmentJob, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT id, segment_id, segment_version, status, status, total, processed, \
             members, error, created_at, finished_at, heartbeat FROM segment_jobs \
             WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("segment job `{id}`")))?;
    job_from_row(&row, now_micros())
}

/// Creates a recompute job for a dynamic segment (the caller starts [`run_job`]).
pub async fn create_job(
    txn: &DatabaseTransaction,
    tenant: &str,
    segment_id: &str,
) -> Result<pb::SegmentJob, Error> {
    let segment = get(txn, tenant, segment_id).await?;
    if segment.definition.as_ref().map(|d| d.kind()) != Some(pb::SegmentKind::Dynamic) {
        return Err(Error::invalid_field(
            "id",
            "is not a dynamic segment (static ones need no recompute)",
        ));
    }
    let total: i64 = txn
        .query_one_raw(stmt(
            txn,
            "SELECT COUNT(*) FROM customers WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("count returned no row"))?
        .try_get_by_index(0)
        .map_err(db_error)?;
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_micros();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO segment_jobs (tenant_id, id, segment_id, segment_version, status, total, \
         processed, members, error, created_at, finished_at, heartbeat) \
         VALUES ($1, $2, $3, $4, 'running', $5, 0, 0, '', $6, NULL, $6)",
        [
            tenant.into(),
            id.clone().into(),
            segment_id.into(),
            segment.version.into(),
            total.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    get_job(txn, tenant, &id).await
}

/// Runs a recompute job to the end, recording progress after every page.
pub async fn run_job(segments: Arc<Segments>, ctx: RequestContext, job: pb::SegmentJob) {
    let tenant = ctx.tenant_id.clone();
    if let Err(e) = run_pages(&segments, &ctx, &job).await {
        tracing::warn!(job = %job.id, error = %e, "segment recompute failed");
        let conn = segments.db.conn();
        let _ = conn
            .execute_raw(stmt(
                conn,
                "UPDATE segment_jobs SET status = 'failed', error = $3, finished_at = $4 \
                 WHERE tenant_id = $1 AND id = $2",
                [
                    tenant.into(),
                    job.id.clone().into(),
                    e.message.clone().into(),
                    now_micros().into(),
                ],
            ))
            .await;
    }
}

async fn run_pages(
    segments: &Segments,
    ctx: &RequestContext,
    job: &pb::SegmentJob,
) -> Result<(), Error> {
    let tenant = ctx.tenant_id.as_str();
    let db = &segments.db;
    let conn = db.conn();
    let segment = get(conn, tenant, &job.segment_id).await?;
    let def = segment.definition.unwrap_or_default();
    let attributes = facts::attributes(conn, tenant).await?;
    let rule = rules::compile(&def.rule, &Schema::new(&attributes, Scope::Segment))
        .map_err(Error::internal)?;
    let settings = facts::settings(conn, tenant).await?;
    let set = SegmentSet {
        version: 0,
        ids: HashSet::from([def.id.clone()]),
        dynamic: vec![(def.id.clone(), Arc::new(rule))],
        has_static: false,
    };
    let mut after = String::new();
    let (mut processed, mut members) = (0i64, 0i64);
    loop {
        let rows = conn
            .query_all_raw(stmt(
                conn,
                "SELECT id FROM customers WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                [tenant.into(), after.clone().into(), (PAGE as i64).into()],
            ))
            .await
            .map_err(db_error)?;
        let ids: Vec<String> = rows
            .iter()
            .map(|r| r.try_get_by_index(0).map_err(db_error))
            .collect::<Result<_, _>>()?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        let now = now_micros();
        let mut found = Vec::new();
        for id in &ids {
            let f = facts::load(conn, ctx, id, now).await?;
            if !segments
                .compute(tenant, &set, &f, now, &settings)
                .await?
                .is_empty()
            {
                found.push(id.clone());
            }
        }
        let txn = db.begin_write().await?;
        txn.execute_raw(stmt(
            &txn,
            "DELETE FROM segment_members WHERE tenant_id = $1 AND segment_id = $2 \
             AND customer_id > $3 AND customer_id <= $4",
            [
                tenant.into(),
                def.id.clone().into(),
                after.clone().into(),
                last.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        insert_rows(
            &txn,
            "INSERT INTO segment_members (tenant_id, segment_id, customer_id)",
            "ON CONFLICT DO NOTHING",
            found
                .iter()
                .map(|c| vec![tenant.into(), def.id.clone().into(), c.clone().into()])
                .collect(),
        )
        .await?;
        processed += ids.len() as i64;
        members += found.len() as i64;
        txn.execute_raw(stmt(
            &txn,
            "UPDATE segment_jobs SET processed = $3, members = $4, heartbeat = $5 \
             WHERE tenant_id = $1 AND id = $2",
            [
                tenant.into(),
                job.id.clone().into(),
                processed.into(),
                members.into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        after = last;
    }
    // Members past the last customer (erased since) go too.
    let txn = db.begin_write().await?;
    txn.execute_raw(stmt(
        &txn,
        "DELETE FROM segment_members WHERE tenant_id = $1 AND segment_id = $2 \
         AND customer_id > $3",
        [tenant.into(), def.id.clone().into(), after.into()],
    ))
    .await
    .map_err(db_error)?;
    let now = now_micros();
    txn.execute_raw(stmt(
        &txn,
        "UPDATE segments SET size = $3, computed_at = $4 WHERE tenant_id = $1 AND id = $2",
        [
            tenant.into(),
            def.id.clone().into(),
            members.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    txn.execute_raw(stmt(
        &txn,
        "UPDATE segment_jobs SET status = 'succeeded', total = $3, finished_at = $4, \
         heartbeat = $4 WHERE tenant_id = $1 AND id = $2",
        [
            tenant.into(),
            job.id.clone().into(),
            processed.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    txn.commit().await.map_err(db_error)?;
    Ok(())
}
