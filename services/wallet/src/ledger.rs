//! Ledger writes and reads. Every function takes the tenant and filters on it; writes run
//! inside the caller's transaction.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_proto::wallet::v1::{self as pb, AssetKind};
use tessera_runtime::error::Violations;
use tessera_runtime::{Error, RequestContext};
use tessera_store::{db_error, now_micros, outbox, stmt};

/// Largest single amount accepted (points or minor units); far above any real credit, far
/// below where sums could overflow 64 bits.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Who owns an account.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    fn event_prefix(&self) -> &'static str {
        match self.kind {
            AssetKind::Points | AssetKind::Unspecified => "points",
            AssetKind::Cashback => "cashback",
            AssetKind::GiftCard => "gift_card",
        }
    }
}

/// Customer ids: 1..=128 visible ASCII characters.
pub fn check_customer_id(v: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        v.add(field, "is required");
    } else if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add(field, "must be 1 to 128 visible ASCII characters");
    }
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
        AssetKind::Points => {
            (1..=64).contains(&code.len())
                && code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        }
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
async fn account(
    txn: &DatabaseTransaction,
    tenant: &str,
    owner: Owner<'_>,
    asset: &Asset,
) -> Result<String, Error> {
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
    let row = txn
        .query_one_raw(stmt(
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
        .ok_or_else(|| Error::internal("account vanished after insert"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// Writes one posting and moves the account's balance by `amount`. Returns the new balance.
async fn post(
    txn: &DatabaseTransaction,
    tenant: &str,
    transaction_id: &str,
    account_id: &str,
    amount: i64,
    now: i64,
) -> Result<i64, Error> {
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO postings (tenant_id, transaction_id, account_id, amount, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
        [
            tenant.into(),
            transaction_id.into(),
            account_id.into(),
            amount.into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let row = txn
        .query_one_raw(stmt(
            txn,
            "UPDATE accounts SET balance = balance + $1, version = version + 1, updated_at = $2 \
             WHERE tenant_id = $3 AND id = $4 RETURNING balance",
            [amount.into(), now.into(), tenant.into(), account_id.into()],
        ))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::internal("posting to a missing account"))?;
    row.try_get_by_index(0).map_err(db_error)
}

/// A validated credit.
#[derive(Debug, Clone)]
pub struct Credit {
    pub customer_id: String,
    pub asset: Asset,
    pub amount: i64,
    pub reason: String,
}

/// Posts a credit: customer account +amount, tenant issuance account −amount, one
/// transaction row, one outbox event.
pub async fn credit(
    txn: &DatabaseTransaction,
    ctx: &RequestContext,
    credit: &Credit,
) -> Result<pb::CreditResponse, Error> {
    let tenant = ctx.tenant_id.as_str();
    let now = now_micros();
    let transaction_id = uuid::Uuid::now_v7().to_string();
    let customer = account(
        txn,
        tenant,
        Owner::Customer(&credit.customer_id),
        &credit.asset,
    )
    .await?;
    let issuance = account(txn, tenant, Owner::System("issuance"), &credit.asset).await?;
    txn.execute_raw(stmt(
        txn,
        "INSERT INTO transactions (id, tenant_id, kind, customer_id, asset_kind, asset_code, \
         amount, reason, principal, created_at) VALUES ($1, $2, 'credit', $3, $4, $5, $6, $7, $8, $9)",
        [
            transaction_id.clone().into(),
            tenant.into(),
            credit.customer_id.clone().into(),
            (credit.asset.kind as i32).into(),
            credit.asset.code.clone().into(),
            credit.amount.into(),
            credit.reason.clone().into(),
            ctx.principal.clone().into(),
            now.into(),
        ],
    ))
    .await
    .map_err(db_error)?;
    let balance = post(txn, tenant, &transaction_id, &customer, credit.amount, now).await?;
    post(txn, tenant, &transaction_id, &issuance, -credit.amount, now).await?;
    outbox::enqueue(
        txn,
        tenant,
        &format!("{}.credited", credit.asset.event_prefix()),
        &serde_json::json!({
            "transaction_id": transaction_id,
            "customer_id": credit.customer_id,
            "asset": { "kind": credit.asset.event_prefix(), "code": credit.asset.code },
            "amount": credit.amount,
            "balance": balance,
            "reason": credit.reason,
        }),
    )
    .await?;
    Ok(pb::CreditResponse {
        transaction: Some(pb::Transaction {
            id: transaction_id,
            customer_id: credit.customer_id.clone(),
            asset: Some(credit.asset.to_proto()),
            amount: credit.amount,
            kind: "credit".into(),
            reason: credit.reason.clone(),
            created_at: Some(outbox::micros_to_timestamp(now)),
        }),
        balance: Some(pb::Balance {
            asset: Some(credit.asset.to_proto()),
            available: balance,
        }),
    })
}

/// Balances of every account of one customer.
pub async fn balances<C: ConnectionTrait>(
    conn: &C,
    tenant: &str,
    customer_id: &str,
) -> Result<Vec<pb::Balance>, Error> {
    let rows = conn
        .query_all_raw(stmt(
            conn,
            "SELECT asset_kind, asset_code, balance FROM accounts \
             WHERE tenant_id = $1 AND owner_kind = 'customer' AND owner_id = $2 \
             ORDER BY asset_kind, asset_code",
            [tenant.into(), customer_id.into()],
        ))
        .await
        .map_err(db_error)?;
    rows.iter()
        .map(|row| {
            Ok(pb::Balance {
                asset: Some(pb::Asset {
                    kind: row.try_get_by_index(0)?,
                    code: row.try_get_by_index(1)?,
                }),
                available: row.try_get_by_index(2)?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_error)
}
