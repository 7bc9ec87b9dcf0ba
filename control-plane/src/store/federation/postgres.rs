//! [`super::FederationStore`] on PostgreSQL.

use super::FederationStore;
use crate::store::postgres::PostgresStore;

#[async_trait::async_trait]
impl FederationStore for PostgresStore {}
