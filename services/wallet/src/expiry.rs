//! When points expire. A programme's policy turns the moment a lot was earned into the first
//! instant it is no longer spendable, computed on the calendar of the programme's time zone:
//!
//! * `Never`;
//! * `OnDate(d)`: at the end of day `d`;
//! * `AfterDays(n)` / `AfterMonths(n)`: at the end of the day `n` days / months after the
//!   earning day (a month end is clamped: 31 Jan + 1 month → 28/29 Feb);
//! * `EndOfPeriod { period, count }`: at the end of the period (month, quarter, year) that
//!   lies `count` periods after the one the lot was earned in — "2 years, bucketed by
//!   quarter" is `EndOfPeriod { Quarter, 8 }`: earned 1 Jan–31 Mar 2019 → valid through
//!   31 Mar 2021.
//!
//! "End of day" means midnight at the start of the next local day, converted to UTC; a lot is
//! expired when `now >= expires_at`. Local midnights that do not exist (a DST gap) resolve to
//! the first instant after the gap.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// A calendar period for bucketed expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Month,
    Quarter,
    Year,
}

impl Period {
    fn months(self) -> u32 {
        match self {
            Period::Month => 1,
            Period::Quarter => 3,
            Period::Year => 12,
        }
    }
}

/// How long earned points stay spendable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExpiryPolicy {
    Never,
    OnDate { date: NaiveDate },
    AfterDays { days: u32 },
    AfterMonths { months: u32 },
    EndOfPeriod { period: Period, count: u32 },
}

/// The first UTC instant of local day `date` in `tz`.
fn start_of_day(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    match tz.from_local_datetime(&midnight) {
        chrono::LocalResult::Single(t) => t.with_timezone(&Utc),
        chrono::LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        // Midnight falls in a DST gap: the day starts when the gap ends. Gaps are at most a
        // few hours; step forward by minutes until the local time exists.
        chrono::LocalResult::None => (1..=24 * 60)
            .find_map(|m| {
                tz.from_local_datetime(&(midnight + chrono::Duration::minutes(m)))
                    .earliest()
            })
            .expect("a DST gap ends within a day")
            .with_timezone(&Utc),
    }
}

/// The instant the day after `last_valid_day` begins in `tz`.
fn end_of_day(last_valid_day: NaiveDate, tz: Tz) -> Option<DateTime<Utc>> {
    Some(start_of_day(
        last_valid_day.checked_add_days(Days::new(1))?,
        tz,
    ))
}

impl ExpiryPolicy {
    /// When a lot earned at `earned_at` expires (`None`: never).
    pub fn expires_at(&self, earned_at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let earned_day = earned_at.with_timezone(&tz).date_naive();
        match *self {
            ExpiryPolicy::Never => None,
            ExpiryPolicy::OnDate { date } => end_of_day(date, tz),
            ExpiryPolicy::AfterDays { days } => {
                end_of_day(earned_day.checked_add_days(Days::new(u64::from(days)))?, tz)
            }
            ExpiryPolicy::AfterMonths { months } => {
                end_of_day(earned_day.checked_add_months(Months::new(months))?, tz)
            }
            ExpiryPolicy::EndOfPeriod { period, count } => {
                let len = period.months();
                let first_month = (earned_day.month0() / len) * len;
                let period_start = NaiveDate::from_ymd_opt(earned_day.year(), first_month + 1, 1)?;
                // The period `count` after the earning one ends where the next one starts.
                let next_start = period_start.checked_add_months(Months::new(len * (count + 1)))?;
                Some(start_of_day(next_start, tz))
            }
        }
    }

    /// Checks the policy's numbers are sensible; the message names what is wrong.
    pub fn validate(&self) -> Result<(), &'static str> {
        match *self {
            ExpiryPolicy::AfterDays { days: 0 } | ExpiryPolicy::AfterMonths { months: 0 } => {
                Err("must be at least 1")
            }
            ExpiryPolicy::AfterDays { days } if days > 36_500 => Err("must be at most 100 years"),
            ExpiryPolicy::AfterMonths { months } if months > 1_200 => {
                Err("must be at most 100 years")
            }
            ExpiryPolicy::EndOfPeriod { count, .. } if count > 400 => {
                Err("must be at most 400 periods")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const TWO_YEARS_BY_QUARTER: ExpiryPolicy = ExpiryPolicy::EndOfPeriod {
        period: Period::Quarter,
        count: 8,
    };

    #[test]
    fn quarter_buckets_from_the_product_brief() {
        let tz = chrono_tz::UTC;
        // Earned 1 Jan – 31 Mar 2019 → expire 31 Mar 2021 (valid through that day).
        for earned in [
            "2019-01-01T00:00:00Z",
            "2019-02-14T12:00:00Z",
            "2019-03-31T23:59:59Z",
        ] {
            assert_eq!(
                TWO_YEARS_BY_QUARTER.expires_at(utc(earned), tz),
                Some(utc("2021-04-01T00:00:00Z")),
                "{earned}"
            );
        }
        // Earned 1 Oct – 31 Dec 2019 → expire 31 Dec 2021.
        for earned in [
            "2019-10-01T00:00:00Z",
            "2019-10-15T09:30:00Z",
            "2019-12-31T23:59:59Z",
        ] {
            assert_eq!(
                TWO_YEARS_BY_QUARTER.expires_at(utc(earned), tz),
                Some(utc("2022-01-01T00:00:00Z")),
                "{earned}"
            );
        }
    }

    #[test]
    fn buckets_follow_the_programme_time_zone() {
        let rome: Tz = "Europe/Rome".parse().unwrap();
        // 23:30 UTC on 31 Mar is already 1 Apr in Rome: the lot belongs to Q2, which ends
        // (two years on) at midnight 1 Jul 2021 Rome time = 22:00 UTC on 30 Jun.
        assert_eq!(
            TWO_YEARS_BY_QUARTER.expires_at(utc("2019-03-31T23:30:00Z"), rome),
            Some(utc("2021-06-30T22:00:00Z"))
        );
        // 21:30 UTC on 31 Mar is still 31 Mar in Rome (CEST, +2): Q1, expiring at midnight
        // 1 Apr 2021 Rome = 22:00 UTC on 31 Mar.
        assert_eq!(
            TWO_YEARS_BY_QUARTER.expires_at(utc("2019-03-31T21:30:00Z"), rome),
            Some(utc("2021-03-31T22:00:00Z"))
        );
        // In New York (UTC−5 in winter), 03:00 UTC on 1 Jan is still 31 Dec: the lot is Q4 2019.
        let ny: Tz = "America/New_York".parse().unwrap();
        assert_eq!(
            TWO_YEARS_BY_QUARTER.expires_at(utc("2020-01-01T03:00:00Z"), ny),
            Some(utc("2022-01-01T05:00:00Z"))
        );
    }

    #[test]
    fn days_months_and_dates() {
        let tz = chrono_tz::UTC;
        let earned = utc("2024-01-31T10:00:00Z");
        assert_eq!(ExpiryPolicy::Never.expires_at(earned, tz), None);
        assert_eq!(
            ExpiryPolicy::AfterDays { days: 30 }.expires_at(earned, tz),
            Some(utc("2024-03-02T00:00:00Z"))
        );
        // 31 Jan + 1 month clamps to 29 Feb (leap year); valid through that day.
        assert_eq!(
            ExpiryPolicy::AfterMonths { months: 1 }.expires_at(earned, tz),
            Some(utc("2024-03-01T00:00:00Z"))
        );
        let date = NaiveDate::from_ymd_opt(2024, 12, 31).unwrap();
        assert_eq!(
            ExpiryPolicy::OnDate { date }.expires_at(earned, tz),
            Some(utc("2025-01-01T00:00:00Z"))
        );
        assert_eq!(
            ExpiryPolicy::EndOfPeriod {
                period: Period::Month,
                count: 0
            }
            .expires_at(earned, tz),
            Some(utc("2024-02-01T00:00:00Z"))
        );
        assert_eq!(
            ExpiryPolicy::EndOfPeriod {
                period: Period::Year,
                count: 1
            }
            .expires_at(earned, tz),
            Some(utc("2026-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn dst_transitions_are_handled() {
        // Santiago skips midnight when DST starts (e.g. 2022-09-11 00:00 → 01:00).
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let date = NaiveDate::from_ymd_opt(2022, 9, 10).unwrap();
        let end = ExpiryPolicy::OnDate { date }
            .expires_at(utc("2022-01-01T00:00:00Z"), santiago)
            .unwrap();
        assert_eq!(
            end,
            utc("2022-09-11T04:00:00Z"),
            "the first instant of 11 Sep local"
        );
        // Rome: the autumn change (27 Oct 2024) does not move midnight; the day is 25 h long.
        let rome: Tz = "Europe/Rome".parse().unwrap();
        let days = ExpiryPolicy::AfterDays { days: 1 };
        assert_eq!(
            days.expires_at(utc("2024-10-26T10:00:00Z"), rome),
            Some(utc("2024-10-27T23:00:00Z"))
        );
        // And the spring change (31 Mar 2024): 23 h day.
        assert_eq!(
            days.expires_at(utc("2024-03-30T10:00:00Z"), rome),
            Some(utc("2024-03-31T22:00:00Z"))
        );
    }

    #[test]
    fn nonsense_policies_are_refused() {
        assert!(ExpiryPolicy::AfterDays { days: 0 }.validate().is_err());
        assert!(
            ExpiryPolicy::AfterMonths { months: 5000 }
                .validate()
                .is_err()
        );
        assert!(TWO_YEARS_BY_QUARTER.validate().is_ok());
    }
}
