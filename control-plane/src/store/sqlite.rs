//! [`Store`] on an embedded SQLite file (the zero-set-up default).
//!
//! WAL journal, checkpointed in the background (restarted when it grows, so
//! it stays bounded under steady writes), foreign keys on, a busy timeout so
//! concurrent writers queue instead of failing. Write transactions start with
//! a write so they take the database's write lock up front (no read-to-write
//! upgrade deadlocks).
//! Ids are stored as UUID text, times as unix milliseconds, JSON as text.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};
use uuid::Uuid;

pub(crate) use super::row::{organization_from_row, server_from_row};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

pub(crate) fn opt_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_ms)
}

pub(crate) fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Corrupt(format!("invalid uuid {s:?}")))
}

pub(crate) fn opt_uuid(s: Option<String>) -> StoreResult<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

pub(crate) fn json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("invalid json: {e}")))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

pub(crate) const SERVER_COLUMNS: &str =
    "id, organization_id, name, hostname, labels, status, status_reason, \
     agent_version, facts, deployment_id, created_at, last_seen_at";

pub(crate) const CREDENTIAL_COLUMNS: &str = "id, organization_id, name, provider, default_region, \
     credentials_sealed, is_validated, created_at, last_used_at, validation_status, validated_at, \
     validation_error, updated_at";

pub(crate) const STATE_VERSION_COLUMNS: &str =
    "id, deployment_id, version, sha256, size_bytes, serial, restored_from, created_at";

pub(crate) const DEPLOYMENT_COLUMNS: &str =
    "id, organization_id, provider, credential_id, status, server_id, \
     record, bootstrap_token_sealed, created_at, updated_at, completed_at";

/// Inserts a one-time enrollment token (hash only).
pub(crate) async fn insert_enrollment_token<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    token: &NewEnrollmentToken,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO enrollment_tokens
           (id, token_hash, organization_id, server_name, labels, deployment_id, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(token.id.to_string())
    .bind(&token.token_hash)
    .bind(token.organization_id.to_string())
    .bind(&token.server_name)
    .bind(to_json(&token.labels))
    .bind(token.deployment_id.map(|d| d.to_string()))
    .bind(ms(token.created_at))
    .bind(ms(token.expires_at))
    .execute(executor)
    .await?;
    Ok(())
}

/// Creates a deployment's (empty) state row if missing. Being a write, it
/// also takes SQLite's write lock for the rest of the transaction.
pub(crate) async fn ensure_state_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    deployment_id: Uuid,
    at: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO terraform_states (deployment_id, updated_at) VALUES (?, ?)
         ON CONFLICT (deployment_id) DO NOTHING",
    )
    .bind(deployment_id.to_string())
    .bind(ms(at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(crate) fn push_scope(
    builder: &mut QueryBuilder<'_, sqlx::Sqlite>,
    column: &str,
    scope: &[Uuid],
) {
    if scope.is_empty() {
        builder.push(" AND 0");
        return;
    }
    builder.push(format!(" AND {column} IN ("));
    let mut list = builder.separated(", ");
    for id in scope {
        list.push_bind(id.to_string());
    }
    list.push_unseparated(")");
}

/// How often the WAL is checkpointed into the database file.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Frames (pages) the WAL may hold after a checkpoint before the next one
/// makes it start over (~16 MiB at 4 KiB pages).
pub(crate) const WAL_RESTART_FRAMES: i64 = 4096;
/// Page cache per connection, in KiB (negative: SQLite's unit for KiB).
pub(crate) const SQLITE_CACHE_KIB: &str = "-16384";
/// Size the WAL file is cut back to when it starts over.
pub(crate) const WAL_SIZE_LIMIT_BYTES: &str = "67108864";
/// Longest a `RESTART` checkpoint waits for readers of older snapshots (and
/// so holds writers back); past it the next round tries again.
pub(crate) const WAL_RESTART_WAIT_MS: i64 = 250;
/// The pool's busy timeout (see [`SqliteStore::connect`]), restored on the
/// connection a `RESTART` checkpoint ran on.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies the write-ahead log into the database file every
/// [`CHECKPOINT_EVERY`] (`PASSIVE`: never waits for readers or writers), so
/// that no request's commit pays for a checkpoint; ends with the pool.
///
/// A passive checkpoint alone never lets the log start over while writes
/// keep coming (SQLite rewinds the WAL only when a writer finds it wholly
/// copied): under steady ingestion the file grew by gigabytes and every
/// append paid for new file pages. So when a passive checkpoint leaves more
/// than [`WAL_RESTART_FRAMES`] in the log, a `RESTART` checkpoint follows:
/// it copies what the passive one could not (little by then), holding
/// writers back for that moment (at most [`WAL_RESTART_WAIT_MS`] while
/// readers of older snapshots finish), and the next write starts the log
/// over.
pub(crate) async fn checkpoint_loop(pool: SqlitePool) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = checkpoint(&pool, WAL_RESTART_FRAMES).await {
            tracing::debug!(error = %e, "WAL checkpoint failed; the next one retries");
        }
    }
}

/// One round of [`checkpoint_loop`]: a passive checkpoint, then a restarting
/// one when more than `restart_frames` are left in the log.
pub(crate) async fn checkpoint(pool: &SqlitePool, restart_frames: i64) -> Result<(), sqlx::Error> {
    // (busy, frames in the log, frames copied)
    let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    if frames > restart_frames {
        let mut conn = pool.acquire().await?;
        sqlx::query(&format!("PRAGMA busy_timeout = {WAL_RESTART_WAIT_MS}"))
            .execute(&mut *conn)
            .await?;
        let restart: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
                .fetch_one(&mut *conn)
                .await;
        if let Err(e) = sqlx::query(&format!(
            "PRAGMA busy_timeout = {}",
            BUSY_TIMEOUT.as_millis()
        ))
        .execute(&mut *conn)
        .await
        {
            // Never hand the pool a connection with the short timeout.
            drop(conn.detach());
            return Err(e);
        }
        let (busy, _, _) = restart?;
        tracing::debug!(frames, restarted = busy == 0, "WAL checkpoint");
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url`.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // Checkpoints (the only fsyncs with synchronous=NORMAL) run in
            // the background task below, never inside a request's commit.
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", WAL_SIZE_LIMIT_BYTES)
            // 16 MiB of page cache per connection instead of SQLite's 2 MiB:
            // the pages every report touches (the newest index leaf of each
            // server, the latest container sets) outgrow 2 MiB at a few
            // hundred agents, and each miss is a read through the kernel.
            .pragma("cache_size", SQLITE_CACHE_KIB);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        tokio::spawn(checkpoint_loop(pool.clone()));
        Ok(Self { pool })
    }

    pub(crate) async fn server_by_id(&self, id: Uuid) -> StoreResult<Option<Server>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE id = ? AND deleted_at IS NULL"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(server_from_row).transpose()
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn init_instance(
        &self,
        instance: &Instance,
        root: &Organization,
        admin_token: &ApiToken,
    ) -> StoreResult<(Instance, bool)> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO instance (id, branch_id, branch_name, root_organization_id, ca_cert_pem, ca_key_sealed, created_at)
             VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(instance.branch_id.to_string())
        .bind(&instance.branch_name)
        .bind(instance.root_organization_id.to_string())
        .bind(&instance.ca_cert_pem)
        .bind(&instance.ca_key_sealed)
        .bind(ms(instance.created_at))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            tx.rollback().await?;
            let existing = self
                .instance()
                .await?
                .ok_or_else(|| StoreError::Corrupt("instance row vanished".into()))?;
            return Ok((existing, false));
        }
        sqlx::query(
            "INSERT INTO organizations (id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, max_monthly_cost_usd, created_at)
             VALUES (?, ?, NULL, ?, ?, ?, ?, ?)",
        )
        .bind(root.id.to_string())
        .bind(&root.name)
        .bind(root.quotas.max_servers)
        .bind(root.quotas.max_cpu_cores)
        .bind(root.quotas.max_memory_gb)
        .bind(root.quotas.max_monthly_cost_usd)
        .bind(ms(root.created_at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, organization_id, name, scopes, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(admin_token.id.to_string())
        .bind(admin_token.organization_id.to_string())
        .bind(&admin_token.name)
        .bind(to_json(&admin_token.scopes))
        .bind(ms(admin_token.created_at))
        .bind(admin_token.expires_at.map(ms))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((instance.clone(), true))
    }

    async fn instance(&self) -> StoreResult<Option<Instance>> {
        let row = sqlx::query(
            "SELECT branch_id, branch_name, root_organization_id, ca_cert_pem, ca_key_sealed, created_at
             FROM instance WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Instance {
                branch_id: uuid(row.try_get("branch_id")?)?,
                branch_name: row.try_get("branch_name")?,
                root_organization_id: uuid(row.try_get("root_organization_id")?)?,
                ca_cert_pem: row.try_get("ca_cert_pem")?,
                ca_key_sealed: row.try_get("ca_key_sealed")?,
                created_at: from_ms(row.try_get("created_at")?),
            })
        })
        .transpose()
    }

    async fn organization_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE tree (id) AS (
                 SELECT id FROM organizations WHERE id = ? AND deleted_at IS NULL
                 UNION ALL
                 SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id
                 WHERE o.deleted_at IS NULL)
             SELECT id FROM tree",
        )
        .bind(organization_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|s| uuid(s)).collect()
    }

    async fn organization_history_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE tree (id) AS (
                 SELECT id FROM organizations WHERE id = ?
                 UNION ALL
                 SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id)
             SELECT id FROM tree",
        )
        .bind(organization_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        parse_ids(&rows)
    }

    async fn api_token(&self, id: Uuid) -> StoreResult<Option<ApiToken>> {
        let row = sqlx::query(
            "SELECT id, organization_id, name, scopes, created_at, expires_at, revoked_at
             FROM api_tokens WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(ApiToken {
                id: uuid(row.try_get("id")?)?,
                organization_id: uuid(row.try_get("organization_id")?)?,
                name: row.try_get("name")?,
                scopes: json(row.try_get("scopes")?)?,
                created_at: from_ms(row.try_get("created_at")?),
                expires_at: opt_ms(row.try_get("expires_at")?),
                revoked_at: opt_ms(row.try_get("revoked_at")?),
            })
        })
        .transpose()
    }

    async fn create_enrollment_token(&self, token: &NewEnrollmentToken) -> StoreResult<()> {
        insert_enrollment_token(&self.pool, token).await?;
        Ok(())
    }

    async fn enroll(&self, e: &Enrollment) -> StoreResult<Result<Server, EnrollmentRefusal>> {
        let mut tx = self.pool.begin().await?;
        // The first statement writes, so this transaction holds the write
        // lock from here on: a racing enrollment (or an organization's
        // deletion) waits, then finds the token used (or sees this server).
        let claimed = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ?, server_id = ?
             WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?
               AND organization_id IN (SELECT id FROM organizations WHERE deleted_at IS NULL)
             RETURNING organization_id, server_name, labels, deployment_id",
        )
        .bind(ms(e.at))
        .bind(e.server_id.to_string())
        .bind(&e.token_hash)
        .bind(ms(e.at))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(claimed) = claimed else {
            let row = sqlx::query(
                "SELECT t.used_at, t.expires_at, o.id IS NULL OR o.deleted_at IS NOT NULL AS org_gone
                 FROM enrollment_tokens t LEFT JOIN organizations o ON o.id = t.organization_id
                 WHERE t.token_hash = ?",
            )
            .bind(&e.token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(Err(match row {
                None => EnrollmentRefusal::UnknownToken,
                Some(row) if row.try_get::<bool, _>("org_gone")? => {
                    EnrollmentRefusal::OrganizationDeleted
                }
                Some(row) if row.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                    EnrollmentRefusal::TokenAlreadyUsed
                }
                Some(_) => EnrollmentRefusal::ExpiredToken,
            }));
        };
        let organization_id: String = claimed.try_get("organization_id")?;
        let name: Option<String> = claimed.try_get("server_name")?;
        let labels: String = claimed.try_get("labels")?;
        let deployment_id: Option<String> = claimed.try_get("deployment_id")?;
        // Quotas: what every limited ancestor uses before and after the new
        // server, under the write lock, so racing enrollments cannot both fit.
        let limited = limited_ancestors(&mut tx, &organization_id).await?;
        let mut before = Vec::with_capacity(limited.len());
        for org in &limited {
            before.push(usage_on(&mut tx, org.id).await?);
        }
        sqlx::query(
            "INSERT INTO servers (id, organization_id, name, hostname, labels, status, status_reason,
                                  agent_version, facts, deployment_id, created_at)
             VALUES (?, ?, ?, ?, ?, 'connecting', 'enrolled; waiting for the agent''s first session', ?, ?, ?, ?)",
        )
        .bind(e.server_id.to_string())
        .bind(&organization_id)
        .bind(name.unwrap_or_else(|| e.hostname.clone()))
        .bind(&e.hostname)
        .bind(&labels)
        .bind(&e.agent_version)
        .bind(to_json(&e.facts))
        .bind(&deployment_id)
        .bind(ms(e.at))
        .execute(&mut *tx)
        .await?;
        for (org, before) in limited.iter().zip(before) {
            let after = usage_on(&mut tx, org.id).await?;
            if let Some(q) = super::quota::exceeded_by_growth(org, before, after) {
                tx.rollback().await?;
                return Ok(Err(EnrollmentRefusal::QuotaExceeded {
                    organization_id: q.organization_id,
                    resource: q.resource,
                    limit: q.limit,
                    usage: q.usage,
                }));
            }
        }
        insert_certificate(&mut tx, &e.certificate).await?;
        tx.commit().await?;
        let server = self
            .server_by_id(e.server_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("enrolled server vanished".into()))?;
        Ok(Ok(server))
    }

    async fn enrollment_token_refusal(
        &self,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<EnrollmentRefusal>> {
        let row = sqlx::query(
            "SELECT t.used_at, t.expires_at, o.deleted_at IS NOT NULL AS organization_deleted
             FROM enrollment_tokens t JOIN organizations o ON o.id = t.organization_id
             WHERE t.token_hash = ?",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Some(EnrollmentRefusal::UnknownToken),
            Some(row) if row.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                Some(EnrollmentRefusal::TokenAlreadyUsed)
            }
            // Deleting an organization also expires its tokens: say why.
            Some(row) if row.try_get::<bool, _>("organization_deleted")? => {
                Some(EnrollmentRefusal::OrganizationDeleted)
            }
            Some(row) if row.try_get::<i64, _>("expires_at")? <= ms(at) => {
                Some(EnrollmentRefusal::ExpiredToken)
            }
            Some(_) => None,
        })
    }

    async fn record_certificate(&self, certificate: &CertificateRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        insert_certificate(&mut tx, certificate).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn revoke_certificates_older_than(
        &self,
        server_id: Uuid,
        serial: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<u64> {
        // Called at every session admission: a read first, so that the
        // usual case (nothing to revoke) never takes the write lock.
        let older = "FROM certificates o
             JOIN certificates c ON c.server_id = o.server_id AND c.serial = ?
             WHERE o.server_id = ? AND o.revoked_at IS NULL AND o.issued_at < c.issued_at";
        let pending: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {older}"))
            .bind(serial)
            .bind(server_id.to_string())
            .fetch_one(&self.pool)
            .await?;
        if pending == 0 {
            return Ok(0);
        }
        let revoked = sqlx::query(
            "UPDATE certificates SET revoked_at = ?
             WHERE server_id = ? AND revoked_at IS NULL
               AND issued_at < (SELECT issued_at FROM certificates WHERE serial = ? AND server_id = ?)",
        )
        .bind(ms(at))
        .bind(server_id.to_string())
        .bind(serial)
        .bind(server_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(revoked.rows_affected())
    }

    async fn admit_session(&self, server_id: Uuid, serial: &str) -> StoreResult<SessionAdmission> {
        let server = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS}, deleted_at FROM servers WHERE id = ?"
        ))
        .bind(server_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(server) = server else {
            return Ok(SessionAdmission::UnknownServer);
        };
        if server.try_get::<Option<i64>, _>("deleted_at")?.is_some() {
            return Ok(SessionAdmission::ServerRemoved);
        }
        let cert =
            sqlx::query("SELECT revoked_at FROM certificates WHERE serial = ? AND server_id = ?")
                .bind(serial)
                .bind(server_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(match cert {
            None => SessionAdmission::UnknownCertificate,
            Some(row) if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() => {
                SessionAdmission::CertificateRevoked
            }
            Some(_) => SessionAdmission::Admitted(Box::new(server_from_row(&server)?)),
        })
    }

    async fn mark_online(
        &self,
        server_id: Uuid,
        agent_version: &str,
        facts: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE servers SET status = 'online', status_reason = NULL, agent_version = ?, facts = ?,
                    hostname = COALESCE(json_extract(?, '$.hostname'), hostname), last_seen_at = ?,
                    online_since = ?
             WHERE id = ? AND deleted_at IS NULL",
        )
        .bind(agent_version)
        .bind(to_json(facts))
        .bind(to_json(facts))
        .bind(ms(at))
        .bind(ms(at))
        .bind(server_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_offline(
        &self,
        server_id: Uuid,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE servers SET status = 'offline', status_reason = ?, last_seen_at = ?
             WHERE id = ? AND deleted_at IS NULL AND status = 'online'",
        )
        .bind(reason)
        .bind(ms(at))
        .bind(server_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn touch_servers(&self, server_ids: &[Uuid], at: DateTime<Utc>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in server_ids.chunks(500) {
            let mut builder = QueryBuilder::new("UPDATE servers SET last_seen_at = ");
            builder.push_bind(ms(at));
            builder.push(" WHERE deleted_at IS NULL");
            push_scope(&mut builder, "id", chunk);
            builder.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn server(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Server>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE deleted_at IS NULL AND id = "
        ));
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(server_from_row).transpose()
    }

    async fn list_servers(&self, q: &ServerQuery) -> StoreResult<Vec<Server>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", &q.scope);
        if let Some(status) = q.status {
            builder.push(" AND status = ").push_bind(status.as_str());
        }
        for (key, value) in &q.labels {
            builder
                .push(" AND json_extract(labels, ")
                .push_bind(format!("$.\"{}\"", key.replace('"', "")))
                .push(") = ")
                .push_bind(value.clone());
        }
        if let Some(after) = q.after {
            builder.push(" AND id > ").push_bind(after.to_string());
        }
        builder
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(server_from_row).collect()
    }

    async fn remove_server(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let mut builder = QueryBuilder::new("UPDATE servers SET deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(
            ", status = 'offline', status_reason = 'removed' WHERE deleted_at IS NULL AND id = ",
        );
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let removed = builder.build().execute(&mut *tx).await?.rows_affected() == 1;
        if removed {
            sqlx::query(
                "UPDATE certificates SET revoked_at = ? WHERE server_id = ? AND revoked_at IS NULL",
            )
            .bind(ms(at))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, organization_id, action, target, source_ip, outcome, detail)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(entry.id.to_string())
        .bind(ms(entry.at))
        .bind(&entry.actor)
        .bind(entry.organization_id.map(|o| o.to_string()))
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.source_ip)
        .bind(&entry.outcome)
        .bind(to_json(&entry.detail))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let mut builder = QueryBuilder::new(
            "SELECT seq, id, at, actor, organization_id, action, target, source_ip, outcome, detail FROM audit_log WHERE (1 = 0",
        );
        if !q.scope.is_empty() {
            builder.push(" OR organization_id IN (");
            let mut list = builder.separated(", ");
            for id in &q.scope {
                list.push_bind(id.to_string());
            }
            list.push_unseparated(")");
        }
        if q.include_unscoped {
            builder.push(" OR organization_id IS NULL");
        }
        builder.push(")");
        if let Some(actor) = &q.actor {
            builder.push(" AND actor = ").push_bind(actor.clone());
        }
        if let Some(action) = &q.action {
            builder.push(" AND action = ").push_bind(action.clone());
        }
        if let Some(from) = q.from {
            builder.push(" AND at >= ").push_bind(ms(from));
        }
        if let Some(to) = q.to {
            builder.push(" AND at <= ").push_bind(ms(to));
        }
        if let Some(before) = q.before_seq {
            builder.push(" AND seq < ").push_bind(before);
        }
        builder
            .push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(q.limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    seq: row.try_get("seq")?,
                    entry: AuditEntry {
                        id: uuid(row.try_get("id")?)?,
                        at: from_ms(row.try_get("at")?),
                        actor: row.try_get("actor")?,
                        organization_id: opt_uuid(row.try_get("organization_id")?)?,
                        action: row.try_get("action")?,
                        target: row.try_get("target")?,
                        source_ip: row.try_get("source_ip")?,
                        outcome: row.try_get("outcome")?,
                        detail: json(row.try_get("detail")?)?,
                    },
                })
            })
            .collect()
    }

    async fn create_organization(&self, org: &Organization) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO organizations (id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, max_monthly_cost_usd, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(org.id.to_string())
        .bind(&org.name)
        .bind(org.parent_id.map(|p| p.to_string()))
        .bind(org.quotas.max_servers)
        .bind(org.quotas.max_cpu_cores)
        .bind(org.quotas.max_memory_gb)
        .bind(org.quotas.max_monthly_cost_usd)
        .bind(ms(org.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>> {
        let row = sqlx::query(&format!(
            "SELECT {ORGANIZATION_COLUMNS} FROM organizations WHERE id = ? AND deleted_at IS NULL"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(organization_from_row).transpose()
    }

    async fn list_organizations(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<Organization>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {ORGANIZATION_COLUMNS} FROM organizations WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "id", scope);
        if let Some(after) = after {
            builder.push(" AND id > ").push_bind(after.to_string());
        }
        builder
            .push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(organization_from_row).collect()
    }

    async fn update_organization(
        &self,
        id: Uuid,
        update: &OrganizationUpdate,
    ) -> StoreResult<Option<Organization>> {
        let mut builder = QueryBuilder::new("UPDATE organizations SET id = id");
        if let Some(name) = &update.name {
            builder.push(", name = ").push_bind(name.clone());
        }
        if let Some(quotas) = &update.quotas {
            builder
                .push(", max_servers = ")
                .push_bind(quotas.max_servers);
            builder
                .push(", max_cpu_cores = ")
                .push_bind(quotas.max_cpu_cores);
            builder
                .push(", max_memory_gb = ")
                .push_bind(quotas.max_memory_gb);
            builder
                .push(", max_monthly_cost_usd = ")
                .push_bind(quotas.max_monthly_cost_usd);
        }
        builder
            .push(" WHERE deleted_at IS NULL AND id = ")
            .push_bind(id.to_string());
        builder.build().execute(&self.pool).await?;
        self.organization(id).await
    }

    async fn delete_organization(
        &self,
        id: Uuid,
        cascade: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<OrganizationDeletion> {
        let mut tx = self.pool.begin().await?;
        // Take the write lock first (see the module doc).
        let exists =
            sqlx::query("UPDATE organizations SET name = name WHERE id = ? AND deleted_at IS NULL")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        if !exists {
            tx.rollback().await?;
            return Ok(OrganizationDeletion::NotFound);
        }
        let subtree: Vec<String> = sqlx::query_scalar(SUBTREE_SQL)
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        let server_count: i64 = {
            let mut builder =
                QueryBuilder::new("SELECT COUNT(*) FROM servers WHERE deleted_at IS NULL");
            push_scope(&mut builder, "organization_id", &parse_ids(&subtree)?);
            builder.build_query_scalar().fetch_one(&mut *tx).await?
        };
        if !cascade && subtree.len() > 1 {
            tx.rollback().await?;
            return Ok(OrganizationDeletion::HasChildren);
        }
        if !cascade && server_count > 0 {
            tx.rollback().await?;
            return Ok(OrganizationDeletion::HasServers);
        }
        let ids = parse_ids(&subtree)?;
        let mut builder = QueryBuilder::new("UPDATE certificates SET revoked_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE revoked_at IS NULL AND server_id IN (SELECT id FROM servers WHERE deleted_at IS NULL");
        push_scope(&mut builder, "organization_id", &ids);
        builder.push(")");
        builder.build().execute(&mut *tx).await?;
        let mut builder = QueryBuilder::new("UPDATE servers SET status = 'offline', status_reason = 'organization deleted', deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE deleted_at IS NULL");
        push_scope(&mut builder, "organization_id", &ids);
        builder.push(" RETURNING id");
        let removed: Vec<String> = builder.build_query_scalar().fetch_all(&mut *tx).await?;
        let mut server_ids = parse_ids(&removed)?;
        server_ids.sort();
        let servers = server_ids.len() as u64;
        // Its tokens go with it: API tokens revoked, unused enrollment
        // tokens expired (an enrollment with one is refused as
        // `OrganizationDeleted`).
        let mut builder = QueryBuilder::new("UPDATE api_tokens SET revoked_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE revoked_at IS NULL");
        push_scope(&mut builder, "organization_id", &ids);
        builder.build().execute(&mut *tx).await?;
        let mut builder = QueryBuilder::new("UPDATE enrollment_tokens SET expires_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE used_at IS NULL AND expires_at > ");
        builder.push_bind(ms(at));
        push_scope(&mut builder, "organization_id", &ids);
        builder.build().execute(&mut *tx).await?;
        let mut builder = QueryBuilder::new("UPDATE organizations SET deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE deleted_at IS NULL");
        push_scope(&mut builder, "id", &ids);
        let organizations = builder.build().execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(OrganizationDeletion::Deleted {
            organizations,
            servers,
            server_ids,
        })
    }

    async fn organization_ancestors(&self, id: Uuid) -> StoreResult<Vec<Organization>> {
        let rows = sqlx::query(&format!(
            "WITH RECURSIVE chain (id, depth) AS (
                 SELECT id, 0 FROM organizations WHERE id = ? AND deleted_at IS NULL
                 UNION ALL
                 SELECT o.parent_id, c.depth + 1 FROM organizations o JOIN chain c ON o.id = c.id
                 WHERE o.parent_id IS NOT NULL)
             SELECT {ORGANIZATION_COLUMNS_QUALIFIED} FROM chain JOIN organizations o ON o.id = chain.id
             ORDER BY chain.depth"
        ))
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(organization_from_row).collect()
    }

    async fn organization_usage(&self, id: Uuid) -> StoreResult<Usage> {
        let mut conn = self.pool.acquire().await?;
        usage_on(&mut conn, id).await
    }

    async fn create_api_token(&self, token: &ApiToken) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, organization_id, name, scopes, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(token.id.to_string())
        .bind(token.organization_id.to_string())
        .bind(&token.name)
        .bind(to_json(&token.scopes))
        .bind(ms(token.created_at))
        .bind(token.expires_at.map(ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoke_api_token(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut builder = QueryBuilder::new("UPDATE api_tokens SET revoked_at = ");
        builder.push_bind(ms(at));
        builder
            .push(" WHERE revoked_at IS NULL AND id = ")
            .push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        Ok(builder.build().execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn ensure_instance_secret(&self, name: &str, candidate: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO instance_secrets (name, sealed) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT sealed FROM instance_secrets WHERE name = ?")
                .bind(name)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>> {
        let ca_keys: Vec<String> =
            sqlx::query_scalar("SELECT ca_key_sealed FROM instance WHERE id = 1")
                .fetch_all(&self.pool)
                .await?;
        let named: Vec<(String, String)> =
            sqlx::query_as("SELECT name, sealed FROM instance_secrets ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        let mut rows = Vec::new();
        for kind in SealedKind::ROW_KINDS {
            let Some((table, column, key)) = kind.row_location() else {
                continue;
            };
            let found: Vec<(String, String)> = sqlx::query_as(&format!(
                "SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL AND {column} <> ''"
            ))
            .fetch_all(&self.pool)
            .await?;
            for (id, sealed) in found {
                rows.push((kind, uuid(&id)?, sealed));
            }
        }
        Ok(super::sealed_secret_list(ca_keys, named, rows))
    }

    async fn replace_sealed_secret(
        &self,
        secret: &SealedSecret,
        resealed: &str,
    ) -> StoreResult<bool> {
        let result = match secret.kind {
            SealedKind::InstanceSecret => {
                sqlx::query("UPDATE instance_secrets SET sealed = ? WHERE name = ? AND sealed = ?")
                    .bind(resealed)
                    .bind(&secret.id)
                    .bind(&secret.sealed)
                    .execute(&self.pool)
                    .await?
            }
            SealedKind::InstanceCaKey => {
                sqlx::query(
                    "UPDATE instance SET ca_key_sealed = ? WHERE id = 1 AND ca_key_sealed = ?",
                )
                .bind(resealed)
                .bind(&secret.sealed)
                .execute(&self.pool)
                .await?
            }
            kind @ (SealedKind::CloudCredential
            | SealedKind::TerraformState
            | SealedKind::TerraformStateVersion
            | SealedKind::BootstrapToken
            | SealedKind::WebhookSecret
            | SealedKind::CommandEnv
            | SealedKind::CommandStdin
            | SealedKind::BranchClientKey
            | SealedKind::FederationSigningKey) => {
                let Some((table, column, key)) = kind.row_location() else {
                    return Ok(false);
                };
                sqlx::query(&format!(
                    "UPDATE {table} SET {column} = ? WHERE {key} = ? AND {column} = ?"
                ))
                .bind(resealed)
                .bind(&secret.id)
                .bind(&secret.sealed)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(result.rows_affected() == 1)
    }
}

pub(crate) const ORGANIZATION_COLUMNS: &str =
    "id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, max_monthly_cost_usd, created_at";
pub(crate) const ORGANIZATION_COLUMNS_QUALIFIED: &str =
    "o.id, o.name, o.parent_id, o.max_servers, o.max_cpu_cores, o.max_memory_gb, o.max_monthly_cost_usd, o.created_at";
/// Ids of a live organization and its live descendants (one `?`: the root).
pub(crate) const SUBTREE_SQL: &str = "WITH RECURSIVE tree (id) AS (
         SELECT id FROM organizations WHERE id = ? AND deleted_at IS NULL
         UNION ALL
         SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id WHERE o.deleted_at IS NULL)
     SELECT id FROM tree";

/// What a live organization and its live descendants use (servers, and
/// deployments still provisioning theirs), read on `conn`. CPU and memory:
/// the catalog sizes of committed deployments, and the reported facts of
/// servers enrolled without a deployment (a deployment's server adds nothing
/// when it enrolls: its size was counted when it was requested).
pub(crate) async fn usage_on(conn: &mut sqlx::SqliteConnection, id: Uuid) -> StoreResult<Usage> {
    let row = sqlx::query(&format!(
        "SELECT COUNT(*) AS servers,
                COALESCE(SUM(CASE WHEN deployment_id IS NULL
                                  THEN COALESCE(json_extract(facts, '$.cpu_cores'), 0) END), 0) AS cpu_cores,
                COALESCE(SUM(CASE WHEN deployment_id IS NULL
                                  THEN (COALESCE(json_extract(facts, '$.memory_bytes'), 0) + 1073741823) / 1073741824 END), 0) AS memory_gb
         FROM servers WHERE deleted_at IS NULL AND organization_id IN ({SUBTREE_SQL})"
    ))
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let active = active_statuses_sql();
    let provisioning: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM deployments d
         WHERE d.deleted_at IS NULL AND d.status IN ({active})
           AND d.organization_id IN ({SUBTREE_SQL})
           AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.deployment_id = d.id)"
    ))
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let committed = super::quota::committed_of(&committed_records_on(conn, id).await?);
    Ok(Usage {
        servers: row.try_get::<i64, _>("servers")? + provisioning,
        cpu_cores: row.try_get::<i64, _>("cpu_cores")? + committed.cpu_cores,
        memory_gb: row.try_get::<i64, _>("memory_gb")? + committed.memory_gb,
        committed_monthly_cost_usd: (committed.monthly_cost_usd * 100.0).round() / 100.0,
    })
}

/// Records of the committed deployments (their server runs or is on its
/// way) of a live organization and its live descendants, read on `conn`.
pub(crate) async fn committed_records_on(
    conn: &mut sqlx::SqliteConnection,
    id: Uuid,
) -> StoreResult<Vec<DeploymentRecord>> {
    let committed = super::quota::committed_statuses_sql();
    let records: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT record FROM deployments
         WHERE deleted_at IS NULL AND status IN ({committed}) AND organization_id IN ({SUBTREE_SQL})"
    ))
    .bind(id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    records
        .iter()
        .map(|r| {
            serde_json::from_str(r)
                .map_err(|e| StoreError::Corrupt(format!("deployment record: {e}")))
        })
        .collect()
}

/// What a live organization and its descendants use as quotas count it at
/// provision time: servers as [`usage_on`] counts them, CPU, memory and
/// monthly cost from the catalog sizes of committed deployments.
pub(crate) async fn committed_on(
    conn: &mut sqlx::SqliteConnection,
    id: Uuid,
) -> StoreResult<super::Demand> {
    let usage = usage_on(conn, id).await?;
    Ok(super::Demand {
        servers: usage.servers,
        cpu_cores: usage.cpu_cores,
        memory_gb: usage.memory_gb,
        monthly_cost_usd: super::quota::committed_of(&committed_records_on(conn, id).await?)
            .monthly_cost_usd,
    })
}

/// The organization `organization_id` and its ancestors that set any limit
/// (the monthly cost included), read on `conn`.
pub(crate) async fn any_limited_ancestors(
    conn: &mut sqlx::SqliteConnection,
    organization_id: &str,
) -> StoreResult<Vec<Organization>> {
    let rows = sqlx::query(&format!(
        "WITH RECURSIVE chain (id, depth) AS (
             SELECT id, 0 FROM organizations WHERE id = ?
             UNION ALL
             SELECT o.parent_id, c.depth + 1 FROM organizations o JOIN chain c ON o.id = c.id
             WHERE o.parent_id IS NOT NULL)
         SELECT {ORGANIZATION_COLUMNS_QUALIFIED} FROM chain JOIN organizations o ON o.id = chain.id
         ORDER BY chain.depth"
    ))
    .bind(organization_id)
    .fetch_all(&mut *conn)
    .await?;
    let orgs: StoreResult<Vec<Organization>> = rows.iter().map(organization_from_row).collect();
    Ok(orgs?
        .into_iter()
        .filter(super::quota::has_any_limit)
        .collect())
}

/// The organization `organization_id` and its ancestors that set a limit,
/// read on `conn`.
pub(crate) async fn limited_ancestors(
    conn: &mut sqlx::SqliteConnection,
    organization_id: &str,
) -> StoreResult<Vec<Organization>> {
    let rows = sqlx::query(&format!(
        "WITH RECURSIVE chain (id, depth) AS (
             SELECT id, 0 FROM organizations WHERE id = ?
             UNION ALL
             SELECT o.parent_id, c.depth + 1 FROM organizations o JOIN chain c ON o.id = c.id
             WHERE o.parent_id IS NOT NULL)
         SELECT {ORGANIZATION_COLUMNS_QUALIFIED} FROM chain JOIN organizations o ON o.id = chain.id
         WHERE o.max_servers IS NOT NULL OR o.max_cpu_cores IS NOT NULL OR o.max_memory_gb IS NOT NULL
         ORDER BY chain.depth"
    ))
    .bind(organization_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(organization_from_row).collect()
}

pub(crate) fn parse_ids(ids: &[String]) -> StoreResult<Vec<Uuid>> {
    ids.iter().map(|s| uuid(s)).collect()
}

pub(crate) async fn insert_certificate(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    c: &CertificateRecord,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO certificates (serial, server_id, not_before, not_after, issued_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(&c.serial)
    .bind(c.server_id.to_string())
    .bind(ms(c.not_before))
    .bind(ms(c.not_after))
    .bind(ms(c.issued_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(crate) const METRICS_COLUMNS: &str = "server_id, seq, ts, cpu_percent, load_1, load_5, load_15, memory_used_bytes, \
     memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core, disks, networks, uptime_seconds, \
     process_count, dropped_batches";
pub(crate) const METRICS_COLUMNS_QUALIFIED: &str = "m.server_id, m.seq, m.ts, m.cpu_percent, m.load_1, m.load_5, m.load_15, \
     m.memory_used_bytes, m.memory_total_bytes, m.swap_used_bytes, m.swap_total_bytes, m.cpu_per_core, m.disks, \
     m.networks, m.uptime_seconds, m.process_count, m.dropped_batches";

impl SqliteStore {
    /// Container reports of one server, or of every live server in `scope`.
    pub(crate) async fn container_sets(
        &self,
        server_id: Option<Uuid>,
        scope: &[Uuid],
    ) -> StoreResult<Vec<ContainerSet>> {
        let mut builder = QueryBuilder::new(
            "SELECT r.server_id, r.seq, r.docker_version, r.error, r.updated_at FROM container_reports r
             JOIN servers s ON s.id = r.server_id WHERE s.deleted_at IS NULL",
        );
        match server_id {
            Some(id) => {
                builder
                    .push(" AND r.server_id = ")
                    .push_bind(id.to_string());
            }
            None => push_scope(&mut builder, "s.organization_id", scope),
        }
        builder.push(" ORDER BY r.server_id");
        let reports = builder.build().fetch_all(&self.pool).await?;
        let mut sets = Vec::with_capacity(reports.len());
        for report in reports {
            let id: String = report.try_get("server_id")?;
            let rows = sqlx::query(
                "SELECT container_id, name, image, state, health, restart_count, started_at, cpu_percent,
                        memory_usage_bytes, memory_limit_bytes, net_rx_bytes, net_tx_bytes, block_read_bytes,
                        block_write_bytes
                 FROM containers WHERE server_id = ? ORDER BY name",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?;
            let containers = rows
                .iter()
                .map(|row| {
                    Ok(ContainerRecord {
                        container_id: row.try_get("container_id")?,
                        name: row.try_get("name")?,
                        image: row.try_get("image")?,
                        state: row.try_get("state")?,
                        health: row.try_get("health")?,
                        restart_count: row.try_get("restart_count")?,
                        started_at: row.try_get("started_at")?,
                        cpu_percent: row.try_get("cpu_percent")?,
                        memory_usage_bytes: row.try_get("memory_usage_bytes")?,
                        memory_limit_bytes: row.try_get("memory_limit_bytes")?,
                        net_rx_bytes: row.try_get("net_rx_bytes")?,
                        net_tx_bytes: row.try_get("net_tx_bytes")?,
                        block_read_bytes: row.try_get("block_read_bytes")?,
                        block_write_bytes: row.try_get("block_write_bytes")?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            sets.push(ContainerSet {
                server_id: uuid(&id)?,
                seq: report.try_get("seq")?,
                docker_version: report.try_get("docker_version")?,
                error: report.try_get("error")?,
                updated_at: from_ms(report.try_get("updated_at")?),
                containers,
            });
        }
        Ok(sets)
    }
}

/// Replaces the latest container set of every server in `sets` whose set is
/// newer than the stored one, in three set-based statements whatever the
/// number of servers: upsert the reports (`RETURNING` the servers whose
/// report was replaced), delete those servers' containers, insert the new
/// ones. Of several sets for one server only the highest `seq` (the first
/// of equals) can win, as if they were applied one after another.
/// Rows per multi-row statement of the metrics writes (at most 18 binds per
/// row: well under SQLite's 32,766). Full chunks always have the same text,
/// so their prepared statement is cached and reused; only the last, shorter
/// chunk of a transaction is prepared for one use and not cached (a cache
/// of every row count would hold ~50 KB per statement).
pub(crate) const ROWS_PER_STATEMENT: usize = 64;

pub(crate) fn cacheable<T>(chunk: &[T]) -> bool {
    chunk.len() == ROWS_PER_STATEMENT
}

pub(crate) async fn replace_container_sets(
    conn: &mut sqlx::SqliteConnection,
    sets: &[ContainerSet],
) -> StoreResult<()> {
    let mut newest: HashMap<Uuid, &ContainerSet> = HashMap::with_capacity(sets.len());
    for set in sets {
        let entry = newest.entry(set.server_id).or_insert(set);
        if set.seq > entry.seq {
            *entry = set;
        }
    }
    let candidates: Vec<&ContainerSet> = newest.into_values().collect();
    let mut replaced: Vec<&ContainerSet> = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(ROWS_PER_STATEMENT) {
        let mut builder = QueryBuilder::new(
            "INSERT INTO container_reports (server_id, seq, docker_version, error, updated_at) ",
        );
        builder.push_values(chunk, |mut row, set| {
            row.push_bind(set.server_id.to_string())
                .push_bind(set.seq)
                .push_bind(&set.docker_version)
                .push_bind(&set.error)
                .push_bind(ms(set.updated_at));
        });
        builder.push(
            " ON CONFLICT (server_id) DO UPDATE SET seq = excluded.seq, docker_version = excluded.docker_version,
                 error = excluded.error, updated_at = excluded.updated_at
             WHERE excluded.seq > container_reports.seq
             RETURNING server_id",
        );
        let accepted: HashSet<String> = builder
            .build_query_scalar::<String>()
            .persistent(cacheable(chunk))
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        replaced.extend(
            chunk
                .iter()
                .filter(|set| accepted.contains(&set.server_id.to_string())),
        );
    }
    for chunk in replaced.chunks(ROWS_PER_STATEMENT) {
        let mut builder = QueryBuilder::new("DELETE FROM containers WHERE server_id IN (");
        let mut ids = builder.separated(", ");
        for set in chunk {
            ids.push_bind(set.server_id.to_string());
        }
        builder.push(")");
        builder
            .build()
            .persistent(cacheable(chunk))
            .execute(&mut *conn)
            .await?;
    }
    let rows: Vec<(String, &ContainerRecord)> = replaced
        .iter()
        .flat_map(|set| {
            let server_id = set.server_id.to_string();
            set.containers.iter().map(move |c| (server_id.clone(), c))
        })
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut builder = QueryBuilder::new(
            "INSERT INTO containers (server_id, container_id, name, image, state, health, restart_count,
             started_at, cpu_percent, memory_usage_bytes, memory_limit_bytes, net_rx_bytes, net_tx_bytes,
             block_read_bytes, block_write_bytes) ",
        );
        builder.push_values(chunk, |mut row, (server_id, c)| {
            row.push_bind(server_id)
                .push_bind(&c.container_id)
                .push_bind(&c.name)
                .push_bind(&c.image)
                .push_bind(&c.state)
                .push_bind(&c.health)
                .push_bind(c.restart_count)
                .push_bind(&c.started_at)
                .push_bind(c.cpu_percent)
                .push_bind(c.memory_usage_bytes)
                .push_bind(c.memory_limit_bytes)
                .push_bind(c.net_rx_bytes)
                .push_bind(c.net_tx_bytes)
                .push_bind(c.block_read_bytes)
                .push_bind(c.block_write_bytes);
        });
        builder.push(" ON CONFLICT (server_id, container_id) DO NOTHING");
        builder
            .build()
            .persistent(cacheable(chunk))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Salt of the WAL header: SQLite changes it each time the log starts over.
    fn wal_salt(db: &std::path::Path) -> [u8; 8] {
        use std::io::Read;
        let mut header = [0u8; 24];
        std::fs::File::open(db.with_extension("db-wal"))
            .and_then(|mut wal| wal.read_exact(&mut header))
            .map(|()| header[16..24].try_into().unwrap_or_default())
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_starts_over_while_writes_keep_coming() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tether.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let pool = store.pool.clone();
        sqlx::query("CREATE TABLE filler (page BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        // One writer that never pauses, and readers that always hold a
        // snapshot: what a busy control plane looks like to SQLite.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = tokio::spawn({
            let (pool, stop) = (pool.clone(), stop.clone());
            async move {
                let mut pages = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut tx = pool.begin().await.unwrap();
                    for _ in 0..8 {
                        sqlx::query("INSERT INTO filler (page) VALUES (zeroblob(4000))")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    tx.commit().await.unwrap();
                    pages += 8;
                }
                pages
            }
        });
        let reader = tokio::spawn({
            let (pool, stop) = (pool.clone(), stop.clone());
            async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM filler")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first_salt = wal_salt(&db);
        let mut restarts = 0;
        let mut salt = first_salt;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            checkpoint(&pool, 64).await.unwrap();
            let now = wal_salt(&db);
            if now != salt {
                restarts += 1;
                salt = now;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let pages = writer.await.unwrap();
        reader.await.unwrap();
        let wal_bytes = std::fs::metadata(db.with_extension("db-wal"))
            .unwrap()
            .len();
        assert!(
            restarts >= 3,
            "the WAL started over {restarts} times in 2 s of writes"
        );
        assert!(
            wal_bytes < pages * 4096 / 2,
            "the WAL holds {wal_bytes} bytes after {pages} pages were written: it kept growing"
        );
    }
}
