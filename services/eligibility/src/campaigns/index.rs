//! The per-tenant index of compiled campaigns (pure): grouped by segment, cart keys, code
//! and event type, so a qualification visits only the groups that can apply.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::compile::*;

/// A set of strings on the request path (a fast, seeded hash: the keys are bounded).
pub type FastSet = HashSet<String, foldhash::fast::RandomState>;

type FastMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The keys of a cart: `sku:…`, `cat:…`, `col:…`.
pub fn cart_keys(cart: &tessera_effects::Cart) -> FastSet {
    let mut keys = FastSet::default();
    for line in &cart.lines {
        keys.insert(format!("sku:{}", line.sku));
        for c in &line.categories {
            keys.insert(format!("cat:{c}"));
        }
        for c in &line.collections {
            keys.insert(format!("col:{c}"));
        }
    }
    keys
}

#[derive(Debug, Default)]
struct Group {
    by_item: FastMap<Vec<u32>>,
    any_item: Vec<u32>,
}

/// What the cheap checks of one campaign read, laid out flat (segment and cart keys as
/// interned numbers) so classifying every campaign of a large tenant stays a linear scan
/// over one array instead of a walk through each campaign's heap objects.
#[derive(Debug)]
pub struct Pre {
    pub active: bool,
    pub starts_at: i64,
    pub ends_at: i64,
    pub windowed: bool,
    pub segments: Box<[u32]>,
    pub needs_code: bool,
    pub event: Option<u32>,
    pub items: Box<[Box<[u32]>]>,
}

/// What a request brings to the cheap checks, as interned numbers.
pub struct Presence {
    /// `present[k]`: the customer is in segment `k`, or the cart holds key `k`, or the
    /// event is of type `k` (one number space).
    present: Vec<bool>,
}

impl Presence {
    pub fn has(&self, k: u32) -> bool {
        self.present.get(k as usize).copied().unwrap_or(false)
    }
}

/// One tenant's campaigns, compiled and indexed.
#[derive(Debug, Default)]
pub struct Index {
    pub version: i64,
    /// By id.
    pub campaigns: Vec<Arc<Compiled>>,
    /// Per campaign (same order): the cheap checks' inputs.
    pub pre: Vec<Pre>,
    /// Segment ids, cart keys and event types (prefixed `seg:`, `sku:`/`cat:`/`col:`,
    /// `evt:`) → their number.
    names: FastMap<u32>,
    by_segment: FastMap<Group>,
    by_code: FastMap<Vec<u32>>,
    /// Every campaign's codes, live or not (redemption tells a disabled or ended code from
    /// one the tenant does not have).
    all_codes: FastMap<Vec<u32>>,
    /// Every campaign by the catalog pools whose codes unlock it, live or not.
    by_pool: FastMap<Vec<u32>>,
    /// Campaigns whose rule needs an event of one type.
    by_event: FastMap<Vec<u32>>,
    /// Active campaigns with earning rules or triggers (with or without a checkout effect):
    /// what a recorded order or event is looked at by.
    pub earning: Vec<Arc<Compiled>>,
}

impl Index {
    pub(crate) fn build(version: i64, mut campaigns: Vec<Arc<Compiled>>) -> Self {
        campaigns.sort_by(|a, b| a.def.id.cmp(&b.def.id));
        let mut index = Index {
            version,
            ..Default::default()
        };
        index.earning = campaigns
            .iter()
            .filter(|c| c.active() && !(c.earning.is_empty() && c.triggers.is_empty()))
            .cloned()
            .collect();
        // Loyalty campaigns that only earn are no incentive at checkout.
        campaigns.retain(|c| c.application.is_some());
        for (i, c) in campaigns.iter().enumerate() {
            let i = i as u32;
            for code in &c.def.codes {
                index.all_codes.entry(code.clone()).or_default().push(i);
            }
            for pool in &c.def.pool_ids {
                index.by_pool.entry(pool.clone()).or_default().push(i);
            }
            if !c.active() {
                continue;
            }
            // Unlocked by its pools' codes only: never automatic.
            if c.def.codes.is_empty() && !c.def.pool_ids.is_empty() {
                continue;
            }
            if !c.def.codes.is_empty() {
                for code in &c.def.codes {
                    index.by_code.entry(code.clone()).or_default().push(i);
                }
                continue;
            }
            if let Some(t) = c.rule.as_ref().and_then(|r| r.event_type.clone()) {
                index.by_event.entry(t).or_default().push(i);
                continue;
            }
            let segments: Vec<&str> = if c.def.segments.is_empty() {
                vec![""]
            } else {
                c.def.segments.iter().map(String::as_str).collect()
            };
            for s in segments {
                let group = index.by_segment.entry(s.to_string()).or_default();
                // Indexed on the first group; the other groups are checked by the scan.
                match c.item_keys.first() {
                    None => group.any_item.push(i),
                    Some(first) => {
                        for k in first {
                            group.by_item.entry(k.clone()).or_default().push(i);
                        }
                    }
                }
            }
        }
        let mut intern = |name: String| -> u32 {
            let next = index.names.len() as u32;
            *index.names.entry(name).or_insert(next)
        };
        index.pre = campaigns
            .iter()
            .map(|c| Pre {
                active: c.active(),
                starts_at: c.starts_at,
                ends_at: c.ends_at.unwrap_or(i64::MAX),
                windowed: !c.windows.is_empty(),
                segments: c
                    .def
                    .segments
                    .iter()
                    .map(|s| intern(format!("seg:{s}")))
                    .collect(),
                needs_code: !c.def.codes.is_empty() || !c.def.pool_ids.is_empty(),
                event: c
                    .rule
                    .as_ref()
                    .and_then(|r| r.event_type.as_ref())
                    .map(|t| intern(format!("evt:{t}"))),
                items: c
                    .item_keys
                    .iter()
                    .map(|g| g.iter().map(|k| intern(k.clone())).collect())
                    .collect(),
            })
            .collect();
        index.campaigns = campaigns;
        index
    }

    /// The campaign with this id.
    pub fn find(&self, id: &str) -> Option<u32> {
        self.campaigns
            .binary_search_by(|c| c.def.id.as_str().cmp(id))
            .ok()
            .map(|i| i as u32)
    }

    /// The campaigns a code belongs to, live or not.
    pub fn code_owners(&self, code: &str) -> &[u32] {
        self.all_codes.get(code).map_or(&[], Vec::as_slice)
    }

    /// The campaigns a catalog pool's codes unlock, live or not.
    pub fn pool_owners(&self, pool: &str) -> &[u32] {
        self.by_pool.get(pool).map_or(&[], Vec::as_slice)
    }

    /// The request's segments, cart keys and event type as numbers of this index.
    pub fn presence<'a>(
        &self,
        segments: impl IntoIterator<Item = &'a String>,
        keys: &FastSet,
        event_type: Option<&str>,
    ) -> Presence {
        let mut present = vec![false; self.names.len()];
        let mut mark = |name: &str| {
            if let Some(k) = self.names.get(name) {
                present[*k as usize] = true;
            }
        };
        for s in segments {
            mark(&format!("seg:{s}"));
        }
        for k in keys {
            mark(k);
        }
        if let Some(t) = event_type {
            mark(&format!("evt:{t}"));
        }
        Presence { present }
    }

    /// Positions of the campaigns worth evaluating, ascending, without duplicates.
    pub fn candidates(
        &self,
        segments: &FastSet,
        keys: &FastSet,
        codes: &[String],
        event_type: Option<&str>,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        let groups = std::iter::once("")
            .chain(segments.iter().map(String::as_str))
            .filter_map(|s| self.by_segment.get(s));
        for group in groups {
            out.extend_from_slice(&group.any_item);
            if group.by_item.len() < keys.len() {
                for (k, list) in &group.by_item {
                    if keys.contains(k) {
                        out.extend_from_slice(list);
                    }
                }
            } else {
                for k in keys {
                    if let Some(list) = group.by_item.get(k) {
                        out.extend_from_slice(list);
                    }
                }
            }
        }
        for code in codes {
            if let Some(list) = self.by_code.get(code) {
                out.extend_from_slice(list);
            }
        }
        if let Some(list) = event_type.and_then(|t| self.by_event.get(t)) {
            out.extend_from_slice(list);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
