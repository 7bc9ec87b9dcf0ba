//! [`super::HealthStore`] on SQLite.

use super::HealthStore;
use crate::store::sqlite::SqliteStore;

#[async_trait::async_trait]
impl HealthStore for SqliteStore {}
