//! Usage counters: the pure limits and periods ([`core`]) and their rows ([`store`]:
//! per-campaign counters in shards, per-customer and per-code uses, budget slices).

pub(crate) mod core;
pub(crate) mod store;

pub(crate) use store::*;
