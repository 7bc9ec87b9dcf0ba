//! [`super::OperationsStore`] on PostgreSQL.

use super::OperationsStore;
use crate::store::postgres::PostgresStore;

#[async_trait::async_trait]
impl OperationsStore for PostgresStore {}
