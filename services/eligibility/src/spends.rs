//! Wallet value a redemption spends: the points of the checkout's programme (pay with
//! points, points exchanges) and the value of gift cards unlocked by their code.
//!
//! A saga across eligibility and the wallet, whose data live apart:
//! - planning reads the customer's wallet balances, so the engine spends only what is there;
//! - Redeem and Reserve place one wallet hold per asset before the redemption's transaction
//!   begins (no pooled connection, no counter lock waits on the wallet), and the transaction
//!   writes a row per hold. The holds of concurrent redemptions are gathered into one
//!   `BatchHold` (a group commit in the wallet; each hold stands or fails on its own). A hold
//!   that fails fails the redemption (INSUFFICIENT_BALANCE when a concurrent spend took the
//!   value); holds the redemption does not end up with (a replay, a budget that ran out, an
//!   order redeemed already) are released at once;
//! - what is left to do is state on those rows, carried out by [`settle`]: for a redeem, by
//!   the settler the commit wakes (the captures of every redemption due go to the wallet's
//!   `BatchCapture` together); for a confirmation or a rollback, right after its commit; and
//!   again every second until it succeeds, under idempotency keys derived from the row. A
//!   redeemed redemption's holds are captured, a released or expired reservation's holds
//!   released, and a rollback's share reversed (points come back to their lots with their
//!   original expiry).
//!
//! A hold orphaned by a crash between the wallet's answer and the commit lapses at its
//! expiry (a day past the redemption's own deadline) and the wallet's sweep releases it.

use std::collections::{BTreeMap, HashMap};

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_effects::Target;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::{Code, Error, RequestContext, grpc};
use tessera_store::idempotency::derived_key;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::{Db, db_error, stmt, tuples};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::redeem::Plan;

/// How long past the redemption's deadline its holds last (time for the capture to land).
const HOLD_GRACE_MICROS: i64 = 24 * 3600 * 1_000_000;

/// What the plan takes from the wallet, one entry per asset (no hold yet).
pub fn of_plan(plan: &Plan, program: &str) -> Vec<pb::WalletSpend> {
    let mut by_asset: BTreeMap<(i32, String), i64> = BTreeMap::new();
    if plan.outcome.points_spent > 0 && !program.is_empty() {
        by_asset.insert(
            (wpb::AssetKind::Points as i32, program.to_string()),
            plan.outcome.points_spent,
        );
    }
    for p in plan.picks.iter().filter(|p| p.card.is_some()) {
        let paid: i64 = plan
            .outcome
            .adjustments
            .iter()
            .filter(|a| a.reward_id == p.id() && a.target == Target::Tender)
            .map(|a| a.amount)
            .sum();
        if paid > 0 {
            *by_asset
                .entry((wpb::AssetKind::GiftCard as i32, p.code.clone()))
                .or_default() += paid;
        }
    }
    by_asset
        .into_iter()
        .map(|((kind, code), amount)| pb::WalletSpend {
            asset: Some(wpb::Asset { kind, code }),
            amount,
            ..Default::default()
        })
        .collect()
}

/// The customer's spendable wallet value: points of `program` and value per gift-card code.
pub struct Balances {
    pub points: i64,
    pub cards: HashMap<String, i64>,
}

/// Reads the customer's balances from the wallet.
pub async fn balances(
    wallet: &WalletServiceClient<grpc::Channel>,
    ctx: &RequestContext,
    customer: &str,
    program: &str,
) -> Result<Balances, Error> {
    let response = wallet
        .clone()
        .get_balance(ctx.request(wpb::GetBalanceRequest {
            customer_id: customer.to_string(),
        }))
        .await
        .map_err(|s| Error::from_status(&s))?
        .into_inner();
    let mut out = Balances {
        points: 0,
        cards: HashMap::new(),
    };
    for b in response.balances {
        let asset = b.asset.unwrap_or_default();
        match asset.kind() {
            wpb::AssetKind::Points if asset.code == program => out.points = b.available,
            wpb::AssetKind::GiftCard => {
                out.cards.insert(asset.code, b.available);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The wallet, called as the caller of the redemption.
#[derive(Clone)]
pub struct Holder {
    pub wallet: WalletServiceClient<grpc::Channel>,
    pub holds: HoldBatcher,
    pub ctx: RequestContext,
}

/// Most holds gathered into one `BatchHold`.
const HOLD_BATCH: usize = 200;

/// One hold a redemption waits for.
struct Ask {
    ctx: RequestContext,
    key: String,
    entry: wpb::BatchHoldEntry,
    reply: oneshot::Sender<Result<wpb::BatchHoldOutcome, Error>>,
}

/// Gathers the holds of concurrent redemptions into one wallet `BatchHold` per tenant and
/// caller, a group commit: while one batch is with the wallet, the next one gathers. Each
/// hold still stands or fails on its own.
#[derive(Clone)]
pub struct HoldBatcher {
    asks: mpsc::Sender<Ask>,
}

impl HoldBatcher {
    /// The batcher and its task (which ends with `shutdown`).
    pub fn start(
        wallet: WalletServiceClient<grpc::Channel>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (asks, rx) = mpsc::channel(4 * HOLD_BATCH);
        let task = tokio::spawn(gather_holds(wallet, rx, shutdown));
        (Self { asks }, task)
    }

    async fn hold(
        &self,
        ctx: &RequestContext,
        key: String,
        entry: wpb::BatchHoldEntry,
    ) -> Result<wpb::BatchHoldOutcome, Error> {
        let (reply, outcome) = oneshot::channel();
        let ask = Ask {
            ctx: ctx.clone(),
            key,
            entry,
            reply,
        };
        let stopped = || Error::new(Code::Unavailable, "the eligibility is shutting down");
        self.asks.send(ask).await.map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

async fn gather_holds(
    wallet: WalletServiceClient<grpc::Channel>,
    mut asks: mpsc::Receiver<Ask>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            ask = asks.recv() => match ask {
                Some(ask) => ask,
                None => return,
            },
        };
        let mut groups: BTreeMap<(String, String), Vec<Ask>> = BTreeMap::new();
        let mut gathered = 1;
        let mut next = Some(first);
        while let Some(ask) = next {
            let group = (ask.ctx.tenant_id.clone(), ask.ctx.principal.clone());
            groups.entry(group).or_default().push(ask);
            next = (gathered < HOLD_BATCH)
                .then(|| asks.try_recv().ok())
                .flatten();
            gathered += 1;
        }
        for group in groups.into_values() {
            hold_batch(&wallet, group).await;
        }
    }
}

/// Sends one batch and answers each of its redemptions.
async fn hold_batch(wallet: &WalletServiceClient<grpc::Channel>, group: Vec<Ask>) {
    let keys: Vec<&str> = group.iter().map(|a| a.key.as_str()).collect();
    let request = group[0].ctx.request(wpb::BatchHoldRequest {
        idempotency_key: derived_key("redemption-holds", &keys),
        holds: group.iter().map(|a| a.entry.clone()).collect(),
    });
    match wallet.clone().batch_hold(request).await {
        Ok(response) => {
            let mut outcomes = response.into_inner().outcomes.into_iter();
            for ask in group {
                let outcome = outcomes
                    .next()
                    .ok_or_else(|| Error::internal("the wallet answered fewer holds"));
                let _ = ask.reply.send(outcome);
            }
        }
        Err(status) => {
            for ask in group {
                let _ = ask.reply.send(Err(Error::from_status(&status)));
            }
        }
    }
}

fn asset_of(s: &pb::WalletSpend) -> wpb::Asset {
    s.asset.clone().unwrap_or_default()
}

fn describe(asset: &wpb::Asset) -> String {
    match asset.kind() {
        wpb::AssetKind::GiftCard => format!("gift card `{}`", asset.code),
        _ => format!("points of programme `{}`", asset.code),
    }
}

/// The idempotency key of one wallet step of one spend.
fn key(redemption: &str, asset: &wpb::Asset, step: &str) -> String {
    derived_key(
        "redemption",
        &[redemption, &asset.kind.to_string(), &asset.code, step],
    )
}

/// Whether `a` and `b` spend the same (ignoring hold ids).
pub fn same(a: &[pb::WalletSpend], b: &[pb::WalletSpend]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.asset == y.asset && x.amount == y.amount)
}

/// Holds `wanted` in the customer's wallet for redemption `redemption` until `deadline`
/// plus a grace; returns them with their hold ids. On failure nothing stays held.
pub async fn hold(
    holder: &Holder,
    redemption: &str,
    customer: &str,
    wanted: Vec<pb::WalletSpend>,
    deadline: i64,
) -> Result<Vec<pb::WalletSpend>, Error> {
    let mut placed: Vec<pb::WalletSpend> = Vec::with_capacity(wanted.len());
    for mut s in wanted {
        let asset = asset_of(&s);
        let entry = wpb::BatchHoldEntry {
            customer_id: customer.to_string(),
            asset: Some(asset.clone()),
            amount: s.amount,
            reason: format!("redemption {redemption}"),
            expires_at: Some(micros_to_timestamp(deadline + HOLD_GRACE_MICROS)),
        };
        let key = key(redemption, &asset, "hold");
        let outcome = holder.holds.hold(&holder.ctx, key, entry).await;
        let refused = match outcome {
            Ok(o) if o.reason.is_empty() => {
                s.hold_id = o.hold.map(|h| h.id).unwrap_or_default();
                placed.push(s);
                continue;
            }
            Ok(o) => Error::new(Code::FailedPrecondition, o.message).with_reason(o.reason),
            Err(e) => e,
        };
        release_now(holder, &placed).await;
        if refused.reason.as_deref() != Some("INSUFFICIENT_BALANCE") {
            return Err(refused);
        }
        return Err(Error::new(
            Code::FailedPrecondition,
            format!(
                "the customer's {} no longer cover {}: {}",
                describe(&asset),
                s.amount,
                refused.message
            ),
        )
        .with_reason("INSUFFICIENT_BALANCE"));
    }
    Ok(placed)
}

/// Releases holds of a redemption that was not made (best effort: a hold left over lapses).
pub async fn release_now(holder: &Holder, held: &[pb::WalletSpend]) {
    for s in held {
        let request = holder.ctx.request(wpb::ReleaseRequest {
            idempotency_key: derived_key("redemption-undo", &[&s.hold_id]),
            hold_id: s.hold_id.clone(),
        });
        if let Err(e) = holder.wallet.clone().release(request).await {
            tracing::warn!(error = %e, hold = %s.hold_id, "hold left to lapse");
        }
    }
}

/// Records the holds of `record` in its transaction: to capture at once when `reserved` is
/// false, else when the reservation is confirmed.
pub async fn record(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
    reserved: bool,
) -> Result<(), Error> {
    let (state, due) = if reserved {
        ("held", 0)
    } else {
        ("capture", 1)
    };
    for s in &record.spends {
        let asset = asset_of(s);
        txn.execute_raw(stmt(
            txn,
            "INSERT INTO redemption_spends (tenant_id, redemption_id, asset_kind, asset_code, \
             customer_id, amount, hold_id, state, capture_tx, refund_target, refunded, due, \
             error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '', 0, 0, $9, '')",
            [
                tenant.into(),
                record.id.clone().into(),
                asset.kind.into(),
                asset.code.clone().into(),
                record.customer_id.clone().into(),
                s.amount.into(),
                s.hold_id.clone().into(),
                state.into(),
                due.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// A reservation was confirmed: its holds are to be captured.
pub async fn capture_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
) -> Result<(), Error> {
    move_state(txn, tenant, record, "capture").await
}

/// A reservation was rolled back or expired: its holds are to be released.
pub async fn release_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
) -> Result<(), Error> {
    move_state(txn, tenant, record, "release").await
}

async fn move_state(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
    to: &str,
) -> Result<(), Error> {
    if record.spends.is_empty() {
        return Ok(());
    }
    txn.execute_raw(stmt(
        txn,
        "UPDATE redemption_spends SET state = $3, due = 1 \
         WHERE tenant_id = $1 AND redemption_id = $2 AND state = 'held'",
        [tenant.into(), record.id.clone().into(), to.into()],
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// A redeemed redemption gave back `released` of its `order_value` (in all, so far): each
/// spend is refunded in that proportion (rounded down; all of it when `whole`).
pub async fn refund_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &mut pb::Redemption,
    released: i64,
    whole: bool,
) -> Result<(), Error> {
    for s in &mut record.spends {
        let target = if whole || record.order_value <= 0 {
            s.amount
        } else {
            i64::try_from(
                i128::from(s.amount) * i128::from(released.clamp(0, record.order_value))
                    / i128::from(record.order_value),
            )
            .unwrap_or(s.amount)
        };
        if target <= s.refunded {
            continue;
        }
        s.refunded = target;
        let asset = asset_of(s);
        txn.execute_raw(stmt(
            txn,
            "UPDATE redemption_spends SET refund_target = $5, due = 1 \
             WHERE tenant_id = $1 AND redemption_id = $2 AND asset_kind = $3 \
             AND asset_code = $4",
            [
                tenant.into(),
                record.id.clone().into(),
                asset.kind.into(),
                asset.code.into(),
                target.into(),
            ],
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// One spend with work left.
struct Due {
    tenant: String,
    redemption: String,
    asset: wpb::Asset,
    customer: String,
    hold: String,
    state: String,
    capture_tx: String,
    refund_target: i64,
    refunded: i64,
}

const WHERE_ROW: &str =
    "tenant_id = $1 AND redemption_id = $2 AND asset_kind = $3 AND asset_code = $4";

impl Due {
    fn filter(&self) -> Vec<sea_orm::Value> {
        vec![
            self.tenant.clone().into(),
            self.redemption.clone().into(),
            self.asset.kind.into(),
            self.asset.code.clone().into(),
        ]
    }
}

/// Most spends one pass settles (and captures in one wallet call per tenant).
pub const SETTLE_BATCH: usize = 500;

/// Carries out what is due on the spends of one redemption (`only`) or of all, up to
/// [`SETTLE_BATCH`]; returns how many rows it worked on. Captures go to the wallet in one
/// `BatchCapture` per tenant (a group commit); releases and refunds one by one. A refusal
/// by the wallet is kept on the row (and logged) instead of being retried forever.
pub async fn settle(
    db: &Db,
    wallet: &WalletServiceClient<grpc::Channel>,
    only: Option<(&str, &str)>,
) -> Result<usize, Error> {
    let conn = db.conn();
    let (filter, values): (&str, Vec<sea_orm::Value>) = match only {
        Some((tenant, redemption)) => (
            "AND tenant_id = $1 AND redemption_id = $2",
            vec![tenant.into(), redemption.into()],
        ),
        None => ("", Vec::new()),
    };
    let rows = conn
        .query_all_raw(stmt(
            conn,
            &format!(
                "SELECT tenant_id, redemption_id, asset_kind, asset_code, customer_id, \
                 hold_id, state, capture_tx, refund_target, refunded FROM redemption_spends \
                 WHERE due = 1 AND error = '' {filter} LIMIT {SETTLE_BATCH}"
            ),
            values,
        ))
        .await
        .map_err(db_error)?;
    let mut dues = Vec::with_capacity(rows.len());
    for row in rows {
        let s = |i: usize| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let n = |i: usize| -> Result<i64, Error> { row.try_get_by_index(i).map_err(db_error) };
        let kind: i32 = row.try_get_by_index(2).map_err(db_error)?;
        dues.push(Due {
            tenant: s(0)?,
            redemption: s(1)?,
            asset: wpb::Asset { kind, code: s(3)? },
            customer: s(4)?,
            hold: s(5)?,
            state: s(6)?,
            capture_tx: s(7)?,
            refund_target: n(8)?,
            refunded: n(9)?,
        });
    }
    let mut captured = capture_all(wallet, &dues).await?;
    let mut settled = Vec::with_capacity(dues.len());
    for d in &dues {
        let outcome = match captured.remove(&(d.tenant.clone(), d.hold.clone())) {
            Some(Err(refused)) => Err(refused),
            capture => settle_one(wallet, d, capture.and_then(Result::ok)).await,
        };
        let refused = match outcome {
            Ok(row) => {
                settled.push(row);
                continue;
            }
            Err(e) => e,
        };
        let what = format!("a spend of redemption {}", d.redemption);
        let table = "redemption_spends";
        if let Err(e) = keep_refusal(conn, table, WHERE_ROW, d.filter(), Err(refused), &what).await
        {
            // What was done so far is written before the rest waits for the wallet.
            write_settled(db, settled).await?;
            return Err(e);
        }
    }
    write_settled(db, settled).await?;
    Ok(dues.len())
}

/// Captures the holds of the spends due for capture, one `BatchCapture` per tenant: the
/// capture transaction of each hold, or the wallet's refusal. A hold the wallet captured
/// already reports its capture, so a batch cut short by a crash is simply sent again.
async fn capture_all(
    wallet: &WalletServiceClient<grpc::Channel>,
    dues: &[Due],
) -> Result<HashMap<(String, String), Result<String, Error>>, Error> {
    let mut by_tenant: BTreeMap<&str, Vec<&Due>> = BTreeMap::new();
    for d in dues.iter().filter(|d| d.state == "capture") {
        by_tenant.entry(d.tenant.as_str()).or_default().push(d);
    }
    let mut out = HashMap::new();
    for (tenant, due) in by_tenant {
        let holds: Vec<&str> = due.iter().map(|d| d.hold.as_str()).collect();
        let ctx = RequestContext::system(tenant.to_string(), crate::SERVICE);
        let response = wallet
            .clone()
            .batch_capture(
                ctx.request(wpb::BatchCaptureRequest {
                    idempotency_key: derived_key("redemption-captures", &holds),
                    captures: holds
                        .iter()
                        .map(|h| wpb::BatchCaptureEntry {
                            hold_id: (*h).to_string(),
                            amount: 0,
                        })
                        .collect(),
                }),
            )
            .await
            .map_err(|s| Error::from_status(&s))?
            .into_inner();
        for o in response.outcomes {
            let outcome = if o.reason.is_empty() {
                Ok(o.hold.map(|h| h.capture_transaction_id).unwrap_or_default())
            } else {
                let code = if o.reason == "NOT_FOUND" {
                    Code::NotFound
                } else {
                    Code::FailedPrecondition
                };
                Err(Error::new(code, o.message).with_reason(o.reason))
            };
            out.insert((tenant.to_string(), o.hold_id), outcome);
        }
    }
    Ok(out)
}

/// The rest of a spend's work once its capture (when due) is known: a release, a refund;
/// returns the row's new values for [`write_settled`].
async fn settle_one(
    wallet: &WalletServiceClient<grpc::Channel>,
    d: &Due,
    captured: Option<String>,
) -> Result<Vec<sea_orm::Value>, Error> {
    let ctx = RequestContext::system(d.tenant.clone(), crate::SERVICE);
    let mut state = d.state.clone();
    let mut capture_tx = d.capture_tx.clone();
    let mut refunded = d.refunded;
    match state.as_str() {
        "capture" => {
            capture_tx = captured.ok_or_else(|| Error::internal("capture without its outcome"))?;
            state = "captured".into();
        }
        "release" => {
            let released = wallet
                .clone()
                .release(ctx.request(wpb::ReleaseRequest {
                    idempotency_key: key(&d.redemption, &d.asset, "release"),
                    hold_id: d.hold.clone(),
                }))
                .await
                .map_err(|s| Error::from_status(&s));
            match released {
                Ok(_) => {}
                // It lapsed and the wallet's sweep released it already.
                Err(e) if e.reason.as_deref() == Some("HOLD_NOT_ACTIVE") => {}
                Err(e) => return Err(e),
            }
            state = "released".into();
        }
        _ => {}
    }
    if d.refund_target > refunded && !capture_tx.is_empty() {
        wallet
            .clone()
            .reverse(ctx.request(wpb::ReverseRequest {
                idempotency_key: key(
                    &d.redemption,
                    &d.asset,
                    &format!("refund-{}", d.refund_target),
                ),
                transaction_id: capture_tx.clone(),
                amount: d.refund_target - refunded,
                reason: format!("redemption {} rolled back", d.redemption),
                customer_id: d.customer.clone(),
                transaction_key: String::new(),
            }))
            .await
            .map_err(|s| Error::from_status(&s))?;
        refunded = d.refund_target;
    }
    // The row as it is to be written.
    Ok(d.filter()
        .into_iter()
        .chain([
            state.into(),
            capture_tx.into(),
            refunded.into(),
            d.refunded.into(),
            d.state.clone().into(),
        ])
        .collect())
}

/// Brings settled rows up to date in one statement (one commit for the whole pass), each
/// only if nobody settled it meanwhile; a row stays due when a rollback raised its refund.
async fn write_settled(db: &Db, rows: Vec<Vec<sea_orm::Value>>) -> Result<(), Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let conn = db.conn();
    conn.execute_raw(stmt(
        conn,
        &format!(
            "UPDATE redemption_spends SET state = v.column5, capture_tx = v.column6, \
             refunded = v.column7, \
             due = CASE WHEN redemption_spends.refund_target > v.column7 THEN 1 ELSE 0 END \
             FROM (VALUES {}) AS v \
             WHERE redemption_spends.tenant_id = v.column1 \
             AND redemption_spends.redemption_id = v.column2 \
             AND redemption_spends.asset_kind = v.column3 \
             AND redemption_spends.asset_code = v.column4 \
             AND redemption_spends.refunded = v.column8 AND redemption_spends.state = v.column9",
            tuples(1, 9, rows.len())
        ),
        rows.into_iter().flatten(),
    ))
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The outcome of a row's work with a peer: `true` when done; a refusal (a deterministic
/// error) is kept on the row's `error` (and logged), so the sweep stops retrying it, and
/// gives `false`; a transient error is returned and the row stays due.
pub(crate) async fn keep_refusal(
    conn: &sea_orm::DatabaseConnection,
    table: &str,
    where_row: &str,
    filter: Vec<sea_orm::Value>,
    outcome: Result<(), Error>,
    what: &str,
) -> Result<bool, Error> {
    let err = match outcome {
        Ok(()) => return Ok(true),
        Err(e) if e.is_deterministic() => e,
        Err(e) => return Err(e),
    };
    tracing::error!(error = %err, "the peer refused {what}; it is not retried");
    let at = filter.len() + 1;
    conn.execute_raw(stmt(
        conn,
        &format!("UPDATE {table} SET error = ${at} WHERE {where_row}"),
        filter.into_iter().chain([err.message.into()]),
    ))
    .await
    .map_err(db_error)?;
    Ok(false)
}
