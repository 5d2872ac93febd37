//! Customer facts: tenant settings, declared attributes, profiles, orders and custom events,
//! and the aggregates rules read (rolling windows computed from the facts themselves, so
//! they are exact at any moment). Every change to a customer's facts bumps its
//! `facts_version`, which versions the cached segment membership.
//!
//! Each file uses only those before it: [`settings`], [`attributes`], [`profiles`],
//! [`orders`], [`events`], [`aggregates`].

pub(crate) mod aggregates;
pub(crate) mod attributes;
pub(crate) mod events;
pub(crate) mod orders;
pub(crate) mod profiles;
pub(crate) mod settings;

pub use self::aggregates::*;
pub use self::attributes::*;
pub use self::events::*;
pub use self::orders::*;
pub use self::profiles::*;
pub use self::settings::*;
