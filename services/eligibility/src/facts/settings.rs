//! The tenant's settings (time zone, currency, incentives per order), with defaults.

use chrono::{DateTime, FixedOffset, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::{db_error, stmt};

pub const DAY_MICROS: i64 = 86_400_000_000;

/// Tenant settings with defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub time_zone: Tz,
    pub currency: String,
    /// Most incentives on one order (0: no limit).
    pub max_incentives_per_order: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            time_zone: chrono_tz::UTC,
            currency: "USD".into(),
            max_incentives_per_order: 0,
        }
    }
}

impl Settings {
    pub fn to_proto(&self) -> pb::Settings {
        pb::Settings {
            time_zone: self.time_zone.name().to_string(),
            currency: self.currency.clone(),
            max_incentives_per_order: self.max_incentives_per_order,
        }
    }

    /// `now` at the tenant's UTC offset (what rules see as `now`).
    pub fn local(&self, micros: i64) -> DateTime<FixedOffset> {
        let utc = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
        let offset = self
            .time_zone
            .offset_from_utc_datetime(&utc.naive_utc())
            .fix();
        utc.with_timezone(&offset)
    }
}

pub fn check_currency(v: &mut Violations, field: &str, currency: &str) {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        v.add(field, "must be an ISO 4217 code in upper case, e.g. EUR");
    }
}

pub fn check_settings(v: &mut Violations, s: Option<&pb::Settings>) -> Option<Settings> {
    let Some(s) = s else {
        v.add("settings", "is required");
        return None;
    };
    check_currency(v, "settings.currency", &s.currency);
    let zone = s.time_zone.parse::<Tz>().ok();
    if zone.is_none() {
        v.add(
            "settings.time_zone",
            "must be an IANA time zone, e.g. Europe/Rome",
        );
    }
    if s.max_incentives_per_order > 1000 {
        v.add("settings.max_incentives_per_order", "must be at most 1000");
    }
    Some(Settings {
        time_zone: zone?,
        currency: s.currency.clone(),
        max_incentives_per_order: s.max_incentives_per_order,
    })
}

pub async fn settings<C: ConnectionTrait>(conn: &C, tenant: &str) -> Result<Settings, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT time_zone, currency, max_incentives_per_order FROM settings \
             WHERE tenant_id = $1",
            [tenant.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else {
        return Ok(Settings::default());
    };
    let zone: String = row.try_get_by_index(0).map_err(db_error)?;
    Ok(Settings {
        time_zone: zone.parse().map_err(Error::internal)?,
        currency: row.try_get_by_index(1).map_err(db_error)?,
        max_incentives_per_order: row
            .try_get_by_index::<i64>(2)
            .map_err(db_error)?
            .clamp(0, 1000) as u32,
    })
}

pub async fn put_settings(
    txn: &DatabaseTransaction,
    tenant: &str,
    s: &Settings,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO settings (tenant_id, time_zone, currency, max_incentives_per_order) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant_id) DO UPDATE SET time_zone = excluded.time_zone, \
         currency = excluded.currency, \
         max_incentives_per_order = excluded.max_incentives_per_order",
        [
            tenant.into(),
            s.time_zone.name().into(),
            s.currency.clone().into(),
            i64::from(s.max_incentives_per_order).into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}
