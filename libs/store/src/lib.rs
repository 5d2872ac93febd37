//! Storage plumbing shared by the services: one connection type for SQLite and PostgreSQL
//! chosen by URL ([`db`]), migrations run at start ([`migrate`]), idempotency keys
//! ([`idempotency`]), the transactional outbox with its relay ([`outbox`]) and the durable
//! work queue with the command outbox ([`queue`]). Tables that
//! belong to a domain live in the service that owns them.

pub mod api;
pub mod clock;
pub mod db;
pub mod idempotency;
pub mod migrate;
pub mod outbox;
pub mod privacy;
pub mod queue;
pub mod retention;

pub use db::{Backend, Db, db_error, insert_rows, now_micros, stmt, tuples};
