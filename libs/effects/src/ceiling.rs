//! A ceiling on what an effect may give, for authors trusted only so far (a tenant's junior
//! marketers). Percent-based effects are capped in basis points, amount-based ones in minor
//! units; a points exchange is judged by the effect it buys. Kinds whose value depends on
//! the cart or the catalogue's prices (fixed price, bundle price, free item, pay with
//! points, extensions) have no ceiling to compare, so they are left to marketers.

use tessera_proto::catalog::v1 as pb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_runtime::error::Violations;
use tessera_runtime::{Code, Error};

/// The most an effect may give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    /// Basis points (5000 = 50 %).
    pub max_percent_bp: u32,
    /// Minor units.
    pub max_amount: i64,
}

impl Ceiling {
    /// Adds to `v` every part of `effect` (at `field`) above the ceiling; `who` names the
    /// author in the descriptions ("a junior marketer").
    pub fn check(&self, v: &mut Violations, field: &str, who: &str, effect: Option<&pb::Effect>) {
        let Some(kind) = effect.and_then(|e| e.kind.as_ref()) else {
            return;
        };
        let percent = |v: &mut Violations, name: &str, bp: u32| {
            if bp > self.max_percent_bp {
                v.add(
                    format!("{field}.{name}"),
                    format!(
                        "{who} may give at most {} bp ({} %); this gives {bp} bp",
                        self.max_percent_bp,
                        f64::from(self.max_percent_bp) / 100.0
                    ),
                );
            }
        };
        let amount = |v: &mut Violations, name: &str, value: i64| {
            if value > self.max_amount {
                v.add(
                    format!("{field}.{name}"),
                    format!(
                        "{who} may give at most {} (minor units); this gives {value}",
                        self.max_amount
                    ),
                );
            }
        };
        match kind {
            Kind::AmountOff(e) => amount(v, "amount_off.amount", e.amount),
            Kind::PercentOff(e) => percent(v, "percent_off.percent_bp", e.percent_bp),
            Kind::BuyXGetY(e) => percent(v, "buy_x_get_y.percent_bp", e.percent_bp),
            Kind::Cashback(e) => {
                percent(v, "cashback.percent_bp", e.percent_bp);
                amount(v, "cashback.amount", e.amount);
            }
            Kind::GiftCard(e) => amount(v, "gift_card.value", e.value),
            Kind::FreeShipping(_) => {}
            Kind::PointsExchange(e) => self.check(
                v,
                &format!("{field}.points_exchange.reward"),
                who,
                e.reward.as_deref(),
            ),
            Kind::FixedPrice(_)
            | Kind::BundlePrice(_)
            | Kind::FreeItem(_)
            | Kind::PayWithPoints(_)
            | Kind::Extension(_) => v.add(
                field.to_string(),
                format!(
                    "{who} may not write a {} effect: what it gives depends on the cart; a \
                     marketer may",
                    crate::wire::kind_name(kind)
                ),
            ),
        }
    }
}

/// Refuses (PERMISSION_DENIED, reason `ROLE_LIMIT_EXCEEDED`, the fields named) an effect
/// above what the tenant's access policy lets a junior marketer give; `field` is the
/// effect's path.
pub fn check_junior(
    policy: &pb::AccessPolicy,
    field: &str,
    effect: Option<&pb::Effect>,
) -> Result<(), Error> {
    let ceiling = Ceiling {
        max_percent_bp: policy.junior_max_percent_bp,
        max_amount: policy.junior_max_amount,
    };
    let mut v = Violations::new();
    ceiling.check(&mut v, field, "a junior marketer", effect);
    v.finish_as(
        Code::PermissionDenied,
        "above what the tenant's access policy lets a junior marketer give",
        "ROLE_LIMIT_EXCEEDED",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: Ceiling = Ceiling {
        max_percent_bp: 5000,
        max_amount: 1000,
    };

    fn fields(effect: Kind) -> Vec<String> {
        let mut v = Violations::new();
        HALF.check(
            &mut v,
            "effect",
            "a junior marketer",
            Some(&pb::Effect { kind: Some(effect) }),
        );
        match v.finish() {
            Ok(()) => Vec::new(),
            Err(e) => e.field_violations.into_iter().map(|f| f.field).collect(),
        }
    }

    #[test]
    fn within_the_ceiling_passes_and_above_names_the_field() {
        let percent = |bp| {
            Kind::PercentOff(pb::PercentOff {
                percent_bp: bp,
                ..Default::default()
            })
        };
        assert!(fields(percent(5000)).is_empty());
        assert_eq!(fields(percent(5001)), ["effect.percent_off.percent_bp"]);
        let amount = |a| {
            Kind::AmountOff(pb::AmountOff {
                amount: a,
                ..Default::default()
            })
        };
        assert!(fields(amount(1000)).is_empty());
        assert_eq!(fields(amount(1001)), ["effect.amount_off.amount"]);
        assert_eq!(
            fields(Kind::Cashback(pb::Cashback {
                percent_bp: 9000,
                amount: 5000,
                ..Default::default()
            })),
            ["effect.cashback.percent_bp", "effect.cashback.amount"]
        );
        assert_eq!(
            fields(Kind::GiftCard(pb::GiftCard {
                value: 1001,
                multi_use: false
            })),
            ["effect.gift_card.value"]
        );
    }

    #[test]
    fn a_points_exchange_is_judged_by_what_it_buys() {
        let exchange = |bp| {
            Kind::PointsExchange(Box::new(pb::PointsExchange {
                cost_points: 100,
                reward: Some(Box::new(pb::Effect {
                    kind: Some(Kind::PercentOff(pb::PercentOff {
                        percent_bp: bp,
                        ..Default::default()
                    })),
                })),
            }))
        };
        assert!(fields(exchange(1000)).is_empty());
        assert_eq!(
            fields(exchange(9000)),
            ["effect.points_exchange.reward.percent_off.percent_bp"]
        );
    }

    #[test]
    fn kinds_without_a_comparable_value_are_for_marketers() {
        assert_eq!(
            fields(Kind::FixedPrice(pb::FixedPrice::default())),
            ["effect"]
        );
        assert!(fields(Kind::FreeShipping(pb::FreeShipping::default())).is_empty());
    }
}
