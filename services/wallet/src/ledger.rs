//! Ledger writes and reads. Every function takes the tenant and filters on it; writes run
//! inside the caller's transaction. Every credit creates a lot; debits and expiry consume
//! lots (recorded in `lot_consumptions`), so a balance always equals its postings and the
//! remaining value of its lots.

use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error, RequestContext};
use tessera_store::{Backend, db_error, insert_rows, now_micros, outbox, stmt, tuples};

use crate::legs::Unbalanced;
pub(crate) use crate::legs::{Balanced, Leg};
use crate::{programs, rules, tiers};

/// Legs that do not balance are a bug in the ledger's caller: nothing is written.
impl From<Unbalanced> for Error {
    fn from(why: Unbalanced) -> Self {
        Error::internal(format!("the ledger refused a transaction: {why}"))
    }
}

/// Largest single amount accepted (points or minor units); far above any real credit, far
/// below where sums could overflow 64 bits. The suite's one limit (`tessera_money`).
pub use tessera_money::MAX_AMOUNT;

/// Who owns an account.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Owner<'a> {
    Customer(&'a str),
    /// A tenant system account (`issuance`, `redemption`, `expiry`, `payout`).
    System(&'static str),
}

impl Owner<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Owner::Customer(_) => "customer",
            Owner::System(_) => "system",
        }
    }
    fn id(&self) -> &str {
        match self {
            Owner::Customer(id) => id,
            Owner::System(name) => name,
        }
    }
}

/// A validated asset.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Asset {
    pub kind: AssetKind,
    pub code: String,
}

impl Asset {
    pub fn to_proto(&self) -> pb::Asset {
        pb::Asset {
            kind: self.kind as i32,
            code: self.code.clone(),
        }
    }

    /// An asset as stored: its kind's number and its code.
    pub fn stored(kind: i32, code: String) -> Self {
        Self {
            kind: AssetKind::try_from(kind).unwrap_or(AssetKind::Unspecified),
            code,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "kind": self.event_prefix(), "code": self.code })
    }

    pub fn event_prefix(&self) -> &'static str {
        match self.kind {
            AssetKind::Points | AssetKind::Unspecified => "points",
            AssetKind::Cashback => "cashback",
            AssetKind::GiftCard => "gift_card",
        }
    }
}

pub use tessera_store::api::check_customer_id;

/// Programme and tier ids: 1 to 64 of a-z, 0-9, _ and -.
pub fn is_slug(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Validates an asset: the kind must be set and the code must fit the kind.
pub fn check_asset(v: &mut Violations, field: &str, asset: Option<&pb::Asset>) -> Option<Asset> {
    let Some(asset) = asset else {
        v.add(field, "is required");
        return None;
    };
    let kind = AssetKind::try_from(asset.kind).unwrap_or(AssetKind::Unspecified);
    let code = asset.code.as_str();
    let code_ok = match kind {
        AssetKind::Unspecified => {
            v.add(
                format!("{field}.kind"),
                "must be POINTS, CASHBACK or GIFT_CARD",
            );
            return None;
        }
        AssetKind::Points => is_slug(code),
        AssetKind::Cashback => code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()),
        AssetKind::GiftCard => {
            (1..=64).contains(&code.len())
                && code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
    };
    if !code_ok {
        let rule = match kind {
            AssetKind::Points => "a programme id: 1 to 64 of a-z, 0-9, _ and -",
            AssetKind::Cashback => "an ISO 4217 currency code such as EUR",
            _ => "a card code: 1 to 64 of A-Z, a-z, 0-9, _ and -",
        };
        v.add(format!("{field}.code"), format!("must be {rule}"));
        return None;
    }
    Some(Asset {
        kind,
        code: code.to_string(),
    })
}

/// Positive amounts up to [`MAX_AMOUNT`].
pub fn check_amount(v: &mut Violations, field: &str, amount: i64) {
    if amount <= 0 {
        v.add(field, "must be a positive integer");
    } else if amount > MAX_AMOUNT {
        v.add(field, format!("must be at most {MAX_AMOUNT}"));
    }
}

/// The account of `owner` for `asset`, created on first use. Returns its id.
pub(crate) async fn account(
    txn: &DatabaseTransaction,
    tenant: &str,
    owner: Owner<'_>,
    asset: &Asset,
) -> Result<String, Error> {
    // Accounts are created once and never removed: look first (one statement on every
    // write after the first), create only when missing.
    if let Some(id) = account_id(txn, tenant, owner, asset).await? {
        return Ok(id);
    }
    let now = now_micros();
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO accounts (id, tenant_id, owner_kind, owner_id, asset_kind, asset_code, \
         balance, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7, $7) \
         ON CONFLICT (tenant_id, owner_kind, owner_id, asset_kind, asset_code) DO NOTHING",
        [
            uuid::Uuid::now_v7().to_string().into(),
            tenant.into(),
            owner.kind().into(),
            owner.id().into(),
            (asset.kind as i32).into(),
            asset.code.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    account_id(txn, tenant, owner, asset)
        .await?
        .ok_or_else(|| Error::internal("account vanished after insert"))
}

async fn account_id(
    txn: &DatabaseTransaction,
    tenant: &str,
    owner: Owner<'_>,
    asset: &Asset,
) -> Result<Option<String>, Error> {
    txn.query_one_raw(stmt(
        txn,
        "SELECT id FROM accounts WHERE tenant_id = $1 AND owner_kind = $2 AND owner_id = $3 \
         AND asset_kind = $4 AND asset_code = $5",
        [
            tenant.into(),
            owner.kind().into(),
            owner.id().into(),
            (asset.kind as i32).into(),
            asset.code.clone().into(),
        ],
    ))
    .await
    .map_err(db_error)?
    .map(|row| row.try_get_by_index(0).map_err(db_error))
    .transpose()
}

/// Writes transaction rows `(id, tenant_id, kind, customer_id, asset_kind, asset_code,
/// amount, reason, principal, created_at)` in multi-row statements.
pub(crate) async fn write_transactions(
    txn: &DatabaseTransaction,
    rows: Vec<Vec<sea_orm::Value>>,
) -> Result<(), Error> {
    insert_rows(
        txn,
        "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, asset_code, \
         amount, reason, principal, created_at)",
        "",
        rows,
    )
    .await
    .map(|_| ())
}

/// Posting rows of one or more transactions, each added whole from legs that balance: the
/// only way postings reach the table.
#[derive(Debug, Default)]
pub(crate) struct Postings(Vec<Vec<sea_orm::Value>>);

impl Postings {
    pub(crate) fn with_capacity(transactions: usize) -> Self {
        Self(Vec::with_capacity(transactions * 2))
    }

    /// Adds the rows of transaction `transaction_id`.
    pub(crate) fn add(
        &mut self,
        tenant: &str,
        transaction_id: &str,
        legs: &Balanced<'_>,
        now: i64,
    ) {
        self.0.extend(legs.legs().iter().map(|leg| {
            vec![
                tenant.into(),
                transaction_id.into(),
                leg.account().into(),
                leg.amount().into(),
                now.into(),
            ]
        }));
    }
}

/// Writes posting rows in multi-row statements.
pub(crate) async fn write_postings(
    txn: &DatabaseTransaction,
    postings: Postings,
) -> Result<(), Error> {
    insert_rows(
        txn,
        "INSERT INTO postings (tenant_id, transaction_id, account_id, amount, created_at)",
        "",
        postings.0,
    )
    .await
    .map(|_| ())
}

/// Writes a transaction's postings (one statement) and moves the customer balance rows.
pub(crate) async fn post(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    legs: Balanced<'_>,
    now: i64,
) -> Result<(), Error> {
    let mut postings = Postings::with_capacity(1);
    postings.add(tenant, transaction_id, &legs, now);
    write_postings(txn, postings).await?;
    for leg in legs.legs() {
        let (sql, account, amount) = match *leg {
            Leg::Customer(account, amount) => (
                "UPDATE accounts SET balance = balance + $1, version = version + 1, \
                 updated_at = $2 WHERE tenant_id = $3 AND id = $4",
                account,
                amount,
            ),
            Leg::Held(account, amount) => (
                "UPDATE accounts SET balance = balance + $1, held = held - $1, \
                 version = version + 1, updated_at = $2 WHERE tenant_id = $3 AND id = $4",
                account,
                amount,
            ),
            Leg::System(..) => continue,
        };
        let updated = txn
            .execute_raw(stmt(
                txn,
                sql,
                [amount.into(), now.into(), tenant.into(), account.into()],
            ))
            .await
            .map_err(db_error)?;
        if updated.rows_affected() != 1 {
            return Err(Error::internal("posting to a missing account"));
        }
    }
    Ok(())
}

/// What kind of ledger movement a credit or debit is: its transaction kind, the tenant system
/// account on the other side, and the event verb (`points.<verb>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movement {
    pub kind: &'static str,
    pub counter_account: &'static str,
    pub event: &'static str,
}

pub const CREDIT: Movement = Movement {
    kind: "credit",
    counter_account: "issuance",
    event: "credited",
};
pub const DEBIT: Movement = Movement {
    kind: "debit",
    counter_account: "redemption",
    event: "debited",
};
/// An agent's correction, either way; the principal and mandatory reason are recorded.
pub const ADJUSTMENT: Movement = Movement {
    kind: "adjustment",
    counter_account: "adjustment",
    event: "adjusted",
};
/// A pending credit confirmed: the value comes from the tenant's pending account.
pub const CONFIRMATION: Movement = Movement {
    kind: "credit",
    counter_account: "pending",
    event: "credited",
};
/// Cashback paid out to the customer.
pub const PAYOUT: Movement = Movement {
    kind: "payout",
    counter_account: "payout",
    event: "paid_out",
};

/// A validated credit.
#[derive(Debug, Clone)]
pub struct Credit {
    pub movement: Movement,
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
    /// Explicit lot expiry (µs since the epoch); None: the programme's policy.
    pub expires_at: Option<i64>,
    /// Purchase amount behind a points credit (tiers on amount spent).
    pub spent_amount: i64,
    /// Multiply the amount by the member's tier earn rate.
    pub apply_tier_multiplier: bool,
}

impl Credit {
    /// A plain credit of `amount`: no spend recorded, no tier multiplier.
    pub fn plain(
        movement: Movement,
        customer_id: String,
        asset: Asset,
        amount: i64,
        reason: String,
        expires_at: Option<i64>,
    ) -> Self {
        Self {
            movement,
            customer_id,
            asset,
            amount,
            reason,
            expires_at,
            spent_amount: 0,
            apply_tier_multiplier: false,
        }
    }
}

/// A validated debit.
#[derive(Debug, Clone)]
pub struct Debit {
    pub movement: Movement,
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
}

/// A lot with value left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lot {
    pub id: i64,
    pub remaining: i64,
    pub expires_at: Option<i64>,
}

/// A customer account, read (and on PostgreSQL locked) by [`lock_account`].
#[derive(Debug, Clone)]
pub(crate) struct AccountRow {
    pub customer_id: String,
    pub asset: Asset,
}

/// Locks a customer account by id for the rest of the transaction (PostgreSQL; SQLite's write
/// transaction already excludes other writers). Every operation that takes value out of an
/// account or restores lots into it locks the account first, so they run one at a time per
/// account and can never overspend. Accounts are locked before holds and lots, never after.
pub(crate) async fn lock_account(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    account_id: &str,
) -> Result<AccountRow, Error> {
    account_row(txn, tenant, account_id, backend.row_lock()).await
}

/// Locks many accounts in id order (PostgreSQL; SQLite's write transaction excludes other
/// writers), so concurrent batches and single operations cannot deadlock.
pub(crate) async fn lock_accounts(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    ids: &BTreeSet<&str>,
) -> Result<(), Error> {
    if backend != Backend::Postgres || ids.is_empty() {
        return Ok(());
    }
    txn.execute_raw(stmt(
        txn,
        &format!(
            "SELECT id FROM accounts WHERE tenant_id = $1 AND id IN {} ORDER BY id FOR UPDATE",
            tuples(2, ids.len(), 1)
        ),
        std::iter::once(tenant.into()).chain(ids.iter().map(|id| (*id).into())),
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// An account's owner and asset, read with `lock` (a row lock, or nothing).
async fn account_row(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    lock: &str,
) -> Result<AccountRow, Error> {
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT owner_id, asset_kind, asset_code FROM accounts \
                 WHERE tenant_id = $1 AND id = $2{lock}"
            ),
            [tenant.into(), account_id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("reference to a missing account"))?;
    Ok(AccountRow {
        customer_id: row.try_get_by_index(0).map_err(db_error)?,
        asset: Asset::stored(
            row.try_get_by_index(1).map_err(db_error)?,
            row.try_get_by_index(2).map_err(db_error)?,
        ),
    })
}

/// The id of a customer's account for `asset`, if it exists; with `lock`, locked as
/// [`lock_account`] does.
pub(crate) async fn find_customer_account(
    txn: &DatabaseTransaction,
    tenant: &str,
    customer_id: &str,
    asset: &Asset,
    lock: Option<Backend>,
) -> Result<Option<String>, Error> {
    let lock = lock.map_or("", Backend::row_lock);
    let row = txn
        .query_one_raw(stmt(
            txn,
            &format!(
                "SELECT id FROM accounts WHERE tenant_id = $1 AND owner_kind = 'customer' \
                 AND owner_id = $2 AND asset_kind = $3 AND asset_code = $4{lock}"
            ),
            [
                tenant.into(),
                customer_id.into(),
                (asset.kind as i32).into(),
                asset.code.clone().into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    row.map(|r| r.try_get_by_index(0).map_err(db_error))
        .transpose()
}

/// Refusal of a spend larger than what is available.
pub(crate) fn insufficient(available: i64, requested: i64) -> Error {
    Error::new(
        Code::FailedPrecondition,
        format!("insufficient balance: {available} available, {requested} requested"),
    )
    .with_reason("INSUFFICIENT_BALANCE")
}

/// The spendable lots of an account (value left, not expired as of `now`), in the order they
/// are spent: lots of `prefer` (a transaction) first, then first-to-expire first, never-expiring
/// last.
pub(crate) async fn spendable_lots(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    prefer: Option<&str>,
    now: i64,
) -> Result<Vec<Lot>, Error> {
    query_lots(
        txn,
        "WHERE tenant_id = $1 AND account_id = $2 \
         AND remaining > 0 AND (expires_at IS NULL OR expires_at > $3) \
         ORDER BY CASE WHEN transaction_id = $4 THEN 0 ELSE 1 END, \
         CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, earned_at, id",
        [
            tenant.into(),
            account_id.into(),
            now.into(),
            prefer.unwrap_or("").into(),
        ],
    )
    .await
}

/// [`spendable_lots`] that hold at least `amount`, else the refusal of the spend.
pub(crate) async fn spendable_for(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    prefer: Option<&str>,
    now: i64,
    amount: i64,
) -> Result<Vec<Lot>, Error> {
    let lots = spendable_lots(txn, tenant, account_id, prefer, now).await?;
    let available: i64 = lots.iter().map(|l| l.remaining).sum();
    if available < amount {
        return Err(insufficient(available, amount));
    }
    Ok(lots)
}

/// Lots selected by `filter` (the SQL after `FROM lots`).
pub(crate) async fn query_lots(
    txn: &DatabaseTransaction,
    filter: &str,
    values: impl IntoIterator<Item = sea_orm::Value>,
) -> Result<Vec<Lot>, Error> {
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!("SELECT id, remaining, expires_at FROM lots {filter}"),
            values,
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|r| {
            Ok(Lot {
                id: r.try_get_by_index(0)?,
                remaining: r.try_get_by_index(1)?,
                expires_at: r.try_get_by_index(2)?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}

/// Takes `amount` out of `lots` in their order for a transaction, recording which lot paid
/// for it so a refund or release can restore it. Returns what each lot gave. The caller has
/// checked that the lots hold enough.
pub(crate) async fn take(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    lots: &[Lot],
    amount: i64,
) -> Result<Vec<(Lot, i64)>, Error> {
    let plan = crate::allocation::allocate(lots.iter().map(|l| (l, l.remaining)), amount)
        .map_err(|_| Error::internal("lots short of a checked amount"))?;
    let mut taken = Vec::with_capacity(plan.len());
    for (lot, part) in plan {
        txn.execute_raw(stmt(
            txn,
            "UPDATE lots SET remaining = remaining - $1 WHERE tenant_id = $2 AND id = $3",
            [part.into(), tenant.into(), lot.id.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO lot_consumptions (tenant_id, transaction_id, lot_id, amount) \
             VALUES ($1, $2, $3, $4)",
            [
                tenant.into(),
                transaction_id.into(),
                lot.id.into(),
                part.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        taken.push((*lot, part));
    }
    Ok(taken)
}

/// Gives back up to `amount` of what transaction `source` took from lots (net of what earlier
/// restorations gave back), latest-to-expire first, each lot keeping its original expiry.
/// Returns the amount restored.
pub(crate) async fn restore(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    source: &str,
    amount: i64,
) -> Result<i64, Error> {
    let rows = txn
        .query_all_raw(stmt(
            txn,
            "SELECT c.lot_id, c.amount - CAST(COALESCE((SELECT SUM(r.amount) FROM lot_restorations r \
             WHERE r.tenant_id = c.tenant_id AND r.source_transaction_id = c.transaction_id \
             AND r.lot_id = c.lot_id), 0) AS BIGINT) \
             FROM lot_consumptions c JOIN lots l ON l.tenant_id = c.tenant_id AND l.id = c.lot_id \
             WHERE c.tenant_id = $1 AND c.transaction_id = $2 \
             ORDER BY CASE WHEN l.expires_at IS NULL THEN 0 ELSE 1 END, l.expires_at DESC, l.id DESC",
            [tenant.into(), source.into()],
        ))
        .await
        .map_err(db_error)?;
    let nets = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get_by_index::<i64>(0)?,
                row.try_get_by_index::<i64>(1)?,
            ))
        })
        .collect::<Result<Vec<(i64, i64)>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    // Up to `amount`: no more than the spend took and has not been given back.
    let open = tessera_money::sum(nets.iter().map(|(_, net)| (*net).max(0)))
        .map_err(|_| Error::internal("lot consumptions out of range"))?;
    let plan = crate::allocation::allocate(nets, amount.min(open))
        .map_err(|_| Error::internal("lot consumptions short of their own sum"))?;
    let mut restored = 0;
    for (lot, part) in plan {
        restored += part;
        txn.execute_raw(stmt(
            txn,
            "UPDATE lots SET remaining = remaining + $1 WHERE tenant_id = $2 AND id = $3",
            [part.into(), tenant.into(), lot.into()],
        ))
        .await
        .map_err(db_error)?;
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO lot_restorations (tenant_id, transaction_id, source_transaction_id, \
             lot_id, amount) VALUES ($1, $2, $3, $4, $5)",
            [
                tenant.into(),
                transaction_id.into(),
                source.into(),
                lot.into(),
                part.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(restored)
}

/// A new lot: `amount` of value earned `earned_at`, expiring `expires_at`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_lot(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    transaction_id: &str,
    amount: i64,
    earned_at: i64,
    expires_at: Option<i64>,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO lots (tenant_id, account_id, transaction_id, amount, remaining, earned_at, expires_at) \
         VALUES ($1, $2, $3, $4, $4, $5, $6)",
        [
            tenant.into(),
            account_id.into(),
            transaction_id.into(),
            amount.into(),
            earned_at.into(),
            expires_at.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// One ledger transaction as the customer's history shows it.
#[derive(Debug, Clone)]
pub(crate) struct Entry<'a> {
    pub id: String,
    pub kind: &'a str,
    pub customer_id: &'a str,
    pub asset: &'a Asset,
    pub amount: i64,
    pub reason: &'a str,
    pub at: i64,
}

impl<'a> Entry<'a> {
    /// A new transaction (fresh time-ordered id) happening `at`.
    pub fn new(
        kind: &'a str,
        customer_id: &'a str,
        asset: &'a Asset,
        amount: i64,
        reason: &'a str,
        at: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            customer_id,
            asset,
            amount,
            reason,
            at,
        }
    }

    /// Records the transaction row (with the acting principal).
    pub async fn write(
        &self,
        txn: &DatabaseTransaction,
        ctx: &RequestContext,
    ) -> Result<(), Error> {
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, asset_code, \
             amount, reason, principal, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [
                self.id.clone().into(),
                ctx.tenant_id.clone().into(),
                self.kind.into(),
                self.customer_id.into(),
                (self.asset.kind as i32).into(),
                self.asset.code.clone().into(),
                self.amount.into(),
                self.reason.into(),
                ctx.principal.clone().into(),
                self.at.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
        Ok(())
    }

    pub fn to_proto(&self) -> pb::Transaction {
        pb::Transaction {
            id: self.id.clone(),
            customer_id: self.customer_id.to_string(),
            asset: Some(self.asset.to_proto()),
            amount: self.amount,
            kind: self.kind.into(),
            reason: self.reason.to_string(),
            created_at: Some(outbox::micros_to_timestamp(self.at)),
        }
    }
}

/// Writes the outbox event `<asset prefix>.<verb>` (e.g. `points.credited`) with `data` plus
/// the asset.
pub(crate) async fn emit(
    txn: &DatabaseTransaction,
    tenant: &str,
    asset: &Asset,
    verb: &str,
    mut data: serde_json::Value,
) -> Result<(), Error> {
    data["asset"] = asset.to_json();
    outbox::enqueue(
        txn,
        tenant,
        &format!("{}.{verb}", asset.event_prefix()),
        &data,
    )
    .await
    .map(|_| ())
}

/// When value earned at `now` expires under a programme's policy, on its calendar.
fn programme_expiry(program: &programs::Program, now: i64) -> Result<Option<i64>, Error> {
    let earned =
        chrono::DateTime::from_timestamp_micros(now).ok_or_else(|| Error::internal("clock"))?;
    Ok(program
        .expiry
        .expires_at(earned, program.time_zone)
        .map(|t| t.timestamp_micros()))
}

/// The programme of a points asset (a programme nobody configured when absent).
pub(crate) async fn programme_of(
    txn: &DatabaseTransaction,
    tenant: &str,
    asset: &Asset,
) -> Result<programs::Program, Error> {
    Ok(programs::find(txn, tenant, &asset.code)
        .await?
        .unwrap_or_else(|| programs::Program::unconfigured(&asset.code)))
}

/// The terms a credit earns under: for points, the member's tier when the programme has
/// tiers (before this credit), and the lot's expiry: the explicit one, else the programme's
/// policy on its calendar, extended by the tier. Other assets do not expire by default.
pub(crate) async fn earning_terms(
    txn: &DatabaseTransaction,
    tenant: &str,
    program: Option<&programs::Program>,
    customer_id: &str,
    explicit: Option<i64>,
    now: i64,
) -> Result<(Option<tiers::Level>, Option<i64>), Error> {
    let Some(program) = program else {
        return Ok((None, explicit));
    };
    let level = match &program.tiers {
        Some(policy) => {
            Some(tiers::current_level(txn, tenant, &program.id, policy, customer_id).await?)
        }
        None => None,
    };
    let expires_at = match explicit {
        Some(at) => Some(at),
        None => programme_expiry(program, now)?
            .map(|at| at + level.as_ref().map_or(0, tiers::Level::extension)),
    };
    Ok((level, expires_at))
}

/// Posts a credit: customer account +amount, the movement's system account −amount, a lot
/// with its expiry, one transaction row, one outbox event. A points credit (not an
/// adjustment) also counts toward the member's tier, which is re-evaluated when the
/// programme has tiers; the tier held before the credit sets its earn rate (when asked) and
/// extends its expiry.
pub async fn credit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    credit: &Credit,
) -> Result<pb::CreditResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    rules::check_expiry(txn, tenant, &credit.asset, credit.expires_at, "expires_at").await?;
    let program = match credit.asset.kind {
        AssetKind::Points => Some(programme_of(txn, tenant, &credit.asset).await?),
        _ => None,
    };
    let tier_policy = program.as_ref().and_then(|p| p.tiers.as_ref());
    let (level, expires_at) = earning_terms(
        txn,
        tenant,
        program.as_ref(),
        &credit.customer_id,
        credit.expires_at,
        now,
    )
    .await?;
    let amount = match &level {
        Some(level) if credit.apply_tier_multiplier => level.multiply(credit.amount),
        _ => credit.amount,
    };
    let customer = account(
        txn,
        tenant,
        Owner::Customer(&credit.customer_id),
        &credit.asset,
    )
    .await?;
    let counter = account(
        txn,
        tenant,
        Owner::System(credit.movement.counter_account),
        &credit.asset,
    )
    .await?;
    let entry = Entry::new(
        credit.movement.kind,
        &credit.customer_id,
        &credit.asset,
        amount,
        &credit.reason,
        now,
    );
    entry.write(txn, ctx).await?;
    insert_lot(txn, tenant, &customer, &entry.id, amount, now, expires_at).await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::Customer(&customer, amount),
            Leg::System(&counter, -amount),
        ])?,
        now,
    )
    .await?;
    if program.is_some() && credit.movement.kind == CREDIT.kind {
        tiers::record_activity(
            txn,
            tenant,
            &credit.asset.code,
            &credit.customer_id,
            amount,
            credit.spent_amount,
            now,
        )
        .await?;
        if let Some(policy) = tier_policy {
            tiers::evaluate(
                txn,
                ctx,
                backend,
                &credit.asset.code,
                policy,
                &credit.customer_id,
            )
            .await?;
        }
    }
    let balance = account_balance(txn, tenant, &credit.customer_id, &credit.asset, now).await?;
    emit(
        txn,
        tenant,
        &credit.asset,
        credit.movement.event,
        serde_json::json!({
            "transaction_id": entry.id,
            "customer_id": credit.customer_id,
            "amount": amount,
            "balance": balance.available,
            "expires_at": expires_at.and_then(chrono::DateTime::from_timestamp_micros),
            "reason": credit.reason,
        }),
    )
    .await?;
    Ok(pb::CreditResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(balance),
    })
}

/// Spends from a customer's account, consuming spendable lots first-to-expire first, under
/// the account's lock (see [`lock_account`]).
pub async fn debit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
    debit: &Debit,
) -> Result<pb::DebitResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let Some(customer) =
        find_customer_account(txn, tenant, &debit.customer_id, &debit.asset, Some(backend)).await?
    else {
        return Err(insufficient(0, debit.amount));
    };
    let lots = spendable_for(txn, tenant, &customer, None, now, debit.amount).await?;
    let entry = Entry::new(
        debit.movement.kind,
        &debit.customer_id,
        &debit.asset,
        -debit.amount,
        &debit.reason,
        now,
    );
    entry.write(txn, ctx).await?;
    take(txn, tenant, &entry.id, &lots, debit.amount).await?;
    let counter = account(
        txn,
        tenant,
        Owner::System(debit.movement.counter_account),
        &debit.asset,
    )
    .await?;
    post(
        txn,
        tenant,
        &entry.id,
        Balanced::new([
            Leg::Customer(&customer, -debit.amount),
            Leg::System(&counter, debit.amount),
        ])?,
        now,
    )
    .await?;
    let balance = account_balance(txn, tenant, &debit.customer_id, &debit.asset, now).await?;
    emit(
        txn,
        tenant,
        &debit.asset,
        debit.movement.event,
        serde_json::json!({
            "transaction_id": entry.id,
            "customer_id": debit.customer_id,
            "amount": debit.amount,
            "balance": balance.available,
            "reason": debit.reason,
        }),
    )
    .await?;
    Ok(pb::DebitResponse {
        transaction: Some(entry.to_proto()),
        balance: Some(balance),
    })
}

/// Most accounts one `ExpireDue` call sweeps; a caller repeats the call until it reports
/// nothing expired.
pub const EXPIRE_BATCH: i64 = 5_000;

/// Releases the tenant's lapsed holds, then expires the due lots (of up to [`EXPIRE_BATCH`]
/// accounts): per account, one expiry transaction moving the remaining value to the tenant's
/// expiry account, and one event. Accounts are locked (PostgreSQL) in id order before their
/// lots, like debits do, so a sweep and a debit never deadlock.
pub async fn expire_due(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    backend: Backend,
) -> Result<pb::ExpireDueResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let holds_released = crate::holds::release_lapsed(txn, ctx, backend).await?;
    let now = now_micros();
    let accounts = txn
        .query_all_raw(stmt(
            txn,
            "SELECT DISTINCT account_id FROM lots WHERE tenant_id = $1 AND remaining > 0 \
             AND expires_at IS NOT NULL AND expires_at <= $2 ORDER BY account_id LIMIT $3",
            [tenant.into(), now.into(), EXPIRE_BATCH.into()],
        ))
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get_by_index::<String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error)?;
    let mut response = pb::ExpireDueResponse {
        holds_released,
        ..Default::default()
    };
    for account_id in accounts {
        let account_row = lock_account(txn, tenant, backend, &account_id).await?;
        let due = query_lots(
            txn,
            "WHERE tenant_id = $1 AND account_id = $2 \
             AND remaining > 0 AND expires_at IS NOT NULL AND expires_at <= $3",
            [tenant.into(), account_id.clone().into(), now.into()],
        )
        .await?;
        let amount: i64 = due.iter().map(|l| l.remaining).sum();
        if amount == 0 {
            continue;
        }
        let entry = Entry::new(
            "expiry",
            &account_row.customer_id,
            &account_row.asset,
            -amount,
            "expired",
            now,
        );
        entry.write(txn, ctx).await?;
        take(txn, tenant, &entry.id, &due, amount).await?;
        let expiry = account(txn, tenant, Owner::System("expiry"), &account_row.asset).await?;
        post(
            txn,
            tenant,
            &entry.id,
            Balanced::new([
                Leg::Customer(&account_id, -amount),
                Leg::System(&expiry, amount),
            ])?,
            now,
        )
        .await?;
        emit(
            txn,
            tenant,
            &account_row.asset,
            "expired",
            serde_json::json!({
                "transaction_id": entry.id,
                "customer_id": account_row.customer_id,
                "amount": amount,
                "lots": due.len(),
            }),
        )
        .await?;
        response.lots_expired += u32::try_from(due.len()).unwrap_or(u32::MAX);
        response.accounts += 1;
        response.amount_expired += amount;
    }
    announce_expiring(txn, tenant, backend, now).await?;
    Ok(response)
}

/// How far ahead a lot's expiry is announced.
pub const EXPIRY_NOTICE_MICROS: i64 = 7 * 86_400 * 1_000_000;

/// Announces, once per lot, value expiring within [`EXPIRY_NOTICE_MICROS`]: one
/// `<asset>.expiring` event per account (the amount, the first expiry and the lots), for
/// notification to remind the customer.
async fn announce_expiring(
    txn: &DatabaseTransaction,
    tenant: &str,
    backend: Backend,
    now: i64,
) -> Result<(), Error> {
    // Lots a spend holds now are skipped (announced by the next sweep): waiting for them
    // while holding others could deadlock with a spend taking its lots in expiry order.
    let skip_locked = match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let rows = txn
        .query_all_raw(stmt(
            txn,
            &format!(
                "UPDATE lots SET expiry_announced = 1 WHERE id IN (\
                   SELECT id FROM lots WHERE tenant_id = $1 AND remaining > 0 \
                   AND expires_at IS NOT NULL AND expires_at > $2 AND expires_at <= $3 \
                   AND expiry_announced = 0 ORDER BY id LIMIT $4{skip_locked}) \
                 RETURNING account_id, remaining, expires_at"
            ),
            [
                tenant.into(),
                now.into(),
                (now + EXPIRY_NOTICE_MICROS).into(),
                (EXPIRE_BATCH * 10).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    // Per account: amount, first expiry, lots.
    let mut by_account: std::collections::BTreeMap<String, (i64, i64, u32)> =
        std::collections::BTreeMap::new();
    for r in &rows {
        let account: String = r.try_get_by_index(0).map_err(db_error)?;
        let remaining: i64 = r.try_get_by_index(1).map_err(db_error)?;
        let expires_at: i64 = r.try_get_by_index(2).map_err(db_error)?;
        let e = by_account.entry(account).or_insert((0, i64::MAX, 0));
        e.0 += remaining;
        e.1 = e.1.min(expires_at);
        e.2 += 1;
    }
    for (account_id, (amount, first, lots)) in by_account {
        // No row lock: lots are taken before accounts here, the reverse of a spend.
        let account = account_row(txn, tenant, &account_id, "").await?;
        emit(
            txn,
            tenant,
            &account.asset,
            "expiring",
            serde_json::json!({
                "customer_id": account.customer_id,
                "amount": amount,
                "expires_at": chrono::DateTime::from_timestamp_micros(first),
                "lots": lots,
            }),
        )
        .await?;
    }
    Ok(())
}

/// Moves a customer account's `pending` total (credited value waiting for confirmation,
/// kept on the row beside the balance so a balance is one row read).
pub(crate) async fn move_pending(
    txn: &DatabaseTransaction,
    tenant: &str,
    account_id: &str,
    delta: i64,
) -> Result<(), Error> {
    txn.execute_raw(stmt(
        txn,
        "UPDATE accounts SET pending = pending + $1 WHERE tenant_id = $2 AND id = $3",
        [delta.into(), tenant.into(), account_id.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The balance of one customer account (zero when it does not exist).
pub(crate) async fn account_balance<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    asset: &Asset,
    now: i64,
) -> Result<pb::Balance, Error> {
    Ok(balances_of(conn, tenant, customer_id, Some(asset), now)
        .await?
        .into_iter()
        .find(|b| b.asset.as_ref() == Some(&asset.to_proto()))
        .unwrap_or_else(|| pb::Balance {
            asset: Some(asset.to_proto()),
            ..Default::default()
        }))
}

/// Balances of every account of one customer, as of `now`: the balance row less value that
/// has expired but not been swept yet, and what expires within 30/60/90 days.
pub async fn balances<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    now: i64,
) -> Result<Vec<pb::Balance>, Error> {
    balances_of(conn, tenant, customer_id, None, now).await
}

/// [`balances`], restricted to one asset when `only` is given (what a write returns).
async fn balances_of<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
    only: Option<&Asset>,
    now: i64,
) -> Result<Vec<pb::Balance>, Error> {
    const DAY: i64 = 86_400 * 1_000_000;
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT a.asset_kind, a.asset_code, a.balance, \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at <= $3 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $4 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $5 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN l.expires_at > $3 AND l.expires_at <= $6 THEN l.remaining ELSE 0 END), 0) AS BIGINT), \
             a.held, a.pending \
             FROM accounts a LEFT JOIN lots l ON l.tenant_id = a.tenant_id AND l.account_id = a.id \
             AND l.remaining > 0 AND l.expires_at IS NOT NULL \
             WHERE a.tenant_id = $1 AND a.owner_kind = 'customer' AND a.owner_id = $2 \
             AND ($7 = 0 OR (a.asset_kind = $7 AND a.asset_code = $8)) \
             GROUP BY a.tenant_id, a.id, a.asset_kind, a.asset_code, a.balance, a.held, a.pending \
             ORDER BY a.asset_kind, a.asset_code",
            [
                tenant.into(),
                customer_id.into(),
                now.into(),
                (now + 30 * DAY).into(),
                (now + 60 * DAY).into(),
                (now + 90 * DAY).into(),
                only.map_or(0, |a| a.kind as i32).into(),
                only.map_or(String::new(), |a| a.code.clone()).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| {
            let balance: i64 = row.try_get_by_index(2)?;
            let expired: i64 = row.try_get_by_index(3)?;
            Ok(pb::Balance {
                asset: Some(pb::Asset {
                    kind: row.try_get_by_index(0)?,
                    code: row.try_get_by_index(1)?,
                }),
                available: balance - expired,
                expiring_30d: row.try_get_by_index(4)?,
                expiring_60d: row.try_get_by_index(5)?,
                expiring_90d: row.try_get_by_index(6)?,
                held: row.try_get_by_index(7)?,
                pending: row.try_get_by_index(8)?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}

/// One page of a customer's transactions, newest first. Transaction ids are UUIDv7 (time
/// ordered), so the cursor is the last id of the previous page.
pub async fn transactions<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    filter: &TransactionFilter,
) -> Result<(Vec<pb::Transaction>, bool), Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT id, kind, asset_kind, asset_code, amount, reason, created_at FROM transactions \
             WHERE tenant_id = $1 AND customer_id = $2 AND ($3 = '' OR id < $3) \
             AND ($4 = 0 OR asset_kind = $4) AND ($5 = '' OR asset_code = $5) \
             AND ($6 = '' OR kind = $6) AND created_at >= $7 AND created_at < $8 \
             ORDER BY id DESC LIMIT $9",
            [
                tenant.into(),
                filter.customer_id.clone().into(),
                filter.starting_after.clone().into(),
                filter.asset_kind.into(),
                filter.asset_code.clone().into(),
                filter.kind.clone().into(),
                filter.from.into(),
                filter.until.into(),
                i64::from(filter.limit + 1).into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    let has_more = rows.len() > filter.limit as usize;
    let page = rows
        .iter()
        .take(filter.limit as usize)
        .map(|row| {
            Ok(pb::Transaction {
                id: row.try_get_by_index(0)?,
                customer_id: filter.customer_id.clone(),
                kind: row.try_get_by_index(1)?,
                asset: Some(pb::Asset {
                    kind: row.try_get_by_index(2)?,
                    code: row.try_get_by_index(3)?,
                }),
                amount: row.try_get_by_index(4)?,
                reason: row.try_get_by_index(5)?,
                created_at: Some(outbox::micros_to_timestamp(row.try_get_by_index(6)?)),
            })
        })
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()
        .map_err(db_error)?;
    Ok((page, has_more))
}

/// Validated filters of `ListTransactions`.
#[derive(Debug, Clone)]
pub struct TransactionFilter {
    pub customer_id: String,
    pub asset_kind: i32,
    pub asset_code: String,
    pub kind: String,
    /// Inclusive lower bound, µs since the epoch.
    pub from: i64,
    /// Exclusive upper bound, µs since the epoch.
    pub until: i64,
    pub starting_after: String,
    pub limit: u32,
}
