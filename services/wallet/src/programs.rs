//! Loyalty programmes: the time zone and expiry policy a programme's points follow. A
//! points credit to a programme that was never configured does not expire (UTC calendar).

use chrono::NaiveDate;
use chrono_tz::Tz;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, expiry_policy::Policy};
use tessera_runtime::Error;
use tessera_runtime::error::Violations;
use tessera_store::{db_error, now_micros, stmt};

use crate::expiry::{ExpiryPolicy, Period};
use crate::tiers::{self, TierPolicy};

/// A programme's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub id: String,
    pub time_zone: Tz,
    pub expiry: ExpiryPolicy,
    pub tiers: Option<TierPolicy>,
}

impl Program {
    /// The settings of a programme nobody configured.
    pub fn unconfigured(id: &str) -> Self {
        Self {
            id: id.to_string(),
            time_zone: chrono_tz::UTC,
            expiry: ExpiryPolicy::Never,
            tiers: None,
        }
    }

    pub fn to_proto(&self) -> pb::Program {
        let policy = match self.expiry {
            ExpiryPolicy::Never => Policy::Never(pb::NeverExpires {}),
            ExpiryPolicy::OnDate { date } => Policy::OnDate(date.to_string()),
            ExpiryPolicy::AfterDays { days } => Policy::AfterDays(days),
            ExpiryPolicy::AfterMonths { months } => Policy::AfterMonths(months),
            ExpiryPolicy::EndOfPeriod { period, count } => Policy::EndOfPeriod(pb::EndOfPeriod {
                period: match period {
                    Period::Month => pb::Period::Month,
                    Period::Quarter => pb::Period::Quarter,
                    Period::Year => pb::Period::Year,
                } as i32,
                count,
            }),
        };
        pb::Program {
            id: self.id.clone(),
            time_zone: self.time_zone.name().to_string(),
            expiry: Some(pb::ExpiryPolicy {
                policy: Some(policy),
            }),
            tiers: self.tiers.as_ref().map(TierPolicy::to_proto),
        }
    }

    /// Validates a programme from the API, naming every field at fault.
    pub fn from_proto(program: Option<&pb::Program>) -> Result<Self, Error> {
        let mut v = Violations::new();
        let Some(program) = program else {
            v.add("program", "is required");
            return Err(v.finish().expect_err("a violation was added"));
        };
        if !crate::ledger::accounts::is_slug(&program.id) {
            v.add("program.id", "must be 1 to 64 of a-z, 0-9, _ and -");
        }
        let time_zone = program.time_zone.parse::<Tz>().ok();
        if time_zone.is_none() {
            v.add(
                "program.time_zone",
                "must be an IANA time zone such as Europe/Rome",
            );
        }
        let expiry = match program.expiry.as_ref().and_then(|e| e.policy.as_ref()) {
            None => {
                v.add(
                    "program.expiry",
                    "is required (use `never` for points that do not expire)",
                );
                None
            }
            Some(Policy::Never(_)) => Some(ExpiryPolicy::Never),
            Some(Policy::OnDate(date)) => match date.parse::<NaiveDate>() {
                Ok(date) => Some(ExpiryPolicy::OnDate { date }),
                Err(_) => {
                    v.add("program.expiry.on_date", "must be a date as YYYY-MM-DD");
                    None
                }
            },
            Some(Policy::AfterDays(days)) => Some(ExpiryPolicy::AfterDays { days: *days }),
            Some(Policy::AfterMonths(months)) => {
                Some(ExpiryPolicy::AfterMonths { months: *months })
            }
            Some(Policy::EndOfPeriod(p)) => {
                let period = match pb::Period::try_from(p.period).unwrap_or(pb::Period::Unspecified)
                {
                    pb::Period::Month => Some(Period::Month),
                    pb::Period::Quarter => Some(Period::Quarter),
                    pb::Period::Year => Some(Period::Year),
                    pb::Period::Unspecified => {
                        v.add(
                            "program.expiry.end_of_period.period",
                            "must be MONTH, QUARTER or YEAR",
                        );
                        None
                    }
                };
                period.map(|period| ExpiryPolicy::EndOfPeriod {
                    period,
                    count: p.count,
                })
            }
        };
        if let Some(policy) = &expiry
            && let Err(problem) = policy.validate()
        {
            v.add("program.expiry", problem);
        }
        let tiers = program
            .tiers
            .as_ref()
            .map(|t| TierPolicy::from_proto(&mut v, "program.tiers", t));
        v.finish()?;
        Ok(Self {
            id: program.id.clone(),
            time_zone: time_zone.expect("validated"),
            expiry: expiry.expect("validated"),
            tiers: tiers.map(|t| t.expect("validated")),
        })
    }
}

/// Stores (creates or replaces) a programme.
pub async fn upsert(
    txn: &DatabaseTransaction,
    tenant: &str,
    program: &Program,
) -> Result<(), Error> {
    let now = now_micros();
    let expiry = serde_json::to_string(&program.expiry).map_err(Error::internal)?;
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO programs (tenant_id, id, time_zone, expiry, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (tenant_id, id) DO UPDATE SET \
         time_zone = excluded.time_zone, expiry = excluded.expiry, updated_at = excluded.updated_at",
        [
            tenant.into(),
            program.id.clone().into(),
            program.time_zone.name().into(),
            expiry.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    tiers::store_policy(txn, tenant, &program.id, program.tiers.as_ref()).await
}

/// A programme of `tenant` with its tiers (one query: it runs on every points credit), if
/// configured.
pub async fn find<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<Option<Program>, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT p.time_zone, p.expiry, t.policy FROM programs p LEFT JOIN program_tiers t \
             ON t.tenant_id = p.tenant_id AND t.program_id = p.id \
             WHERE p.tenant_id = $1 AND p.id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let time_zone: String = row.try_get_by_index(0).map_err(db_error)?;
    let expiry: String = row.try_get_by_index(1).map_err(db_error)?;
    let tiers: Option<String> = row.try_get_by_index(2).map_err(db_error)?;
    Ok(Some(Program {
        id: id.to_string(),
        time_zone: time_zone
            .parse()
            .map_err(|_| Error::internal(format!("stored zone {time_zone}")))?,
        expiry: serde_json::from_str(&expiry).map_err(Error::internal)?,
        tiers: tiers.as_deref().map(tiers::decode_policy).transpose()?,
    }))
}
