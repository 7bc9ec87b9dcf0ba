//! [`super::WebhookStore`] on SQLite.

use super::WebhookStore;
use crate::store::sqlite::SqliteStore;

#[async_trait::async_trait]
impl WebhookStore for SqliteStore {}
