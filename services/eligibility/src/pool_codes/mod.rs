//! Catalog codes at checkout. The catalog owns codes (generation, import, publication, kill
//! switches) and sends each change here ([`sync`], through its command outbox); eligibility
//! keeps that copy in its own tables, not in memory, so a pool of a million codes costs no
//! replica memory and a kill switch reaches every replica with the row. A code unlocks the
//! campaigns that list its pool (`pool_ids`; the scheduler adds a campaign's incentive
//! pool). Its uses are counted where redemption happens, in the redemption's transaction
//! (`code_usage`, under its row lock), and each use counted or given back is reported to the
//! catalog ([`report_uses`]) in that same transaction, so the catalog shows the code
//! redeemed, by whom and for which order. docs/architecture.md says why.

pub mod core;
mod store;

use std::collections::HashMap;

use tessera_proto::catalog::v1 as cpb;
use tessera_proto::eligibility::v1 as pb;
use tessera_runtime::{Code, Error};
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::commands::{self, Command};
use tessera_store::{Db, db_error};

pub use self::core::Unlocked;
use self::core::{PoolCode, normalize};
use crate::campaigns::Index;
use crate::checkout::plan::{Counted, refusal};

/// The catalog's intake of uses.
const RECORD_USES: &str = "/tessera.catalog.v1.CatalogService/RecordCodeUses";

/// The catalog codes among `codes` (those no campaign lists itself), checked for `customer`
/// at `now`. A code the tenant does not have is NOT_FOUND; one that cannot be used now is
/// FAILED_PRECONDITION with its reason; one whose pool no campaign issues is
/// FAILED_PRECONDITION `NO_CAMPAIGN`.
pub async fn resolve(
    db: &Db,
    tenant: &str,
    index: &Index,
    codes: &[String],
    customer: &str,
    now: i64,
) -> Result<Vec<Unlocked>, Error> {
    let (wanted, found) = unlisted(db, tenant, index, codes).await?;
    let mut out = Vec::with_capacity(wanted.len());
    for code in wanted {
        let Some(c) = found.get(&code) else {
            return Err(Error::not_found(format!("code `{code}`")).with_reason("CODE_NOT_FOUND"));
        };
        let c = &as_spent(index, c);
        if let Err((reason, detail)) = core::check(c, customer, now) {
            return Err(refusal(format!("code `{code}`"), reason, &detail));
        }
        if index.pool_owners(&c.pool_id).is_empty() {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!(
                    "code `{code}` cannot be used: no campaign issues its pool `{}`",
                    c.pool_id
                ),
            )
            .with_reason("NO_CAMPAIGN"));
        }
        out.push(unlocked(c));
    }
    Ok(out)
}

/// For qualification: the catalog codes among `codes` that `customer` may use now (the
/// others unlock nothing, and their campaigns say a code is required).
pub async fn usable(
    db: &Db,
    tenant: &str,
    index: &Index,
    codes: &[String],
    customer: &str,
    now: i64,
) -> Result<Vec<Unlocked>, Error> {
    let (_, found) = unlisted(db, tenant, index, codes).await?;
    Ok(found
        .values()
        .map(|c| as_spent(index, c))
        .filter(|c| core::check(c, customer, now).is_ok())
        .map(|c| unlocked(&c))
        .collect())
}

/// The codes among `codes` no campaign lists itself (normalised), and those of them the
/// tenant's catalog has.
async fn unlisted(
    db: &Db,
    tenant: &str,
    index: &Index,
    codes: &[String],
) -> Result<(Vec<String>, HashMap<String, PoolCode>), Error> {
    let wanted: Vec<String> = codes
        .iter()
        .filter(|c| index.code_owners(c).is_empty())
        .map(|c| normalize(c))
        .collect();
    let found = store::lookup(db.conn(), tenant, &wanted).await?;
    Ok((wanted, found))
}

/// A code as its campaigns spend it: the code of a multi-use gift card is not counted in
/// uses (the card's value in the wallet is what runs out), whatever its pool allows.
fn as_spent(index: &Index, c: &PoolCode) -> PoolCode {
    let owners = index.pool_owners(&c.pool_id);
    let card = !owners.is_empty()
        && owners
            .iter()
            .all(|&i| index.campaigns[i as usize].is_multi_use_card());
    if card {
        PoolCode {
            uses: 0,
            max_uses: 0,
            ..c.clone()
        }
    } else {
        c.clone()
    }
}

/// `max_uses` 0: not counted against a limit.
fn unlocked(c: &PoolCode) -> Unlocked {
    Unlocked {
        code: c.code.clone(),
        pool_id: c.pool_id.clone(),
        max_uses: c.max_uses,
    }
}

/// Stores a sync from the catalog in one transaction.
pub async fn sync(
    db: &Db,
    tenant: &str,
    request: &pb::SyncCatalogCodesRequest,
) -> Result<pb::SyncCatalogCodesResponse, Error> {
    let txn = db.begin_write().await?;
    let (codes, switches) = store::apply(&txn, tenant, &request.codes, &request.switches).await?;
    txn.commit().await.map_err(db_error)?;
    Ok(pb::SyncCatalogCodesResponse {
        codes_applied: i64::try_from(codes).unwrap_or(i64::MAX),
        switches_applied: i64::try_from(switches).unwrap_or(i64::MAX),
    })
}

/// Tells the catalog, in the caller's transaction, that `redemption` took (`delta` 1) or
/// gave back (-1) one use of each catalog code it `counted`. `step` names the change in the
/// idempotency key (`take`, `give-back`), so each is reported once.
pub async fn report_uses<C: sea_orm::ConnectionTrait>(
    txn: &C,
    tenant: &str,
    redemption: &pb::Redemption,
    counted: &Counted,
    delta: i32,
    step: &str,
    now: i64,
) -> Result<(), Error> {
    let codes = &counted.pool_codes;
    if codes.is_empty() {
        return Ok(());
    }
    let key = format!("eligibility.code-uses:{}:{step}", redemption.id);
    let request = cpb::RecordCodeUsesRequest {
        idempotency_key: key.clone(),
        uses: codes
            .iter()
            .map(|code| cpb::CodeUse {
                code: code.clone(),
                delta,
                customer_id: redemption.customer_id.clone(),
                order_id: redemption.order_id.clone(),
                redemption_id: redemption.id.clone(),
                at: Some(micros_to_timestamp(now)),
                spends_value: counted.card_codes.contains(code),
            })
            .collect(),
    };
    commands::send(
        txn,
        tenant,
        [Command {
            path: RECORD_USES,
            key,
            request,
        }],
    )
    .await?;
    Ok(())
}
