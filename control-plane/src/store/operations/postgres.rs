//! [`super::OperationsStore`] on PostgreSQL. Replicas route commands with
//! `NOTIFY tether_commands` / `LISTEN`; claims are conditional `UPDATE`s, so
//! exactly one replica dispatches a queued command.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::*;
use crate::store::postgres::PostgresStore;
use crate::store::{StoreError, StoreResult};

const COLUMNS: &str =
    "c.id, c.organization_id, c.server_id, r.argv, c.timeout_ms, c.max_output_bytes, c.status, \
     c.exit_code, c.signal, c.reason, c.output, c.output_truncated, c.cancel_requested, \
     c.created_by, c.created_at, c.started_at, c.finished_at, c.claimed_by, c.deliver_by";

/// Commands with their requests (aliases `c` and `r`).
const FROM: &str = "commands c JOIN command_requests r ON r.id = c.request_id";

/// Clears the sealed values of the requests of `commands` (which just
/// ended) once none of their commands is queued or running. The requests
/// are locked first, and checked in a statement of their own (a fresh
/// snapshot): of two commands of one request ending at once, the one
/// locking second sees the other ended.
async fn clear_finished_requests(
    tx: &mut sqlx::PgConnection,
    commands: &[Uuid],
) -> StoreResult<()> {
    if commands.is_empty() {
        return Ok(());
    }
    let requests: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM command_requests
         WHERE id IN (SELECT request_id FROM commands WHERE id = ANY($1))
           AND (env_sealed IS NOT NULL OR stdin_sealed IS NOT NULL)
         ORDER BY id FOR UPDATE",
    )
    .bind(commands)
    .fetch_all(&mut *tx)
    .await?;
    if requests.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE command_requests r SET env_sealed = NULL, stdin_sealed = NULL
         WHERE r.id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM commands a WHERE a.request_id = r.id
                           AND a.status IN ('queued', 'running'))",
    )
    .bind(&requests)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn state_of(text: &str) -> StoreResult<CommandState> {
    CommandState::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown command status {text:?}")))
}

fn record_from_row(row: &PgRow) -> StoreResult<CommandRecord> {
    let Json(argv): Json<Vec<String>> = row.try_get("argv")?;
    Ok(CommandRecord {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        server_id: row.try_get("server_id")?,
        argv,
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
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        claimed_by: row.try_get("claimed_by")?,
        deliver_by: row.try_get("deliver_by")?,
    })
}

#[async_trait::async_trait]
impl OperationsStore for PostgresStore {
    async fn create_commands(
        &self,
        request: &NewCommandRequest,
        commands: &[NewCommand],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO command_requests (id, argv, env_sealed, stdin_sealed, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(request.id)
        .bind(Json(&request.argv))
        .bind(&request.env_sealed)
        .bind(&request.stdin_sealed)
        .bind(request.created_at)
        .execute(&mut *tx)
        .await?;
        for command in commands {
            let (status, started_at) = match command.claimed_by {
                Some(_) => (CommandState::Running, Some(command.created_at)),
                None => (CommandState::Queued, None),
            };
            sqlx::query(
                "INSERT INTO commands (id, request_id, organization_id, server_id,
                 timeout_ms, max_output_bytes, status, created_by, created_at, started_at,
                 claimed_by, deliver_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(command.id)
            .bind(command.request_id)
            .bind(command.organization_id)
            .bind(command.server_id)
            .bind(command.timeout_ms)
            .bind(command.max_output_bytes)
            .bind(status.as_str())
            .bind(&command.created_by)
            .bind(command.created_at)
            .bind(started_at)
            .bind(&command.claimed_by)
            .bind(command.deliver_by)
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
        let row = match scope {
            Some(scope) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM {FROM} WHERE c.id = $1 AND c.organization_id = ANY($2)"
                ))
                .bind(id)
                .bind(scope)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM {FROM} WHERE c.id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.as_ref().map(record_from_row).transpose()
    }

    async fn claim_command(
        &self,
        id: Uuid,
        worker: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<ClaimedCommand>> {
        let row = sqlx::query(
            "UPDATE commands c SET status = 'running', claimed_by = $1, started_at = $2
             FROM command_requests r
             WHERE c.id = $3 AND c.status = 'queued' AND c.deliver_by >= $2
               AND r.id = c.request_id
             RETURNING c.id, c.request_id, c.organization_id, c.server_id, r.argv,
                       r.env_sealed, r.stdin_sealed, c.timeout_ms, c.max_output_bytes,
                       c.cancel_requested",
        )
        .bind(worker)
        .bind(at)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let Json(argv): Json<Vec<String>> = row.try_get("argv")?;
        Ok(Some(ClaimedCommand {
            id: row.try_get("id")?,
            request_id: row.try_get("request_id")?,
            organization_id: row.try_get("organization_id")?,
            server_id: row.try_get("server_id")?,
            argv,
            env_sealed: row.try_get("env_sealed")?,
            stdin_sealed: row.try_get("stdin_sealed")?,
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
        Ok(sqlx::query_as(
            "SELECT id, server_id FROM commands
             WHERE status = 'queued' AND deliver_by >= $1
               AND ($2::uuid IS NULL OR server_id = $2)
             ORDER BY created_at, id LIMIT $3",
        )
        .bind(now)
        .bind(server_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn append_command_output(
        &self,
        id: Uuid,
        chunk: &[u8],
        truncated: bool,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE commands SET output = output || $1, output_truncated = output_truncated OR $2
             WHERE id = $3 AND status = 'running'",
        )
        .bind(chunk)
        .bind(truncated)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn finish_command(&self, id: Uuid, finish: &CommandFinish) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "UPDATE commands SET status = $1, exit_code = $2, signal = $3, reason = $4,
                 output = output || $5, output_truncated = output_truncated OR $6,
                 finished_at = $7
             WHERE id = $8 AND status = 'running'",
        )
        .bind(finish.status.as_str())
        .bind(finish.exit_code)
        .bind(finish.signal)
        .bind(&finish.reason)
        .bind(&finish.output_tail)
        .bind(finish.output_truncated)
        .bind(finish.at)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() == 1 {
            clear_finished_requests(&mut tx, &[id]).await?;
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
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, bool)> = sqlx::query_as(
            "WITH target AS (
                 SELECT id, status FROM commands
                 WHERE id = $1 AND organization_id = ANY($2) FOR UPDATE
             ), changed AS (
                 UPDATE commands c SET
                     status = CASE WHEN t.status = 'queued' THEN 'cancelled' ELSE c.status END,
                     finished_at = CASE WHEN t.status = 'queued' THEN $3 ELSE c.finished_at END,
                     reason = CASE WHEN t.status = 'queued' THEN 'cancelled before delivery'
                                   ELSE c.reason END,
                     cancel_requested = true
                 FROM target t
                 WHERE c.id = t.id AND t.status IN ('queued', 'running')
                 RETURNING c.id
             )
             SELECT t.status, EXISTS (SELECT 1 FROM changed) FROM target t",
        )
        .bind(id)
        .bind(scope)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((status, true)) = &row {
            if status == CommandState::Queued.as_str() {
                clear_finished_requests(&mut tx, &[id]).await?;
            }
        }
        tx.commit().await?;
        Ok(match row {
            None => CancelOutcome::NotFound,
            Some((status, changed)) => match (state_of(&status)?, changed) {
                (CommandState::Queued, true) => CancelOutcome::CancelledQueued,
                (CommandState::Running, true) => CancelOutcome::Requested,
                (state, _) => CancelOutcome::AlreadyFinished(state),
            },
        })
    }

    async fn mark_undeliverable(&self, now: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE commands SET status = 'undeliverable', finished_at = $1,
                 reason = 'the server did not connect before the delivery deadline'
             WHERE status = 'queued' AND deliver_by < $1
             RETURNING id",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        clear_finished_requests(&mut tx, &ids).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn active_commands_on_server(&self, server_id: Uuid) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM commands WHERE server_id = $1 AND status IN ('queued', 'running')",
        )
        .bind(server_id)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn notify_commands(&self, payload: &str) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(COMMAND_CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn command_notifications(&self) -> StoreResult<Option<CommandNotifications>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(COMMAND_CHANNEL).await?;
        let stream = listener
            .into_stream()
            .filter_map(|notification| async move {
                match notification {
                    Ok(notification) => Some(notification.payload().to_string()),
                    Err(e) => {
                        tracing::warn!(error = %e, "command notifications: listener error");
                        None
                    }
                }
            });
        Ok(Some(Box::pin(stream)))
    }
}
