//! The protobuf form of effects, carts and outcomes (`tessera.catalog.v1`), checked field by
//! field: every problem is reported with its field path, all at once.

use tessera_proto::catalog::v1 as pb;
use tessera_proto::catalog::v1::effect::Kind;
use tessera_runtime::error::Violations;

use crate::engine::{
    Adjustment, Allocation, Cart, Effect, FULL_BP, Line, Outcome, Selector, Target,
};

pub use tessera_money::{MAX_AMOUNT, MAX_CART_TOTAL, MAX_LINES, MAX_QUANTITY, exact_total};

/// The oneof field name of an effect's kind (as `ListRewards` filters it).
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::AmountOff(_) => "amount_off",
        Kind::PercentOff(_) => "percent_off",
        Kind::FixedPrice(_) => "fixed_price",
        Kind::FreeShipping(_) => "free_shipping",
        Kind::FreeItem(_) => "free_item",
        Kind::BuyXGetY(_) => "buy_x_get_y",
        Kind::BundlePrice(_) => "bundle_price",
        Kind::GiftCard(_) => "gift_card",
        Kind::PayWithPoints(_) => "pay_with_points",
        Kind::PointsExchange(_) => "points_exchange",
        Kind::Cashback(_) => "cashback",
        Kind::Extension(_) => "extension",
    }
}

/// Every effect kind's name.
pub const KINDS: [&str; 12] = [
    "amount_off",
    "percent_off",
    "fixed_price",
    "free_shipping",
    "free_item",
    "buy_x_get_y",
    "bundle_price",
    "gift_card",
    "pay_with_points",
    "points_exchange",
    "cashback",
    "extension",
];

fn amount(v: &mut Violations, field: &str, value: i64, positive: bool) {
    let min = i64::from(positive);
    if value < min || value > MAX_AMOUNT {
        v.add(
            field,
            format!("must be {min} to {MAX_AMOUNT} (minor units)"),
        );
    }
}

fn quantity(v: &mut Violations, field: &str, value: i64, positive: bool) {
    let min = i64::from(positive);
    if value < min || value > MAX_QUANTITY {
        v.add(field, format!("must be {min} to {MAX_QUANTITY}"));
    }
}

fn basis_points(v: &mut Violations, field: &str, value: u32, positive: bool) -> i64 {
    let min = u32::from(positive);
    if value < min || i64::from(value) > FULL_BP {
        v.add(
            field,
            format!("must be {min} to {FULL_BP} basis points (100%)"),
        );
    }
    i64::from(value)
}

/// A SKU, category or collection id: 1 to 128 visible characters.
fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

fn labels(v: &mut Violations, field: &str, values: &[String]) -> Vec<String> {
    if values.len() > 1000 {
        v.add(field, "must have at most 1000 entries");
    }
    for (i, s) in values.iter().enumerate() {
        if !is_label(s) {
            v.add(format!("{field}.{i}"), "must be 1 to 128 characters");
        }
    }
    values.to_vec()
}

fn selector(v: &mut Violations, field: &str, s: Option<&pb::Selector>) -> Selector {
    let Some(s) = s else {
        return Selector::default();
    };
    amount(
        v,
        &format!("{field}.min_unit_price"),
        s.min_unit_price,
        false,
    );
    amount(
        v,
        &format!("{field}.max_unit_price"),
        s.max_unit_price,
        false,
    );
    if s.max_unit_price > 0 && s.max_unit_price < s.min_unit_price {
        v.add(
            format!("{field}.max_unit_price"),
            "must not be below min_unit_price",
        );
    }
    Selector {
        skus: labels(v, &format!("{field}.skus"), &s.skus),
        categories: labels(v, &format!("{field}.categories"), &s.categories),
        collections: labels(v, &format!("{field}.collections"), &s.collections),
        min_unit_price: (s.min_unit_price > 0).then_some(s.min_unit_price),
        max_unit_price: (s.max_unit_price > 0).then_some(s.max_unit_price),
        only_non_discounted: s.only_non_discounted,
        exclude_skus: labels(v, &format!("{field}.exclude_skus"), &s.exclude_skus),
        exclude_categories: labels(
            v,
            &format!("{field}.exclude_categories"),
            &s.exclude_categories,
        ),
    }
}

/// An extension kind: 1 to 64 of a-z, 0-9, `_`, `.` and `-`.
fn is_kind(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Checks an effect and turns it into the engine's form. `None` when it has violations
/// (which are added to `v` under `field`).
pub fn effect(v: &mut Violations, field: &str, e: Option<&pb::Effect>) -> Option<Effect> {
    let before = v.count();
    let Some(kind) = e.and_then(|e| e.kind.as_ref()) else {
        v.add(field, format!("is required: one of {}", KINDS.join(", ")));
        return None;
    };
    let f = |name: &str| format!("{field}.{}.{name}", kind_name(kind));
    let effect = match kind {
        Kind::AmountOff(a) => {
            amount(v, &f("amount"), a.amount, true);
            quantity(v, &f("max_quantity"), a.max_quantity, false);
            amount(v, &f("min_subtotal"), a.min_subtotal, false);
            let allocation = match pb::Allocation::try_from(a.allocation) {
                Ok(pb::Allocation::Each) => Allocation::Each,
                Ok(_) => Allocation::Across,
                Err(_) => {
                    v.add(f("allocation"), "must be ACROSS or EACH");
                    Allocation::Across
                }
            };
            if a.max_quantity > 0 && allocation == Allocation::Across {
                v.add(f("max_quantity"), "applies to allocation EACH only");
            }
            Effect::AmountOff {
                amount: a.amount,
                selector: selector(v, &f("selector"), a.selector.as_ref()),
                allocation,
                max_quantity: a.max_quantity,
                min_subtotal: a.min_subtotal,
            }
        }
        Kind::PercentOff(p) => {
            amount(v, &f("cap"), p.cap, false);
            quantity(v, &f("max_quantity"), p.max_quantity, false);
            Effect::PercentOff {
                percent_bp: basis_points(v, &f("percent_bp"), p.percent_bp, true),
                cap: p.cap,
                selector: selector(v, &f("selector"), p.selector.as_ref()),
                max_quantity: p.max_quantity,
            }
        }
        Kind::FixedPrice(p) => {
            amount(v, &f("unit_price"), p.unit_price, false);
            quantity(v, &f("max_quantity"), p.max_quantity, false);
            Effect::FixedPrice {
                unit_price: p.unit_price,
                selector: selector(v, &f("selector"), p.selector.as_ref()),
                max_quantity: p.max_quantity,
            }
        }
        Kind::FreeShipping(s) => {
            amount(v, &f("threshold"), s.threshold, false);
            Effect::FreeShipping {
                threshold: s.threshold,
                after_discounts: s.after_discounts,
            }
        }
        Kind::FreeItem(i) => {
            if !is_label(&i.sku) {
                v.add(f("sku"), "must be 1 to 128 characters");
            }
            quantity(v, &f("quantity"), i.quantity, true);
            Effect::FreeItem {
                sku: i.sku.clone(),
                quantity: i.quantity,
            }
        }
        Kind::BuyXGetY(b) => {
            quantity(v, &f("buy_quantity"), b.buy_quantity, true);
            quantity(v, &f("get_quantity"), b.get_quantity, true);
            quantity(v, &f("repeat_limit"), b.repeat_limit, false);
            quantity(v, &f("max_quantity"), b.max_quantity, false);
            if b.max_quantity > 0 && b.max_quantity < b.get_quantity {
                v.add(f("max_quantity"), "must be at least get_quantity");
            }
            Effect::BuyXGetY {
                buy: selector(v, &f("buy"), b.buy.as_ref()),
                buy_quantity: b.buy_quantity,
                get: selector(v, &f("get"), b.get.as_ref()),
                get_quantity: b.get_quantity,
                percent_bp: basis_points(v, &f("percent_bp"), b.percent_bp, true),
                repeat_limit: b.repeat_limit,
                max_quantity: b.max_quantity,
            }
        }
        Kind::BundlePrice(b) => {
            amount(v, &f("price"), b.price, false);
            if b.components.is_empty() || b.components.len() > 20 {
                v.add(f("components"), "must have 1 to 20 parts");
            }
            let components = b
                .components
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let part = f(&format!("components.{i}"));
                    quantity(v, &format!("{part}.quantity"), c.quantity, true);
                    (
                        selector(v, &format!("{part}.selector"), c.selector.as_ref()),
                        c.quantity,
                    )
                })
                .collect();
            Effect::Bundle {
                components,
                price: b.price,
            }
        }
        Kind::GiftCard(g) => {
            amount(v, &f("value"), g.value, true);
            Effect::GiftCard { value: g.value }
        }
        Kind::PayWithPoints(p) => {
            amount(v, &f("points"), p.points, true);
            amount(v, &f("amount"), p.amount, true);
            let min_share_bp = basis_points(v, &f("min_share_bp"), p.min_share_bp, false);
            let max_share_bp = basis_points(v, &f("max_share_bp"), p.max_share_bp, false);
            if max_share_bp > 0 && max_share_bp < min_share_bp {
                v.add(f("max_share_bp"), "must not be below min_share_bp");
            }
            Effect::PayWithPoints {
                points: p.points,
                amount: p.amount,
                min_share_bp,
                max_share_bp,
            }
        }
        Kind::PointsExchange(x) => {
            amount(v, &f("cost_points"), x.cost_points, true);
            let inner = x.reward.as_deref();
            if matches!(
                inner.and_then(|e| e.kind.as_ref()),
                Some(Kind::PointsExchange(_) | Kind::PayWithPoints(_))
            ) {
                v.add(f("reward"), "must not itself spend points");
                None
            } else {
                effect(v, &f("reward"), inner)
            }
            .map(|reward| Effect::PointsExchange {
                cost_points: x.cost_points,
                reward: Box::new(reward),
            })?
        }
        Kind::Cashback(c) => {
            let percent_bp = basis_points(v, &f("percent_bp"), c.percent_bp, false);
            amount(v, &f("amount"), c.amount, false);
            amount(v, &f("cap"), c.cap, false);
            if percent_bp == 0 && c.amount == 0 {
                v.add(f("percent_bp"), "or amount must be set");
            }
            if c.pending_days > 365 {
                v.add(f("pending_days"), "must be 0 to 365");
            }
            Effect::Cashback {
                percent_bp,
                amount: c.amount,
                cap: c.cap,
                pending_days: c.pending_days,
            }
        }
        Kind::Extension(x) => {
            if !is_kind(&x.kind) {
                v.add(f("kind"), "must be 1 to 64 of a-z, 0-9, _, . and -");
            }
            if x.params_json.len() > 16_384 {
                v.add(f("params_json"), "must be at most 16384 bytes");
            } else if !x.params_json.is_empty()
                && !serde_json::from_str::<serde_json::Value>(&x.params_json)
                    .is_ok_and(|p| p.is_object())
            {
                v.add(f("params_json"), "must be a JSON object");
            }
            Effect::Extension {
                kind: x.kind.clone(),
            }
        }
    };
    (v.count() == before).then_some(effect)
}

/// Checks a cart and turns it into the engine's form.
pub fn cart(v: &mut Violations, field: &str, c: Option<&pb::Cart>) -> Cart {
    let Some(c) = c else {
        v.add(field, "is required");
        return Cart::default();
    };
    if c.lines.is_empty() || c.lines.len() > MAX_LINES {
        v.add(
            format!("{field}.lines"),
            format!("must have 1 to {MAX_LINES} lines"),
        );
    }
    amount(v, &format!("{field}.shipping"), c.shipping, false);
    amount(
        v,
        &format!("{field}.points_balance"),
        c.points_balance,
        false,
    );
    let mut ids = std::collections::HashSet::new();
    let lines = c
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let f = |name: &str| format!("{field}.lines.{i}.{name}");
            if !is_label(&l.id) {
                v.add(f("id"), "must be 1 to 128 characters");
            } else if !ids.insert(l.id.as_str()) {
                v.add(f("id"), "is used by another line");
            }
            if !is_label(&l.sku) {
                v.add(f("sku"), "must be 1 to 128 characters");
            }
            quantity(v, &f("quantity"), l.quantity, true);
            amount(v, &f("unit_price"), l.unit_price, false);
            Line {
                id: l.id.clone(),
                sku: l.sku.clone(),
                categories: labels(v, &f("categories"), &l.categories),
                collections: labels(v, &f("collections"), &l.collections),
                quantity: l.quantity,
                unit_price: l.unit_price,
                on_sale: l.on_sale,
            }
        })
        .collect();
    if exact_total(
        c.lines.iter().map(|l| (l.quantity, l.unit_price)),
        c.shipping,
    ) > i128::from(MAX_CART_TOTAL)
    {
        v.add(
            format!("{field}.lines"),
            format!("the cart's total (lines and shipping) must be at most {MAX_CART_TOTAL}"),
        );
    }
    Cart {
        lines,
        shipping: c.shipping,
        points_balance: c.points_balance,
    }
}

fn adjustment(a: Adjustment) -> pb::Adjustment {
    let mut out = pb::Adjustment {
        reward_id: a.reward_id,
        amount: a.amount,
        units: a.units,
        points: a.points,
        ..Default::default()
    };
    let target = match a.target {
        Target::Line(id) => {
            out.line_id = id;
            pb::Target::Line
        }
        Target::Shipping => pb::Target::Shipping,
        Target::Tender => pb::Target::Tender,
        Target::Cashback { pending_days } => {
            out.pending_days = pending_days;
            pb::Target::Cashback
        }
        Target::AddItem { sku } => {
            out.sku = sku;
            pb::Target::AddItem
        }
        Target::Points => pb::Target::Points,
        Target::Extension { kind } => {
            out.extension_kind = kind;
            pb::Target::Extension
        }
    };
    out.target = target.into();
    out
}

/// The protobuf form of an outcome.
pub fn outcome(o: Outcome) -> pb::Outcome {
    pb::Outcome {
        adjustments: o.adjustments.into_iter().map(adjustment).collect(),
        skipped: o
            .skipped
            .into_iter()
            .map(|(reward_id, reason)| pb::Skipped { reward_id, reason })
            .collect(),
        subtotal: o.subtotal,
        discount: o.discount,
        shipping_discount: o.shipping_discount,
        tender: o.tender,
        total_due: o.total_due,
        cashback: o.cashback,
        points_spent: o.points_spent,
    }
}
