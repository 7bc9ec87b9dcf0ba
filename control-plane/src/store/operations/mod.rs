//! Health results, pushed health checks, commands and their output.
//!
//! The trait is part of [`super::Store`]; each database implements it in its
//! own file (`sqlite.rs`, `postgres.rs`), covered by the shared store suite.

mod postgres;
mod sqlite;

/// Storage of this area. See the module doc.
#[async_trait::async_trait]
pub trait OperationsStore: Send + Sync {}
