//! [`super::HealthStore`] on PostgreSQL.

use super::HealthStore;
use crate::store::postgres::PostgresStore;

#[async_trait::async_trait]
impl HealthStore for PostgresStore {}
