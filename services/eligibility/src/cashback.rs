//! Redemption cashback becomes wallet value: a redeemed (or confirmed) redemption whose
//! incentives give cashback credits it to the customer's cashback account as a pending
//! credit that confirms after the campaign's return window (`pending_days`; the
//! scheduler's activation sweep confirms it then); a full rollback cancels it. Both go to
//! the wallet through the command outbox, in the redemption's transaction, under keys
//! derived from the redemption, so each happens once.

use chrono::Days;
use sea_orm::ConnectionTrait;
use tessera_proto::catalog::v1 as cpb;
use tessera_proto::eligibility::v1 as pb;
use tessera_proto::wallet::v1 as wpb;
use tessera_runtime::Error;
use tessera_store::outbox::micros_to_timestamp;
use tessera_store::queue::commands::{self, Command};

use crate::checkout::plan::Pick;

const CREDIT: &str = "/tessera.wallet.v1.WalletService/Credit";
const CANCEL: &str = "/tessera.wallet.v1.WalletService/CancelPending";

/// The return window of the applied incentives that give cashback (the longest), in days;
/// `None` when none gives cashback.
pub fn pending_days(picks: &[Pick]) -> Option<u32> {
    picks
        .iter()
        .filter_map(|p| match p.campaign.def.effect.as_ref()?.kind.as_ref()? {
            cpb::effect::Kind::Cashback(c) => Some(c.pending_days),
            _ => None,
        })
        .max()
}

/// When a credit made at `now` with a `days` return window confirms: `None` (at once) for
/// no window.
pub fn activate_at(now: i64, days: u32) -> Option<i64> {
    if days == 0 {
        return None;
    }
    let at =
        chrono::DateTime::from_timestamp_micros(now)?.checked_add_days(Days::new(days.into()))?;
    Some(at.timestamp_micros())
}

fn key(redemption: &pb::Redemption) -> String {
    format!("eligibility.cashback:{}", redemption.id)
}

/// Credits the redemption's cashback (if any) in the caller's transaction.
pub async fn credit<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    redemption: &pb::Redemption,
    currency: &str,
    days: Option<u32>,
    now: i64,
) -> Result<(), Error> {
    let amount = redemption.outcome.as_ref().map_or(0, |o| o.cashback);
    let Some(days) = days.filter(|_| amount > 0) else {
        return Ok(());
    };
    let key = key(redemption);
    let request = wpb::CreditRequest {
        idempotency_key: key.clone(),
        customer_id: redemption.customer_id.clone(),
        asset: Some(wpb::Asset {
            kind: wpb::AssetKind::Cashback.into(),
            code: currency.to_string(),
        }),
        amount,
        reason: cashback_reason(redemption),
        pending: Some(wpb::PendingOptions {
            activate_at: activate_at(now, days).map(micros_to_timestamp),
        }),
        ..Default::default()
    };
    commands::send(
        txn,
        tenant,
        [Command {
            path: CREDIT,
            key,
            request,
        }],
    )
    .await?;
    Ok(())
}

/// Cancels the redemption's pending cashback (a full rollback), in the caller's transaction.
pub async fn cancel<C: ConnectionTrait>(
    txn: &C,
    tenant: &str,
    redemption: &pb::Redemption,
    reason: &str,
) -> Result<(), Error> {
    if redemption.outcome.as_ref().map_or(0, |o| o.cashback) <= 0 {
        return Ok(());
    }
    let cancel_key = format!("eligibility.cashback-cancel:{}", redemption.id);
    let request = wpb::CancelPendingRequest {
        idempotency_key: cancel_key.clone(),
        credit_key: key(redemption),
        reason: format!("order {} returned: {reason}", order_of(redemption))
            .chars()
            .take(200)
            .collect(),
        ..Default::default()
    };
    commands::send(
        txn,
        tenant,
        [Command {
            path: CANCEL,
            key: cancel_key,
            request,
        }],
    )
    .await?;
    Ok(())
}

fn order_of(r: &pb::Redemption) -> &str {
    if r.order_id.is_empty() {
        &r.id
    } else {
        &r.order_id
    }
}

fn cashback_reason(r: &pb::Redemption) -> String {
    format!("cashback on order {}", order_of(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_counted_in_days() {
        let now = 1_700_000_000_000_000;
        assert_eq!(activate_at(now, 0), None);
        assert_eq!(activate_at(now, 14), Some(now + 14 * 86_400_000_000));
    }
}
