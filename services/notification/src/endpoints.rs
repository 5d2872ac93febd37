//! Webhook endpoints: their URL (behind the SSRF guard), event-type filters, state, signing
//! secrets (the current one, and the previous one during a rotation's overlap) and health.

use std::net::IpAddr;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::notification::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_runtime::sealing::Keyring;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, stmt};

/// Deliveries in flight per endpoint when not set.
pub const DEFAULT_CONCURRENCY: u32 = 8;

/// An endpoint as stored (with its secrets).
#[derive(Debug, Clone)]
pub struct Stored {
    pub endpoint: pb::WebhookEndpoint,
    pub secret: String,
    pub previous_secret: String,
    pub previous_until: i64,
}

impl Stored {
    /// The secrets that sign now, opened: the current one, and the previous one until its
    /// overlap ends.
    pub fn signing_secrets(
        &self,
        keyring: &Keyring,
        tenant: &str,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        let context = secret_context(tenant, &self.endpoint.id);
        let mut out = vec![keyring.open_text(&self.secret, &context)?];
        if !self.previous_secret.is_empty() && now < self.previous_until {
            out.push(keyring.open_text(&self.previous_secret, &context)?);
        }
        Ok(out)
    }
}

/// What an endpoint's sealed secrets are bound to (both of them: a rotation moves the
/// current one to `previous_secret` as it is).
fn secret_context(tenant: &str, endpoint: &str) -> String {
    format!("webhook-secret\n{tenant}\n{endpoint}")
}

/// Brings every endpoint's secrets under the keyring's current master key (sealing those
/// written before sealing, re-wrapping those under a retired key), one row at a time and
/// only if the row did not change meanwhile. Returns how many values were rewritten.
pub async fn reseal(db: &Db, keyring: &Keyring) -> Result<u64, Error> {
    let conn = db.conn();
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT tenant_id, id, secret, previous_secret FROM webhook_endpoints",
            [],
        ))
        .await
        .map_err(db_error)?;
    let (mut rewritten, mut current, mut unopenable) = (0, 0u64, 0u64);
    for row in &rows {
        let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let (tenant, id) = (text(0)?, text(1)?);
        let context = secret_context(&tenant, &id);
        for (column, at) in [("secret", 2), ("previous_secret", 3)] {
            let stored = text(at)?;
            if stored.is_empty() {
                continue;
            }
            let fresh = match keyring.rewrap(&stored, &context) {
                Ok(None) => {
                    current += 1;
                    continue;
                }
                Ok(Some(fresh)) => fresh,
                Err(e) => {
                    tracing::error!(tenant, endpoint = %id, error = %e, "a webhook secret does not open with the configured master keys");
                    unopenable += 1;
                    continue;
                }
            };
            current += 1;
            rewritten += conn
                .execute_raw(stmt(
                    conn,
                    &format!(
                        "UPDATE webhook_endpoints SET {column} = $4 \
                         WHERE tenant_id = $1 AND id = $2 AND {column} = $3"
                    ),
                    [
                        tenant.clone().into(),
                        id.clone().into(),
                        stored.into(),
                        fresh.into(),
                    ],
                ))
                .await
                .map_err(db_error)?
                .rows_affected();
        }
    }
    metrics::gauge!("tessera_sealed_secrets", "service" => crate::SERVICE, "state" => "current")
        .set(current as f64);
    metrics::gauge!("tessera_sealed_secrets", "service" => crate::SERVICE, "state" => "unopenable")
        .set(unopenable as f64);
    Ok(rewritten)
}

/// Whether an event type is one an endpoint asked for: listed, under a `prefix.*`, or the
/// list is empty (everything).
pub fn wants(event_types: &[String], event_type: &str) -> bool {
    event_types.is_empty()
        || event_types.iter().any(|t| match t.strip_suffix(".*") {
            Some(prefix) => event_type
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.')),
            None => t == event_type,
        })
}

/// Addresses a webhook may not reach unless its host is allowed: loopback, private,
/// link-local (which holds the cloud metadata address 169.254.169.254), unspecified,
/// carrier-grade NAT, unique-local IPv6 and IPv4-mapped forms of those.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Checks an endpoint URL: http(s), a host, and (unless the host is allowed) no address it
/// resolves to is forbidden. `field` names it in the error.
pub async fn check_url(url: &str, allowed_hosts: &[String], field: &str) -> Result<(), Error> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Error::invalid_field(field, format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(Error::invalid_field(field, "must be an http or https URL"));
    }
    if url.len() > 2000 {
        return Err(Error::invalid_field(
            field,
            "must be at most 2000 characters",
        ));
    }
    let Some(host) = parsed.host_str() else {
        return Err(Error::invalid_field(field, "must have a host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Ok(());
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::invalid_field(field, format!("does not resolve: {e}")))?
            .map(|a| a.ip())
            .collect(),
    };
    if addresses.iter().any(|ip| forbidden(*ip)) {
        return Err(Error::invalid_field(
            field,
            "resolves to a loopback, private, link-local or metadata address",
        ));
    }
    Ok(())
}

/// Checks the parts of an endpoint other than its URL.
pub fn check(v: &mut Violations, description: &str, event_types: &[String], concurrency: u32) {
    if description.chars().count() > 500 {
        v.add("description", "must be at most 500 characters");
    }
    if event_types.len() > 100 {
        v.add("event_types", "must hold at most 100 types");
    }
    for (i, t) in event_types.iter().enumerate() {
        let name = t.strip_suffix(".*").unwrap_or(t);
        let ok = !name.is_empty()
            && name.len() <= 100
            && name
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        if !ok {
            v.add(
                format!("event_types.{i}"),
                "must be an event type (points.credited) or a prefix (points.*)",
            );
        }
    }
    if concurrency > 64 {
        v.add("max_concurrency", "must be 0 to 64");
    }
}

const COLUMNS: &str = "id, url, description, event_types, enabled, disabled_reason, \
                       max_concurrency, created_at, updated_at, failing_since, secret, \
                       previous_secret, previous_until";

fn decode(row: &sea_orm::QueryResult) -> Result<Stored, Error> {
    let text = |i| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
    let big = |i| -> Result<i64, Error> { row.try_get_by_index(i).map_err(db_error) };
    let failing_since = big(9)?;
    let endpoint = pb::WebhookEndpoint {
        id: text(0)?,
        url: text(1)?,
        description: text(2)?,
        event_types: serde_json::from_str(&text(3)?).map_err(Error::internal)?,
        enabled: row.try_get_by_index::<i32>(4).map_err(db_error)? == 1,
        disabled_reason: text(5)?,
        max_concurrency: u32::try_from(row.try_get_by_index::<i32>(6).map_err(db_error)?)
            .unwrap_or(DEFAULT_CONCURRENCY),
        created_at: Some(micros_to_timestamp(big(7)?)),
        updated_at: Some(micros_to_timestamp(big(8)?)),
        failing_since: (failing_since > 0).then(|| micros_to_timestamp(failing_since)),
    };
    Ok(Stored {
        endpoint,
        secret: text(10)?,
        previous_secret: text(11)?,
        previous_until: big(12)?,
    })
}

pub async fn get<C: ConnectionTrait>(conn: &C, tenant: &str, id: &str) -> Result<Stored, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            &format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2"),
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("webhook endpoint `{id}`")))?;
    decode(&row)
}

/// The tenant's enabled endpoints (for the fan-out).
pub async fn enabled<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<Vec<Stored>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND enabled = 1"
            ),
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    rows.iter().map(decode).collect()
}

pub async fn list<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    after: &str,
    limit: u32,
) -> Result<(Vec<pb::WebhookEndpoint>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT {COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND id > $2 \
                 ORDER BY id LIMIT $3"
            ),
            [tenant.into(), after.into(), i64::from(limit + 1).into()],
        ))
        .await
        .map_err(db_error)?;
    let mut out = rows
        .iter()
        .map(|r| decode(r).map(|s| s.endpoint))
        .collect::<Result<Vec<_>, _>>()?;
    let more = out.len() > limit as usize;
    out.truncate(limit as usize);
    Ok((out, more))
}

/// Stores a new endpoint with its secret (sealed).
pub async fn create(
    txn: &DatabaseTransaction,
    keyring: &Keyring,
    tenant: &str,
    e: &pb::WebhookEndpoint,
    secret: &str,
    now: i64,
) -> Result<(), Error> {
    let sealed = keyring.seal(secret.as_bytes(), &secret_context(tenant, &e.id));
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO webhook_endpoints (tenant_id, id, url, description, event_types, enabled, \
         disabled_reason, max_concurrency, created_at, updated_at, failing_since, secret, \
         previous_secret, previous_until) \
         VALUES ($1, $2, $3, $4, $5, 1, '', $6, $7, $7, 0, $8, '', 0)",
        [
            tenant.into(),
            e.id.clone().into(),
            e.url.clone().into(),
            e.description.clone().into(),
            serde_json::to_string(&e.event_types)
                .map_err(Error::internal)?
                .into(),
            i32::try_from(e.max_concurrency).unwrap_or(8).into(),
            now.into(),
            sealed.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Replaces an endpoint's settings; enabling it clears its failure state.
pub async fn update(
    txn: &DatabaseTransaction,
    tenant: &str,
    e: &pb::WebhookEndpoint,
    now: i64,
) -> Result<(), Error> {
    let changed = txn
        .execute_raw(stmt(
            txn,
            "UPDATE webhook_endpoints SET url = $3, description = $4, event_types = $5, \
             enabled = $6, disabled_reason = CASE WHEN $6 = 1 THEN '' ELSE 'disabled by hand' END, \
             failing_since = CASE WHEN $6 = 1 AND enabled = 0 THEN 0 ELSE failing_since END, \
             max_concurrency = $7, updated_at = $8 WHERE tenant_id = $1 AND id = $2",
            [
                tenant.into(),
                e.id.clone().into(),
                e.url.clone().into(),
                e.description.clone().into(),
                serde_json::to_string(&e.event_types)
                    .map_err(Error::internal)?
                    .into(),
                i32::from(e.enabled).into(),
                i32::try_from(e.max_concurrency).unwrap_or(8).into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if changed.rows_affected() == 0 {
        return Err(Error::not_found(format!("webhook endpoint `{}`", e.id)));
    }
    Ok(())
}

/// Makes `secret` the signing secret (sealed); the current one keeps signing until `until`.
pub async fn rotate(
    txn: &DatabaseTransaction,
    keyring: &Keyring,
    tenant: &str,
    id: &str,
    secret: &str,
    until: i64,
    now: i64,
) -> Result<(), Error> {
    let sealed = keyring.seal(secret.as_bytes(), &secret_context(tenant, id));
    let changed = txn
        .execute_raw(stmt(
            txn,
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = $4, \
             secret = $3, updated_at = $5 WHERE tenant_id = $1 AND id = $2",
            [
                tenant.into(),
                id.into(),
                sealed.into(),
                until.into(),
                now.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    if changed.rows_affected() == 0 {
        return Err(Error::not_found(format!("webhook endpoint `{id}`")));
    }
    Ok(())
}

/// Records an attempt's outcome on the endpoint's health: a success clears it; a failure
/// starts it, and after `disable_after` (µs) of failures the endpoint is disabled. Returns
/// true when this call disabled it.
pub async fn record_health<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
    ok: bool,
    now: i64,
    disable_after: i64,
) -> Result<bool, Error> {
    if ok {
        conn.execute_raw(stmt(
            conn,
            "UPDATE webhook_endpoints SET failing_since = 0 \
             WHERE tenant_id = $1 AND id = $2 AND failing_since <> 0",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
        return Ok(false);
    }
    conn.execute_raw(stmt(
        conn,
        "UPDATE webhook_endpoints SET failing_since = $3 \
         WHERE tenant_id = $1 AND id = $2 AND failing_since = 0",
        [tenant.into(), id.into(), now.into()],
    ))
    .await
    .map_err(db_error)?;
    let disabled = conn
        .execute_raw(stmt(
            conn,
            "UPDATE webhook_endpoints SET enabled = 0, updated_at = $3, \
             disabled_reason = 'failing without a success for too long' \
             WHERE tenant_id = $1 AND id = $2 AND enabled = 1 AND failing_since <> 0 \
             AND failing_since <= $4",
            [
                tenant.into(),
                id.into(),
                now.into(),
                (now - disable_after).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    Ok(disabled.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_types_and_prefixes() {
        let types = vec!["points.*".to_string(), "tier.changed".to_string()];
        assert!(wants(&types, "points.credited"));
        assert!(wants(&types, "tier.changed"));
        assert!(!wants(&types, "pointsx.credited"));
        assert!(!wants(&types, "tier.expired"));
        assert!(wants(&[], "anything.at_all"));
    }

    #[test]
    fn the_guard_refuses_internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(forbidden(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(!forbidden(ip.parse().expect("ip")), "{ip}");
        }
    }
}
