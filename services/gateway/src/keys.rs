//! API keys: one per integration, bound to a tenant and a role, shown once and stored only
//! as a SHA-256 hash (keys are 192-bit random, so a fast hash is enough to make a leaked
//! table useless), revocable. A tenant's admins manage its keys over HTTP
//! (`POST|GET /v1/api-keys`, `DELETE /v1/api-keys/{id}`); an operator gives a new tenant its
//! first admin key with `tessera create-key`.

use rand::RngCore;
use sea_orm::{ConnectionTrait, QueryResult};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_runtime::{Code, Error};
use tessera_store::{Db, db_error, now_micros, stmt};
use utoipa::ToSchema;

use crate::query::rfc3339_micros;

/// Tenant the bootstrap admin key belongs to.
pub const DEFAULT_TENANT: &str = "default";
const KEY_PREFIX: &str = "tsk_";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Marketer,
    JuniorMarketer,
    SupportAgent,
    Touchpoint,
    Analyst,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Admin,
        Role::Marketer,
        Role::JuniorMarketer,
        Role::SupportAgent,
        Role::Touchpoint,
        Role::Analyst,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Marketer => "marketer",
            Role::JuniorMarketer => "junior_marketer",
            Role::SupportAgent => "support_agent",
            Role::Touchpoint => "touchpoint",
            Role::Analyst => "analyst",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "admin" => Role::Admin,
            "marketer" => Role::Marketer,
            "junior_marketer" => Role::JuniorMarketer,
            "support_agent" => Role::SupportAgent,
            "touchpoint" => Role::Touchpoint,
            "analyst" => Role::Analyst,
            _ => return None,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub tenant_id: String,
    pub role: Role,
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: `tsk_` + 48 hex characters.
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// A key as its tenant's admins see it (never the key itself).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyInfo {
    /// `key_…`: what the audit log names as the principal.
    pub id: String,
    pub name: String,
    /// `admin`, `marketer`, `junior_marketer`, `support_agent`, `touchpoint` or `analyst`.
    pub role: String,
    pub created_at: Option<String>,
    /// Set once the key is revoked; it authenticates nothing after that.
    pub revoked_at: Option<String>,
}

/// What `POST /v1/api-keys` takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// What the key is for ("web shop", "CRM sync"): 1 to 100 characters.
    pub name: String,
    /// Its role.
    pub role: String,
}

fn info(row: &QueryResult) -> Result<KeyInfo, Error> {
    Ok(KeyInfo {
        id: row.try_get_by_index(0).map_err(db_error)?,
        name: row.try_get_by_index(1).map_err(db_error)?,
        role: row.try_get_by_index(2).map_err(db_error)?,
        created_at: rfc3339_micros(row.try_get_by_index(3).map_err(db_error)?),
        revoked_at: row
            .try_get_by_index::<Option<i64>>(4)
            .map_err(db_error)?
            .and_then(rfc3339_micros),
    })
}

const INFO: &str = "id, name, role, created_at, revoked_at";

/// The API key store.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    db: Db,
}

impl ApiKeys {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores `key` for `tenant` with `role`. Returns the key id.
    pub async fn insert(
        &self,
        tenant: &str,
        name: &str,
        role: Role,
        key: &str,
    ) -> Result<String, Error> {
        let id = format!("key_{}", uuid::Uuid::now_v7().simple());
        let conn = self.db.conn();
        conn.execute_raw(stmt(
            conn,
            "INSERT INTO api_keys (id, tenant_id, name, role, key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_hash) DO NOTHING",
            [
                id.clone().into(),
                tenant.into(),
                name.into(),
                role.as_str().into(),
                hash(key).into(),
                now_micros().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(id)
    }

    /// Makes sure an admin key exists for the default tenant. With `configured`, that key is
    /// installed (idempotently). Without it, a key is generated on the very first start and
    /// returned so the operator can be shown it once.
    pub async fn bootstrap(&self, configured: Option<&str>) -> Result<Option<String>, Error> {
        if let Some(key) = configured {
            self.insert(DEFAULT_TENANT, "bootstrap admin", Role::Admin, key)
                .await?;
            return Ok(None);
        }
        let conn = self.db.conn();
        let existing = conn
            .query_one_raw(stmt(conn, "SELECT COUNT(*) FROM api_keys", []))
            .await
            .map_err(db_error)?
            .map(|r| r.try_get_by_index::<i64>(0))
            .transpose()
            .map_err(db_error)?
            .unwrap_or(0);
        if existing > 0 {
            return Ok(None);
        }
        let key = generate();
        self.insert(DEFAULT_TENANT, "bootstrap admin", Role::Admin, &key)
            .await?;
        Ok(Some(key))
    }

    /// The principal behind a presented key, if the key is known and not revoked.
    pub async fn authenticate(&self, key: &str) -> Result<Option<Principal>, Error> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return Ok(None);
        }
        let conn = self.db.conn();
        let row = conn
            .query_one_raw(stmt(
                conn,
                "SELECT id, tenant_id, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                [hash(key).into()],
            ))
            .await
            .map_err(db_error)?;
        let Some(row) = row else { return Ok(None) };
        let role: String = row.try_get_by_index(2).map_err(db_error)?;
        Ok(Some(Principal {
            key_id: row.try_get_by_index(0).map_err(db_error)?,
            tenant_id: row.try_get_by_index(1).map_err(db_error)?,
            role: Role::parse(&role)
                .ok_or_else(|| Error::internal(format!("stored role {role}")))?,
        }))
    }

    /// The API keys as gRPC servers in this process resolve them.
    pub fn verifier(&self) -> std::sync::Arc<dyn tessera_runtime::auth::KeyVerifier> {
        std::sync::Arc::new(self.clone())
    }

    /// Revokes a key of `tenant`. Returns whether a key was revoked.
    pub async fn revoke(&self, tenant: &str, key_id: &str) -> Result<bool, Error> {
        let conn = self.db.conn();
        let result = conn
            .execute_raw(stmt(
                conn,
                "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
                [now_micros().into(), tenant.into(), key_id.into()],
            ))
            .await
            .map_err(db_error)?;
        Ok(result.rows_affected() == 1)
    }

    /// Creates a key for `tenant`, once per `idempotency_key`: the new key is returned this
    /// once; a retry with the same key and body finds the key it made (without the key
    /// itself, which is not kept), another body is refused.
    pub async fn create(
        &self,
        tenant: &str,
        new: &NewKey,
        idempotency_key: &str,
    ) -> Result<(KeyInfo, Option<String>), Error> {
        let id = format!(
            "key_{}",
            &hex::encode(Sha256::digest(format!("{tenant}\n{idempotency_key}")))[..32]
        );
        let key = generate();
        let conn = self.db.conn();
        let inserted = conn
            .execute_raw(stmt(
                conn,
                "INSERT INTO api_keys (id, tenant_id, name, role, key_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                [
                    id.clone().into(),
                    tenant.into(),
                    new.name.clone().into(),
                    new.role.clone().into(),
                    hash(&key).into(),
                    now_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected()
            == 1;
        let stored = self
            .get(tenant, &id)
            .await?
            .ok_or_else(|| Error::internal("a created key is missing"))?;
        if inserted {
            return Ok((stored, Some(key)));
        }
        if stored.name != new.name || stored.role != new.role {
            return Err(Error::new(
                Code::FailedPrecondition,
                "this Idempotency-Key was used with another request",
            )
            .with_reason("IDEMPOTENCY_KEY_REUSED"));
        }
        Ok((stored, None))
    }

    /// A key of `tenant`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<KeyInfo>, Error> {
        let conn = self.db.conn();
        conn.query_one_raw(stmt(
            conn,
            &format!("SELECT {INFO} FROM api_keys WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .map(|row| info(&row))
        .transpose()
    }

    /// A page of `tenant`'s keys by id, after `starting_after`; and whether more follow.
    pub async fn list(
        &self,
        tenant: &str,
        limit: u32,
        starting_after: &str,
    ) -> Result<(Vec<KeyInfo>, bool), Error> {
        let conn = self.db.conn();
        let rows = conn
            .query_all_raw(stmt(
                conn,
                &format!(
                    "SELECT {INFO} FROM api_keys WHERE tenant_id = $1 AND id > $2 \
                     ORDER BY id LIMIT $3"
                ),
                [
                    tenant.into(),
                    starting_after.into(),
                    i64::from(limit + 1).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let more = rows.len() > limit as usize;
        let keys = rows
            .iter()
            .take(limit as usize)
            .map(info)
            .collect::<Result<_, _>>()?;
        Ok((keys, more))
    }

    /// Revokes key `id` of `tenant` unless it is the tenant's last admin key in use (then
    /// `FAILED_PRECONDITION`, reason `LAST_ADMIN_KEY`). The tenant's admin keys are locked
    /// first (PostgreSQL; SQLite has one writer), so two admins revoking each other's keys
    /// at once cannot leave the tenant without one. Revoking a revoked key changes nothing.
    /// Returns the key as it is after; None when the tenant has no such key.
    pub async fn revoke_checked(&self, tenant: &str, id: &str) -> Result<Option<KeyInfo>, Error> {
        let txn = self.db.begin_write().await?;
        let lock = self.db.backend().row_lock();
        let admins = txn
            .query_all_raw(stmt(
                &txn,
                &format!(
                    "SELECT id FROM api_keys WHERE tenant_id = $1 AND role = $2 \
                     AND revoked_at IS NULL ORDER BY id{lock}"
                ),
                [tenant.into(), Role::Admin.as_str().into()],
            ))
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_error)?;
        if admins.len() == 1 && admins[0] == id {
            return Err(Error::new(
                Code::FailedPrecondition,
                "this is the tenant's last admin key: create another admin key first",
            )
            .with_reason("LAST_ADMIN_KEY"));
        }
        txn.execute_raw(stmt(
            &txn,
            "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 \
             AND revoked_at IS NULL",
            [now_micros().into(), tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.get(tenant, id).await
    }
}

/// gRPC callers send the same keys as HTTP ones (see `tessera_runtime::auth`).
impl tessera_runtime::auth::KeyVerifier for ApiKeys {
    fn verify<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<tessera_runtime::auth::KeyIdentity>, Error>>
    {
        Box::pin(async move {
            Ok(self
                .authenticate(key)
                .await?
                .map(|p| tessera_runtime::auth::KeyIdentity {
                    tenant_id: p.tenant_id,
                    key_id: p.key_id,
                    role: p.role.as_str().to_string(),
                }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn generated_keys_are_unique_and_prefixed() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == 52);
        assert_ne!(hash(&a), hash(&b));
    }
}
