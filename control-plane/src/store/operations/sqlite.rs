//! [`super::OperationsStore`] on SQLite.

use super::OperationsStore;
use crate::store::sqlite::SqliteStore;

#[async_trait::async_trait]
impl OperationsStore for SqliteStore {}
