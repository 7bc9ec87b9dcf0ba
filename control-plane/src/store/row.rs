//! Column types: how each backend encodes ids, times and JSON documents, behind
//! one [`StoreRow`] trait, so that a table's row is mapped to its domain type
//! once (a `from_row` generic over the backend) instead of once per backend.
//!
//! SQLite keeps ids as UUID text, times as unix milliseconds and JSON as text;
//! PostgreSQL has native `uuid`, `timestamptz` and `jsonb` columns.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::{Organization, Quotas, Server, ServerStatus, StoreError, StoreResult};

/// A row of either backend, read column by column in domain types.
pub(crate) trait StoreRow {
    fn id(&self, column: &str) -> StoreResult<Uuid>;
    fn opt_id(&self, column: &str) -> StoreResult<Option<Uuid>>;
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>>;
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>>;
    /// A JSON document column, deserialized.
    fn json<T: DeserializeOwned>(&self, column: &str) -> StoreResult<T>;
    fn text(&self, column: &str) -> StoreResult<String>;
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>>;
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn opt_int(&self, column: &str) -> StoreResult<Option<i64>>;
    fn float(&self, column: &str) -> StoreResult<f64>;
    fn flag(&self, column: &str) -> StoreResult<bool>;
}

/// Plain columns (text, integers, booleans) decode alike on both backends.
macro_rules! plain_columns {
    () => {
        fn text(&self, column: &str) -> StoreResult<String> {
            Ok(self.try_get(column)?)
        }
        fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
            Ok(self.try_get(column)?)
        }
        fn int(&self, column: &str) -> StoreResult<i64> {
            Ok(self.try_get(column)?)
        }
        fn opt_int(&self, column: &str) -> StoreResult<Option<i64>> {
            Ok(self.try_get(column)?)
        }
        fn float(&self, column: &str) -> StoreResult<f64> {
            Ok(self.try_get(column)?)
        }
        fn flag(&self, column: &str) -> StoreResult<bool> {
            Ok(self.try_get(column)?)
        }
    };
}

impl StoreRow for SqliteRow {
    fn id(&self, column: &str) -> StoreResult<Uuid> {
        super::sqlite::uuid(self.try_get(column)?)
    }
    fn opt_id(&self, column: &str) -> StoreResult<Option<Uuid>> {
        super::sqlite::opt_uuid(self.try_get(column)?)
    }
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>> {
        Ok(super::sqlite::from_ms(self.try_get(column)?))
    }
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        Ok(super::sqlite::opt_ms(self.try_get(column)?))
    }
    fn json<T: DeserializeOwned>(&self, column: &str) -> StoreResult<T> {
        let text: &str = self.try_get(column)?;
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("invalid json: {e}")))
    }
    plain_columns!();
}

impl StoreRow for PgRow {
    fn id(&self, column: &str) -> StoreResult<Uuid> {
        Ok(self.try_get(column)?)
    }
    fn opt_id(&self, column: &str) -> StoreResult<Option<Uuid>> {
        Ok(self.try_get(column)?)
    }
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>> {
        Ok(self.try_get(column)?)
    }
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>> {
        Ok(self.try_get(column)?)
    }
    fn json<T: DeserializeOwned>(&self, column: &str) -> StoreResult<T> {
        let Json(value): Json<T> = self.try_get(column)?;
        Ok(value)
    }
    plain_columns!();
}

/// A `servers` row.
pub(crate) fn server_from_row(row: &impl StoreRow) -> StoreResult<Server> {
    let status = row.text("status")?;
    Ok(Server {
        id: row.id("id")?,
        organization_id: row.id("organization_id")?,
        name: row.text("name")?,
        hostname: row.text("hostname")?,
        labels: row.json("labels")?,
        status: ServerStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("invalid status {status:?}")))?,
        status_reason: row.opt_text("status_reason")?,
        agent_version: row.opt_text("agent_version")?,
        facts: row.json("facts")?,
        deployment_id: row.opt_id("deployment_id")?,
        created_at: row.time("created_at")?,
        last_seen_at: row.opt_time("last_seen_at")?,
    })
}

/// An `organizations` row.
pub(crate) fn organization_from_row(row: &impl StoreRow) -> StoreResult<Organization> {
    Ok(Organization {
        id: row.id("id")?,
        name: row.text("name")?,
        parent_id: row.opt_id("parent_id")?,
        quotas: Quotas {
            max_servers: row.opt_int("max_servers")?,
            max_cpu_cores: row.opt_int("max_cpu_cores")?,
            max_memory_gb: row.opt_int("max_memory_gb")?,
            max_monthly_cost_usd: row.opt_int("max_monthly_cost_usd")?,
        },
        created_at: row.time("created_at")?,
    })
}
