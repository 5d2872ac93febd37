//! Ledger writes and reads. Every function takes the tenant and filters on it; writes run
//! inside the caller's transaction. Every credit creates a lot; debits and expiry consume
//! lots (recorded in `lot_consumptions`), so a balance always equals its postings and the
//! remaining value of its lots.
//!
//! Layered, each file using only those above it: [`accounts`], [`postings`], [`lots`],
//! then the operations [`credit`], [`debit`], [`expire`], and the reads in [`queries`].

pub(crate) mod accounts;
pub(crate) mod credit;
pub(crate) mod debit;
pub(crate) mod expire;
pub(crate) mod lots;
pub(crate) mod postings;
pub(crate) mod queries;

pub use self::accounts::*;
pub use self::credit::*;
pub use self::debit::*;
pub use self::expire::*;
pub(crate) use self::lots::*;
pub use self::postings::*;
pub use self::queries::*;

/// Largest single amount accepted (points or minor units); far above any real credit, far
/// below where sums could overflow 64 bits. The suite's one limit (`tessera_money`).
pub use tessera_money::MAX_AMOUNT;

pub use tessera_store::api::check_customer_id;
