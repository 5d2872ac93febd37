//! The rules of a catalog code at checkout, without storage: whether a code may be used by
//! this customer now, and why not.

use tessera_proto::eligibility::v1 as pb;

/// A catalog code as eligibility holds it, with the switches of its pool and reward and the
/// uses counted so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolCode {
    pub code: String,
    pub pool_id: String,
    pub reward_id: String,
    /// Published to this customer only (empty: anyone).
    pub customer_id: String,
    pub max_uses: i64,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub disabled: bool,
    pub pool_disabled: bool,
    pub reward_disabled: bool,
    pub uses: i64,
}

/// Why a code cannot be used.
pub type Refusal = (pb::Reason, String);

/// The code as the catalog writes it: trimmed, upper case.
pub fn normalize(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

/// Whether `customer` may use the code at `now`: the kill switches first (code, pool,
/// reward), then its window, its owner and its uses left.
pub fn check(c: &PoolCode, customer: &str, now: i64) -> Result<(), Refusal> {
    if c.disabled {
        return Err((pb::Reason::Disabled, "the code is disabled".into()));
    }
    if c.pool_disabled {
        return Err((
            pb::Reason::Disabled,
            format!("its pool `{}` is disabled", c.pool_id),
        ));
    }
    if c.reward_disabled {
        return Err((
            pb::Reason::Disabled,
            format!("its reward `{}` is disabled", c.reward_id),
        ));
    }
    if c.starts_at.is_some_and(|s| now < s) {
        return Err((pb::Reason::NotStarted, "the code is not valid yet".into()));
    }
    if c.ends_at.is_some_and(|e| now >= e) {
        return Err((pb::Reason::Ended, "the code has expired".into()));
    }
    if !c.customer_id.is_empty() && c.customer_id != customer {
        return Err((
            pb::Reason::CodeOfAnotherCustomer,
            "the code was given to another customer".into(),
        ));
    }
    // 0: not counted (a multi-use gift card: its value runs out, not its uses).
    let max = c.max_uses;
    if max > 0 && c.uses >= max {
        return Err((
            pb::Reason::CodeUsed,
            format!("code used {} of {max} times", c.uses),
        ));
    }
    Ok(())
}

/// A catalog code a checkout may use: its text and pool, and the uses it allows (0: no
/// limit, a multi-use gift card).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocked {
    pub code: String,
    pub pool_id: String,
    pub max_uses: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code() -> PoolCode {
        PoolCode {
            code: "SPR-1234-AB".into(),
            pool_id: "p".into(),
            reward_id: "r".into(),
            max_uses: 1,
            ..Default::default()
        }
    }

    fn reason(c: &PoolCode, customer: &str, now: i64) -> Option<pb::Reason> {
        check(c, customer, now).err().map(|(r, _)| r)
    }

    #[test]
    fn a_fresh_code_is_usable_by_anyone() {
        assert_eq!(reason(&code(), "alice", 10), None);
    }

    #[test]
    fn every_refusal_has_its_own_reason() {
        let off = PoolCode {
            disabled: true,
            ..code()
        };
        assert_eq!(reason(&off, "alice", 10), Some(pb::Reason::Disabled));
        let pool_off = PoolCode {
            pool_disabled: true,
            ..code()
        };
        assert_eq!(reason(&pool_off, "alice", 10), Some(pb::Reason::Disabled));
        let reward_off = PoolCode {
            reward_disabled: true,
            ..code()
        };
        assert_eq!(reason(&reward_off, "alice", 10), Some(pb::Reason::Disabled));
        let later = PoolCode {
            starts_at: Some(11),
            ..code()
        };
        assert_eq!(reason(&later, "alice", 10), Some(pb::Reason::NotStarted));
        let over = PoolCode {
            ends_at: Some(10),
            ..code()
        };
        assert_eq!(reason(&over, "alice", 10), Some(pb::Reason::Ended));
        let bobs = PoolCode {
            customer_id: "bob".into(),
            ..code()
        };
        assert_eq!(
            reason(&bobs, "alice", 10),
            Some(pb::Reason::CodeOfAnotherCustomer)
        );
        assert_eq!(reason(&bobs, "bob", 10), None);
        let used = PoolCode { uses: 1, ..code() };
        assert_eq!(reason(&used, "alice", 10), Some(pb::Reason::CodeUsed));
    }

    #[test]
    fn codes_are_matched_in_upper_case() {
        assert_eq!(normalize("  spr-1234-ab "), "SPR-1234-AB");
    }

    proptest! {
        /// An N-use code takes exactly N uses, whoever uses it; 0 counts none.
        #[test]
        fn an_n_use_code_takes_exactly_n(max in 0i64..50, uses in 0i64..100) {
            let c = PoolCode { max_uses: max, uses, ..code() };
            let usable = check(&c, "alice", 10).is_ok();
            prop_assert_eq!(usable, max == 0 || uses < max);
        }

        /// A kill switch refuses whatever else holds.
        #[test]
        fn a_switch_wins(which in 0u8..3, uses in 0i64..3, owner in "[a-c]?") {
            let c = PoolCode {
                disabled: which == 0,
                pool_disabled: which == 1,
                reward_disabled: which == 2,
                uses,
                customer_id: owner,
                max_uses: 5,
                ..code()
            };
            prop_assert_eq!(reason(&c, "a", 10), Some(pb::Reason::Disabled));
        }
    }
}
