use proptest::prelude::*;

use crate::engine::{distribute, div_half_even};
use crate::*;

fn line(id: &str, sku: &str, category: &str, quantity: i64, unit_price: i64) -> Line {
    Line {
        id: id.into(),
        sku: sku.into(),
        categories: vec![category.into()],
        quantity,
        unit_price,
        ..Line::default()
    }
}

fn cart(lines: Vec<Line>) -> Cart {
    Cart {
        lines,
        ..Cart::default()
    }
}

fn one(reward_id: &str, effect: Effect) -> Vec<Application> {
    vec![Application {
        reward_id: reward_id.into(),
        priority: 0,
        effect,
    }]
}

fn category(c: &str) -> Selector {
    Selector {
        categories: vec![c.into()],
        ..Selector::default()
    }
}

/// `(line id, amount)` of the line adjustments.
fn lines_off(o: &Outcome) -> Vec<(String, i64)> {
    o.adjustments
        .iter()
        .filter_map(|a| match &a.target {
            Target::Line(id) => Some((id.clone(), a.amount)),
            _ => None,
        })
        .collect()
}

fn percent(bp: i64) -> Effect {
    Effect::PercentOff {
        percent_bp: bp,
        cap: 0,
        selector: Selector::default(),
        max_quantity: 0,
    }
}

#[test]
fn half_even_rounding() {
    assert_eq!(div_half_even(5, 2), 2); // 2.5 → 2
    assert_eq!(div_half_even(7, 2), 4); // 3.5 → 4
    assert_eq!(div_half_even(11, 4), 3); // 2.75 → 3
    assert_eq!(div_half_even(9, 4), 2); // 2.25 → 2
    assert_eq!(div_half_even(0, 3), 0);
}

#[test]
fn largest_remainder_adds_up_and_breaks_ties_to_the_earlier_line() {
    assert_eq!(distribute(100, &[1, 1, 1]), vec![34, 33, 33]);
    assert_eq!(distribute(10, &[500, 300, 200]), vec![5, 3, 2]);
    assert_eq!(distribute(2, &[1, 1, 1]), vec![1, 1, 0]);
    assert_eq!(distribute(7, &[0, 5, 0]), vec![0, 7, 0]);
    assert_eq!(distribute(5, &[0, 0]), vec![0, 0]);
}

#[test]
fn percent_off_rounds_each_line_half_even() {
    // 12.5% of 1000 = 125; of 500 = 62.5 → 62; of 700 = 87.5 → 88.
    let c = cart(vec![
        line("a", "A", "x", 1, 1000),
        line("b", "B", "x", 1, 500),
        line("c", "C", "x", 1, 700),
    ]);
    let o = apply(&one("r", percent(1250)), &c);
    assert_eq!(
        lines_off(&o),
        vec![("a".into(), 125), ("b".into(), 62), ("c".into(), 88)]
    );
    assert_eq!(o.discount, 275);
    assert_eq!(o.total_due, 2200 - 275);
}

#[test]
fn percent_cap_is_spread_by_largest_remainder() {
    let c = cart(vec![
        line("a", "A", "x", 1, 1000),
        line("b", "B", "x", 1, 500),
    ]);
    let capped = Effect::PercentOff {
        percent_bp: 5000,
        cap: 100,
        selector: Selector::default(),
        max_quantity: 0,
    };
    let o = apply(&one("r", capped), &c);
    // Uncapped 500 + 250; the cap of 100 is split 2:1 → 66.67 / 33.33 → 67 / 33.
    assert_eq!(lines_off(&o), vec![("a".into(), 67), ("b".into(), 33)]);
    assert_eq!(o.discount, 100);
}

#[test]
fn percent_off_with_max_quantity_and_selector() {
    // The peer's "10% off category items, max 5 units": 7 units of 300 → 5 units discounted.
    let c = cart(vec![
        line("a", "A", "x", 7, 300),
        line("b", "B", "y", 1, 1000),
    ]);
    let e = Effect::PercentOff {
        percent_bp: 1000,
        cap: 0,
        selector: category("x"),
        max_quantity: 5,
    };
    let o = apply(&one("r", e), &c);
    assert_eq!(lines_off(&o), vec![("a".into(), 150)]);
}

#[test]
fn amount_off_across_and_each() {
    let c = cart(vec![
        line("a", "A", "x", 1, 2000),
        line("b", "B", "x", 3, 1000),
    ]);
    let across = Effect::AmountOff {
        amount: 500,
        selector: Selector::default(),
        allocation: Allocation::Across,
        max_quantity: 0,
        min_subtotal: 0,
    };
    let o = apply(&one("r", across), &c);
    assert_eq!(lines_off(&o), vec![("a".into(), 200), ("b".into(), 300)]);

    let each = Effect::AmountOff {
        amount: 200,
        selector: Selector {
            skus: vec!["B".into()],
            ..Selector::default()
        },
        allocation: Allocation::Each,
        max_quantity: 2,
        min_subtotal: 0,
    };
    let o = apply(&one("r", each), &c);
    assert_eq!(lines_off(&o), vec![("b".into(), 400)]);
}

#[test]
fn amount_off_never_exceeds_the_order_and_respects_the_minimum() {
    let c = cart(vec![line("a", "A", "x", 1, 300)]);
    let big = Effect::AmountOff {
        amount: 10_000,
        selector: Selector::default(),
        allocation: Allocation::Across,
        max_quantity: 0,
        min_subtotal: 0,
    };
    let o = apply(&one("r", big), &c);
    assert_eq!(o.discount, 300);
    assert_eq!(o.total_due, 0);

    let spend_more = Effect::AmountOff {
        amount: 100,
        selector: Selector::default(),
        allocation: Allocation::Across,
        max_quantity: 0,
        min_subtotal: 500,
    };
    let o = apply(&one("r", spend_more), &c);
    assert_eq!(o.discount, 0);
    assert_eq!(o.skipped.len(), 1);
    assert!(
        o.skipped[0].1.contains("below the minimum of 500"),
        "{:?}",
        o.skipped
    );
}

#[test]
fn fixed_price_only_lowers_prices() {
    let c = cart(vec![
        line("a", "A", "x", 2, 1500),
        line("b", "B", "x", 1, 800),
    ]);
    let e = Effect::FixedPrice {
        unit_price: 1000,
        selector: Selector::default(),
        max_quantity: 0,
    };
    let o = apply(&one("r", e), &c);
    assert_eq!(lines_off(&o), vec![("a".into(), 1000)]);
}

#[test]
fn bogo_with_multiples_repeat_limit_and_max_quantity() {
    // Buy 2 get 1 free in one category: 7 units → 2 multiples (6 units used), cheapest free.
    let c = cart(vec![
        line("a", "A", "x", 4, 1000),
        line("b", "B", "x", 3, 600),
    ]);
    let bogo = |repeat_limit, max_quantity| Effect::BuyXGetY {
        buy: category("x"),
        buy_quantity: 2,
        get: category("x"),
        get_quantity: 1,
        percent_bp: FULL,
        repeat_limit,
        max_quantity,
    };
    const FULL: i64 = 10_000;
    let o = apply(&one("r", bogo(0, 0)), &c);
    assert_eq!(lines_off(&o), vec![("b".into(), 1200)]);
    let o = apply(&one("r", bogo(1, 0)), &c);
    assert_eq!(lines_off(&o), vec![("b".into(), 600)]);
    let o = apply(&one("r", bogo(0, 1)), &c);
    assert_eq!(lines_off(&o), vec![("b".into(), 600)]);
}

#[test]
fn bogo_across_categories_half_price() {
    // Buy 2 from x, get 1 from y at 50%: 5 x-units → 2 multiples, but only one y unit.
    let c = cart(vec![
        line("a", "A", "x", 5, 1000),
        line("b", "B", "y", 1, 801),
    ]);
    let e = Effect::BuyXGetY {
        buy: category("x"),
        buy_quantity: 2,
        get: category("y"),
        get_quantity: 1,
        percent_bp: 5000,
        repeat_limit: 0,
        max_quantity: 0,
    };
    let o = apply(&one("r", e.clone()), &c);
    assert_eq!(lines_off(&o), vec![("b".into(), 400)]); // 400.5 → 400 (half even)
    let c = cart(vec![
        line("a", "A", "x", 1, 1000),
        line("b", "B", "y", 1, 800),
    ]);
    let o = apply(&one("r", e), &c);
    assert!(lines_off(&o).is_empty());
    assert_eq!(o.skipped.len(), 1);
}

#[test]
fn bundle_price_per_complete_bundle() {
    // Burger + drink for 1000: two burgers, one drink → one bundle.
    let c = cart(vec![
        line("a", "BURGER", "food", 2, 800),
        line("b", "DRINK", "drink", 1, 400),
    ]);
    let e = Effect::Bundle {
        components: vec![(category("food"), 1), (category("drink"), 1)],
        price: 1000,
    };
    let o = apply(&one("r", e), &c);
    // Bundle items worth 1200 → 200 off, split 800:400.
    assert_eq!(lines_off(&o), vec![("a".into(), 133), ("b".into(), 67)]);
    assert_eq!(o.discount, 200);
}

#[test]
fn free_item_discounts_or_asks_to_add() {
    let c = cart(vec![
        line("a", "A", "x", 2, 500),
        line("s", "SAMPLE", "x", 3, 200),
    ]);
    let o = apply(
        &one(
            "r",
            Effect::FreeItem {
                sku: "SAMPLE".into(),
                quantity: 1,
            },
        ),
        &c,
    );
    assert_eq!(lines_off(&o), vec![("s".into(), 200)]);
    let o = apply(
        &one(
            "r",
            Effect::FreeItem {
                sku: "MUG".into(),
                quantity: 1,
            },
        ),
        &c,
    );
    assert_eq!(
        o.adjustments[0].target,
        Target::AddItem { sku: "MUG".into() }
    );
    assert_eq!(o.discount, 0);
}

#[test]
fn free_shipping_threshold_before_or_after_discounts() {
    let mut c = cart(vec![line("a", "A", "x", 1, 5000)]);
    c.shipping = 499;
    let ship = |after_discounts| Effect::FreeShipping {
        threshold: 4500,
        after_discounts,
    };
    let with_discount = |after| {
        vec![
            Application {
                reward_id: "ship".into(),
                priority: 10,
                effect: ship(after),
            },
            Application {
                reward_id: "ten".into(),
                priority: 0,
                effect: percent(2000),
            },
        ]
    };
    // Before discounts: 5000 ≥ 4500 → free, even though the 20% off runs later in priority.
    let o = apply(&with_discount(false), &c);
    assert_eq!(o.shipping_discount, 499);
    assert_eq!(o.total_due, 4000);
    // After discounts: 4000 < 4500 → shipping is paid.
    let o = apply(&with_discount(true), &c);
    assert_eq!(o.shipping_discount, 0);
    assert_eq!(o.total_due, 4499);
}

#[test]
fn priority_orders_discounts_and_later_ones_see_what_is_left() {
    let c = cart(vec![line("a", "A", "x", 1, 1000)]);
    let apps = vec![
        Application {
            reward_id: "amount".into(),
            priority: 1,
            effect: Effect::AmountOff {
                amount: 100,
                selector: Selector::default(),
                allocation: Allocation::Across,
                max_quantity: 0,
                min_subtotal: 0,
            },
        },
        Application {
            reward_id: "percent".into(),
            priority: 5,
            effect: percent(5000),
        },
    ];
    let o = apply(&apps, &c);
    // 50% first (500 off), then 100 off what is left.
    assert_eq!(o.adjustments[0].reward_id, "percent");
    assert_eq!(o.adjustments[0].amount, 500);
    assert_eq!(o.adjustments[1].amount, 100);
    assert_eq!(o.total_due, 400);
}

#[test]
fn tender_gift_card_and_points_with_shares() {
    let mut c = cart(vec![line("a", "A", "x", 1, 10_000)]);
    c.shipping = 500;
    c.points_balance = 3_000;
    let points = |min, max| Effect::PayWithPoints {
        points: 100,
        amount: 50, // 2 points per cent
        min_share_bp: min,
        max_share_bp: max,
    };
    let o = apply(&one("p", points(0, 0)), &c);
    assert_eq!(o.tender, 1_500);
    assert_eq!(o.points_spent, 3_000);
    assert_eq!(o.total_due, 9_000);
    // At most 10% of 10,500 by points.
    let o = apply(&one("p", points(0, 1000)), &c);
    assert_eq!(o.tender, 1_050);
    assert_eq!(o.points_spent, 2_100);
    // At least 20% must be covered: 1,500 < 2,100 → not applied.
    let o = apply(&one("p", points(2000, 0)), &c);
    assert_eq!(o.tender, 0);
    assert_eq!(o.skipped.len(), 1);

    let apps = vec![
        Application {
            reward_id: "card".into(),
            priority: 0,
            effect: Effect::GiftCard { value: 20_000 },
        },
        Application {
            reward_id: "off".into(),
            priority: 0,
            effect: percent(1000),
        },
    ];
    let o = apply(&apps, &c);
    assert_eq!(o.discount, 1_000);
    assert_eq!(o.tender, 9_500);
    assert_eq!(o.total_due, 0);
}

#[test]
fn points_exchange_spends_points_only_when_it_applies() {
    let mut c = cart(vec![line("a", "A", "x", 1, 1000)]);
    c.points_balance = 500;
    let exchange = |cost| Effect::PointsExchange {
        cost_points: cost,
        reward: Box::new(percent(1000)),
    };
    let o = apply(&one("x", exchange(400)), &c);
    assert_eq!(o.discount, 100);
    assert_eq!(o.points_spent, 400);
    let o = apply(&one("x", exchange(600)), &c);
    assert_eq!(o.discount, 0);
    assert_eq!(o.points_spent, 0);
    assert!(o.skipped[0].1.contains("needs 600 points"));
}

#[test]
fn cashback_on_the_net_total_with_cap() {
    let c = cart(vec![line("a", "A", "x", 1, 10_000)]);
    let apps = vec![
        Application {
            reward_id: "cb".into(),
            priority: 0,
            effect: Effect::Cashback {
                percent_bp: 500,
                amount: 0,
                cap: 0,
                pending_days: 30,
            },
        },
        Application {
            reward_id: "off".into(),
            priority: 0,
            effect: percent(2000),
        },
    ];
    let o = apply(&apps, &c);
    assert_eq!(o.cashback, 400); // 5% of 8,000
    assert_eq!(
        o.adjustments[1].target,
        Target::Cashback { pending_days: 30 }
    );
    let capped = Effect::Cashback {
        percent_bp: 500,
        amount: 0,
        cap: 250,
        pending_days: 0,
    };
    assert_eq!(apply(&one("cb", capped), &c).cashback, 250);
}

#[test]
fn extensions_qualify_for_the_touchpoint() {
    let c = cart(vec![line("a", "A", "x", 1, 1000)]);
    let o = apply(
        &one(
            "e",
            Effect::Extension {
                kind: "double_stamp".into(),
            },
        ),
        &c,
    );
    assert_eq!(
        o.adjustments[0].target,
        Target::Extension {
            kind: "double_stamp".into()
        }
    );
    assert_eq!(o.total_due, 1000);
}

#[test]
fn selector_inclusions_ranges_and_exclusions() {
    let mut l = line("a", "A", "x", 1, 1000);
    l.collections = vec!["summer".into()];
    let s = |f: fn(&mut Selector)| {
        let mut s = Selector::default();
        f(&mut s);
        s
    };
    assert!(Selector::default().matches(&l));
    assert!(s(|s| s.collections = vec!["summer".into()]).matches(&l));
    assert!(!s(|s| s.skus = vec!["B".into()]).matches(&l));
    assert!(!s(|s| s.min_unit_price = Some(1001)).matches(&l));
    assert!(!s(|s| s.exclude_categories = vec!["x".into()]).matches(&l));
    l.on_sale = true;
    assert!(!s(|s| s.only_non_discounted = true).matches(&l));
}

// ---- property tests -------------------------------------------------------------------

fn arb_selector() -> impl Strategy<Value = Selector> {
    (
        prop::option::of(0..4usize),
        prop::option::of(0..3usize),
        any::<bool>(),
    )
        .prop_map(|(sku, category, only_non_discounted)| Selector {
            skus: sku.map(|s| vec![format!("S{s}")]).unwrap_or_default(),
            categories: category.map(|c| vec![format!("c{c}")]).unwrap_or_default(),
            only_non_discounted,
            ..Selector::default()
        })
}

fn arb_effect() -> impl Strategy<Value = Effect> {
    let leaf = prop_oneof![
        (
            1..5_000i64,
            arb_selector(),
            any::<bool>(),
            0..4i64,
            0..3_000i64
        )
            .prop_map(|(amount, selector, each, max_quantity, min_subtotal)| {
                Effect::AmountOff {
                    amount,
                    selector,
                    allocation: if each {
                        Allocation::Each
                    } else {
                        Allocation::Across
                    },
                    max_quantity: if each { max_quantity } else { 0 },
                    min_subtotal,
                }
            }),
        (1..=10_000i64, 0..2_000i64, arb_selector(), 0..4i64).prop_map(
            |(percent_bp, cap, selector, max_quantity)| Effect::PercentOff {
                percent_bp,
                cap,
                selector,
                max_quantity
            }
        ),
        (0..2_000i64, arb_selector(), 0..3i64).prop_map(|(unit_price, selector, max_quantity)| {
            Effect::FixedPrice {
                unit_price,
                selector,
                max_quantity,
            }
        }),
        (0..5_000i64, any::<bool>()).prop_map(|(threshold, after_discounts)| {
            Effect::FreeShipping {
                threshold,
                after_discounts,
            }
        }),
        (0..5usize, 1..3i64).prop_map(|(s, quantity)| Effect::FreeItem {
            sku: format!("S{s}"),
            quantity
        }),
        (
            arb_selector(),
            1..4i64,
            arb_selector(),
            1..3i64,
            1..=10_000i64,
            0..3i64,
            0..6i64
        )
            .prop_map(
                |(buy, buy_quantity, get, get_quantity, percent_bp, repeat_limit, max_quantity)| {
                    Effect::BuyXGetY {
                        buy,
                        buy_quantity,
                        get,
                        get_quantity,
                        percent_bp,
                        repeat_limit,
                        max_quantity: if max_quantity > 0 {
                            max_quantity.max(get_quantity)
                        } else {
                            0
                        },
                    }
                }
            ),
        (
            prop::collection::vec((arb_selector(), 1..3i64), 1..3),
            0..3_000i64
        )
            .prop_map(|(components, price)| Effect::Bundle { components, price }),
        (1..20_000i64).prop_map(|value| Effect::GiftCard { value }),
        (1..200i64, 1..200i64, 0..5_000i64, 0..=10_000i64).prop_map(
            |(points, amount, min_share_bp, max_share_bp)| Effect::PayWithPoints {
                points,
                amount,
                min_share_bp,
                max_share_bp: max_share_bp.max(min_share_bp)
            }
        ),
        (0..2_000i64, 0..500i64, 0..1_000i64).prop_map(|(percent_bp, amount, cap)| {
            Effect::Cashback {
                percent_bp,
                amount,
                cap,
                pending_days: 0,
            }
        }),
    ];
    leaf.prop_recursive(1, 4, 1, |inner| {
        (1..2_000i64, inner).prop_map(|(cost_points, reward)| Effect::PointsExchange {
            cost_points,
            reward: Box::new(reward),
        })
    })
}

fn arb_cart() -> impl Strategy<Value = Cart> {
    (
        prop::collection::vec(
            (0..4usize, 0..3usize, 1..6i64, 0..3_000i64, any::<bool>()),
            1..8,
        ),
        0..1_000i64,
        0..5_000i64,
    )
        .prop_map(|(lines, shipping, points_balance)| Cart {
            lines: lines
                .into_iter()
                .enumerate()
                .map(|(i, (sku, category, quantity, unit_price, on_sale))| Line {
                    id: format!("l{i}"),
                    sku: format!("S{sku}"),
                    categories: vec![format!("c{category}")],
                    quantity,
                    unit_price,
                    on_sale,
                    ..Line::default()
                })
                .collect(),
            shipping,
            points_balance,
        })
}

fn arb_applications() -> impl Strategy<Value = Vec<Application>> {
    prop::collection::vec((-3..3i32, arb_effect()), 1..6).prop_map(|effects| {
        effects
            .into_iter()
            .enumerate()
            .map(|(i, (priority, effect))| Application {
                reward_id: format!("r{i}"),
                priority,
                effect,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn invariants_hold(apps in arb_applications(), cart in arb_cart()) {
        let o = apply(&apps, &cart);
        let subtotal: i64 = cart.lines.iter().map(Line::total).sum();
        prop_assert_eq!(o.subtotal, subtotal);
        // Total discount never exceeds the order; no line goes negative or over its total.
        prop_assert!(o.discount >= 0 && o.discount <= subtotal);
        for l in &cart.lines {
            let off: i64 = lines_off(&o).iter().filter(|(id, _)| *id == l.id).map(|(_, a)| a).sum();
            prop_assert!(off <= l.total(), "line {} discounted {} of {}", l.id, off, l.total());
        }
        prop_assert!(o.adjustments.iter().all(|a| a.amount >= 0 && a.points >= 0));
        let line_sum: i64 = lines_off(&o).iter().map(|(_, a)| a).sum();
        prop_assert_eq!(line_sum, o.discount);
        prop_assert!(o.shipping_discount >= 0 && o.shipping_discount <= cart.shipping);
        prop_assert!(o.total_due >= 0);
        prop_assert_eq!(o.total_due, subtotal - o.discount + cart.shipping - o.shipping_discount - o.tender);
        prop_assert!(o.points_spent <= cart.points_balance);
        // Every adjustment is tagged with a reward that was asked for.
        prop_assert!(o.adjustments.iter().all(|a| apps.iter().any(|x| x.reward_id == a.reward_id)));
        // Every reward either adjusted something or says why not.
        for x in &apps {
            let adjusted = o.adjustments.iter().any(|a| a.reward_id == x.reward_id);
            let skipped = o.skipped.iter().any(|(id, _)| *id == x.reward_id);
            prop_assert!(adjusted || skipped, "{} neither applied nor skipped", x.reward_id);
        }
        // Deterministic: the same input gives the same outcome.
        prop_assert_eq!(apply(&apps, &cart), o);
    }

    #[test]
    fn percent_cap_bounds_the_discount(bp in 1..=10_000i64, cap in 1..5_000i64, cart in arb_cart()) {
        let e = Effect::PercentOff { percent_bp: bp, cap, selector: Selector::default(), max_quantity: 0 };
        let o = apply(&one("r", e), &cart);
        prop_assert!(o.discount <= cap);
        let uncapped = apply(&one("r", percent(bp)), &cart).discount;
        prop_assert_eq!(o.discount, uncapped.min(cap));
    }

    #[test]
    fn bogo_discounts_whole_multiples_within_limits(
        units in 0..20i64, buy_quantity in 1..4i64, get_quantity in 1..3i64,
        repeat_limit in 0..4i64, max_quantity in 0..8i64, price in 1..1_000i64,
    ) {
        let max_quantity = if max_quantity > 0 { max_quantity.max(get_quantity) } else { 0 };
        let c = cart(vec![line("a", "A", "x", units.max(1), price)]);
        let e = Effect::BuyXGetY { buy: category("x"), buy_quantity, get: category("x"), get_quantity,
            percent_bp: 10_000, repeat_limit, max_quantity };
        let o = apply(&one("r", e), &c);
        let mut multiples = units.max(1) / (buy_quantity + get_quantity);
        if repeat_limit > 0 { multiples = multiples.min(repeat_limit); }
        if max_quantity > 0 { multiples = multiples.min(max_quantity / get_quantity); }
        prop_assert_eq!(o.discount, multiples * get_quantity * price);
    }

    #[test]
    fn free_shipping_threshold(threshold in 0..6_000i64, cart in arb_cart(), bp in 1..=10_000i64, after in any::<bool>()) {
        let apps = vec![
            Application { reward_id: "ship".into(), priority: 0,
                effect: Effect::FreeShipping { threshold, after_discounts: after } },
            Application { reward_id: "off".into(), priority: 0, effect: percent(bp) },
        ];
        let o = apply(&apps, &cart);
        let base = if after { o.subtotal - o.discount } else { o.subtotal };
        let expected = if base >= threshold { cart.shipping } else { 0 };
        prop_assert_eq!(o.shipping_discount, expected);
    }

    #[test]
    fn distribute_adds_up_within_weights(amount in 0..100_000i64, weights in prop::collection::vec(0..10_000i64, 1..10)) {
        let total: i64 = weights.iter().sum();
        let amount = amount.min(total);
        let parts = distribute(amount, &weights);
        if total > 0 { prop_assert_eq!(parts.iter().sum::<i64>(), amount); }
        for (p, w) in parts.iter().zip(&weights) { prop_assert!(*p >= 0 && p <= w); }
    }
}

/// A quantity or an amount as a crafted cart may send it: mostly ordinary, sometimes at or
/// far past the limits.
fn extreme(ordinary: i64, limit: i64) -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => 0..=ordinary,
        2 => Just(limit),
        1 => (limit - 10)..=limit,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        1 => 0..=i64::MAX,
    ]
}

fn wire_cart(lines: &[(i64, i64)], shipping: i64) -> tessera_proto::catalog::v1::Cart {
    tessera_proto::catalog::v1::Cart {
        currency: "USD".into(),
        lines: lines
            .iter()
            .enumerate()
            .map(
                |(i, (quantity, unit_price))| tessera_proto::catalog::v1::CartLine {
                    id: format!("l{i}"),
                    sku: "SKU".into(),
                    quantity: *quantity,
                    unit_price: *unit_price,
                    ..Default::default()
                },
            )
            .collect(),
        shipping,
        ..Default::default()
    }
}

#[test]
fn five_hundred_lines_at_the_limits_are_refused_not_wrapped() {
    let lines = vec![(wire::MAX_QUANTITY, wire::MAX_AMOUNT); wire::MAX_LINES];
    let mut v = tessera_runtime::error::Violations::new();
    wire::cart(&mut v, "cart", Some(&wire_cart(&lines, wire::MAX_AMOUNT)));
    let err = v.finish().expect_err("refused");
    assert!(
        err.field_violations.iter().any(|f| f.field == "cart.lines"),
        "{err:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every cart the public entries take goes through `wire::cart`: one with extreme values
    /// is either refused field by field, or accepted with a total within the bound, and
    /// then the engine's sums never overflow (tests build with overflow checks).
    #[test]
    fn extreme_carts_are_refused_or_summed_exactly(
        lines in prop::collection::vec(
            (extreme(20, wire::MAX_QUANTITY), extreme(100_000, wire::MAX_AMOUNT)),
            1..=wire::MAX_LINES,
        ),
        shipping in extreme(2_000, wire::MAX_AMOUNT),
        apps in arb_applications(),
    ) {
        let mut v = tessera_runtime::error::Violations::new();
        let cart = wire::cart(&mut v, "cart", Some(&wire_cart(&lines, shipping)));
        let exact = wire::exact_total(lines.iter().copied(), shipping);
        match v.finish() {
            Ok(()) => {
                prop_assert!(exact <= i128::from(wire::MAX_CART_TOTAL));
                let o = apply(&apps, &cart);
                prop_assert_eq!(i128::from(o.subtotal) + i128::from(shipping), exact);
                prop_assert!(o.total_due >= 0 && i128::from(o.total_due) <= exact);
            }
            Err(e) => prop_assert!(!e.field_violations.is_empty()),
        }
    }
}
