//! Two-phase spends. A hold takes value out of the customer's account at once (first-to-expire
//! lots first, into the tenant's `holds` account), so nothing else can spend it; a capture
//! moves all or part of it on to `redemption` and releases the rest; a release (or the sweep,
//! once the hold lapses) gives it back to the very lots it came from, with their expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1 as pb;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::{Backend, db_error, insert_rows, now_micros, outbox, stmt, tuples};

use crate::ledger::accounts::{Asset, Owner, account, insufficient, lock_account};
use crate::ledger::postings::{Balanced, Entry, Leg, emit, post};
use crate::ledger::queries::account_balance;

/// Default life of a hold nobody captures.
pub const DEFAULT_HOLD_SECS: i64 = 7 * 86_400;
/// Longest life a caller may give a hold.
pub const MAX_HOLD_SECS: i64 = 30 * 86_400;
/// Most lapsed holds one sweep releases.
const RELEASE_BATCH: i64 = 5_000;

/// A validated hold request.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
    pub expires_at: i64,
}

/// A stored hold.
#[derive(Debug, Clone)]
struct HoldRow {
    id: String,
    customer_id: String,
    account_id: String,
    asset: Asset,
    amount: i64,
    captured: i64,
    status: String,
    expires_at: i64,
    capture_transaction_id: Option<String>,
}

impl HoldRow {
    fn to_proto(&self) -> pb::Hold {
        pb::Hold {
            id: self.id.clone(),
            customer_id: self.customer_id.clone(),
            asset: Some(self.asset.to_proto()),
            amount: self.amount,
            status: match self.status.as_str() {
                "active" => pb::HoldStatus::Active,
                "captured" => pb::HoldStatus::Captured,
                _ => pb::HoldStatus::Released,
            } as i32,
            captured: self.captured,
            expires_at: Some(outbox::micros_to_timestamp(self.expires_at)),
            capture_transaction_id: self.capture_transaction_id.clone().unwrap_or_default(),
        }
    }
}

const HOLD_COLUMNS: &str = "id, customer_id, account_id, asset_kind, asset_code, amount, \
     captured, status, expires_at, capture_transaction_id";

fn hold_of(row: &sea_orm::QueryResult) -> Result<HoldRow, Error> {
    (|| {
        Ok::<_, sea_orm::DbErr>(HoldRow {
            id: row.try_get_by_index(0)?,
            customer_id: row.try_get_by_index(1)?,
            account_id: row.try_get_by_index(2)?,
            asset: Asset::stored(row.try_get_by_index(3)?, row.try_get_by_index(4)?),
            amount: row.try_get_by_index(5)?,
            captured: row.try_get_by_index(6)?,
            status: row.try_get_by_index(7)?,
            expires_at: row.try_get_by_index(8)?,
            capture_transaction_id: row.try_get_by_index(9)?,
        })
    })()
    .map_err(db_error)
}

/// Reads a hold; with `backend`, locks it (after locking its account: accounts before holds).
async fn load(
    txn: &DatabaseTransaction,
    tenant: &str,
    id: &str,
    backend: Option<Backend>,
) -> Result<Option<HoldRow>, Error> {
    let lock = backend.map_or("", Backend::row_lock);
    txn.query_one_raw(stmt(
        txn,
        &format!("SELECT {HOLD_COLUMNS} FROM holds WHERE tenant_id = $1 AND id = $2{lock}"),
        [tenant.into(), id.into()],
    ))
    .await
    .map_err(db_error)?
    .as_ref()
    .map(hold_of)
    .transpose()
}

/// Reads holds by id, in id order; with `backend`, locks them (after their accounts).
async fn load_many(
    txn: &DatabaseTransaction,
    tenant: &str,
    ids: &BTreeSet<&str>,
    backend: Option<Backend>,
) -> Result<HashMap<String, HoldRow>, Error> {
    let lock = backend.map_or("", Backend::row_lock);
    txn.query_all_raw(stmt(
        txn,
        &format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE tenant_id = $1 AND id IN {} \
             ORDER BY id{lock}",
            tuples(2, ids.len(), 1)
        ),
        std::iter::once(tenant.into()).chain(ids.iter().map(|id| (*id).into())),
    ))
    .await
    .map_err(db_error)?
    .iter()
    .map(|row| hold_of(row).map(|h| (h.id.clone(), h)))
    .collect()
}

/// Locks the hold's account, then the hold, and checks the hold is still active.
async fn lock_active(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    id: &str,
) -> Result<HoldRow, Error> {
    let hold = load(txn, tenant, id, None)
        .await?
        .ok_or_else(|| Error::not_found(format!("hold `{id}`")))?;
    lock_account(txn, tenant, backend, &hold.account_id).await?;
    let hold = load(txn, tenant, id, Some(backend))
        .await?
        .ok_or_else(|| Error::internal("hold vanished under lock"))?;
    if hold.status != "active" {
        return Err(Error::new(
            Code::FailedPrecondition,
            format!("hold `{id}` is {}, not active", hold.status),
        )
        .with_reason("HOLD_NOT_ACTIVE"));
    }
    Ok(hold)
}

/// Most holds one `BatchHold` carries.
pub const MAX_HOLDS: usize = 500;

/// A spendable lot of one account, as the batch spends it.
struct Spendable {
    id: i64,
    remaining: i64,
}

/// Places holds in the caller's transaction with a few multi-row statements, each on its own
/// and in order (two holds on one account spend its lots one after the other): the accounts
/// locked in id order, their spendable lots read once, first-to-expire first.
async fn hold_many(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    wanted: &[NewHold],
) -> Result<Vec<Result<HoldRow, Error>>, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let owners: BTreeSet<&str> = wanted.iter().map(|h| h.customer_id.as_str()).collect();
    let mut account_of: HashMap<(String, Asset), String> = HashMap::new();
    for row in txn
        .query_all_raw(stmt(
            txn,
            &format!(
                "SELECT id, owner_id, asset_kind, asset_code FROM accounts \
                 WHERE tenant_id = $1 AND owner_kind = 'customer' AND owner_id IN {}",
                tuples(2, owners.len(), 1)
            ),
            std::iter::once(tenant.into()).chain(owners.iter().map(|o| (*o).into())),
        ))
        .await
        .map_err(db_error)?
    {
        let asset = Asset::stored(
            row.try_get_by_index(2).map_err(db_error)?,
            row.try_get_by_index(3).map_err(db_error)?,
        );
        let owner: String = row.try_get_by_index(1).map_err(db_error)?;
        account_of.insert((owner, asset), row.try_get_by_index(0).map_err(db_error)?);
    }
    let accounts: BTreeSet<&str> = wanted
        .iter()
        .filter_map(|h| account_of.get(&(h.customer_id.clone(), h.asset.clone())))
        .map(String::as_str)
        .collect();
    crate::ledger::accounts::lock_accounts(txn, tenant, backend, &accounts).await?;
    let mut lots: HashMap<String, Vec<Spendable>> = HashMap::new();
    if !accounts.is_empty() {
        for row in txn
            .query_all_raw(stmt(
                txn,
                &format!(
                    "SELECT account_id, id, remaining FROM lots WHERE tenant_id = $1 \
                     AND account_id IN {} AND remaining > 0 \
                     AND (expires_at IS NULL OR expires_at > $2) \
                     ORDER BY account_id, CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, \
                     expires_at, earned_at, id",
                    tuples(3, accounts.len(), 1)
                ),
                [tenant.into(), now.into()]
                    .into_iter()
                    .chain(accounts.iter().map(|a| (*a).into())),
            ))
            .await
            .map_err(db_error)?
        {
            let account: String = row.try_get_by_index(0).map_err(db_error)?;
            lots.entry(account).or_default().push(Spendable {
                id: row.try_get_by_index(1).map_err(db_error)?,
                remaining: row.try_get_by_index(2).map_err(db_error)?,
            });
        }
    }

    let mut outcomes = Vec::with_capacity(wanted.len());
    let mut transactions = Vec::new();
    let mut consumptions = Vec::new();
    let mut taken: BTreeMap<i64, i64> = BTreeMap::new();
    let mut moved: BTreeMap<&str, i64> = BTreeMap::new();
    for new in wanted {
        let Some(account) = account_of.get(&(new.customer_id.clone(), new.asset.clone())) else {
            outcomes.push(Err(insufficient(0, new.amount)));
            continue;
        };
        let spendable = lots.entry(account.clone()).or_default();
        let plan = match crate::allocation::allocate(
            spendable.iter().enumerate().map(|(i, l)| (i, l.remaining)),
            new.amount,
        ) {
            Ok(plan) => plan,
            Err(short) => {
                outcomes.push(Err(insufficient(short.available, new.amount)));
                continue;
            }
        };
        let id = uuid::Uuid::now_v7().to_string();
        for (i, part) in plan {
            let lot = &mut spendable[i];
            lot.remaining -= part;
            *taken.entry(lot.id).or_default() += part;
            consumptions.push(vec![
                tenant.into(),
                id.clone().into(),
                lot.id.into(),
                part.into(),
            ]);
        }
        transactions.push(vec![
            id.clone().into(),
            tenant.into(),
            "hold".into(),
            new.customer_id.clone().into(),
            (new.asset.kind as i32).into(),
            new.asset.code.clone().into(),
            (-new.amount).into(),
            new.reason.clone().into(),
            ctx.principal.clone().into(),
            now.into(),
        ]);
        *moved.entry(account.as_str()).or_default() += new.amount;
        let hold = HoldRow {
            id,
            customer_id: new.customer_id.clone(),
            account_id: account.clone(),
            asset: new.asset.clone(),
            amount: new.amount,
            captured: 0,
            status: "active".into(),
            expires_at: new.expires_at,
            capture_transaction_id: None,
        };
        outcomes.push(Ok(hold));
    }
    let placed: Vec<&HoldRow> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    if placed.is_empty() {
        return Ok(outcomes);
    }

    let mut system: HashMap<&Asset, String> = HashMap::new();
    let mut postings = crate::ledger::postings::Postings::with_capacity(placed.len());
    let mut rows = Vec::with_capacity(placed.len());
    let mut events = Vec::with_capacity(placed.len());
    for h in placed {
        if !system.contains_key(&h.asset) {
            let holds = account(txn, tenant, Owner::System("holds"), &h.asset).await?;
            system.insert(&h.asset, holds);
        }
        let legs = Balanced::new([
            Leg::Held(&h.account_id, -h.amount),
            Leg::System(&system[&h.asset], h.amount),
        ])?;
        postings.add(tenant, &h.id, &legs, now);
        rows.push(vec![
            tenant.into(),
            h.id.clone().into(),
            h.customer_id.clone().into(),
            h.account_id.clone().into(),
            (h.asset.kind as i32).into(),
            h.asset.code.clone().into(),
            h.amount.into(),
            0i64.into(),
            "active".into(),
            h.expires_at.into(),
            now.into(),
            now.into(),
        ]);
    }
    crate::ledger::postings::write_transactions(txn, transactions).await?;
    txn.execute_raw(stmt(
        txn,
        &format!(
            "UPDATE lots SET remaining = remaining - v.column2 FROM (VALUES {}) AS v \
             WHERE lots.tenant_id = $1 AND lots.id = v.column1",
            tuples(2, 2, taken.len())
        ),
        std::iter::once(tenant.into()).chain(
            taken
                .iter()
                .flat_map(|(id, part)| [(*id).into(), (*part).into()]),
        ),
    ))
    .await
    .map_err(db_error)?;
    insert_rows(
        txn,
        "INSERT INTO lot_consumptions (tenant_id, transaction_id, lot_id, amount)",
        "",
        consumptions,
    )
    .await?;
    crate::ledger::postings::write_postings(txn, postings).await?;
    // Held value leaves the balance for the held total (Leg::Held, per account).
    let updated = txn
        .execute_raw(stmt(
            txn,
            &format!(
                "UPDATE accounts SET balance = balance - v.column2, held = held + v.column2, \
                 version = version + 1, updated_at = $2 FROM (VALUES {}) AS v \
                 WHERE accounts.tenant_id = $1 AND accounts.id = v.column1",
                tuples(3, 2, moved.len())
            ),
            [tenant.into(), now.into()].into_iter().chain(
                moved
                    .iter()
                    .flat_map(|(id, amount)| [(*id).into(), (*amount).into()]),
            ),
        ))
        .await
        .map_err(db_error)?;
    if updated.rows_affected() != moved.len() as u64 {
        return Err(Error::internal("hold on a missing account"));
    }
    insert_rows(
        txn,
        "INSERT INTO holds (tenant_id, id, customer_id, account_id, asset_kind, asset_code, \
         amount, captured, status, expires_at, created_at, updated_at)",
        "",
        rows,
    )
    .await?;
    for (h, new) in outcomes
        .iter()
        .zip(wanted)
        .filter_map(|(o, new)| o.as_ref().ok().map(|h| (h, new)))
    {
        events.push((
            format!("{}.held", h.asset.event_prefix()),
            serde_json::json!({
                "hold_id": h.id,
                "customer_id": h.customer_id,
                "amount": h.amount,
                "reason": new.reason,
                "asset": h.asset.to_json(),
            }),
        ));
    }
    outbox::enqueue_many(
        txn,
        tenant,
        events
            .iter()
            .map(|(event_type, data)| (event_type.as_str(), data)),
    )
    .await?;
    Ok(outcomes)
}

/// The balance of a hold's account now (what a single hold, capture or release answers).
async fn balance_after(
    txn: &DatabaseTransaction,
    tenant: &str,
    hold: &HoldRow,
) -> Result<pb::Balance, Error> {
    account_balance(txn, tenant, &hold.customer_id, &hold.asset, now_micros()).await
}

/// Places a hold.
pub async fn hold(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    new: &NewHold,
) -> Result<pb::HoldResponse, Error> {
    let hold = hold_many(txn, ctx, backend, std::slice::from_ref(new))
        .await?
        .pop()
        .ok_or_else(|| Error::internal("a hold without its outcome"))??;
    Ok(pb::HoldResponse {
        balance: Some(balance_after(txn, &ctx.tenant_id, &hold).await?),
        hold: Some(hold.to_proto()),
    })
}

/// Places many holds, each on its own: see [`hold_many`].
pub async fn batch_hold(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    wanted: &[NewHold],
) -> Result<pb::BatchHoldResponse, Error> {
    let outcomes = hold_many(txn, ctx, backend, wanted).await?;
    Ok(pb::BatchHoldResponse {
        outcomes: outcomes
            .into_iter()
            .map(|o| match o {
                Ok(h) => pb::BatchHoldOutcome {
                    hold: Some(h.to_proto()),
                    ..Default::default()
                },
                Err(e) => pb::BatchHoldOutcome {
                    hold: None,
                    reason: e.reason.unwrap_or_default(),
                    message: e.message,
                },
            })
            .collect(),
    })
}

/// Gives `amount` of a hold back to the lots it came from: one `release` transaction.
async fn give_back(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    hold: &HoldRow,
    amount: i64,
    now: i64,
) -> Result<(), Error> {
    let tenant = ctx.tenant_id.as_str();
    let entry = Entry::new(
        "release",
        &hold.customer_id,
        &hold.asset,
        amount,
        "hold released",
        now,
    );
    entry.write(txn, ctx).await?;
    let restored = crate::ledger::lots::restore(txn, tenant, &entry.id, &hold.id, amount).await?;
    if restored != amount {
        return Err(Error::internal("hold lots short of the held amount"));
    }
    let holds = account(txn, tenant, Owner::System("holds"), &hold.asset).await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::System(&holds, -amount),
            Leg::Held(&hold.account_id, amount),
        ])?,
        now,
    )
    .await
}

/// Marks a hold released. Returns it as stored now.
async fn mark_released(
    txn: &DatabaseTransaction,
    tenant: &str,
    hold: &HoldRow,
    now: i64,
) -> Result<HoldRow, Error> {
    txn.execute_raw(stmt(
        txn,
        "UPDATE holds SET status = 'released', updated_at = $1 WHERE tenant_id = $2 AND id = $3",
        [now.into(), tenant.into(), hold.id.clone().into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(HoldRow {
        status: "released".into(),
        ..hold.clone()
    })
}

/// Most captures one `BatchCapture` carries.
pub const MAX_CAPTURES: usize = 500;

/// One capture asked for: a hold and the amount to capture (0: all of it).
#[derive(Debug, Clone)]
pub struct CaptureOf {
    pub hold_id: String,
    pub amount: i64,
}

/// How one capture went.
enum Captured {
    /// Captured now.
    Now(HoldRow),
    /// Captured before, by the amount asked (or by any amount when 0 was asked).
    Before(HoldRow),
    /// Not captured: the error, and the hold as it stands when there is one.
    Refused(Error, Option<HoldRow>),
}

/// Captures holds (each at most once in `wanted`) in the caller's transaction with a few
/// multi-row statements: accounts locked in id order, then the holds; every capture moves
/// its value from the tenant's `holds` account to `redemption` and releases what it leaves.
async fn capture_many(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    wanted: &[CaptureOf],
) -> Result<Vec<Captured>, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let ids: BTreeSet<&str> = wanted.iter().map(|c| c.hold_id.as_str()).collect();
    let seen = load_many(txn, tenant, &ids, None).await?;
    let accounts: BTreeSet<&str> = seen.values().map(|h| h.account_id.as_str()).collect();
    crate::ledger::accounts::lock_accounts(txn, tenant, backend, &accounts).await?;
    let holds = load_many(txn, tenant, &ids, Some(backend)).await?;

    let mut outcomes = Vec::with_capacity(wanted.len());
    for c in wanted {
        let Some(hold) = holds.get(&c.hold_id) else {
            let e = Error::not_found(format!("hold `{}`", c.hold_id));
            outcomes.push(Captured::Refused(e, None));
            continue;
        };
        let refused = |code, reason: &str, message: String| {
            Captured::Refused(
                Error::new(code, message).with_reason(reason),
                Some(hold.clone()),
            )
        };
        let amount = if c.amount == 0 { hold.amount } else { c.amount };
        outcomes.push(match hold.status.as_str() {
            "captured" if c.amount == 0 || c.amount == hold.captured => {
                Captured::Before(hold.clone())
            }
            "active" if hold.expires_at <= now => refused(
                Code::FailedPrecondition,
                "HOLD_EXPIRED",
                format!("hold `{}` lapsed; place a new one", hold.id),
            ),
            "active" if amount > hold.amount => refused(
                Code::InvalidArgument,
                "AMOUNT_ABOVE_HOLD",
                format!("must be at most the held amount {}", hold.amount),
            ),
            "active" => Captured::Now(HoldRow {
                status: "captured".into(),
                captured: amount,
                capture_transaction_id: Some(uuid::Uuid::now_v7().to_string()),
                ..hold.clone()
            }),
            status => refused(
                Code::FailedPrecondition,
                "HOLD_NOT_ACTIVE",
                format!("hold `{}` is {status}, not active", hold.id),
            ),
        });
    }
    let now_captured: Vec<&HoldRow> = outcomes
        .iter()
        .filter_map(|o| match o {
            Captured::Now(h) => Some(h),
            _ => None,
        })
        .collect();
    if now_captured.is_empty() {
        return Ok(outcomes);
    }

    let mut system: HashMap<&Asset, (String, String)> = HashMap::new();
    let mut transactions = Vec::with_capacity(now_captured.len());
    let mut postings = crate::ledger::postings::Postings::with_capacity(now_captured.len());
    let mut held: BTreeMap<&str, i64> = BTreeMap::new();
    let mut settled = Vec::with_capacity(now_captured.len());
    let mut events = Vec::with_capacity(now_captured.len());
    for h in &now_captured {
        if !system.contains_key(&h.asset) {
            let holds = account(txn, tenant, Owner::System("holds"), &h.asset).await?;
            let redemption = account(txn, tenant, Owner::System("redemption"), &h.asset).await?;
            system.insert(&h.asset, (holds, redemption));
        }
        let (holds_account, redemption_account) = &system[&h.asset];
        let tx = h.capture_transaction_id.clone().unwrap_or_default();
        transactions.push(vec![
            tx.clone().into(),
            tenant.into(),
            "capture".into(),
            h.customer_id.clone().into(),
            (h.asset.kind as i32).into(),
            h.asset.code.clone().into(),
            (-h.captured).into(),
            "hold captured".into(),
            ctx.principal.clone().into(),
            now.into(),
        ]);
        let legs = Balanced::new([
            Leg::System(holds_account, -h.captured),
            Leg::System(redemption_account, h.captured),
        ])?;
        postings.add(tenant, &tx, &legs, now);
        *held.entry(h.account_id.as_str()).or_default() += h.captured;
        settled.extend([h.id.clone().into(), h.captured.into(), tx.clone().into()]);
        events.push((
            format!("{}.captured", h.asset.event_prefix()),
            serde_json::json!({
                "hold_id": h.id,
                "transaction_id": tx,
                "customer_id": h.customer_id,
                "amount": h.captured,
                "released": h.amount - h.captured,
                "asset": h.asset.to_json(),
            }),
        ));
    }
    crate::ledger::postings::write_transactions(txn, transactions).await?;
    crate::ledger::postings::write_postings(txn, postings).await?;
    // The captured value leaves the accounts' held totals (their balances moved when held).
    let moved = txn
        .execute_raw(stmt(
            txn,
            &format!(
                "UPDATE accounts SET held = held - v.column2 FROM (VALUES {}) AS v \
                 WHERE accounts.tenant_id = $1 AND accounts.id = v.column1",
                tuples(2, 2, held.len())
            ),
            std::iter::once(tenant.into()).chain(
                held.iter()
                    .flat_map(|(id, amount)| [(*id).into(), (*amount).into()]),
            ),
        ))
        .await
        .map_err(db_error)?;
    if moved.rows_affected() != held.len() as u64 {
        return Err(Error::internal("capture from a missing account"));
    }
    for h in &now_captured {
        if h.captured < h.amount {
            give_back(txn, ctx, h, h.amount - h.captured, now).await?;
        }
    }
    txn.execute_raw(stmt(
        txn,
        &format!(
            "UPDATE holds SET status = 'captured', captured = v.column2, \
             capture_transaction_id = v.column3, updated_at = $2 FROM (VALUES {}) AS v \
             WHERE holds.tenant_id = $1 AND holds.id = v.column1",
            tuples(3, 3, now_captured.len())
        ),
        [tenant.into(), now.into()].into_iter().chain(settled),
    ))
    .await
    .map_err(db_error)?;
    outbox::enqueue_many(
        txn,
        tenant,
        events
            .iter()
            .map(|(event_type, data)| (event_type.as_str(), data)),
    )
    .await?;
    Ok(outcomes)
}

/// Captures `amount` of a hold (0: all of it) and releases the rest.
pub async fn capture(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    hold_id: &str,
    amount: i64,
) -> Result<pb::CaptureResponse, Error> {
    let wanted = [CaptureOf {
        hold_id: hold_id.to_string(),
        amount,
    }];
    let hold = match capture_many(txn, ctx, backend, &wanted).await?.pop() {
        Some(Captured::Now(hold)) => hold,
        Some(Captured::Before(_)) => {
            return Err(Error::new(
                Code::FailedPrecondition,
                format!("hold `{hold_id}` is captured, not active"),
            )
            .with_reason("HOLD_NOT_ACTIVE"));
        }
        Some(Captured::Refused(e, _)) if e.code == Code::InvalidArgument => {
            return Err(Error::invalid_field("amount", e.message));
        }
        Some(Captured::Refused(e, _)) => return Err(e),
        None => return Err(Error::internal("a capture without its outcome")),
    };
    Ok(pb::CaptureResponse {
        balance: Some(balance_after(txn, &ctx.tenant_id, &hold).await?),
        hold: Some(hold.to_proto()),
    })
}

/// Captures many holds, each on its own: see [`capture_many`].
pub async fn batch_capture(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    wanted: &[CaptureOf],
) -> Result<pb::BatchCaptureResponse, Error> {
    let outcomes = capture_many(txn, ctx, backend, wanted).await?;
    Ok(pb::BatchCaptureResponse {
        outcomes: wanted
            .iter()
            .zip(outcomes)
            .map(|(c, o)| {
                let (hold, error) = match o {
                    Captured::Now(h) | Captured::Before(h) => (Some(h), None),
                    Captured::Refused(e, h) => (h, Some(e)),
                };
                pb::BatchCaptureOutcome {
                    hold_id: c.hold_id.clone(),
                    hold: hold.map(|h| h.to_proto()),
                    reason: error
                        .as_ref()
                        .map(|e| e.reason.clone().unwrap_or_else(|| "NOT_FOUND".into()))
                        .unwrap_or_default(),
                    message: error.map(|e| e.message).unwrap_or_default(),
                }
            })
            .collect(),
    })
}

/// Releases a hold locked by [`lock_active`].
async fn release_locked(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    hold: &HoldRow,
    why: &str,
    now: i64,
) -> Result<HoldRow, Error> {
    give_back(txn, ctx, hold, hold.amount, now).await?;
    let settled = mark_released(txn, &ctx.tenant_id, hold, now).await?;
    emit(
        txn,
        &ctx.tenant_id,
        &hold.asset,
        "released",
        serde_json::json!({
            "hold_id": hold.id,
            "customer_id": hold.customer_id,
            "amount": hold.amount,
            "reason": why,
        }),
    )
    .await?;
    Ok(settled)
}

/// Releases a hold.
pub async fn release(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    hold_id: &str,
) -> Result<pb::ReleaseResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let settled = match lock_active(txn, tenant, backend, hold_id).await {
        Ok(hold) => release_locked(txn, ctx, &hold, "released", now).await?,
        // Released before (a lapse, another caller): the end the caller wants.
        Err(e) if e.reason.as_deref() == Some("HOLD_NOT_ACTIVE") => {
            match load(txn, tenant, hold_id, None).await? {
                Some(hold) if hold.status == "released" => hold,
                _ => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    Ok(pb::ReleaseResponse {
        balance: Some(
            account_balance(txn, tenant, &settled.customer_id, &settled.asset, now).await?,
        ),
        hold: Some(settled.to_proto()),
    })
}

/// The capture transaction of hold `id`, for a reversal that names the hold: UNAVAILABLE
/// while it is active (its capture may be on its way), HOLD_NOT_CAPTURED once released.
pub async fn capture_of<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    id: &str,
) -> Result<String, Error> {
    let row = conn
        .query_one_raw(stmt(
            conn,
            "SELECT status, capture_transaction_id FROM holds WHERE tenant_id = $1 AND id = $2",
            [tenant.into(), id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::not_found(format!("hold `{id}`")))?;
    let status: String = row.try_get_by_index(0).map_err(db_error)?;
    let captured: Option<String> = row.try_get_by_index(1).map_err(db_error)?;
    match (status.as_str(), captured) {
        (_, Some(tx)) if !tx.is_empty() => Ok(tx),
        ("active", _) => Err(Error::unavailable(format!(
            "hold `{id}` is not captured yet; retry"
        ))),
        (status, _) => Err(Error::new(
            Code::FailedPrecondition,
            format!("hold `{id}` was {status}, not captured: there is nothing to reverse"),
        )
        .with_reason("HOLD_NOT_CAPTURED")),
    }
}

/// Releases the tenant's holds past their expiry (up to a batch). Returns how many.
pub async fn release_lapsed(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
) -> Result<u32, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let ids = txn
        .query_all_raw(stmt(
            txn,
            "SELECT id FROM holds WHERE tenant_id = $1 AND status = 'active' AND expires_at <= $2 \
             ORDER BY account_id, id LIMIT $3",
            [tenant.into(), now.into(), RELEASE_BATCH.into()],
        ))
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    let mut released = 0;
    for id in ids {
        match lock_active(txn, tenant, backend, &id).await {
            Ok(hold) => {
                release_locked(txn, ctx, &hold, "lapsed", now).await?;
                released += 1;
            }
            // Captured or released meanwhile: nothing to do.
            Err(e) if e.code == Code::FailedPrecondition => {}
            Err(e) => return Err(e),
        }
    }
    Ok(released)
}

/// The hold a capture transaction settled, for refunds.
pub async fn captured_by(
    txn: &DatabaseTransaction,
    tenant: &str,
    capture_transaction_id: &str,
) -> Result<String, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            "SELECT id FROM holds WHERE tenant_id = $1 AND capture_transaction_id = $2",
            [tenant.into(), capture_transaction_id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("capture without its hold"))?;
    row.try_get_by_index(0).map_err(db_error)
}
