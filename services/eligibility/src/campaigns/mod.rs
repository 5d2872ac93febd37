//! The campaign read model and its index.
//!
//! Campaigns are owned by the campaign scheduler; their eligibility-relevant part reaches
//! this service through `PutCampaign` / `RemoveCampaign` and is stored in `campaigns`, with a
//! per-tenant feed version. Each replica keeps an in-memory [`Index`] per tenant (a
//! [`ReadModel`]), compiled once (rules, effects, windows) and rebuilt incrementally when the
//! feed version moves, so a kill switch lands within a second everywhere.
//!
//! The index exists so qualification does not look at every campaign: active campaigns are
//! grouped by the segment they need (or none), then by the cart keys their effect needs
//! (`sku:…`, `cat:…`, `col:…`, or none); code-only campaigns by code and campaigns whose
//! rule needs an event of one type by that type. A qualification visits only the groups of
//! the customer's segments, the cart's keys, the codes given and the event's type.

pub(crate) mod compile;
pub(crate) mod index;
pub(crate) mod store;

pub use self::compile::*;
pub use self::index::*;
pub use self::store::*;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tessera_proto::catalog::v1 as cpb;
    use tessera_proto::catalog::v1::effect::Kind;
    use tessera_proto::eligibility::v1 as pb;
    use tessera_runtime::error::Violations;

    use super::*;

    fn selector(categories: &[&str]) -> Option<cpb::Selector> {
        Some(cpb::Selector {
            categories: categories.iter().map(|c| (*c).into()).collect(),
            ..Default::default()
        })
    }

    fn campaign(id: &str, kind: Kind) -> pb::Campaign {
        pb::Campaign {
            id: id.into(),
            status: pb::CampaignStatus::Active.into(),
            effect: Some(cpb::Effect { kind: Some(kind) }),
            ..Default::default()
        }
    }

    fn compiled(c: pb::Campaign) -> Arc<Compiled> {
        let mut v = Violations::new();
        let out = compile(&mut v, &c, 1, &BTreeMap::new(), None, 0).expect("compiles");
        assert_eq!(v.count(), 0);
        Arc::new(out)
    }

    fn set(items: &[&str]) -> FastSet {
        items.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn the_index_visits_only_matching_groups() {
        let shoes = campaign(
            "a-shoes",
            Kind::PercentOff(cpb::PercentOff {
                percent_bp: 1000,
                selector: selector(&["shoes"]),
                ..Default::default()
            }),
        );
        let bogo = campaign(
            "b-bogo",
            Kind::BuyXGetY(cpb::BuyXGetY {
                buy: selector(&["socks"]),
                buy_quantity: 2,
                get: selector(&["hats"]),
                get_quantity: 1,
                percent_bp: 10_000,
                ..Default::default()
            }),
        );
        let mut vip = campaign(
            "c-vip",
            Kind::AmountOff(cpb::AmountOff {
                amount: 500,
                ..Default::default()
            }),
        );
        vip.segments = vec!["vip".into()];
        let mut coded = vip.clone();
        coded.id = "d-code".into();
        coded.segments.clear();
        coded.codes = vec!["SPRING".into()];
        let mut review = vip.clone();
        review.id = "e-review".into();
        review.segments.clear();
        review.rule = r#"event.type == "review""#.into();
        let mut off = vip.clone();
        off.id = "f-off".into();
        off.status = pb::CampaignStatus::Disabled.into();
        let index = Index::build(
            7,
            [shoes, bogo, vip, coded, review, off]
                .into_iter()
                .map(compiled)
                .collect(),
        );
        let ids = |found: Vec<u32>| -> Vec<&str> {
            found
                .into_iter()
                .map(|i| index.campaigns[i as usize].def.id.as_str())
                .collect()
        };
        let keys = set(&["cat:shoes", "cat:socks", "sku:X"]);
        assert_eq!(
            ids(index.candidates(&set(&[]), &keys, &[], None)),
            ["a-shoes", "b-bogo"]
        );
        assert_eq!(
            ids(index.candidates(
                &set(&["vip"]),
                &set(&[]),
                &["SPRING".into()],
                Some("review")
            )),
            ["c-vip", "d-code", "e-review"]
        );
        // A buy-X-get-Y needs both sides in the cart: the second group is in its record.
        let bogo_at = 1;
        assert_eq!(index.pre[bogo_at].items.len(), 2);
        let present = index.presence([].iter(), &keys, None);
        assert!(index.pre[bogo_at].items[0].iter().any(|k| present.has(*k)));
        assert!(!index.pre[bogo_at].items[1].iter().any(|k| present.has(*k)));
        assert!(
            !index.pre[5].active,
            "the disabled campaign is kept, not indexed"
        );
    }

    fn utc(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("RFC 3339")
            .timestamp_micros()
    }

    fn windows(list: Vec<pb::TimeWindow>) -> Vec<Window> {
        let mut v = Violations::new();
        let w = compile_windows(
            &mut v,
            "w",
            &list,
            chrono_tz::Europe::Rome,
            utc("2026-01-01T00:00:00Z"),
        );
        v.finish().expect("valid windows");
        w
    }

    /// Friday 17:00-19:00 Europe/Rome, as weekly hours and as a cron window, on both sides of
    /// both daylight-saving changes of 2026 (29 March, 25 October).
    #[test]
    fn windows_follow_the_wall_clock_across_dst() {
        let weekly = windows(vec![pb::TimeWindow {
            days: vec![pb::Weekday::Friday.into()],
            start_minute: 17 * 60,
            end_minute: 19 * 60,
            ..Default::default()
        }]);
        let cron = windows(vec![pb::TimeWindow {
            cron: "0 17 * * FRI".into(),
            duration_minutes: 120,
            ..Default::default()
        }]);
        let rome = chrono_tz::Europe::Rome;
        for (at, open) in [
            // Winter time (UTC+1), the Friday before the spring change.
            ("2026-03-27T15:59:00Z", false),
            ("2026-03-27T16:00:00Z", true),
            ("2026-03-27T17:59:00Z", true),
            ("2026-03-27T18:00:00Z", false),
            // Summer time (UTC+2), the Friday after.
            ("2026-04-03T14:59:00Z", false),
            ("2026-04-03T15:00:00Z", true),
            ("2026-04-03T16:59:00Z", true),
            ("2026-04-03T17:00:00Z", false),
            // Summer time, the Friday before the autumn change.
            ("2026-10-23T15:00:00Z", true),
            ("2026-10-23T17:00:00Z", false),
            // Winter time again, the Friday after.
            ("2026-10-30T15:30:00Z", false),
            ("2026-10-30T16:00:00Z", true),
            ("2026-10-30T17:59:00Z", true),
            ("2026-10-30T18:00:00Z", false),
            // Not a Friday.
            ("2026-10-29T16:30:00Z", false),
        ] {
            assert_eq!(any_open(&weekly, utc(at), rome), open, "weekly at {at}");
            assert_eq!(any_open(&cron, utc(at), rome), open, "cron at {at}");
        }
    }

    /// A daily window at 02:30 on the night the clocks skip 02:00-03:00 still opens (right
    /// after the gap), and on the night 02:00-03:00 happens twice it opens once.
    #[test]
    fn a_cron_window_in_the_skipped_or_repeated_hour() {
        let nightly = windows(vec![pb::TimeWindow {
            cron: "30 2 * * *".into(),
            duration_minutes: 20,
            ..Default::default()
        }]);
        let rome = chrono_tz::Europe::Rome;
        // 29 March: 02:30 does not exist; 03:00 CEST is 01:00 UTC.
        assert!(any_open(&nightly, utc("2026-03-29T01:05:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-03-29T01:40:00Z"), rome));
        // 25 October: 02:30 CEST (00:30 UTC) opens it; 02:30 CET (01:30 UTC) does not again.
        assert!(any_open(&nightly, utc("2026-10-25T00:35:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-10-25T00:55:00Z"), rome));
        assert!(!any_open(&nightly, utc("2026-10-25T01:35:00Z"), rome));
    }

    #[test]
    fn bad_cron_windows_name_the_field() {
        let cases = [
            (
                pb::TimeWindow {
                    cron: "0 0 30 2 *".into(),
                    duration_minutes: 60,
                    ..Default::default()
                },
                "w.0.cron",
            ),
            (
                pb::TimeWindow {
                    cron: "every friday".into(),
                    duration_minutes: 60,
                    ..Default::default()
                },
                "w.0.cron",
            ),
            (
                pb::TimeWindow {
                    cron: "0 17 * * FRI".into(),
                    duration_minutes: 0,
                    ..Default::default()
                },
                "w.0.duration_minutes",
            ),
            (
                pb::TimeWindow {
                    cron: "0 17 * * FRI".into(),
                    duration_minutes: 60,
                    start_minute: 5,
                    ..Default::default()
                },
                "w.0.cron",
            ),
        ];
        for (w, field) in cases {
            let mut v = Violations::new();
            compile_windows(
                &mut v,
                "w",
                std::slice::from_ref(&w),
                chrono_tz::Europe::Rome,
                utc("2026-01-01T00:00:00Z"),
            );
            let err = v.finish().expect_err(field);
            assert_eq!(err.field_violations[0].field, field, "{w:?}: {err:?}");
        }
    }
}
