//! Money and points as integers: minor units of a currency (cents) or points, never floats.
//!
//! [`Money`] is the one amount type with checked arithmetic: every sum that could leave
//! `i64` answers [`Overflow`] instead of wrapping (release builds wrap silently; debug
//! builds panic). Proportions ([`Money::ratio`]) are computed exactly in
//! `i128` and rounded as asked; a split ([`distribute`]) gives every cent to someone. The
//! limits the APIs enforce at their edges ([`MAX_AMOUNT`], [`MAX_QUANTITY`], [`MAX_LINES`],
//! [`MAX_CART_TOTAL`]) live here too, so every service refuses the same inputs and every
//! sum made of accepted inputs stays far inside `i64`.

use std::fmt;

/// Largest single amount, in minor units or points: a line's unit price, an effect's
/// amount, one wallet movement (10^12).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// Largest quantity of a line or a limit.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Most lines in a cart.
pub const MAX_LINES: usize = 500;
/// Largest total of a cart or an order (its lines and shipping), in minor units (10^15).
/// Each line may be up to 10^12 × 10^6, and 500 such lines would overflow an i64: the
/// total is bounded so every sum made of a cart stays far inside it.
pub const MAX_CART_TOTAL: i64 = 1_000_000_000_000_000;

/// An amount went out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("amount out of range")
    }
}

impl std::error::Error for Overflow {}

/// How a proportion is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Toward negative infinity (a share that must not exceed its exact value).
    Down,
    /// Toward positive infinity (a price that must cover its exact value).
    Up,
    /// To the nearest, ties to even (banker's rounding: no drift over many roundings).
    HalfEven,
}

/// An amount of money in minor units, or of points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Result<Money, Overflow> {
        self.0.checked_add(other.0).map(Money).ok_or(Overflow)
    }

    /// `self × num / den`, exact in `i128`, rounded as asked.
    pub fn ratio(self, num: i128, den: i128, rounding: Rounding) -> Result<Money, Overflow> {
        let n = i128::from(self.0).checked_mul(num).ok_or(Overflow)?;
        div(n, den, rounding)
    }

    /// The sum of `amounts`.
    pub fn sum(amounts: impl IntoIterator<Item = Money>) -> Result<Money, Overflow> {
        amounts
            .into_iter()
            .try_fold(Money::ZERO, |total, a| total.checked_add(a))
    }
}

/// The sum of plain amounts (minor units or points), checked.
pub fn sum(amounts: impl IntoIterator<Item = i64>) -> Result<i64, Overflow> {
    Money::sum(amounts.into_iter().map(Money)).map(Money::get)
}

/// `a + b`, checked.
pub fn add(a: i64, b: i64) -> Result<i64, Overflow> {
    Money(a).checked_add(Money(b)).map(Money::get)
}

/// `value × num / den`, exact in `i128`, rounded as asked.
pub fn ratio(value: i64, num: i128, den: i128, rounding: Rounding) -> Result<i64, Overflow> {
    Money(value).ratio(num, den, rounding).map(Money::get)
}

/// `n / d` rounded as asked, if it fits an `i64` (a zero `d`: [`Overflow`]).
pub fn div(n: i128, d: i128, rounding: Rounding) -> Result<Money, Overflow> {
    if d == 0 {
        return Err(Overflow);
    }
    let (n, d) = if d < 0 { (-n, -d) } else { (n, d) };
    let q = n.div_euclid(d);
    let r = n.rem_euclid(d);
    let q = match rounding {
        Rounding::Down => q,
        Rounding::Up => q + i128::from(r > 0),
        Rounding::HalfEven => match (2 * r).cmp(&d) {
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal if q % 2 != 0 => q + 1,
            _ => q,
        },
    };
    i64::try_from(q).map(Money).map_err(|_| Overflow)
}

/// The exact total of `lines` (quantity × unit amount) and `extra`, for checking against
/// [`MAX_CART_TOTAL`] before anything sums it in `i64`: exact while it fits an `i128`
/// (each product does), saturating past it.
pub fn exact_total(lines: impl IntoIterator<Item = (i64, i64)>, extra: i64) -> i128 {
    lines
        .into_iter()
        .map(|(quantity, unit)| i128::from(quantity) * i128::from(unit))
        .fold(i128::from(extra), i128::saturating_add)
}

/// Splits `amount` over `weights` in proportion (largest remainder; ties to the earlier
/// index), so the parts add up to `amount` exactly. With `amount <= sum(weights)`, no part
/// exceeds its weight. Nothing to split (no positive amount or weight): all zero.
pub fn distribute(amount: i64, weights: &[i64]) -> Vec<i64> {
    let total: i128 = weights.iter().map(|w| i128::from(*w)).sum();
    if total <= 0 || amount <= 0 {
        return vec![0; weights.len()];
    }
    let amount = i128::from(amount);
    let mut parts: Vec<i64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(i128, usize)> = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let exact = amount * i128::from(*w);
        parts.push(i64::try_from(exact / total).unwrap_or(i64::MAX));
        remainders.push((exact % total, i));
    }
    let given: i128 = parts.iter().map(|p| i128::from(*p)).sum();
    let left = usize::try_from(amount - given).unwrap_or(0);
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders.into_iter().take(left) {
        parts[i] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sums_refuse_to_wrap() {
        assert_eq!(sum([i64::MAX, 1]), Err(Overflow));
        assert_eq!(sum([i64::MAX, -1, 1]), Ok(i64::MAX));
        assert_eq!(sum([MAX_AMOUNT * MAX_QUANTITY; 500]), Err(Overflow));
        assert_eq!(
            Money::new(i64::MIN).checked_add(Money::new(-1)),
            Err(Overflow)
        );
    }

    #[test]
    fn rounding() {
        assert_eq!(ratio(5, 1, 2, Rounding::HalfEven), Ok(2));
        assert_eq!(ratio(7, 1, 2, Rounding::HalfEven), Ok(4));
        assert_eq!(ratio(7, 1, 2, Rounding::Down), Ok(3));
        assert_eq!(ratio(7, 1, 2, Rounding::Up), Ok(4));
        assert_eq!(ratio(-7, 1, 2, Rounding::Down), Ok(-4));
        assert_eq!(ratio(-7, 1, 2, Rounding::Up), Ok(-3));
        assert_eq!(ratio(i64::MAX, 3, 2, Rounding::Down), Err(Overflow));
        assert_eq!(
            ratio(
                i64::MAX,
                i128::from(i64::MAX),
                i128::from(i64::MAX),
                Rounding::Down
            ),
            Ok(i64::MAX)
        );
    }

    proptest! {
        #[test]
        fn a_split_gives_every_cent_and_none_beyond_a_weight(
            amount in 0i64..=MAX_AMOUNT,
            weights in proptest::collection::vec(0i64..=MAX_AMOUNT, 1..=MAX_LINES),
        ) {
            let parts = distribute(amount, &weights);
            let total: i128 = weights.iter().map(|w| i128::from(*w)).sum();
            let given: i128 = parts.iter().map(|p| i128::from(*p)).sum();
            if total > 0 {
                prop_assert_eq!(given, i128::from(amount));
                if i128::from(amount) <= total {
                    for (p, w) in parts.iter().zip(&weights) {
                        prop_assert!(p <= w);
                    }
                }
            } else {
                prop_assert_eq!(given, 0);
            }
        }

        #[test]
        fn a_ratio_is_within_one_unit_of_exact_and_ordered_by_rounding(
            value in -MAX_CART_TOTAL..=MAX_CART_TOTAL,
            num in 0i128..=10_000,
            den in 1i128..=10_000,
        ) {
            let exact = i128::from(value) * num;
            let down = i128::from(ratio(value, num, den, Rounding::Down).unwrap());
            let up = i128::from(ratio(value, num, den, Rounding::Up).unwrap());
            let even = i128::from(ratio(value, num, den, Rounding::HalfEven).unwrap());
            prop_assert!(down * den <= exact && exact < (down + 1) * den);
            prop_assert!(up - down <= 1 && down <= even && even <= up);
            prop_assert!((2 * (exact - even * den)).abs() <= den);
        }

        #[test]
        fn the_sum_of_any_accepted_cart_fits(
            lines in proptest::collection::vec((1i64..=MAX_QUANTITY, 0i64..=MAX_AMOUNT), 1..=MAX_LINES),
        ) {
            let exact = exact_total(lines.iter().copied(), 0);
            // Each line's total fits (10^6 × 10^12 = 10^18); their sum may not.
            let checked = Money::sum(lines.iter().map(|(q, u)| Money::new(q * u)));
            match checked {
                Ok(total) => prop_assert_eq!(i128::from(total.get()), exact),
                Err(Overflow) => prop_assert!(exact > i128::from(i64::MAX)),
            }
        }
    }
}
