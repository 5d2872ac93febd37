//! The legs of a ledger transaction, and the proof that they balance. Pure: no database.
//!
//! Double entry: every transaction moves value between accounts (a customer's and a
//! tenant's system accounts: issuance, redemption, expiry, holds…), so its postings add up
//! to zero. [`Balanced`] can only be built from legs that do, computed without overflow,
//! and the ledger's `post` takes nothing else: a transaction that would make or lose value
//! cannot be written.

use std::fmt;

/// One leg of a ledger transaction: an account and the amount it moves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg<'a> {
    /// A customer account: its balance row moves with the posting.
    Customer(&'a str, i64),
    /// A customer account whose value moves between available and held (a hold placed,
    /// released): the balance row moves by the amount and its `held` by the opposite.
    Held(&'a str, i64),
    /// A tenant system account. System accounts keep no balance row (every credit would
    /// queue on the issuance account's row lock): their balances are the sums of their
    /// postings, which is what `GetLiability` reports.
    System(&'a str, i64),
}

impl<'a> Leg<'a> {
    pub(crate) fn account(&self) -> &'a str {
        let (Leg::Customer(account, _) | Leg::Held(account, _) | Leg::System(account, _)) = *self;
        account
    }

    pub(crate) fn amount(&self) -> i64 {
        let (Leg::Customer(_, amount) | Leg::Held(_, amount) | Leg::System(_, amount)) = *self;
        amount
    }
}

/// Why legs were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unbalanced {
    /// Fewer than two legs: nothing moves from one account to another.
    TooFew,
    /// The amounts do not add up to zero (their sum).
    Sum(i64),
    /// The amounts overflow 64 bits.
    Overflow,
}

impl fmt::Display for Unbalanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unbalanced::TooFew => f.write_str("a transaction needs at least two legs"),
            Unbalanced::Sum(sum) => write!(f, "the legs add up to {sum}, not 0"),
            Unbalanced::Overflow => f.write_str("the legs' amounts are out of range"),
        }
    }
}

/// Legs that add up to zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Balanced<'a>(Vec<Leg<'a>>);

impl<'a> Balanced<'a> {
    pub(crate) fn new(legs: impl IntoIterator<Item = Leg<'a>>) -> Result<Self, Unbalanced> {
        let legs: Vec<Leg<'a>> = legs.into_iter().collect();
        if legs.len() < 2 {
            return Err(Unbalanced::TooFew);
        }
        match tessera_money::sum(legs.iter().map(Leg::amount)) {
            Ok(0) => Ok(Self(legs)),
            Ok(sum) => Err(Unbalanced::Sum(sum)),
            Err(_) => Err(Unbalanced::Overflow),
        }
    }

    pub(crate) fn legs(&self) -> &[Leg<'a>] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_transfer_balances_and_a_gift_does_not() {
        let moved = Balanced::new([Leg::Customer("a", 150), Leg::System("issuance", -150)]);
        assert_eq!(moved.map(|b| b.legs().len()), Ok(2));
        assert_eq!(
            Balanced::new([Leg::Customer("a", 150), Leg::System("issuance", -100)]),
            Err(Unbalanced::Sum(50))
        );
        assert_eq!(
            Balanced::new([Leg::Customer("a", 0)]),
            Err(Unbalanced::TooFew)
        );
        assert_eq!(
            Balanced::new([
                Leg::Customer("a", i64::MAX),
                Leg::Held("a", 1),
                Leg::System("s", i64::MIN),
            ]),
            Err(Unbalanced::Overflow)
        );
    }

    proptest! {
        #[test]
        fn legs_are_accepted_exactly_when_they_add_up_to_zero(
            amounts in proptest::collection::vec(any::<i64>(), 0..6),
        ) {
            let legs: Vec<Leg> = amounts.iter().map(|a| Leg::Customer("x", *a)).collect();
            let exact: i128 = amounts.iter().map(|a| i128::from(*a)).sum();
            let fits = amounts
                .iter()
                .try_fold(0i64, |t, a| t.checked_add(*a))
                .is_some();
            let accepted = Balanced::new(legs).is_ok();
            prop_assert_eq!(accepted, amounts.len() >= 2 && exact == 0 && fits);
        }

        #[test]
        fn any_amount_moved_between_two_accounts_balances(amount in any::<i64>()) {
            prop_assume!(amount != i64::MIN);
            let b = Balanced::new([Leg::Customer("c", amount), Leg::System("s", -amount)]);
            prop_assert!(b.is_ok());
        }
    }
}
