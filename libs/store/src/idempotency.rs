//! Idempotency keys for every mutating RPC, with the semantics of the IETF
//! `Idempotency-Key` draft:
//!
//! * same key, same request → the stored response (or the stored error, when the first
//!   attempt failed for a reason that replaying cannot change);
//! * same key, different request → `FAILED_PRECONDITION`, reason `IDEMPOTENCY_KEY_REUSED`;
//! * same key while the first request is still running → `ABORTED`, reason
//!   `IDEMPOTENCY_KEY_IN_FLIGHT`.
//!
//! A request claims its key as the first write of the transaction that does its work and
//! records the response, so the stored response exists exactly when the effects do, in one
//! commit. On PostgreSQL a transaction-scoped advisory lock on the key tells a concurrent
//! duplicate that the key is in flight (instead of letting it wait on the uncommitted claim);
//! on SQLite writers are serialised, so a duplicate finds the key settled. If the process dies
//! mid-request the transaction, claim included, is rolled back. Claims committed on their own
//! ([`Idempotency::begin`]) are leases: after `in_flight_lease_secs` a retry takes the key
//! over, and the dead owner's late commit is refused by the fencing check on `owner`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use sha2::{Digest, Sha256};
use tessera_runtime::{Code, Error, RequestContext};

use crate::db::{Backend, Db, db_error, now_micros, stmt};

const IN_FLIGHT: &str = "in_flight";
const DONE: &str = "done";

fn in_flight() -> Error {
    Error::new(
        Code::Aborted,
        "a request with this idempotency key is in flight, retry later",
    )
    .with_reason("IDEMPOTENCY_KEY_IN_FLIGHT")
}

/// Checks the shape of a key: 1..=255 visible ASCII characters.
pub fn validate_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid_field("idempotency_key", "is required"));
    }
    if key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid_field(
            "idempotency_key",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(())
}

/// An idempotency key derived from the parts that identify an effect (`prefix:a:b:…`), for
/// one service to call another exactly once per thing. Parts are tenant-chosen ids, so when
/// the plain form would not be a valid key (too long, invisible characters) it becomes
/// `prefix:` and the SHA-256 of the parts: still one key per thing.
pub fn derived_key(prefix: &str, parts: &[&str]) -> String {
    let plain = std::iter::once(prefix)
        .chain(parts.iter().copied())
        .collect::<Vec<_>>()
        .join(":");
    if validate_key(&plain).is_ok() {
        return plain;
    }
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    format!("{prefix}:{}", hex::encode(hasher.finalize()))
}

/// A key this request owns until it completes or fails.
#[derive(Debug)]
pub struct Claim {
    tenant_id: String,
    scope: String,
    key: String,
    owner: String,
}

impl Claim {
    fn new(ctx: &RequestContext, scope: &str, key: &str, owner: String) -> Self {
        Self {
            tenant_id: ctx.tenant_id.clone(),
            scope: scope.to_string(),
            key: key.to_string(),
            owner,
        }
    }
}

/// What claiming a key found.
#[derive(Debug)]
pub enum Begin<R> {
    /// The key is new (or its previous owner died): do the work.
    Fresh(Claim),
    /// The key was used for this same request before: return this.
    Replay(Result<R, Error>),
}

fn fingerprint(scope: &str, request: &impl Message) -> String {
    let mut hasher = Sha256::new();
    hasher.update(scope.as_bytes());
    hasher.update([0]);
    hasher.update(request.encode_to_vec());
    hex::encode(hasher.finalize())
}

/// Encodes a stored error: code name, reason and violations as a small JSON document.
fn encode_error(err: &Error) -> Vec<u8> {
    serde_json::json!({
        "code": err.code.as_str(),
        "message": err.message,
        "reason": err.reason,
        "violations": err.field_violations,
    })
    .to_string()
    .into_bytes()
}

fn decode_error(code: i32, bytes: &[u8]) -> Error {
    let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let status = tonic::Status::new(tonic::Code::from(code), "");
    let mut err = Error::new(
        Code::from_grpc(status.code()),
        value["message"].as_str().unwrap_or_default(),
    );
    err.reason = value["reason"].as_str().map(str::to_owned);
    if let Some(violations) = value["violations"].as_array() {
        err.field_violations = violations
            .iter()
            .map(|v| {
                tessera_runtime::FieldViolation::new(
                    v["field"].as_str().unwrap_or_default(),
                    v["description"].as_str().unwrap_or_default(),
                )
            })
            .collect();
    }
    err
}

/// A key's stored state.
enum Stored<R> {
    Done(Result<R, Error>),
    /// In flight, leased until this time (µs).
    InFlight(i64),
}

/// Idempotency for one service's database.
#[derive(Debug, Clone)]
pub struct Idempotency {
    db: Db,
    lease: Duration,
    wake: Vec<Arc<Notify>>,
    /// Seals stored answers (a service whose answers carry secrets).
    keyring: Option<tessera_runtime::sealing::Keyring>,
}

impl Idempotency {
    pub fn new(db: Db, lease: Duration) -> Self {
        Self {
            db,
            lease,
            wake: Vec::new(),
            keyring: None,
        }
    }

    /// Stores answers sealed with `keyring` (bound to tenant, scope and key): for a service
    /// whose answers carry secrets shown once (a webhook's signing secret), which a replay
    /// must give again but the database must not hold in the clear.
    pub fn sealing(mut self, keyring: tessera_runtime::sealing::Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    fn answer_context(tenant: &str, scope: &str, key: &str) -> String {
        format!("idempotency-answer\n{tenant}\n{scope}\n{key}")
    }

    /// A stored answer's bytes, opened when sealed.
    fn reveal(
        &self,
        tenant: &str,
        scope: &str,
        key: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        match (&self.keyring, std::str::from_utf8(&body)) {
            (Some(keyring), Ok(text)) if text.starts_with("sealed:") => {
                keyring.open(text, &Self::answer_context(tenant, scope, key))
            }
            _ => Ok(body),
        }
    }

    /// Wakes `relay` after every successful [`run`](Self::run), so the events (or queue
    /// items) the work wrote leave at once. Can be called once per relay or worker.
    pub fn waking(mut self, relay: Arc<Notify>) -> Self {
        self.wake.push(relay);
        self
    }

    /// Claims `key` for `request` under `scope` (the RPC name).
    pub async fn begin<R: Message + Default>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &impl Message,
    ) -> Result<Begin<R>, Error> {
        validate_key(key)?;
        let conn = self.db.conn();
        if let Some(claim) = self.claim_in(conn, ctx, scope, key, request).await? {
            return Ok(Begin::Fresh(claim));
        }
        let fingerprint = fingerprint(scope, request);
        let now = now_micros();
        let lease_until = now + i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX);
        let claim = Claim::new(ctx, scope, key, uuid::Uuid::new_v4().to_string());
        let locked_until = match self.lookup::<R>(ctx, scope, key, &fingerprint).await? {
            None => return Err(Error::new(Code::Aborted, "idempotency key changed, retry")),
            Some(Stored::Done(result)) => return Ok(Begin::Replay(result)),
            Some(Stored::InFlight(until)) => until,
        };
        if locked_until > now {
            return Err(in_flight());
        }
        // The owner's lease ran out (it died): take the key over, fenced on the old owner.
        let taken = conn
            .execute_raw(stmt(
                conn,
                "UPDATE idempotency_keys SET owner = $1, locked_until = $2 \
                 WHERE tenant_id = $3 AND scope = $4 AND key = $5 AND state = $6 \
                 AND locked_until = $7",
                [
                    claim.owner.clone().into(),
                    lease_until.into(),
                    ctx.tenant_id.clone().into(),
                    scope.into(),
                    key.into(),
                    IN_FLIGHT.into(),
                    locked_until.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        if taken.rows_affected() == 1 {
            Ok(Begin::Fresh(claim))
        } else {
            Err(in_flight())
        }
    }

    /// The answer stored for a completed request under (`scope`, `key`) of `tenant`:
    /// `None` while there is none (never made, or still in flight).
    pub async fn stored<R: Message + Default>(
        &self,
        tenant: &str,
        scope: &str,
        key: &str,
    ) -> Result<Option<Result<R, Error>>, Error> {
        let conn = self.db.conn();
        let Some(row) = conn
            .query_one_raw(stmt(
                conn,
                "SELECT response_code, response FROM idempotency_keys \
                 WHERE tenant_id = $1 AND scope = $2 AND key = $3 AND state = $4",
                [tenant.into(), scope.into(), key.into(), DONE.into()],
            ))
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let code: Option<i32> = row.try_get_by_index(0).map_err(db_error)?;
        let body: Option<Vec<u8>> = row.try_get_by_index(1).map_err(db_error)?;
        let body = body.unwrap_or_default();
        Ok(Some(match code.unwrap_or(0) {
            0 => R::decode(self.reveal(tenant, scope, key, body)?.as_slice())
                .map_err(Error::internal),
            code => Err(decode_error(code, &body)),
        }))
    }

    /// The stored state of a key: `None` when it is free.
    async fn lookup<R: Message + Default>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Stored<R>>, Error> {
        let conn = self.db.conn();
        let Some(row) = conn
            .query_one_raw(stmt(
                conn,
                "SELECT fingerprint, state, locked_until, response_code, response \
                 FROM idempotency_keys WHERE tenant_id = $1 AND scope = $2 AND key = $3",
                [ctx.tenant_id.clone().into(), scope.into(), key.into()],
            ))
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let stored: String = row.try_get_by_index(0).map_err(db_error)?;
        let state: String = row.try_get_by_index(1).map_err(db_error)?;
        let locked_until: i64 = row.try_get_by_index(2).map_err(db_error)?;
        if stored != fingerprint {
            return Err(Error::new(
                Code::FailedPrecondition,
                "idempotency key was already used with a different request",
            )
            .with_reason("IDEMPOTENCY_KEY_REUSED"));
        }
        if state != DONE {
            return Ok(Some(Stored::InFlight(locked_until)));
        }
        let code: Option<i32> = row.try_get_by_index(3).map_err(db_error)?;
        let body: Option<Vec<u8>> = row.try_get_by_index(4).map_err(db_error)?;
        let body = body.unwrap_or_default();
        Ok(Some(Stored::Done(match code.unwrap_or(0) {
            0 => R::decode(self.reveal(&ctx.tenant_id, scope, key, body)?.as_slice())
                .map_err(Error::internal),
            code => Err(decode_error(code, &body)),
        })))
    }

    /// Records the response inside the work's transaction. Fails (and the caller must roll
    /// back) if this claim lost its lease to a retry.
    pub async fn complete<R: Message>(
        &self,
        txn: &DatabaseTransaction,
        claim: &Claim,
        response: &R,
    ) -> Result<(), Error> {
        let body = match &self.keyring {
            Some(keyring) => keyring
                .seal(
                    &response.encode_to_vec(),
                    &Self::answer_context(&claim.tenant_id, &claim.scope, &claim.key),
                )
                .into_bytes(),
            None => response.encode_to_vec(),
        };
        self.finish(txn, claim, 0, body).await
    }

    async fn finish<C: ConnectionTrait>(
        &self,
        conn: &C,
        claim: &Claim,
        code: i32,
        body: Vec<u8>,
    ) -> Result<(), Error> {
        let done = conn
            .execute_raw(stmt(
                conn,
                "UPDATE idempotency_keys SET state = $1, response_code = $2, response = $3 \
                 WHERE tenant_id = $4 AND scope = $5 AND key = $6 AND owner = $7 AND state = $8",
                [
                    DONE.into(),
                    code.into(),
                    body.into(),
                    claim.tenant_id.clone().into(),
                    claim.scope.clone().into(),
                    claim.key.clone().into(),
                    claim.owner.clone().into(),
                    IN_FLIGHT.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(Error::new(
                Code::Aborted,
                "idempotency lease lost to a retry of the same request",
            ))
        }
    }

    /// The work failed. A deterministic error is stored (a replay gets the same answer); a
    /// transient one releases the key so the client can retry.
    pub async fn fail(&self, claim: &Claim, err: &Error) {
        let result = if err.is_deterministic() {
            self.finish(
                self.db.conn(),
                claim,
                err.code.grpc() as i32,
                encode_error(err),
            )
            .await
        } else {
            let conn = self.db.conn();
            conn.execute_raw(stmt(
                conn,
                "DELETE FROM idempotency_keys \
                 WHERE tenant_id = $1 AND scope = $2 AND key = $3 AND owner = $4",
                [
                    claim.tenant_id.clone().into(),
                    claim.scope.clone().into(),
                    claim.key.clone().into(),
                    claim.owner.clone().into(),
                ],
            ))
            .await
            .map(|_| ())
            .map_err(db_error)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, key = %claim.key, "could not settle idempotency key");
        }
    }

    /// Runs `work` at most once per (tenant, scope, key): claims the key, runs `work` in a
    /// write transaction, stores its response in that transaction and commits.
    pub async fn run<Req, R, F>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &Req,
        work: F,
    ) -> Result<R, Error>
    where
        Req: Message,
        R: Message + Default,
        F: for<'t> FnOnce(
            &'t DatabaseTransaction,
        ) -> futures::future::BoxFuture<'t, Result<R, Error>>,
    {
        let outcome = self.run_once(ctx, scope, key, request, work).await;
        if outcome.is_ok() {
            for wake in &self.wake {
                wake.notify_one();
            }
        }
        outcome
    }

    async fn run_once<Req, R, F>(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &Req,
        work: F,
    ) -> Result<R, Error>
    where
        Req: Message,
        R: Message + Default,
        F: for<'t> FnOnce(
            &'t DatabaseTransaction,
        ) -> futures::future::BoxFuture<'t, Result<R, Error>>,
    {
        validate_key(key)?;
        // Fast path, one commit: claim the key inside the work's own transaction. A
        // concurrent duplicate is refused by the advisory lock (PostgreSQL) or waits for the
        // writer (SQLite) and then finds the key settled and replays it.
        let txn = self.db.begin_write().await?;
        let claim = if self.db.backend() == Backend::Postgres {
            match self.lock_and_claim(&txn, ctx, scope, key, request).await? {
                Some(claim) => claim,
                None => {
                    txn.rollback().await.map_err(db_error)?;
                    return Err(in_flight());
                }
            }
        } else {
            self.claim_in(&txn, ctx, scope, key, request).await?
        };
        let Some(claim) = claim else {
            // The key exists: replay, refuse, or take over a dead owner's claim.
            txn.rollback().await.map_err(db_error)?;
            let claim = match self.begin::<R>(ctx, scope, key, request).await? {
                Begin::Replay(result) => return result,
                Begin::Fresh(claim) => claim,
            };
            let outcome = self.run_claimed(&claim, work).await;
            if let Err(err) = &outcome {
                self.fail(&claim, err).await;
            }
            return outcome;
        };
        match work(&txn).await {
            Ok(response) => {
                self.complete(&txn, &claim, &response).await?;
                txn.commit().await.map_err(db_error)?;
                Ok(response)
            }
            Err(err) => {
                // The claim goes with the rollback; a deterministic error is then stored so a
                // replay gets the same answer, a transient one leaves the key free.
                txn.rollback().await.map_err(db_error)?;
                if err.is_deterministic() {
                    let conn = self.db.conn();
                    if let Some(claim) = self.claim_in(conn, ctx, scope, key, request).await? {
                        self.fail(&claim, &err).await;
                    }
                }
                Err(err)
            }
        }
    }

    /// PostgreSQL, in one round trip: takes a transaction-scoped advisory lock on the key and,
    /// holding it, inserts the in-flight claim. `None` when another transaction holds the
    /// lock, i.e. the same key is in flight (without the lock a duplicate would wait on the
    /// first request's uncommitted claim instead of being told); `Some(None)` when the key
    /// exists already.
    async fn lock_and_claim(
        &self,
        txn: &DatabaseTransaction,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &impl Message,
    ) -> Result<Option<Option<Claim>>, Error> {
        // Advisory locks are database-wide: the schema is part of the lock's name, or two
        // deployments (or test suites) sharing a database refuse each other's keys as
        // "in flight".
        let mut hasher = Sha256::new();
        for part in [
            self.db.schema().unwrap_or_default(),
            ctx.tenant_id.as_str(),
            scope,
            key,
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let (owner, mut values) = self.claim_values(ctx, scope, key, request);
        values.push(i64::from_be_bytes(first).into());
        // `l` is referenced twice, so PostgreSQL evaluates it (and takes the lock) once.
        let row = txn
            .query_one_raw(stmt(
                txn,
                "WITH l AS (SELECT pg_try_advisory_xact_lock($9) AS ok), \
                 i AS (INSERT INTO idempotency_keys \
                 (tenant_id, scope, key, fingerprint, state, owner, locked_until, created_at) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM l WHERE l.ok \
                 ON CONFLICT (tenant_id, scope, key) DO NOTHING RETURNING 1) \
                 SELECT (SELECT ok FROM l), (SELECT COUNT(*) FROM i)",
                values,
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::internal("claim returned no row"))?;
        let locked: bool = row.try_get_by_index(0).map_err(db_error)?;
        let inserted: i64 = row.try_get_by_index(1).map_err(db_error)?;
        Ok(locked.then(|| (inserted == 1).then(|| Claim::new(ctx, scope, key, owner))))
    }

    /// The values of a new in-flight claim ($1..$8) and its owner.
    fn claim_values(
        &self,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &impl Message,
    ) -> (String, Vec<sea_orm::Value>) {
        let owner = uuid::Uuid::new_v4().to_string();
        let now = now_micros();
        let lease_until = now + i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX);
        let values = vec![
            ctx.tenant_id.clone().into(),
            scope.into(),
            key.into(),
            fingerprint(scope, request).into(),
            IN_FLIGHT.into(),
            owner.clone().into(),
            lease_until.into(),
            now.into(),
        ];
        (owner, values)
    }

    /// Inserts an in-flight claim on `conn`; `None` when the key exists already.
    async fn claim_in<C: ConnectionTrait>(
        &self,
        conn: &C,
        ctx: &RequestContext,
        scope: &str,
        key: &str,
        request: &impl Message,
    ) -> Result<Option<Claim>, Error> {
        let (owner, values) = self.claim_values(ctx, scope, key, request);
        let inserted = conn
            .execute_raw(stmt(
                conn,
                "INSERT INTO idempotency_keys \
                 (tenant_id, scope, key, fingerprint, state, owner, locked_until, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (tenant_id, scope, key) DO NOTHING",
                values,
            ))
            .await
            .map_err(db_error)?;
        Ok((inserted.rows_affected() == 1).then(|| Claim::new(ctx, scope, key, owner)))
    }

    async fn run_claimed<R, F>(&self, claim: &Claim, work: F) -> Result<R, Error>
    where
        R: Message + Default,
        F: for<'t> FnOnce(
            &'t DatabaseTransaction,
        ) -> futures::future::BoxFuture<'t, Result<R, Error>>,
    {
        let txn = self.db.begin_write().await?;
        let response = match work(&txn).await {
            Ok(response) => response,
            Err(err) => {
                txn.rollback().await.map_err(db_error)?;
                return Err(err);
            }
        };
        self.complete(&txn, claim, &response).await?;
        txn.commit().await.map_err(db_error)?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("order-123").is_ok());
        assert_eq!(
            validate_key("").unwrap_err().field_violations[0].field,
            "idempotency_key"
        );
        assert!(validate_key("has space").is_err());
        assert!(validate_key(&"k".repeat(256)).is_err());
    }

    #[test]
    fn stored_errors_round_trip() {
        let err = Error::invalid_field("amount", "must be positive").with_reason("R");
        let back = decode_error(err.code.grpc() as i32, &encode_error(&err));
        assert_eq!(back, err);
    }
}
