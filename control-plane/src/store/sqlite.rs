//! [`Store`] on an embedded SQLite file (the zero-set-up default).
//!
//! WAL journal, foreign keys on, a busy timeout so concurrent writers queue
//! instead of failing. Write transactions start with a write so they take the
//! database's write lock up front (no read-to-write upgrade deadlocks).
//! Ids are stored as UUID text, times as unix milliseconds, JSON as text.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, SqlitePool};
use uuid::Uuid;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

fn opt_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_ms)
}

fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Corrupt(format!("invalid uuid {s:?}")))
}

fn opt_uuid(s: Option<String>) -> StoreResult<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

fn json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("invalid json: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

const SERVER_COLUMNS: &str = "id, organization_id, name, hostname, labels, status, status_reason, \
     agent_version, facts, deployment_id, created_at, last_seen_at";

fn server_from_row(row: &SqliteRow) -> StoreResult<Server> {
    let status: String = row.try_get("status")?;
    Ok(Server {
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        name: row.try_get("name")?,
        hostname: row.try_get("hostname")?,
        labels: json(row.try_get("labels")?)?,
        status: ServerStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("invalid status {status:?}")))?,
        status_reason: row.try_get("status_reason")?,
        agent_version: row.try_get("agent_version")?,
        facts: json(row.try_get("facts")?)?,
        deployment_id: opt_uuid(row.try_get("deployment_id")?)?,
        created_at: from_ms(row.try_get("created_at")?),
        last_seen_at: opt_ms(row.try_get("last_seen_at")?),
    })
}

fn push_scope(builder: &mut QueryBuilder<'_, sqlx::Sqlite>, column: &str, scope: &[Uuid]) {
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

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url`.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    async fn server_by_id(&self, id: Uuid) -> StoreResult<Option<Server>> {
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
            "INSERT INTO organizations (id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, created_at)
             VALUES (?, ?, NULL, ?, ?, ?, ?)",
        )
        .bind(root.id.to_string())
        .bind(&root.name)
        .bind(root.quotas.max_servers)
        .bind(root.quotas.max_cpu_cores)
        .bind(root.quotas.max_memory_gb)
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn enroll(&self, e: &Enrollment) -> StoreResult<Result<Server, EnrollmentRefusal>> {
        let mut tx = self.pool.begin().await?;
        // The first statement writes, so this transaction holds the write
        // lock from here on: a racing enrollment waits, then finds the token used.
        let claimed = sqlx::query(
            "UPDATE enrollment_tokens SET used_at = ?, server_id = ?
             WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?
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
                "SELECT used_at, expires_at FROM enrollment_tokens WHERE token_hash = ?",
            )
            .bind(&e.token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(Err(match row {
                None => EnrollmentRefusal::UnknownToken,
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
        insert_certificate(&mut tx, &e.certificate).await?;
        tx.commit().await?;
        let server = self
            .server_by_id(e.server_id)
            .await?
            .ok_or_else(|| StoreError::Corrupt("enrolled server vanished".into()))?;
        Ok(Ok(server))
    }

    async fn record_certificate(&self, certificate: &CertificateRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        insert_certificate(&mut tx, certificate).await?;
        tx.commit().await?;
        Ok(())
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
                    hostname = COALESCE(json_extract(?, '$.hostname'), hostname), last_seen_at = ?
             WHERE id = ? AND deleted_at IS NULL",
        )
        .bind(agent_version)
        .bind(to_json(facts))
        .bind(to_json(facts))
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

    async fn mark_silent_offline(
        &self,
        cutoff: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<Vec<Uuid>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE servers SET status = 'offline', status_reason = ?
             WHERE status = 'online' AND deleted_at IS NULL AND (last_seen_at IS NULL OR last_seen_at < ?)
             RETURNING id",
        )
        .bind(reason)
        .bind(ms(cutoff))
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|s| uuid(s)).collect()
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
            "INSERT INTO organizations (id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(org.id.to_string())
        .bind(&org.name)
        .bind(org.parent_id.map(|p| p.to_string()))
        .bind(org.quotas.max_servers)
        .bind(org.quotas.max_cpu_cores)
        .bind(org.quotas.max_memory_gb)
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
        let servers = builder.build().execute(&mut *tx).await?.rows_affected();
        let mut builder = QueryBuilder::new("UPDATE organizations SET deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE deleted_at IS NULL");
        push_scope(&mut builder, "id", &ids);
        let organizations = builder.build().execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(OrganizationDeletion::Deleted {
            organizations,
            servers,
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
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS servers,
                    COALESCE(SUM(COALESCE(json_extract(facts, '$.cpu_cores'), 0)), 0) AS cpu_cores,
                    COALESCE(SUM((COALESCE(json_extract(facts, '$.memory_bytes'), 0) + 1073741823) / 1073741824), 0) AS memory_gb
             FROM servers WHERE deleted_at IS NULL AND organization_id IN ({SUBTREE_SQL})"
        ))
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(Usage {
            servers: row.try_get("servers")?,
            cpu_cores: row.try_get("cpu_cores")?,
            memory_gb: row.try_get("memory_gb")?,
        })
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

    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT ca_key_sealed FROM instance WHERE id = 1")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|sealed| SealedSecret {
                kind: SealedKind::InstanceCaKey,
                id: "1".into(),
                context: INSTANCE_CA_KEY_CONTEXT.into(),
                sealed,
            })
            .collect())
    }

    async fn replace_sealed_secret(
        &self,
        secret: &SealedSecret,
        resealed: &str,
    ) -> StoreResult<bool> {
        let result = match secret.kind {
            SealedKind::InstanceCaKey => {
                sqlx::query(
                    "UPDATE instance SET ca_key_sealed = ? WHERE id = 1 AND ca_key_sealed = ?",
                )
                .bind(resealed)
                .bind(&secret.sealed)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(result.rows_affected() == 1)
    }
}

const ORGANIZATION_COLUMNS: &str =
    "id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, created_at";
const ORGANIZATION_COLUMNS_QUALIFIED: &str =
    "o.id, o.name, o.parent_id, o.max_servers, o.max_cpu_cores, o.max_memory_gb, o.created_at";
/// Ids of a live organization and its live descendants (one `?`: the root).
const SUBTREE_SQL: &str = "WITH RECURSIVE tree (id) AS (
         SELECT id FROM organizations WHERE id = ? AND deleted_at IS NULL
         UNION ALL
         SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id WHERE o.deleted_at IS NULL)
     SELECT id FROM tree";

fn organization_from_row(row: &SqliteRow) -> StoreResult<Organization> {
    Ok(Organization {
        id: uuid(row.try_get("id")?)?,
        name: row.try_get("name")?,
        parent_id: opt_uuid(row.try_get("parent_id")?)?,
        quotas: Quotas {
            max_servers: row.try_get("max_servers")?,
            max_cpu_cores: row.try_get("max_cpu_cores")?,
            max_memory_gb: row.try_get("max_memory_gb")?,
        },
        created_at: from_ms(row.try_get("created_at")?),
    })
}

fn parse_ids(ids: &[String]) -> StoreResult<Vec<Uuid>> {
    ids.iter().map(|s| uuid(s)).collect()
}

async fn insert_certificate(
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
