//! The cart-effect engine: what rewards do to a cart. Pure (no I/O, no clock), so the
//! catalog's previews and eligibility's qualification and redemption compute the very same
//! adjustments. [`engine`] holds the model and `apply`; [`wire`] converts the protobuf form,
//! checking every field.

pub mod ceiling;
pub mod engine;
pub mod wire;

#[cfg(test)]
mod tests;

pub use ceiling::{Ceiling, check_junior};
pub use engine::{
    Adjustment, Allocation, Application, Cart, Effect, Line, Outcome, Selector, Target, apply,
};
