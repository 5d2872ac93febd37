//! Request checks and response parts every service's handlers share: idempotency keys, ids
//! this API issued, and cursor pages.

use tessera_proto::common::v1::{PageRequest, PageResponse};
use tessera_runtime::error::Violations;

/// Adds a violation unless `key` is a well-formed idempotency key.
pub fn check_idempotency_key(v: &mut Violations, key: &str) {
    if let Err(e) = crate::idempotency::validate_key(key) {
        for violation in e.field_violations {
            v.add(violation.field, violation.description);
        }
    }
}

/// Adds a violation unless `id` is an id this API returned (a UUID).
pub fn check_id(v: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        v.add(field, "is required");
    } else if uuid::Uuid::parse_str(id).is_err() {
        v.add(field, "is not an id returned by this API");
    }
}

/// Customer ids are the tenant's own: 1 to 128 visible ASCII characters.
pub fn check_customer_id(v: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        v.add(field, "is required");
    } else if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        v.add(field, "must be 1 to 128 visible ASCII characters");
    }
}

/// The limit and cursor of a page request whose cursors are ids (UUIDs).
pub fn page(v: &mut Violations, page: Option<PageRequest>) -> (u32, String) {
    let page = page.unwrap_or_default();
    let limit = v.page_limit(page.limit);
    if !page.starting_after.is_empty() && uuid::Uuid::parse_str(&page.starting_after).is_err() {
        v.add(
            "page.starting_after",
            "is not a cursor returned by this API",
        );
    }
    (limit, page.starting_after)
}

/// The page part of a list response: the cursor is the last id when more follow.
pub fn page_response(has_more: bool, last_id: Option<&str>) -> Option<PageResponse> {
    Some(PageResponse {
        next_cursor: last_id.filter(|_| has_more).unwrap_or_default().to_string(),
        has_more,
    })
}

/// A language tag as messages use it (BCP 47, simplified): a 2–3 letter lower-case
/// language, then subtags of 2–8 letters or digits (`it`, `it-IT`, `zh-Hant-TW`).
pub fn is_locale(s: &str) -> bool {
    let mut parts = s.split('-');
    s.len() <= 35
        && parts.next().is_some_and(|l| {
            (2..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_lowercase())
        })
        && parts.all(|p| (2..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}
