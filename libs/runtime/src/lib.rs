//! Runtime plumbing every Tessera service shares, so each service crate holds only its domain:
//! configuration ([`config`]), telemetry and W3C trace propagation ([`telemetry`]), the error
//! model mapped to gRPC and HTTP ([`error`]), the tenant/principal request context
//! ([`context`]), graceful shutdown ([`shutdown`]), the gRPC server with health and
//! reflection ([`grpc`]), Prometheus metrics ([`metrics`]) and the unit a service hands to it
//! ([`component`]).

pub mod auth;
pub mod bin;
pub mod component;
pub mod config;
pub mod context;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod ops;
pub mod sealing;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use context::RequestContext;
pub use error::{Code, Error, FieldViolation};
