//! Which lots pay for an amount. Pure: no database.
//!
//! Value is taken from lots in the order given (the ledger orders them soonest-expiring
//! first, then oldest: FIFO within an expiry), each giving what it has left until the
//! amount is covered; a refund gives back to the lots a spend took from, in the order the
//! caller chose. Either way every unit is accounted for: the parts add up to the amount,
//! no lot gives more than it has, and only the last lot used may give part of what it has.

/// The lots did not hold the amount; `available` is what they held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Short {
    pub available: i64,
}

/// Takes `amount` (≥ 0) from `lots` — `(lot, what it has)` in the order to use them —
/// and returns `(lot, part)` for each lot that gives something. Lots with nothing are
/// skipped.
pub(crate) fn allocate<K: Copy>(
    lots: impl IntoIterator<Item = (K, i64)>,
    amount: i64,
) -> Result<Vec<(K, i64)>, Short> {
    let mut left = amount.max(0);
    let mut parts = Vec::new();
    let mut available: i64 = 0;
    for (lot, has) in lots {
        let has = has.max(0);
        available = available.saturating_add(has);
        if left == 0 || has == 0 {
            continue;
        }
        let part = has.min(left);
        left -= part;
        parts.push((lot, part));
    }
    if left > 0 {
        return Err(Short { available });
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn oldest_first_and_the_last_one_in_part() {
        let lots = [(1, 50), (2, 0), (3, 30), (4, 100)];
        assert_eq!(allocate(lots, 70), Ok(vec![(1, 50), (3, 20)]));
        assert_eq!(allocate(lots, 0), Ok(vec![]));
        assert_eq!(allocate(lots, 181), Err(Short { available: 180 }));
    }

    proptest! {
        #[test]
        fn every_unit_is_accounted_for(
            has in proptest::collection::vec(0i64..=1_000_000_000_000, 0..40),
            amount in 0i64..=40_000_000_000_000,
        ) {
            let lots: Vec<(usize, i64)> = has.iter().copied().enumerate().collect();
            let total: i64 = has.iter().sum();
            match allocate(lots.iter().copied(), amount) {
                Err(Short { available }) => {
                    prop_assert_eq!(available, total);
                    prop_assert!(amount > total);
                }
                Ok(parts) => {
                    prop_assert!(amount <= total);
                    prop_assert_eq!(parts.iter().map(|p| p.1).sum::<i64>(), amount);
                    for (i, (lot, part)) in parts.iter().enumerate() {
                        prop_assert!(*part > 0 && *part <= has[*lot]);
                        // In order, and every lot before the last one used gave all it had.
                        if i + 1 < parts.len() {
                            prop_assert_eq!(*part, has[*lot]);
                            prop_assert!(parts[i + 1].0 > *lot);
                        }
                    }
                    // No lot with something left was skipped before the last one used.
                    if let Some((last, _)) = parts.last() {
                        for (lot, h) in has.iter().enumerate().take(*last) {
                            prop_assert!(*h == 0 || parts.iter().any(|p| p.0 == lot));
                        }
                    }
                }
            }
        }
    }
}
