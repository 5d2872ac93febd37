//! Usage counters and limits, pure: a campaign's counts ([`Usage`]), the check of its
//! budgets and per-customer limits against them, and the tenant-local periods per-period
//! limits count in (calendar day, ISO week from Monday, month, in the tenant's time zone).

use chrono::{Datelike, NaiveDate, TimeZone};
use tessera_proto::eligibility::v1 as pb;

use crate::facts::Settings;

/// Why a campaign does not apply, or `Ok`.
pub type Verdict = Result<(), (pb::Reason, String)>;

fn reject(reason: pb::Reason, detail: impl Into<String>) -> Verdict {
    Err((reason, detail.into()))
}

/// A campaign's usage counters (`campaign_usage` plus its shards).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub redemptions: i64,
    pub discount_total: i64,
    pub order_value_total: i64,
    /// The customer's redemptions in the current period (campaigns with a per-period limit).
    pub customer_period: i64,
}

/// Usage counters by campaign id.
pub type UsageMap = std::collections::HashMap<String, Usage>;

/// The campaign's budgets and the customer's limit, before this order: `discount` and
/// `order_value` are what this order would add (0 at qualification, where a budget with
/// anything left qualifies).
pub fn check_limits(
    limits: Option<&pb::Limits>,
    usage: Usage,
    customer: i64,
    discount_added: i64,
    order_value: i64,
) -> Verdict {
    let Some(l) = limits else {
        return Ok(());
    };
    let Usage {
        redemptions,
        discount_total: discount,
        order_value_total,
        customer_period,
    } = usage;
    if l.max_redemptions > 0 && redemptions >= l.max_redemptions {
        return reject(
            pb::Reason::BudgetExhausted,
            format!("{redemptions} of {} redemptions used", l.max_redemptions),
        );
    }
    // A sum past the largest amount is past every budget.
    let over =
        |used: i64, added: i64, max: i64| !tessera_money::add(used, added).is_ok_and(|t| t <= max);
    if l.max_discount_total > 0
        && (discount >= l.max_discount_total
            || over(discount, discount_added, l.max_discount_total))
    {
        return reject(
            pb::Reason::BudgetExhausted,
            format!(
                "{discount} of {} discount budget used",
                l.max_discount_total
            ),
        );
    }
    if l.max_order_value_total > 0 && over(order_value_total, order_value, l.max_order_value_total)
    {
        return reject(
            pb::Reason::BudgetExhausted,
            format!(
                "{order_value_total} of {} order-value budget used",
                l.max_order_value_total
            ),
        );
    }
    if l.max_redemptions_per_customer > 0 && customer >= l.max_redemptions_per_customer {
        return reject(
            pb::Reason::CustomerLimitReached,
            format!(
                "customer used it {customer} of {} times",
                l.max_redemptions_per_customer
            ),
        );
    }
    if l.max_redemptions_per_customer_per_period > 0
        && customer_period >= l.max_redemptions_per_customer_per_period
    {
        return reject(
            pb::Reason::CustomerLimitReached,
            format!(
                "customer used it {customer_period} of {} times this {}",
                l.max_redemptions_per_customer_per_period,
                period_name(l.period())
            ),
        );
    }
    Ok(())
}

/// A period in words: "day", "week", "month".
pub fn period_name(p: pb::Period) -> String {
    p.as_str_name().trim_start_matches("PERIOD_").to_lowercase()
}

/// The start (µs) of the tenant-local period holding `now`.
pub fn period_start(period: pb::Period, now: i64, settings: &Settings) -> i64 {
    let local = settings.local(now).date_naive();
    let first = match period {
        pb::Period::Week => {
            local - chrono::Days::new(u64::from(local.weekday().num_days_from_monday()))
        }
        pb::Period::Month => {
            NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap_or(local)
        }
        _ => local,
    };
    day_start(first, settings).unwrap_or(now)
}

/// The first moment (µs) of a local day: its midnight, or, where the clocks jump over
/// midnight (Rome on 1 June 1975), the first minute of that day the clocks show.
fn day_start(day: NaiveDate, settings: &Settings) -> Option<i64> {
    let midnight = day.and_hms_opt(0, 0, 0)?;
    (0..24 * 60).find_map(|minute| {
        settings
            .time_zone
            .from_local_datetime(&(midnight + chrono::Duration::minutes(minute)))
            .earliest()
            .map(|t| t.timestamp_micros())
    })
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDateTime, Timelike};
    use proptest::prelude::*;

    use super::*;

    fn rome() -> Settings {
        Settings {
            time_zone: chrono_tz::Europe::Rome,
            ..Settings::default()
        }
    }

    /// µs of a Rome wall-clock time (the earlier one when it occurs twice).
    fn at(local: &str) -> i64 {
        let t = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M").expect("time");
        chrono_tz::Europe::Rome
            .from_local_datetime(&t)
            .earliest()
            .expect("exists")
            .timestamp_micros()
    }

    #[test]
    fn periods_start_at_local_midnight_across_daylight_saving() {
        let s = rome();
        // The day clocks go forward (23 hours) and back (25 hours).
        assert_eq!(
            period_start(pb::Period::Day, at("2026-03-29 12:00"), &s),
            at("2026-03-29 00:00")
        );
        assert_eq!(
            at("2026-03-30 00:00") - at("2026-03-29 00:00"),
            23 * 3_600_000_000
        );
        assert_eq!(
            period_start(pb::Period::Day, at("2026-10-25 23:30"), &s),
            at("2026-10-25 00:00")
        );
        // Weeks start on Monday, months on the 1st, both at local midnight.
        assert_eq!(
            period_start(pb::Period::Week, at("2026-03-29 12:00"), &s),
            at("2026-03-23 00:00")
        );
        assert_eq!(
            period_start(pb::Period::Month, at("2026-11-01 00:30"), &s),
            at("2026-11-01 00:00")
        );
        assert_eq!(
            period_start(pb::Period::Month, at("2026-10-31 23:59"), &s),
            at("2026-10-01 00:00")
        );
        // On 1 June 1975 Rome's clocks went from 00:00 straight to 01:00: the day, and
        // the month, start at 01:00, whatever the moment of that day asked about.
        for moment in ["1975-06-01 01:00", "1975-06-01 13:45", "1975-06-30 23:59"] {
            assert_eq!(
                period_start(pb::Period::Month, at(moment), &s),
                at("1975-06-01 01:00"),
                "{moment}"
            );
        }
    }

    fn limits() -> pb::Limits {
        pb::Limits {
            max_redemptions: 10,
            max_discount_total: 1_000,
            max_redemptions_per_customer: 2,
            max_order_value_total: 0,
            max_redemptions_per_customer_per_period: 1,
            period: pb::Period::Week as i32,
            max_uses_per_code: 0,
        }
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        let l = limits();
        let fresh = Usage::default();
        assert_eq!(check_limits(Some(&l), fresh, 0, 500, 0), Ok(()));
        assert_eq!(
            check_limits(
                None,
                Usage {
                    redemptions: 99,
                    ..fresh
                },
                99,
                0,
                0
            ),
            Ok(())
        );
        let used = |u: Usage, customer: i64, discount: i64| {
            check_limits(Some(&l), u, customer, discount, 0).map_err(|(r, _)| r)
        };
        assert_eq!(
            used(
                Usage {
                    redemptions: 10,
                    ..fresh
                },
                0,
                0
            ),
            Err(pb::Reason::BudgetExhausted)
        );
        assert_eq!(
            used(
                Usage {
                    discount_total: 600,
                    ..fresh
                },
                0,
                401
            ),
            Err(pb::Reason::BudgetExhausted),
            "this order's discount would pass the budget"
        );
        assert_eq!(
            used(
                Usage {
                    discount_total: 600,
                    ..fresh
                },
                0,
                400
            ),
            Ok(())
        );
        assert_eq!(used(fresh, 2, 0), Err(pb::Reason::CustomerLimitReached));
        let (reason, detail) = check_limits(
            Some(&l),
            Usage {
                customer_period: 1,
                ..fresh
            },
            1,
            0,
            0,
        )
        .unwrap_err();
        assert_eq!(reason, pb::Reason::CustomerLimitReached);
        assert!(detail.ends_with("this week"), "{detail}");
    }

    proptest! {
        /// A period holds the moment it starts for, starts a local day (at midnight, or at
        /// the first minute the clocks show where they jump over it), and every moment of
        /// it has the same start.
        #[test]
        fn a_period_holds_now_and_starts_at_local_midnight(
            now in 0i64..4_102_444_800_000_000,
            period in prop::sample::select(vec![pb::Period::Day, pb::Period::Week, pb::Period::Month]),
        ) {
            let s = rome();
            let start = period_start(period, now, &s);
            prop_assert!(start <= now);
            let local = s.local(start);
            prop_assert!(s.local(start - 1).date_naive() < local.date_naive(), "starts a day");
            prop_assert!(local.hour() <= 1 && local.second() == 0);
            prop_assert_eq!(period_start(period, start, &s), start);
            prop_assert!(now - start <= 31 * 25 * 3_600_000_000);
        }

        /// Whatever the counts (up to `i64::MAX`), the check answers without overflowing,
        /// and a budget never admits an order that would pass it.
        #[test]
        fn limits_never_overflow_nor_admit_past_a_budget(
            used in 0i64..=i64::MAX,
            added in 0i64..=i64::MAX,
            max in 1i64..=i64::MAX,
        ) {
            let l = pb::Limits { max_discount_total: max, ..Default::default() };
            let usage = Usage { discount_total: used, ..Usage::default() };
            let ok = check_limits(Some(&l), usage, 0, added, 0).is_ok();
            prop_assert_eq!(ok, used < max && used.checked_add(added).is_some_and(|t| t <= max));
        }
    }
}
