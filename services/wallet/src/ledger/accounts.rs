//! Accounts: who owns them (a customer, a tenant system account), the validated asset they
//! hold, finding or opening them, locking them in a fixed order, their balances.

use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};
use tessera_store::{Backend, db_error, now_micros, stmt, tuples};

use tessera_money::MAX_AMOUNT;

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
pub(crate) async fn account_row(
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
