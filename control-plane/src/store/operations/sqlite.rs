//! [`super::OperationsStore`] on SQLite (one process: no notifications;
//! a single writer, so clearing a finished request needs no lock).

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::store::sqlite::{from_ms, ms, opt_ms, push_scope, uuid, SqliteStore};
use crate::store::{StoreError, StoreResult};

const COLUMNS: &str =
    "c.id, c.organization_id, c.server_id, r.argv, c.timeout_ms, c.max_output_bytes, c.status, \
     c.exit_code, c.signal, c.reason, c.output, c.output_truncated, c.cancel_requested, \
     c.created_by, c.created_at, c.started_at, c.finished_at, c.claimed_by, c.deliver_by";

/// Commands with their requests (aliases `c` and `r`).
const FROM: &str = "commands c JOIN command_requests r ON r.id = c.request_id";

/// Clears the sealed values of the request of command `?` once none of its
/// commands is queued or running.
const CLEAR_FINISHED_REQUEST: &str =
    "UPDATE command_requests SET env_sealed = NULL, stdin_sealed = NULL
     WHERE id = (SELECT request_id FROM commands WHERE id = ?)
       AND (env_sealed IS NOT NULL OR stdin_sealed IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM commands a WHERE a.request_id = command_requests.id
                       AND a.status IN ('queued', 'running'))";

fn argv_of(text: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("command argv: {e}")))
}

fn state_of(text: &str) -> StoreResult<CommandState> {
    CommandState::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown command status {text:?}")))
}

fn record_from_row(row: &SqliteRow) -> StoreResult<CommandRecord> {
    Ok(CommandRecord {
        id: uuid(&row.try_get::<String, _>("id")?)?,
        organization_id: uuid(&row.try_get::<String, _>("organization_id")?)?,
        server_id: uuid(&row.try_get::<String, _>("server_id")?)?,
        argv: argv_of(&row.try_get::<String, _>("argv")?)?,
        timeout_ms: row.try_get("timeout_ms")?,
        max_output_bytes: row.try_get("max_output_bytes")?,
        status: state_of(&row.try_get::<String, _>("status")?)?,
        exit_code: row.try_get("exit_code")?,
        signal: row.try_get("signal")?,
        reason: row.try_get("reason")?,
        output: row.try_get("output")?,
        output_truncated: row.try_get("output_truncated")?,
        cancel_requested: row.try_get("cancel_requested")?,
        created_by: row.try_get("created_by")?,
        created_at: from_ms(row.try_get("created_at")?),
        started_at: opt_ms(row.try_get("started_at")?),
        finished_at: opt_ms(row.try_get("finished_at")?),
        claimed_by: row.try_get("claimed_by")?,
        deliver_by: from_ms(row.try_get("deliver_by")?),
    })
}

#[async_trait::async_trait]
impl OperationsStore for SqliteStore {
    async fn create_commands(
        &self,
        request: &NewCommandRequest,
        commands: &[NewCommand],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let argv = serde_json::to_string(&request.argv)
            .map_err(|e| StoreError::Corrupt(format!("command argv: {e}")))?;
        sqlx::query(
            "INSERT INTO command_requests (id, argv, env_sealed, stdin_sealed, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(request.id.to_string())
        .bind(argv)
        .bind(&request.env_sealed)
        .bind(&request.stdin_sealed)
        .bind(ms(request.created_at))
        .execute(&mut *tx)
        .await?;
        for command in commands {
            let (status, started_at) = match command.claimed_by {
                Some(_) => (CommandState::Running, Some(ms(command.created_at))),
                None => (CommandState::Queued, None),
            };
            sqlx::query(
                "INSERT INTO commands (id, request_id, organization_id, server_id,
                 timeout_ms, max_output_bytes, status, created_by, created_at, started_at,
                 claimed_by, deliver_by)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(command.id.to_string())
            .bind(command.request_id.to_string())
            .bind(command.organization_id.to_string())
            .bind(command.server_id.to_string())
            .bind(command.timeout_ms)
            .bind(command.max_output_bytes)
            .bind(status.as_str())
            .bind(&command.created_by)
            .bind(ms(command.created_at))
            .bind(started_at)
            .bind(&command.claimed_by)
            .bind(ms(command.deliver_by))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn command(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<CommandRecord>> {
        let mut builder = QueryBuilder::new(format!("SELECT {COLUMNS} FROM {FROM} WHERE c.id = "));
        builder.push_bind(id.to_string());
        if let Some(scope) = scope {
            push_scope(&mut builder, "c.organization_id", scope);
        }
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn claim_command(
        &self,
        id: Uuid,
        worker: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<ClaimedCommand>> {
        let row = sqlx::query(
            "UPDATE commands SET status = 'running', claimed_by = ?, started_at = ?
             WHERE id = ? AND status = 'queued' AND deliver_by >= ?
             RETURNING id, request_id, organization_id, server_id, timeout_ms,
                       max_output_bytes, cancel_requested",
        )
        .bind(worker)
        .bind(ms(at))
        .bind(id.to_string())
        .bind(ms(at))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        // The request keeps its sealed values while this command runs.
        let request_id = uuid(&row.try_get::<String, _>("request_id")?)?;
        let request =
            sqlx::query("SELECT argv, env_sealed, stdin_sealed FROM command_requests WHERE id = ?")
                .bind(request_id.to_string())
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("command {id} has no request")))?;
        Ok(Some(ClaimedCommand {
            id: uuid(&row.try_get::<String, _>("id")?)?,
            request_id,
            organization_id: uuid(&row.try_get::<String, _>("organization_id")?)?,
            server_id: uuid(&row.try_get::<String, _>("server_id")?)?,
            argv: argv_of(&request.try_get::<String, _>("argv")?)?,
            env_sealed: request.try_get("env_sealed")?,
            stdin_sealed: request.try_get("stdin_sealed")?,
            timeout_ms: row.try_get("timeout_ms")?,
            max_output_bytes: row.try_get("max_output_bytes")?,
            cancel_requested: row.try_get("cancel_requested")?,
        }))
    }

    async fn queued_commands(
        &self,
        server_id: Option<Uuid>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, Uuid)>> {
        let mut builder = QueryBuilder::new(
            "SELECT id, server_id FROM commands WHERE status = 'queued' AND deliver_by >= ",
        );
        builder.push_bind(ms(now));
        if let Some(server_id) = server_id {
            builder
                .push(" AND server_id = ")
                .push_bind(server_id.to_string());
        }
        builder
            .push(" ORDER BY created_at, id LIMIT ")
            .push_bind(i64::from(limit));
        let rows: Vec<(String, String)> = builder.build_query_as().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|(id, server)| Ok((uuid(id)?, uuid(server)?)))
            .collect()
    }

    async fn append_command_output(
        &self,
        id: Uuid,
        chunk: &[u8],
        truncated: bool,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE commands SET output = CAST(output || ? AS BLOB),
                 output_truncated = output_truncated OR ?
             WHERE id = ? AND status = 'running'",
        )
        .bind(chunk)
        .bind(truncated)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn finish_command(&self, id: Uuid, finish: &CommandFinish) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "UPDATE commands SET status = ?, exit_code = ?, signal = ?, reason = ?,
                 output = CAST(output || ? AS BLOB), output_truncated = output_truncated OR ?,
                 finished_at = ?
             WHERE id = ? AND status = 'running'",
        )
        .bind(finish.status.as_str())
        .bind(finish.exit_code)
        .bind(finish.signal)
        .bind(&finish.reason)
        .bind(&finish.output_tail)
        .bind(finish.output_truncated)
        .bind(ms(finish.at))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 1 {
            sqlx::query(CLEAR_FINISHED_REQUEST)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(result.rows_affected() == 1)
    }

    async fn cancel_command(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<CancelOutcome> {
        let Some(record) = self.command(Some(scope), id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        let mut tx = self.pool.begin().await?;
        let queued = sqlx::query(
            "UPDATE commands SET status = 'cancelled', cancel_requested = 1, finished_at = ?,
                 reason = 'cancelled before delivery'
             WHERE id = ? AND status = 'queued'",
        )
        .bind(ms(at))
        .bind(record.id.to_string())
        .execute(&mut *tx)
        .await?;
        if queued.rows_affected() == 1 {
            sqlx::query(CLEAR_FINISHED_REQUEST)
                .bind(record.id.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(CancelOutcome::CancelledQueued);
        }
        tx.commit().await?;
        let running = sqlx::query(
            "UPDATE commands SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
        )
        .bind(record.id.to_string())
        .execute(&self.pool)
        .await?;
        if running.rows_affected() == 1 {
            return Ok(CancelOutcome::Requested);
        }
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM commands WHERE id = ?")
            .bind(record.id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match status {
            Some(status) => Ok(CancelOutcome::AlreadyFinished(state_of(&status)?)),
            None => Ok(CancelOutcome::NotFound),
        }
    }

    async fn mark_undeliverable(&self, now: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE commands SET status = 'undeliverable', finished_at = ?,
                 reason = 'the server did not connect before the delivery deadline'
             WHERE status = 'queued' AND deliver_by < ?
             RETURNING id",
        )
        .bind(ms(now))
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            sqlx::query(CLEAR_FINISHED_REQUEST)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        ids.iter().map(|id| uuid(id)).collect()
    }

    async fn active_commands_on_server(&self, server_id: Uuid) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM commands WHERE server_id = ? AND status IN ('queued', 'running')",
        )
        .bind(server_id.to_string())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn notify_commands(&self, _payload: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn command_notifications(&self) -> StoreResult<Option<CommandNotifications>> {
        Ok(None)
    }
}
