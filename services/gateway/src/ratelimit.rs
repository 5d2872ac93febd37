//! Rate limits per API key and per customer (GCRA, the `governor` crate), checked when a
//! request's key is authenticated. Every limited answer carries the IETF draft headers
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds), of the tighter
//! of the two limits; a refused one is 429 with `Retry-After`. The customer is the one a
//! route names (`/v1/customers/{id}/…`), within the key's tenant.
//!
//! Limits are per gateway replica: with N replicas behind a balancer a key gets up to N
//! times its limit.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tessera_runtime::config::GatewayConfig;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// What the headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the limit is whole again.
    pub reset_secs: u64,
    /// Set when the request is refused: seconds before a retry can pass.
    pub retry_after: Option<u64>,
}

/// Writes the headers of a checked request.
pub fn write_headers(info: &Info, headers: &mut http::HeaderMap) {
    for (name, value) in [
        ("ratelimit-limit", Some(u64::from(info.limit))),
        ("ratelimit-remaining", Some(u64::from(info.remaining))),
        ("ratelimit-reset", Some(info.reset_secs)),
        ("retry-after", info.retry_after),
    ] {
        if let Some(v) = value {
            headers.insert(name, http::HeaderValue::from(v));
        }
    }
}

/// The gateway's limiters.
pub struct Limits {
    per_key: Option<(Keyed, u32)>,
    per_customer: Option<(Keyed, u32)>,
    checks: AtomicU64,
}

fn limiter(per_minute: u32) -> Option<(Keyed, u32)> {
    let n = NonZeroU32::new(per_minute)?;
    Some((
        RateLimiter::dashmap(Quota::per_minute(n)).with_middleware::<StateInformationMiddleware>(),
        per_minute,
    ))
}

/// The customer a path names (`/v1/customers/{id}/…`).
fn customer_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/customers/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

impl Limits {
    pub fn new(config: &GatewayConfig) -> Self {
        Self {
            per_key: limiter(config.rate_limit_per_key_per_minute),
            per_customer: limiter(config.rate_limit_per_customer_per_minute),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request of `key_id` (and of the customer its path names); the tighter
    /// limit's state, refused (`retry_after` set) when either is spent.
    pub fn check(&self, key_id: &str, tenant: &str, path: &str) -> Option<Info> {
        // Forget idle keys now and then, so the state stays as big as the active set.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 10_000 == 9_999 {
            for (l, _) in [&self.per_key, &self.per_customer].into_iter().flatten() {
                l.retain_recent();
            }
        }
        let customer = customer_of(path).map(|c| format!("{tenant}/{c}"));
        let checks = [
            self.per_key.as_ref().map(|l| (l, key_id.to_string())),
            self.per_customer.as_ref().zip(customer),
        ];
        let mut tightest: Option<Info> = None;
        for ((limiter, limit), key) in checks.into_iter().flatten() {
            let per_cell = Duration::from_secs(60) / *limit;
            let info = match limiter.check_key(&key) {
                Ok(state) => {
                    let remaining = state.remaining_burst_capacity();
                    Info {
                        limit: *limit,
                        remaining,
                        reset_secs: (per_cell * (*limit - remaining)).as_secs_f64().ceil() as u64,
                        retry_after: None,
                    }
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    Info {
                        limit: *limit,
                        remaining: 0,
                        reset_secs: (per_cell * *limit).as_secs_f64().ceil() as u64,
                        retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
                    }
                }
            };
            let tighter = tightest.is_none_or(|t| {
                info.retry_after.is_some() && t.retry_after.is_none()
                    || (info.retry_after.is_none() == t.retry_after.is_none()
                        && info.remaining < t.remaining)
            });
            if tighter {
                tightest = Some(info);
            }
        }
        tightest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customers_are_read_from_the_path() {
        assert_eq!(customer_of("/v1/customers/ada/wallet"), Some("ada"));
        assert_eq!(customer_of("/v1/customers/ada"), Some("ada"));
        assert_eq!(customer_of("/v1/customers/"), None);
        assert_eq!(customer_of("/v1/campaigns/x"), None);
    }

    #[test]
    fn the_tighter_limit_is_reported_and_refuses() {
        let limits = Limits::new(&GatewayConfig {
            rate_limit_per_key_per_minute: 10,
            rate_limit_per_customer_per_minute: 2,
            ..GatewayConfig::default()
        });
        let first = limits
            .check("k", "t", "/v1/customers/ada/wallet")
            .expect("limited");
        assert_eq!(
            (first.limit, first.remaining, first.retry_after),
            (2, 1, None)
        );
        limits.check("k", "t", "/v1/customers/ada/wallet");
        let refused = limits
            .check("k", "t", "/v1/customers/ada/wallet")
            .expect("limited");
        assert_eq!((refused.limit, refused.remaining), (2, 0));
        assert!(refused.retry_after.is_some_and(|s| (1..=30).contains(&s)));
        // Another customer of the same key: the key's own limit (7 of 10 left after 3).
        let other = limits
            .check("k", "t", "/v1/customers/bob")
            .expect("limited");
        assert_eq!((other.limit, other.retry_after), (2, None));
        let keyed = limits.check("k", "t", "/v1/campaigns").expect("limited");
        assert_eq!((keyed.limit, keyed.remaining), (10, 5));
    }
}
