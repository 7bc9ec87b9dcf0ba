//! [`super::FederationStore`] on SQLite.

use super::FederationStore;
use crate::store::sqlite::SqliteStore;

#[async_trait::async_trait]
impl FederationStore for SqliteStore {}
