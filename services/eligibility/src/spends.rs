//! Wallet value a redemption spends: the points of the checkout's programme (pay with
//! points, points exchanges) and the value of gift cards unlocked by their code.
//!
//! A saga across eligibility and the wallet, whose data live apart:
//! - planning reads the customer's wallet balances, so the engine spends only what is there;
//! - Redeem and Reserve place one wallet hold per asset before the redemption's transaction
//!   begins (no pooled connection, no counter lock waits on the wallet), and the redemption
//!   keeps the hold ids. The holds of concurrent redemptions are gathered into one
//!   `BatchHold` (a group commit in the wallet; each hold stands or fails on its own). A hold
//!   that fails fails the redemption (INSUFFICIENT_BALANCE when a concurrent spend took the
//!   value); holds the redemption does not end up with (a replay, a budget that ran out, an
//!   order redeemed already) are released at once;
//! - what is left to do leaves through the command outbox, in the transaction that decides
//!   it: a redeem or a confirmation captures the holds, a released or expired reservation
//!   releases them, a rollback reverses its share of each capture (points come back to their
//!   lots with their original expiry). Each command's idempotency key is derived from the
//!   redemption, the asset and the step. [`Captures`] gathers the captures of one claim
//!   into one `BatchCapture` per tenant.
//!
//! A hold orphaned by a crash between the wallet's answer and the commit lapses at its
//! expiry (a day past the redemption's own deadline) and the wallet's sweep releases it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction};
use tessera_money::Rounding;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tessera_runtime::telemetry;
use tessera_runtime::{Code, Error, RequestContext, grpc};
use tessera_store::idempotency::derived_key;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::commands::{self, Command};
use tessera_store::queue::{BatchContext, Failure, Handler, Item};
use tessera_store::{Db, db_error, stmt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long past the redemption's deadline its holds last (time for the capture to land).
const HOLD_GRACE_MICROS: i64 = 24 * 3600 * 1_000_000;

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
    /// The asking request's trace context: the batch continues the first one's trace and
    /// links the others.
    traceparent: String,
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
            traceparent: telemetry::current_traceparent(),
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
    let span = tracing::info_span!("spends.hold", holds = group.len());
    telemetry::batch_parent(&span, group.iter().map(|a| a.traceparent.as_str()));
    match wallet.clone().batch_hold(request).instrument(span).await {
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

/// The wallet's methods the spends' follow-ups call.
const CAPTURE: &str = "/tessera.wallet.v1.WalletService/Capture";
const RELEASE: &str = "/tessera.wallet.v1.WalletService/Release";
const REVERSE: &str = "/tessera.wallet.v1.WalletService/Reverse";

/// The holds of `record`, written in its transaction: captured through the command outbox
/// at once when `reserved` is false, else when the reservation is confirmed.
pub async fn record(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
    reserved: bool,
) -> Result<(), Error> {
    if reserved {
        return Ok(());
    }
    capture_later(txn, tenant, record).await
}

/// The redemption's holds are to be captured (a redeem, a confirmed reservation).
pub async fn capture_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
) -> Result<(), Error> {
    let commands: Vec<_> = record
        .spends
        .iter()
        .map(|s| {
            let key = key(&record.id, &asset_of(s), "capture");
            Command {
                path: CAPTURE,
                key: key.clone(),
                request: wpb::CaptureRequest {
                    idempotency_key: key,
                    hold_id: s.hold_id.clone(),
                    amount: 0,
                },
            }
        })
        .collect();
    commands::send(txn, tenant, commands).await?;
    Ok(())
}

/// A reservation was rolled back or expired: its holds are to be released.
pub async fn release_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &pb::Redemption,
) -> Result<(), Error> {
    let commands: Vec<_> = record
        .spends
        .iter()
        .map(|s| {
            let key = key(&record.id, &asset_of(s), "release");
            Command {
                path: RELEASE,
                key: key.clone(),
                request: wpb::ReleaseRequest {
                    idempotency_key: key,
                    hold_id: s.hold_id.clone(),
                },
            }
        })
        .collect();
    commands::send(txn, tenant, commands).await?;
    Ok(())
}

/// A redeemed redemption gave back `released` of its `order_value` (in all, so far): each
/// spend is refunded in that proportion (rounded down; all of it when `whole`), by reversing
/// the capture of its hold through the command outbox (the wallet answers UNAVAILABLE, so
/// the command waits, while the capture has not landed yet).
pub async fn refund_later(
    txn: &DatabaseTransaction,
    tenant: &str,
    record: &mut pb::Redemption,
    released: i64,
    whole: bool,
) -> Result<(), Error> {
    let mut refunds = Vec::new();
    for s in &mut record.spends {
        let target = refund_target(s.amount, record.order_value, released, whole);
        if target <= s.refunded {
            continue;
        }
        let key = key(&record.id, &asset_of(s), &format!("refund-{target}"));
        refunds.push(Command {
            path: REVERSE,
            key: key.clone(),
            request: wpb::ReverseRequest {
                idempotency_key: key,
                hold_id: s.hold_id.clone(),
                amount: target - s.refunded,
                reason: format!("redemption {} rolled back", record.id),
                customer_id: record.customer_id.clone(),
                ..Default::default()
            },
        });
        s.refunded = target;
    }
    commands::send(txn, tenant, refunds).await?;
    Ok(())
}

/// What of a spend of `amount` is refunded in all once `released` of the redemption's
/// `order_value` came back: the same proportion, rounded down; all of it when `whole` (or
/// when the redemption had no order value).
fn refund_target(amount: i64, order_value: i64, released: i64, whole: bool) -> i64 {
    if whole || order_value <= 0 {
        return amount;
    }
    let returned = i128::from(released.clamp(0, order_value));
    tessera_money::ratio(amount, returned, order_value.into(), Rounding::Down).unwrap_or(amount)
}

/// Moves the follow-ups that the spends table of earlier versions still owed onto the
/// command outbox (once, at start); returns how many.
pub async fn adopt_waiting(db: &Db) -> Result<u64, Error> {
    let txn = db.begin_write().await?;
    let rows = txn
        .query_all_raw(stmt(
            &txn,
            "SELECT tenant_id, redemption_id, asset_kind, asset_code, customer_id, hold_id, \
             state, refund_target, refunded FROM redemption_spends \
             WHERE due = 1 AND error = '' ORDER BY tenant_id, redemption_id",
            [],
        ))
        .await
        .map_err(db_error)?;
    let mut adopted = 0;
    for row in &rows {
        let s = |i: usize| -> Result<String, Error> { row.try_get_by_index(i).map_err(db_error) };
        let n = |i: usize| -> Result<i64, Error> { row.try_get_by_index(i).map_err(db_error) };
        let (tenant, state) = (s(0)?, s(6)?);
        let kind: i32 = row.try_get_by_index(2).map_err(db_error)?;
        let mut record = pb::Redemption {
            id: s(1)?,
            customer_id: s(4)?,
            spends: vec![pb::WalletSpend {
                asset: Some(wpb::Asset { kind, code: s(3)? }),
                hold_id: s(5)?,
                amount: n(7)?,
                refunded: n(8)?,
            }],
            ..Default::default()
        };
        match state.as_str() {
            "capture" => capture_later(&txn, &tenant, &record).await?,
            "release" => release_later(&txn, &tenant, &record).await?,
            _ => {}
        }
        // A refund owed: its target is the amount above, so the proportion is all of it.
        refund_later(&txn, &tenant, &mut record, 0, true).await?;
        adopted += 1;
    }
    txn.execute_raw(stmt(
        &txn,
        "UPDATE redemption_spends SET due = 0 WHERE due = 1 AND error = ''",
        [],
    ))
    .await
    .map_err(db_error)?;
    txn.commit().await.map_err(db_error)?;
    Ok(adopted)
}

/// The eligibility's command relay, with the spends' captures gathered: the captures of a
/// claim go to the wallet in one `BatchCapture` per tenant (a group commit; each capture
/// stands or fails on its own, and a hold captured before reports its capture, so a batch
/// cut short is simply sent again). Every other command goes to the relay.
pub struct Captures {
    pub relay: Arc<dyn Handler>,
    pub wallet: WalletServiceClient<grpc::Channel>,
}

#[async_trait::async_trait]
impl Handler for Captures {
    async fn handle(&self, item: &Item) -> Result<(), Failure> {
        self.relay.handle(item).await
    }

    async fn handle_all(
        &self,
        items: Vec<Item>,
        ctx: &BatchContext,
    ) -> Vec<(Item, Result<(), Failure>)> {
        let (captures, others): (Vec<Item>, Vec<Item>) =
            items.into_iter().partition(|i| i.kind == CAPTURE);
        let mut by_tenant: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for item in captures {
            by_tenant.entry(item.tenant.clone()).or_default().push(item);
        }
        let mut done = self.relay.handle_all(others, ctx).await;
        for (tenant, items) in by_tenant {
            for chunk in chunks(items, MAX_CAPTURES) {
                done.extend(self.capture(&tenant, chunk).await);
            }
        }
        done
    }
}

/// Most captures in one `BatchCapture` (the wallet's limit).
const MAX_CAPTURES: usize = 500;

fn chunks(mut items: Vec<Item>, size: usize) -> Vec<Vec<Item>> {
    let mut out = Vec::new();
    while items.len() > size {
        let rest = items.split_off(size);
        out.push(std::mem::replace(&mut items, rest));
    }
    out.push(items);
    out
}

impl Captures {
    async fn capture(&self, tenant: &str, items: Vec<Item>) -> Vec<(Item, Result<(), Failure>)> {
        let mut entries = Vec::with_capacity(items.len());
        let mut bad = Vec::new();
        let mut asked = Vec::with_capacity(items.len());
        for item in items {
            match wpb::CaptureRequest::decode(item.payload.as_slice()) {
                Ok(c) => {
                    entries.push(wpb::BatchCaptureEntry {
                        hold_id: c.hold_id,
                        amount: c.amount,
                    });
                    asked.push(item);
                }
                Err(e) => {
                    let failure = Failure::Permanent(format!("undecodable capture: {e}"));
                    bad.push((item, Err(failure)));
                }
            }
        }
        if asked.is_empty() {
            return bad;
        }
        let span = tracing::info_span!("spends.capture", tenant, captures = asked.len());
        telemetry::batch_parent(&span, asked.iter().map(|i| i.traceparent.as_str()));
        let keys: Vec<&str> = asked.iter().map(|i| i.key.as_str()).collect();
        let request = RequestContext::system(tenant.to_string(), crate::SERVICE).request(
            wpb::BatchCaptureRequest {
                idempotency_key: derived_key("redemption-captures", &keys),
                captures: entries,
            },
        );
        let answer = self
            .wallet
            .clone()
            .batch_capture(request)
            .instrument(span)
            .await;
        let outcomes = match answer {
            Ok(response) => response.into_inner().outcomes,
            Err(status) => {
                let text = format!("{}: {}", status.code(), status.message());
                let failure = if commands::is_permanent(status.code()) {
                    Failure::Permanent(text)
                } else {
                    Failure::Retry(text)
                };
                bad.extend(asked.into_iter().map(|i| (i, Err(failure.clone()))));
                return bad;
            }
        };
        let mut outcomes = outcomes.into_iter();
        for item in asked {
            let result = match outcomes.next() {
                Some(o) if o.reason.is_empty() => Ok(()),
                Some(o) => Err(Failure::Permanent(format!("{}: {}", o.reason, o.message))),
                None => Err(Failure::Retry("the wallet answered fewer captures".into())),
            };
            bad.push((item, result));
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn whole_rollbacks_refund_everything() {
        assert_eq!(refund_target(700, 10_000, 0, true), 700);
        assert_eq!(refund_target(700, 0, 0, false), 700);
        assert_eq!(refund_target(700, 10_000, 2_500, false), 175);
        assert_eq!(refund_target(700, 10_000, 20_000, false), 700);
    }

    proptest! {
        /// The refunded share grows with what came back and never exceeds the spend.
        #[test]
        fn refunds_are_monotone_and_bounded(
            amount in 0..i64::MAX / 2,
            order in 1..i64::MAX / 2,
            a in 0..i64::MAX / 2,
            b in 0..i64::MAX / 2,
        ) {
            let (lo, hi) = (a.min(b), a.max(b));
            let (x, y) = (
                refund_target(amount, order, lo, false),
                refund_target(amount, order, hi, false),
            );
            prop_assert!(0 <= x && x <= y && y <= amount);
        }
    }
}
