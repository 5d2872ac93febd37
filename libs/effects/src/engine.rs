//! `apply(effects, cart) → outcome`.
//!
//! # Passes
//! Effects are applied in four passes, each in priority order (higher first, then input
//! order):
//! 1. discounts on lines (amount off, percent off, fixed price, free item, buy X get Y,
//!    bundle, and exchanges whose reward is one of these);
//! 2. shipping (free shipping, against the subtotal before or after pass 1 as configured);
//! 3. tender (gift cards, pay with points), against what is left to pay;
//! 4. cashback, on the merchandise total after discounts.
//!
//! Every effect sees what earlier effects left: a line is never discounted below zero and
//! never by more than its total.
//!
//! # Rounding
//! Amounts are integers in minor units. A percentage (or any proportional share of one line)
//! is rounded half to even, once, from the exact fraction. An amount spread over several
//! lines is split by the largest-remainder method: every line gets the floor of its exact
//! share and the units left over go to the largest fractional parts (ties to the earlier
//! line), so the parts always add up to the amount. Both come from `tessera_money`, the
//! suite's one money arithmetic.

use tessera_money::{Money, Rounding};

/// 100% in basis points.
pub const FULL_BP: i64 = 10_000;

/// A cart line. Its total is `unit_price × quantity`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Line {
    pub id: String,
    pub sku: String,
    pub categories: Vec<String>,
    pub collections: Vec<String>,
    pub quantity: i64,
    pub unit_price: i64,
    pub on_sale: bool,
}

impl Line {
    pub fn total(&self) -> i64 {
        self.unit_price.saturating_mul(self.quantity)
    }
}

/// A cart, with what the customer can spend in points.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cart {
    pub lines: Vec<Line>,
    pub shipping: i64,
    pub points_balance: i64,
}

/// Which lines an effect applies to (see the protobuf `Selector`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub skus: Vec<String>,
    pub categories: Vec<String>,
    pub collections: Vec<String>,
    pub min_unit_price: Option<i64>,
    pub max_unit_price: Option<i64>,
    pub only_non_discounted: bool,
    pub exclude_skus: Vec<String>,
    pub exclude_categories: Vec<String>,
}

impl Selector {
    pub fn matches(&self, line: &Line) -> bool {
        let included =
            (self.skus.is_empty() && self.categories.is_empty() && self.collections.is_empty())
                || self.skus.contains(&line.sku)
                || line.categories.iter().any(|c| self.categories.contains(c))
                || line
                    .collections
                    .iter()
                    .any(|c| self.collections.contains(c));
        included
            && self.min_unit_price.is_none_or(|min| line.unit_price >= min)
            && self.max_unit_price.is_none_or(|max| line.unit_price <= max)
            && !(self.only_non_discounted && line.on_sale)
            && !self.exclude_skus.contains(&line.sku)
            && !line
                .categories
                .iter()
                .any(|c| self.exclude_categories.contains(c))
    }
}

/// How an amount off is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocation {
    /// One amount, spread over the matching lines in proportion to what is left of them.
    #[default]
    Across,
    /// The amount off each matching unit.
    Each,
}

/// What a reward does. Quantities of 0 mean "no limit" where a limit is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    AmountOff {
        amount: i64,
        selector: Selector,
        allocation: Allocation,
        max_quantity: i64,
        min_subtotal: i64,
    },
    PercentOff {
        percent_bp: i64,
        cap: i64,
        selector: Selector,
        max_quantity: i64,
    },
    FixedPrice {
        unit_price: i64,
        selector: Selector,
        max_quantity: i64,
    },
    FreeShipping {
        threshold: i64,
        after_discounts: bool,
    },
    FreeItem {
        sku: String,
        quantity: i64,
    },
    BuyXGetY {
        buy: Selector,
        buy_quantity: i64,
        get: Selector,
        get_quantity: i64,
        percent_bp: i64,
        repeat_limit: i64,
        max_quantity: i64,
    },
    Bundle {
        components: Vec<(Selector, i64)>,
        price: i64,
    },
    GiftCard {
        value: i64,
    },
    PayWithPoints {
        points: i64,
        amount: i64,
        min_share_bp: i64,
        max_share_bp: i64,
    },
    PointsExchange {
        cost_points: i64,
        reward: Box<Effect>,
    },
    Cashback {
        percent_bp: i64,
        amount: i64,
        cap: i64,
        pending_days: u32,
    },
    Extension {
        kind: String,
    },
}

impl Effect {
    fn pass(&self) -> u8 {
        match self {
            Effect::FreeShipping { .. } => 1,
            Effect::GiftCard { .. } | Effect::PayWithPoints { .. } => 2,
            Effect::Cashback { .. } => 3,
            Effect::PointsExchange { reward, .. } => reward.pass(),
            _ => 0,
        }
    }
}

/// An effect to apply, tagged with the reward it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub reward_id: String,
    pub priority: i32,
    pub effect: Effect,
}

/// What an adjustment changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Line(String),
    Shipping,
    Tender,
    Cashback { pending_days: u32 },
    AddItem { sku: String },
    Points,
    Extension { kind: String },
}

/// One change, tagged with the reward that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    pub reward_id: String,
    pub target: Target,
    pub amount: i64,
    pub units: i64,
    pub points: i64,
}

/// What the effects do to the cart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub adjustments: Vec<Adjustment>,
    /// `(reward id, why it did not apply)`.
    pub skipped: Vec<(String, String)>,
    pub subtotal: i64,
    pub discount: i64,
    pub shipping_discount: i64,
    pub tender: i64,
    pub total_due: i64,
    pub cashback: i64,
    pub points_spent: i64,
}

/// `n / d` rounded half to even; `n >= 0`, `d > 0`. Every quantity the engine divides is
/// bounded by the cart's checked limits (`tessera_money::MAX_CART_TOTAL`), so the quotient
/// fits; past it, it saturates.
pub fn div_half_even(n: i128, d: i128) -> i64 {
    tessera_money::div(n, d, Rounding::HalfEven).map_or(i64::MAX, Money::get)
}

pub use tessera_money::distribute;

/// The running state of one application: what is left of every line, points and tender.
struct State<'c> {
    cart: &'c Cart,
    remaining: Vec<i64>,
    points: i64,
    shipping_left: i64,
    tender: i64,
    outcome: Outcome,
}

impl State<'_> {
    fn merchandise_left(&self) -> i64 {
        self.remaining.iter().sum()
    }

    fn due(&self) -> i64 {
        self.merchandise_left() + self.shipping_left - self.tender
    }

    /// The value of `units` of line `i` at what is left of its price.
    fn units_value(&self, i: usize, units: i64) -> i64 {
        let quantity = self.cart.lines[i].quantity.max(1);
        div_half_even(
            i128::from(self.remaining[i]) * i128::from(units.min(quantity)),
            i128::from(quantity),
        )
    }

    fn take_line(&mut self, reward_id: &str, i: usize, amount: i64, units: i64) -> i64 {
        let amount = amount.min(self.remaining[i]).max(0);
        if amount > 0 {
            self.remaining[i] -= amount;
            self.outcome.adjustments.push(Adjustment {
                reward_id: reward_id.to_string(),
                target: Target::Line(self.cart.lines[i].id.clone()),
                amount,
                units,
                points: 0,
            });
        }
        amount
    }

    fn push(&mut self, reward_id: &str, target: Target, amount: i64, units: i64, points: i64) {
        self.outcome.adjustments.push(Adjustment {
            reward_id: reward_id.to_string(),
            target,
            amount,
            units,
            points,
        });
    }

    fn matching(&self, selector: &Selector) -> Vec<usize> {
        (0..self.cart.lines.len())
            .filter(|&i| self.remaining[i] > 0 && selector.matches(&self.cart.lines[i]))
            .collect()
    }

    /// Applies one effect; `Err` says why it did not apply.
    fn apply(&mut self, reward_id: &str, effect: &Effect) -> Result<(), String> {
        match effect {
            Effect::AmountOff {
                amount,
                selector,
                allocation,
                max_quantity,
                min_subtotal,
            } => {
                let lines = self.matching(selector);
                if lines.is_empty() {
                    return Err("no line matches".into());
                }
                let matched: i64 = lines.iter().map(|&i| self.cart.lines[i].total()).sum();
                if matched < *min_subtotal {
                    return Err(format!(
                        "the matching lines total {matched}, below the minimum of {min_subtotal}"
                    ));
                }
                match allocation {
                    Allocation::Across => {
                        let weights: Vec<i64> = lines.iter().map(|&i| self.remaining[i]).collect();
                        let total = (*amount).min(weights.iter().sum());
                        for (k, part) in distribute(total, &weights).into_iter().enumerate() {
                            let units = self.cart.lines[lines[k]].quantity;
                            self.take_line(reward_id, lines[k], part, units);
                        }
                    }
                    Allocation::Each => {
                        for i in lines {
                            let units = limit(self.cart.lines[i].quantity, *max_quantity);
                            self.take_line(reward_id, i, amount.saturating_mul(units), units);
                        }
                    }
                }
                Ok(())
            }
            Effect::PercentOff {
                percent_bp,
                cap,
                selector,
                max_quantity,
            } => {
                let lines = self.matching(selector);
                if lines.is_empty() {
                    return Err("no line matches".into());
                }
                let units: Vec<i64> = lines
                    .iter()
                    .map(|&i| limit(self.cart.lines[i].quantity, *max_quantity))
                    .collect();
                let mut parts: Vec<i64> = lines
                    .iter()
                    .zip(&units)
                    .map(|(&i, &u)| {
                        let line = &self.cart.lines[i];
                        div_half_even(
                            i128::from(self.remaining[i]) * i128::from(u) * i128::from(*percent_bp),
                            i128::from(line.quantity.max(1)) * i128::from(FULL_BP),
                        )
                    })
                    .collect();
                let sum: i64 = parts.iter().sum();
                if *cap > 0 && sum > *cap {
                    parts = distribute(*cap, &parts);
                }
                for ((&i, part), u) in lines.iter().zip(parts).zip(units) {
                    self.take_line(reward_id, i, part, u);
                }
                Ok(())
            }
            Effect::FixedPrice {
                unit_price,
                selector,
                max_quantity,
            } => {
                let lines = self.matching(selector);
                let mut applied = false;
                for i in lines {
                    let units = limit(self.cart.lines[i].quantity, *max_quantity);
                    let now = self.units_value(i, units);
                    let off = now - unit_price.saturating_mul(units);
                    applied |= self.take_line(reward_id, i, off, units) > 0;
                }
                if applied {
                    Ok(())
                } else {
                    Err("no matching line costs more than the fixed price".into())
                }
            }
            Effect::FreeItem { sku, quantity } => {
                let line = (0..self.cart.lines.len())
                    .find(|&i| self.cart.lines[i].sku == *sku && self.remaining[i] > 0);
                match line {
                    Some(i) => {
                        let units = (*quantity).min(self.cart.lines[i].quantity);
                        let value = self.units_value(i, units);
                        self.take_line(reward_id, i, value, units);
                    }
                    None => self.push(
                        reward_id,
                        Target::AddItem { sku: sku.clone() },
                        0,
                        *quantity,
                        0,
                    ),
                }
                Ok(())
            }
            Effect::BuyXGetY {
                buy,
                buy_quantity,
                get,
                get_quantity,
                percent_bp,
                repeat_limit,
                max_quantity,
            } => self.buy_x_get_y(
                reward_id,
                buy,
                *buy_quantity,
                get,
                *get_quantity,
                *percent_bp,
                *repeat_limit,
                *max_quantity,
            ),
            Effect::Bundle { components, price } => self.bundle(reward_id, components, *price),
            Effect::FreeShipping {
                threshold,
                after_discounts,
            } => {
                let base = if *after_discounts {
                    self.merchandise_left()
                } else {
                    self.outcome.subtotal
                };
                if base < *threshold {
                    return Err(format!("the order total {base} is below {threshold}"));
                }
                if self.shipping_left <= 0 {
                    return Err("shipping is already free".into());
                }
                let amount = self.shipping_left;
                self.shipping_left = 0;
                self.push(reward_id, Target::Shipping, amount, 0, 0);
                Ok(())
            }
            Effect::GiftCard { value } => {
                let pay = (*value).min(self.due());
                if pay <= 0 {
                    return Err("nothing is left to pay".into());
                }
                self.tender += pay;
                self.push(reward_id, Target::Tender, pay, 0, 0);
                Ok(())
            }
            Effect::PayWithPoints {
                points,
                amount,
                min_share_bp,
                max_share_bp,
            } => {
                let order = self.merchandise_left() + self.shipping_left;
                let share = |bp: i64| {
                    div_half_even(i128::from(order) * i128::from(bp), i128::from(FULL_BP))
                };
                let max_pay = if *max_share_bp > 0 {
                    share(*max_share_bp)
                } else {
                    order
                };
                let worth = i64::try_from(
                    i128::from(self.points) * i128::from(*amount) / i128::from((*points).max(1)),
                )
                .unwrap_or(i64::MAX);
                let pay = worth.min(max_pay).min(self.due());
                let min_pay = share(*min_share_bp);
                if pay <= 0 || pay < min_pay {
                    return Err(format!(
                        "the customer's points pay {} of the at least {} required",
                        pay.max(0),
                        min_pay.max(1)
                    ));
                }
                // The points that buy `pay`, rounded up: points never pay more than they are worth.
                let used = i64::try_from(
                    (i128::from(pay) * i128::from(*points) + i128::from(*amount) - 1)
                        / i128::from((*amount).max(1)),
                )
                .unwrap_or(i64::MAX)
                .min(self.points);
                self.points -= used;
                self.outcome.points_spent += used;
                self.tender += pay;
                self.push(reward_id, Target::Tender, pay, 0, used);
                Ok(())
            }
            Effect::PointsExchange {
                cost_points,
                reward,
            } => {
                if self.points < *cost_points {
                    return Err(format!(
                        "needs {cost_points} points, the customer has {}",
                        self.points
                    ));
                }
                // The cost is set aside first: the reward cannot spend those points again.
                self.points -= cost_points;
                let before = self.outcome.adjustments.len();
                let applied = self.apply(reward_id, reward);
                if applied.is_err() || self.outcome.adjustments.len() == before {
                    self.points += cost_points;
                    applied?;
                    return Err("the exchanged reward changes nothing".into());
                }
                self.outcome.points_spent += cost_points;
                self.push(reward_id, Target::Points, 0, 0, *cost_points);
                Ok(())
            }
            Effect::Cashback {
                percent_bp,
                amount,
                cap,
                pending_days,
            } => {
                let base = self.merchandise_left();
                let mut earned = div_half_even(
                    i128::from(base) * i128::from(*percent_bp),
                    i128::from(FULL_BP),
                ) + amount;
                if *cap > 0 {
                    earned = earned.min(*cap);
                }
                if earned <= 0 {
                    return Err("the order earns no cashback".into());
                }
                self.outcome.cashback += earned;
                self.push(
                    reward_id,
                    Target::Cashback {
                        pending_days: *pending_days,
                    },
                    earned,
                    0,
                    0,
                );
                Ok(())
            }
            Effect::Extension { kind } => {
                self.push(reward_id, Target::Extension { kind: kind.clone() }, 0, 0, 0);
                Ok(())
            }
        }
    }

    /// Units of the `pool` lines (sorted cheapest first) taken to discount `count` units.
    fn cheapest_units(&self, pool: &[usize], count: i64) -> Vec<(usize, i64)> {
        let mut left = count;
        let mut taken = Vec::new();
        for &i in pool {
            if left == 0 {
                break;
            }
            let k = left.min(self.cart.lines[i].quantity);
            taken.push((i, k));
            left -= k;
        }
        taken
    }

    #[allow(clippy::too_many_arguments)]
    fn buy_x_get_y(
        &mut self,
        reward_id: &str,
        buy: &Selector,
        buy_quantity: i64,
        get: &Selector,
        get_quantity: i64,
        percent_bp: i64,
        repeat_limit: i64,
        max_quantity: i64,
    ) -> Result<(), String> {
        let lines = &self.cart.lines;
        let bought: i64 = lines
            .iter()
            .filter(|l| buy.matches(l))
            .map(|l| l.quantity)
            .sum();
        let mut pool = self.matching(get);
        // Cheapest unit first (by what is left of it), then line order.
        pool.sort_by(|&a, &b| {
            let (qa, qb) = (lines[a].quantity.max(1), lines[b].quantity.max(1));
            (i128::from(self.remaining[a]) * i128::from(qb))
                .cmp(&(i128::from(self.remaining[b]) * i128::from(qa)))
                .then(a.cmp(&b))
        });
        let get_units: i64 = pool.iter().map(|&i| lines[i].quantity).sum();
        let mut upper = (get_units / get_quantity).min(bought / buy_quantity);
        if repeat_limit > 0 {
            upper = upper.min(repeat_limit);
        }
        if max_quantity > 0 {
            upper = upper.min(max_quantity / get_quantity);
        }
        // Feasible multiples are a prefix: more free units never leave more units to buy.
        let feasible = |m: i64| {
            let overlap: i64 = self
                .cheapest_units(&pool, m * get_quantity)
                .iter()
                .filter(|(i, _)| buy.matches(&lines[*i]))
                .map(|(_, k)| k)
                .sum();
            bought - overlap >= m * buy_quantity
        };
        let (mut lo, mut hi) = (0, upper);
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2;
            if feasible(mid) {
                lo = mid
            } else {
                hi = mid - 1
            }
        }
        if lo == 0 {
            return Err(format!(
                "needs {buy_quantity} units to buy and {get_quantity} to discount"
            ));
        }
        for (i, k) in self.cheapest_units(&pool, lo * get_quantity) {
            let quantity = self.cart.lines[i].quantity.max(1);
            let off = div_half_even(
                i128::from(self.remaining[i]) * i128::from(k) * i128::from(percent_bp),
                i128::from(quantity) * i128::from(FULL_BP),
            );
            self.take_line(reward_id, i, off, k);
        }
        Ok(())
    }

    fn bundle(
        &mut self,
        reward_id: &str,
        components: &[(Selector, i64)],
        price: i64,
    ) -> Result<(), String> {
        // Each unit fills at most one part; parts take units in line order.
        let fill = |count: i64| -> Option<Vec<(usize, i64)>> {
            let mut used = vec![0i64; self.cart.lines.len()];
            let mut taken = Vec::new();
            for (selector, per_bundle) in components {
                let mut left = per_bundle * count;
                for i in self.matching(selector) {
                    let k = left.min(self.cart.lines[i].quantity - used[i]);
                    if k > 0 {
                        used[i] += k;
                        taken.push((i, k));
                        left -= k;
                    }
                }
                if left > 0 {
                    return None;
                }
            }
            Some(taken)
        };
        let mut upper = components
            .iter()
            .map(|(selector, per_bundle)| {
                let units: i64 = self
                    .matching(selector)
                    .iter()
                    .map(|&i| self.cart.lines[i].quantity)
                    .sum();
                units / per_bundle
            })
            .min()
            .unwrap_or(0);
        let taken = loop {
            if upper == 0 {
                return Err("the cart holds no complete bundle".into());
            }
            if let Some(taken) = fill(upper) {
                break taken;
            }
            upper -= 1;
        };
        let values: Vec<i64> = taken.iter().map(|&(i, k)| self.units_value(i, k)).collect();
        let off = values.iter().sum::<i64>() - price.saturating_mul(upper);
        if off <= 0 {
            return Err("the bundle price is not below the items' price".into());
        }
        for ((i, k), part) in taken.into_iter().zip(distribute(off, &values)) {
            self.take_line(reward_id, i, part, k);
        }
        Ok(())
    }
}

/// `quantity`, or at most `max` when `max > 0`.
fn limit(quantity: i64, max: i64) -> i64 {
    if max > 0 { quantity.min(max) } else { quantity }
}

/// Applies `applications` to `cart` (see the module documentation for order and rounding).
pub fn apply(applications: &[Application], cart: &Cart) -> Outcome {
    let mut state = State {
        cart,
        remaining: cart.lines.iter().map(|l| l.total().max(0)).collect(),
        points: cart.points_balance.max(0),
        shipping_left: cart.shipping.max(0),
        tender: 0,
        outcome: Outcome::default(),
    };
    state.outcome.subtotal = state.merchandise_left();
    let mut order: Vec<&Application> = applications.iter().collect();
    order.sort_by(|a, b| {
        a.effect
            .pass()
            .cmp(&b.effect.pass())
            .then(b.priority.cmp(&a.priority))
    });
    for application in order {
        let before = state.outcome.adjustments.len();
        let applied = state
            .apply(&application.reward_id, &application.effect)
            .and_then(|()| {
                if state.outcome.adjustments.len() > before {
                    Ok(())
                } else {
                    Err("it qualifies, but its discount rounds to nothing".to_string())
                }
            });
        if let Err(reason) = applied {
            state
                .outcome
                .skipped
                .push((application.reward_id.clone(), reason));
        }
    }
    let mut outcome = state.outcome;
    outcome.discount = outcome.subtotal - state.remaining.iter().sum::<i64>();
    outcome.shipping_discount = cart.shipping.max(0) - state.shipping_left;
    outcome.tender = state.tender;
    outcome.total_due = outcome.subtotal - outcome.discount + cart.shipping.max(0)
        - outcome.shipping_discount
        - outcome.tender;
    outcome
}
