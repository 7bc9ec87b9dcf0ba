//! [`super::WebhookStore`] on PostgreSQL.

use super::WebhookStore;
use crate::store::postgres::PostgresStore;

#[async_trait::async_trait]
impl WebhookStore for PostgresStore {}
