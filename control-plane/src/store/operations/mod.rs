//! Commands sent to agents: requests, per-server status and bounded output.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite.

mod postgres;
mod sqlite;

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait OperationsStore: Send + Sync {}
