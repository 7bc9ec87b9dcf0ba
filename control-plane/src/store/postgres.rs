//! [`Store`] on PostgreSQL (scale-out: several control-plane replicas share
//! one database).
//!
//! Written in PostgreSQL's own dialect: native `uuid`, `timestamptz`, `jsonb`
//! and `text[]` columns; scopes bound as one uuid array (`= ANY($1)`), never
//! as generated `IN` lists; organization trees walked with recursive CTEs.
//! Races between replicas are settled by the database: an enrollment token is
//! claimed by one conditional `UPDATE ... RETURNING` (row locks make exactly
//! one racer win), and statements that lock several server rows lock them in
//! id order so they cannot deadlock one another. The audit log is append-only
//! by trigger. Telemetry is written in bulk: each column of an ingest is
//! bound as one array and `UNNEST`ed server-side, so storing thousands of
//! points takes one statement per table (no bind limit, few round trips).
//! Queries are built at runtime (no compile-time checking, CI has no
//! database); the store test suite covers them.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, QueryBuilder, Row};
use uuid::Uuid;

pub(crate) use super::row::{organization_from_row, server_from_row};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
}

pub(crate) const SERVER_COLUMNS: &str =
    "id, organization_id, name, hostname, labels, status, status_reason, \
     agent_version, facts, deployment_id, created_at, last_seen_at";

pub(crate) const ORGANIZATION_COLUMNS: &str =
    "id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, max_monthly_cost_usd, created_at";

pub(crate) const API_TOKEN_COLUMNS: &str =
    "id, organization_id, name, scopes, created_at, expires_at, revoked_at";

pub(crate) const AUDIT_COLUMNS: &str =
    "seq, id, at, actor, organization_id, action, target, source_ip, outcome, detail";

/// A live organization and its live descendants, as the CTE `tree (id)`;
/// `$1` is the organization. `UNION` (not `UNION ALL`) ends the walk even if
/// the tree were corrupted into a cycle.
pub(crate) const SUBTREE_CTE: &str = "WITH RECURSIVE tree (id) AS (
         SELECT id FROM organizations WHERE id = $1 AND deleted_at IS NULL
         UNION
         SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id
         WHERE o.deleted_at IS NULL)";

pub(crate) const ENROLLED_REASON: &str = "enrolled; waiting for the agent's first session";
pub(crate) const REMOVED_REASON: &str = "removed";
pub(crate) const ORGANIZATION_DELETED_REASON: &str = "organization deleted";

/// What a live organization and its live descendants use (servers, and
/// deployments still provisioning theirs), read on `conn`. CPU and memory:
/// the catalog sizes of committed deployments, and the reported facts of
/// servers enrolled without a deployment (a deployment's server adds nothing
/// when it enrolls: its size was counted when it was requested).
pub(crate) async fn usage_on(conn: &mut sqlx::PgConnection, id: Uuid) -> StoreResult<Usage> {
    // Facts are what agents reported; values that are not JSON numbers
    // count as nothing rather than failing the whole sum.
    let row = sqlx::query(&format!(
        "{SUBTREE_CTE}
         SELECT COUNT(*) AS servers,
                COALESCE(SUM(CASE WHEN deployment_id IS NULL
                                       AND jsonb_typeof(facts -> 'cpu_cores') = 'number'
                                  THEN (facts ->> 'cpu_cores')::numeric END), 0)::bigint AS cpu_cores,
                COALESCE(SUM(CASE WHEN deployment_id IS NULL
                                       AND jsonb_typeof(facts -> 'memory_bytes') = 'number'
                                  THEN CEIL((facts ->> 'memory_bytes')::numeric / 1073741824) END), 0)::bigint
                    AS memory_gb
         FROM servers
         WHERE deleted_at IS NULL AND organization_id IN (SELECT id FROM tree)"
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    let active = active_statuses_sql();
    let provisioning: i64 = sqlx::query_scalar(&format!(
        "{SUBTREE_CTE}
         SELECT COUNT(*) FROM deployments d
         WHERE d.deleted_at IS NULL AND d.status IN ({active})
           AND d.organization_id IN (SELECT id FROM tree)
           AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.deployment_id = d.id)"
    ))
    .bind(id)
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
    conn: &mut sqlx::PgConnection,
    id: Uuid,
) -> StoreResult<Vec<DeploymentRecord>> {
    let committed = super::quota::committed_statuses_sql();
    let records: Vec<sqlx::types::Json<DeploymentRecord>> = sqlx::query_scalar(&format!(
        "{SUBTREE_CTE}
         SELECT record FROM deployments
         WHERE deleted_at IS NULL AND status IN ({committed}) AND organization_id IN (SELECT id FROM tree)"
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(records.into_iter().map(|r| r.0).collect())
}

/// What a live organization and its descendants use as quotas count it at
/// provision time: servers as [`usage_on`] counts them, CPU, memory and
/// monthly cost from the catalog sizes of committed deployments.
pub(crate) async fn committed_on(
    conn: &mut sqlx::PgConnection,
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

/// Locks `organization_id` and its ancestors (in id order, like the
/// enrollment) and returns those that set any limit, the monthly cost
/// included; `None` when the organization is gone.
pub(crate) async fn lock_limited_ancestors(
    conn: &mut sqlx::PgConnection,
    organization_id: Uuid,
) -> StoreResult<Option<Vec<Organization>>> {
    let rows = sqlx::query(&format!(
        "WITH RECURSIVE chain (id, parent_id) AS (
             SELECT id, parent_id FROM organizations WHERE id = $1
             UNION
             SELECT o.id, o.parent_id FROM organizations o JOIN chain c ON o.id = c.parent_id)
         SELECT {ORGANIZATION_COLUMNS}, deleted_at IS NOT NULL AS deleted FROM organizations
         WHERE id IN (SELECT id FROM chain)
         ORDER BY id FOR UPDATE"
    ))
    .bind(organization_id)
    .fetch_all(&mut *conn)
    .await?;
    let own_live = rows.iter().any(|row| {
        row.try_get::<Uuid, _>("id").ok() == Some(organization_id)
            && row.try_get::<bool, _>("deleted").ok() == Some(false)
    });
    if !own_live {
        return Ok(None);
    }
    let mut limited = Vec::new();
    for row in &rows {
        let org = organization_from_row(row)?;
        if super::quota::has_any_limit(&org) {
            limited.push(org);
        }
    }
    Ok(Some(limited))
}

pub(crate) fn api_token_from_row(row: &PgRow) -> StoreResult<ApiToken> {
    Ok(ApiToken {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        scopes: row.try_get("scopes")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

pub(crate) fn audit_from_row(row: &PgRow) -> StoreResult<AuditRecord> {
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        entry: AuditEntry {
            id: row.try_get("id")?,
            at: row.try_get("at")?,
            actor: row.try_get("actor")?,
            organization_id: row.try_get("organization_id")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            source_ip: row.try_get("source_ip")?,
            outcome: row.try_get("outcome")?,
            detail: row.try_get("detail")?,
        },
    })
}

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
    executor: impl sqlx::PgExecutor<'e>,
    token: &NewEnrollmentToken,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO enrollment_tokens
           (id, token_hash, organization_id, server_name, labels, deployment_id, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(token.id)
    .bind(&token.token_hash)
    .bind(token.organization_id)
    .bind(&token.server_name)
    .bind(Json(&token.labels))
    .bind(token.deployment_id)
    .bind(token.created_at)
    .bind(token.expires_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// The state row of a deployment (created empty if missing), locked for
/// this transaction: its lock id and the holder's LockInfo.
pub(crate) async fn locked_state_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    deployment_id: Uuid,
    at: DateTime<Utc>,
) -> StoreResult<(Option<String>, Option<serde_json::Value>)> {
    sqlx::query(
        "INSERT INTO terraform_states (deployment_id, updated_at) VALUES ($1, $2)
         ON CONFLICT (deployment_id) DO NOTHING",
    )
    .bind(deployment_id)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(sqlx::query_as(
        "SELECT lock_id, lock_info FROM terraform_states WHERE deployment_id = $1 FOR UPDATE",
    )
    .bind(deployment_id)
    .fetch_one(&mut **tx)
    .await?)
}

pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PostgresStore {
    /// Connects a pool to the database named by `url`
    /// (`postgres://user:password@host:port/database`).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name("tether-control-plane");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> StoreResult<()> {
        // sqlx holds an advisory lock while migrating: replicas starting
        // together apply each migration once.
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
        // A replica racing this insert waits on the conflicting row, then
        // does nothing and reads the winner's instance.
        let inserted = sqlx::query(
            "INSERT INTO instance (id, branch_id, branch_name, root_organization_id, ca_cert_pem, ca_key_sealed, created_at)
             VALUES (1, $1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
        )
        .bind(instance.branch_id)
        .bind(&instance.branch_name)
        .bind(instance.root_organization_id)
        .bind(&instance.ca_cert_pem)
        .bind(&instance.ca_key_sealed)
        .bind(instance.created_at)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
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
             VALUES ($1, $2, NULL, $3, $4, $5, $6, $7)",
        )
        .bind(root.id)
        .bind(&root.name)
        .bind(root.quotas.max_servers)
        .bind(root.quotas.max_cpu_cores)
        .bind(root.quotas.max_memory_gb)
        .bind(root.quotas.max_monthly_cost_usd)
        .bind(root.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, organization_id, name, scopes, created_at, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(admin_token.id)
        .bind(admin_token.organization_id)
        .bind(&admin_token.name)
        .bind(&admin_token.scopes)
        .bind(admin_token.created_at)
        .bind(admin_token.expires_at)
        .bind(admin_token.revoked_at)
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
                branch_id: row.try_get("branch_id")?,
                branch_name: row.try_get("branch_name")?,
                root_organization_id: row.try_get("root_organization_id")?,
                ca_cert_pem: row.try_get("ca_cert_pem")?,
                ca_key_sealed: row.try_get("ca_key_sealed")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn organization_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let ids = sqlx::query_scalar(&format!("{SUBTREE_CTE} SELECT id FROM tree"))
            .bind(organization_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(ids)
    }

    async fn organization_history_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>> {
        let ids = sqlx::query_scalar(
            "WITH RECURSIVE tree (id) AS (
                 SELECT id FROM organizations WHERE id = $1
                 UNION ALL
                 SELECT o.id FROM organizations o JOIN tree t ON o.parent_id = t.id)
             SELECT id FROM tree",
        )
        .bind(organization_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn api_token(&self, id: Uuid) -> StoreResult<Option<ApiToken>> {
        let row = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLUMNS} FROM api_tokens WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(api_token_from_row).transpose()
    }

    async fn create_enrollment_token(&self, token: &NewEnrollmentToken) -> StoreResult<()> {
        insert_enrollment_token(&self.pool, token).await?;
        Ok(())
    }

    async fn enroll(&self, e: &Enrollment) -> StoreResult<Result<Server, EnrollmentRefusal>> {
        let mut tx = self.pool.begin().await?;
        // The token's organization (a token never changes organization),
        // locked with every ancestor that sets a limit, in id order, before
        // the token is claimed: a deletion of the organization finishes
        // first (and this enrollment sees it) or waits for this one, and
        // racing enrollments into a limited tree count one another.
        let organization_id: Option<Uuid> = sqlx::query_scalar(
            "SELECT organization_id FROM enrollment_tokens WHERE token_hash = $1",
        )
        .bind(&e.token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let mut limited = Vec::new();
        if let Some(organization_id) = organization_id {
            let rows = sqlx::query(&format!(
                "WITH RECURSIVE chain (id, parent_id) AS (
                     SELECT id, parent_id FROM organizations WHERE id = $1
                     UNION
                     SELECT o.id, o.parent_id FROM organizations o JOIN chain c ON o.id = c.parent_id)
                 SELECT {ORGANIZATION_COLUMNS}, deleted_at IS NOT NULL AS deleted FROM organizations
                 WHERE id IN (SELECT id FROM chain)
                   AND (id = $1 OR max_servers IS NOT NULL OR max_cpu_cores IS NOT NULL
                        OR max_memory_gb IS NOT NULL)
                 ORDER BY id FOR UPDATE"
            ))
            .bind(organization_id)
            .fetch_all(&mut *tx)
            .await?;
            let own_live = rows.iter().any(|row| {
                row.try_get::<Uuid, _>("id").ok() == Some(organization_id)
                    && row.try_get::<bool, _>("deleted").ok() == Some(false)
            });
            if !own_live {
                tx.rollback().await?;
                return Ok(Err(EnrollmentRefusal::OrganizationDeleted));
            }
            for row in &rows {
                let org = organization_from_row(row)?;
                let q = &org.quotas;
                if q.max_servers.is_some() || q.max_cpu_cores.is_some() || q.max_memory_gb.is_some()
                {
                    limited.push(org);
                }
            }
        }
        let mut before = Vec::with_capacity(limited.len());
        for org in &limited {
            before.push(usage_on(&mut tx, org.id).await?);
        }
        // One statement claims the token and creates the server. Racing
        // enrollments with the same token queue on the token's row lock; once
        // the winner commits, the others re-check `used_at IS NULL` against
        // the committed row, match nothing and insert nothing.
        let server = sqlx::query(&format!(
            "WITH claimed AS (
                 UPDATE enrollment_tokens SET used_at = $1, server_id = $2
                 WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $1
                 RETURNING organization_id, server_name, labels, deployment_id)
             INSERT INTO servers (id, organization_id, name, hostname, labels, status, status_reason,
                                  agent_version, facts, deployment_id, created_at)
             SELECT $2, organization_id, COALESCE(server_name, $4), $4, labels, 'connecting', $5,
                    $6, $7, deployment_id, $1
             FROM claimed
             RETURNING {SERVER_COLUMNS}"
        ))
        .bind(e.at)
        .bind(e.server_id)
        .bind(&e.token_hash)
        .bind(&e.hostname)
        .bind(ENROLLED_REASON)
        .bind(&e.agent_version)
        .bind(&e.facts)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(server) = server else {
            let row = sqlx::query(
                "SELECT used_at IS NOT NULL AS used FROM enrollment_tokens WHERE token_hash = $1",
            )
            .bind(&e.token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(Err(match row {
                None => EnrollmentRefusal::UnknownToken,
                Some(row) if row.try_get::<bool, _>("used")? => EnrollmentRefusal::TokenAlreadyUsed,
                Some(_) => EnrollmentRefusal::ExpiredToken,
            }));
        };
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
        let server = server_from_row(&server)?;
        insert_certificate(&mut tx, &e.certificate).await?;
        tx.commit().await?;
        Ok(Ok(server))
    }

    async fn enrollment_token_refusal(
        &self,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<EnrollmentRefusal>> {
        let row = sqlx::query(
            "SELECT t.used_at IS NOT NULL AS used, t.expires_at <= $2 AS expired,
                    o.deleted_at IS NOT NULL AS organization_deleted
             FROM enrollment_tokens t JOIN organizations o ON o.id = t.organization_id
             WHERE t.token_hash = $1",
        )
        .bind(token_hash)
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Some(EnrollmentRefusal::UnknownToken),
            Some(row) if row.try_get::<bool, _>("used")? => {
                Some(EnrollmentRefusal::TokenAlreadyUsed)
            }
            // Deleting an organization also expires its tokens: say why.
            Some(row) if row.try_get::<bool, _>("organization_deleted")? => {
                Some(EnrollmentRefusal::OrganizationDeleted)
            }
            Some(row) if row.try_get::<bool, _>("expired")? => {
                Some(EnrollmentRefusal::ExpiredToken)
            }
            Some(_) => None,
        })
    }

    async fn record_certificate(&self, certificate: &CertificateRecord) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        insert_certificate(&mut conn, certificate).await
    }

    async fn revoke_certificates_older_than(
        &self,
        server_id: Uuid,
        serial: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let revoked = sqlx::query(
            "UPDATE certificates o SET revoked_at = $1
             FROM certificates c
             WHERE c.serial = $3 AND c.server_id = $2
               AND o.server_id = $2 AND o.revoked_at IS NULL AND o.issued_at < c.issued_at",
        )
        .bind(at)
        .bind(server_id)
        .bind(serial)
        .execute(&self.pool)
        .await?;
        Ok(revoked.rows_affected())
    }

    async fn admit_session(&self, server_id: Uuid, serial: &str) -> StoreResult<SessionAdmission> {
        let row = sqlx::query(
            "SELECT s.id, s.organization_id, s.name, s.hostname, s.labels, s.status, s.status_reason,
                    s.agent_version, s.facts, s.deployment_id, s.created_at, s.last_seen_at,
                    s.deleted_at IS NOT NULL AS removed,
                    c.serial IS NOT NULL AS certificate_known,
                    c.revoked_at IS NOT NULL AS certificate_revoked
             FROM servers s
             LEFT JOIN certificates c ON c.server_id = s.id AND c.serial = $2
             WHERE s.id = $1",
        )
        .bind(server_id)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(SessionAdmission::UnknownServer);
        };
        Ok(if row.try_get::<bool, _>("removed")? {
            SessionAdmission::ServerRemoved
        } else if !row.try_get::<bool, _>("certificate_known")? {
            SessionAdmission::UnknownCertificate
        } else if row.try_get::<bool, _>("certificate_revoked")? {
            SessionAdmission::CertificateRevoked
        } else {
            SessionAdmission::Admitted(Box::new(server_from_row(&row)?))
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
            "UPDATE servers SET status = 'online', status_reason = NULL, agent_version = $1,
                    facts = $2::jsonb, hostname = COALESCE($2::jsonb ->> 'hostname', hostname),
                    last_seen_at = $3, online_since = $3
             WHERE id = $4 AND deleted_at IS NULL",
        )
        .bind(agent_version)
        .bind(facts)
        .bind(at)
        .bind(server_id)
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
            "UPDATE servers SET status = 'offline', status_reason = $1, last_seen_at = $2
             WHERE id = $3 AND deleted_at IS NULL AND status = 'online'",
        )
        .bind(reason)
        .bind(at)
        .bind(server_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn touch_servers(&self, server_ids: &[Uuid], at: DateTime<Utc>) -> StoreResult<()> {
        if server_ids.is_empty() {
            return Ok(());
        }
        // Rows are locked in id order (see the module doc), and only as
        // strongly as an update of a non-key column needs: `FOR UPDATE`
        // also waits for the `KEY SHARE` locks that foreign-key checks take
        // (every metrics write inserting containers holds them), and the
        // two deadlocked under load.
        sqlx::query(
            "WITH target AS (
                 SELECT s.id FROM servers s JOIN UNNEST($1::uuid[]) AS t (id) ON s.id = t.id
                 WHERE s.deleted_at IS NULL
                 ORDER BY s.id
                 FOR NO KEY UPDATE OF s)
             UPDATE servers s SET last_seen_at = $2 FROM target WHERE s.id = target.id",
        )
        .bind(server_ids)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn server(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Server>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS} FROM servers
             WHERE id = $1 AND organization_id = ANY($2) AND deleted_at IS NULL"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(server_from_row).transpose()
    }

    async fn list_servers(&self, q: &ServerQuery) -> StoreResult<Vec<Server>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {SERVER_COLUMNS} FROM servers WHERE deleted_at IS NULL AND organization_id = ANY("
        ));
        builder.push_bind(q.scope.as_slice()).push(")");
        if let Some(status) = q.status {
            builder.push(" AND status = ").push_bind(status.as_str());
        }
        for (key, value) in &q.labels {
            builder
                .push(" AND labels ->> ")
                .push_bind(key.as_str())
                .push(" = ")
                .push_bind(value.as_str());
        }
        if let Some(after) = q.after {
            builder.push(" AND id > ").push_bind(after);
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
        // One statement: the server and its certificates change together.
        let removed: i64 = sqlx::query_scalar(
            "WITH removed AS (
                 UPDATE servers SET deleted_at = $1, status = 'offline', status_reason = $4
                 WHERE id = $2 AND organization_id = ANY($3) AND deleted_at IS NULL
                 RETURNING id),
             revoked AS (
                 UPDATE certificates SET revoked_at = $1
                 WHERE revoked_at IS NULL AND server_id IN (SELECT id FROM removed))
             SELECT COUNT(*) FROM removed",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .bind(REMOVED_REASON)
        .fetch_one(&self.pool)
        .await?;
        Ok(removed == 1)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, organization_id, action, target, source_ip, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(entry.id)
        .bind(entry.at)
        .bind(&entry.actor)
        .bind(entry.organization_id)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.source_ip)
        .bind(&entry.outcome)
        .bind(&entry.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log
             WHERE (organization_id = ANY($1) OR ($2 AND organization_id IS NULL))
               AND ($3::text IS NULL OR actor = $3)
               AND ($4::text IS NULL OR action = $4)
               AND ($5::timestamptz IS NULL OR at >= $5)
               AND ($6::timestamptz IS NULL OR at <= $6)
               AND ($7::bigint IS NULL OR seq < $7)
             ORDER BY seq DESC
             LIMIT $8"
        ))
        .bind(q.scope.as_slice())
        .bind(q.include_unscoped)
        .bind(&q.actor)
        .bind(&q.action)
        .bind(q.from)
        .bind(q.to)
        .bind(q.before_seq)
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn create_organization(&self, org: &Organization) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO organizations (id, name, parent_id, max_servers, max_cpu_cores, max_memory_gb, max_monthly_cost_usd, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(org.id)
        .bind(&org.name)
        .bind(org.parent_id)
        .bind(org.quotas.max_servers)
        .bind(org.quotas.max_cpu_cores)
        .bind(org.quotas.max_memory_gb)
        .bind(org.quotas.max_monthly_cost_usd)
        .bind(org.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>> {
        let row = sqlx::query(&format!(
            "SELECT {ORGANIZATION_COLUMNS} FROM organizations WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id)
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
        let rows = sqlx::query(&format!(
            "SELECT {ORGANIZATION_COLUMNS} FROM organizations
             WHERE id = ANY($1) AND deleted_at IS NULL AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id
             LIMIT $3"
        ))
        .bind(scope)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(organization_from_row).collect()
    }

    async fn update_organization(
        &self,
        id: Uuid,
        update: &OrganizationUpdate,
    ) -> StoreResult<Option<Organization>> {
        let quotas = update.quotas.clone().unwrap_or_default();
        let row = sqlx::query(&format!(
            "UPDATE organizations SET
                 name = COALESCE($2, name),
                 max_servers = CASE WHEN $3 THEN $4 ELSE max_servers END,
                 max_cpu_cores = CASE WHEN $3 THEN $5 ELSE max_cpu_cores END,
                 max_memory_gb = CASE WHEN $3 THEN $6 ELSE max_memory_gb END,
                 max_monthly_cost_usd = CASE WHEN $3 THEN $7 ELSE max_monthly_cost_usd END
             WHERE id = $1 AND deleted_at IS NULL
             RETURNING {ORGANIZATION_COLUMNS}"
        ))
        .bind(id)
        .bind(&update.name)
        .bind(update.quotas.is_some())
        .bind(quotas.max_servers)
        .bind(quotas.max_cpu_cores)
        .bind(quotas.max_memory_gb)
        .bind(quotas.max_monthly_cost_usd)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(organization_from_row).transpose()
    }

    async fn delete_organization(
        &self,
        id: Uuid,
        cascade: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<OrganizationDeletion> {
        let mut tx = self.pool.begin().await?;
        // Lock the organization first: a concurrent deletion of it waits here,
        // and children cannot be attached to it (their foreign key check
        // needs a share lock on this row) until this transaction ends.
        let live = sqlx::query(
            "SELECT id FROM organizations WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if !live {
            tx.rollback().await?;
            return Ok(OrganizationDeletion::NotFound);
        }
        let subtree: Vec<Uuid> = sqlx::query_scalar(&format!(
            "{SUBTREE_CTE} SELECT o.id FROM organizations o JOIN tree ON o.id = tree.id
             ORDER BY o.id FOR UPDATE OF o"
        ))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if !cascade {
            let refusal = if subtree.len() > 1 {
                Some(OrganizationDeletion::HasChildren)
            } else {
                let has_servers: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM servers WHERE organization_id = $1 AND deleted_at IS NULL)",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                has_servers.then_some(OrganizationDeletion::HasServers)
            };
            if let Some(refusal) = refusal {
                tx.rollback().await?;
                return Ok(refusal);
            }
        }
        let row = sqlx::query(
            "WITH doomed AS (
                 SELECT id FROM servers
                 WHERE organization_id = ANY($1) AND deleted_at IS NULL
                 ORDER BY id
                 FOR UPDATE),
             removed_servers AS (
                 UPDATE servers s SET deleted_at = $2, status = 'offline', status_reason = $3
                 FROM doomed WHERE s.id = doomed.id
                 RETURNING s.id),
             revoked AS (
                 UPDATE certificates SET revoked_at = $2
                 WHERE revoked_at IS NULL AND server_id IN (SELECT id FROM removed_servers)),
             removed_organizations AS (
                 UPDATE organizations SET deleted_at = $2
                 WHERE id = ANY($1) AND deleted_at IS NULL
                 RETURNING id),
             revoked_tokens AS (
                 UPDATE api_tokens SET revoked_at = $2
                 WHERE organization_id = ANY($1) AND revoked_at IS NULL),
             expired_enrollment_tokens AS (
                 UPDATE enrollment_tokens SET expires_at = $2
                 WHERE organization_id = ANY($1) AND used_at IS NULL AND expires_at > $2)
             SELECT (SELECT COUNT(*) FROM removed_organizations) AS organizations,
                    ARRAY(SELECT id FROM removed_servers ORDER BY id) AS server_ids",
        )
        .bind(subtree.as_slice())
        .bind(at)
        .bind(ORGANIZATION_DELETED_REASON)
        .fetch_one(&mut *tx)
        .await?;
        let organizations = count(row.try_get("organizations")?);
        let server_ids: Vec<Uuid> = row.try_get("server_ids")?;
        tx.commit().await?;
        Ok(OrganizationDeletion::Deleted {
            organizations,
            servers: server_ids.len() as u64,
            server_ids,
        })
    }

    async fn organization_ancestors(&self, id: Uuid) -> StoreResult<Vec<Organization>> {
        let rows = sqlx::query(&format!(
            "WITH RECURSIVE chain AS (
                 SELECT {ORGANIZATION_COLUMNS}, 0 AS depth
                 FROM organizations WHERE id = $1 AND deleted_at IS NULL
                 UNION ALL
                 SELECT p.id, p.name, p.parent_id, p.max_servers, p.max_cpu_cores, p.max_memory_gb,
                        p.max_monthly_cost_usd,
                        p.created_at, c.depth + 1
                 FROM organizations p JOIN chain c ON p.id = c.parent_id)
             CYCLE id SET in_cycle USING path
             SELECT {ORGANIZATION_COLUMNS} FROM chain WHERE NOT in_cycle ORDER BY depth"
        ))
        .bind(id)
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
            "INSERT INTO api_tokens (id, organization_id, name, scopes, created_at, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(token.id)
        .bind(token.organization_id)
        .bind(&token.name)
        .bind(&token.scopes)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.revoked_at)
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
        let revoked = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1
             WHERE id = $2 AND organization_id = ANY($3) AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(revoked == 1)
    }

    async fn ensure_instance_secret(&self, name: &str, candidate: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO instance_secrets (name, sealed) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT sealed FROM instance_secrets WHERE name = $1")
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
            let found: Vec<(Uuid, String)> = sqlx::query_as(&format!(
                "SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL AND {column} <> ''"
            ))
            .fetch_all(&self.pool)
            .await?;
            rows.extend(found.into_iter().map(|(id, sealed)| (kind, id, sealed)));
        }
        Ok(super::sealed_secret_list(ca_keys, named, rows))
    }

    async fn replace_sealed_secret(
        &self,
        secret: &SealedSecret,
        resealed: &str,
    ) -> StoreResult<bool> {
        let replaced = match secret.kind {
            SealedKind::InstanceSecret => sqlx::query(
                "UPDATE instance_secrets SET sealed = $1 WHERE name = $2 AND sealed = $3",
            )
            .bind(resealed)
            .bind(&secret.id)
            .bind(&secret.sealed)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            SealedKind::InstanceCaKey => sqlx::query(
                "UPDATE instance SET ca_key_sealed = $1 WHERE id = 1 AND ca_key_sealed = $2",
            )
            .bind(resealed)
            .bind(&secret.sealed)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            kind @ (SealedKind::CloudCredential
            | SealedKind::TerraformState
            | SealedKind::TerraformStateVersion
            | SealedKind::BootstrapToken
            | SealedKind::WebhookSecret
            | SealedKind::CommandEnv
            | SealedKind::CommandStdin
            | SealedKind::BranchClientKey
            | SealedKind::FederationSigningKey) => {
                let (Some((table, column, key)), Ok(id)) =
                    (kind.row_location(), Uuid::parse_str(&secret.id))
                else {
                    return Ok(false);
                };
                sqlx::query(&format!(
                    "UPDATE {table} SET {column} = $1 WHERE {key} = $2 AND {column} = $3"
                ))
                .bind(resealed)
                .bind(id)
                .bind(&secret.sealed)
                .execute(&self.pool)
                .await?
                .rows_affected()
            }
        };
        Ok(replaced == 1)
    }
}

pub(crate) async fn insert_certificate(
    conn: &mut sqlx::PgConnection,
    c: &CertificateRecord,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO certificates (serial, server_id, not_before, not_after, issued_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&c.serial)
    .bind(c.server_id)
    .bind(c.not_before)
    .bind(c.not_after)
    .bind(c.issued_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The JSON lists come back as the text they were stored as (`json` keeps it).
pub(crate) const METRICS_COLUMNS: &str =
    "server_id, seq, ts, cpu_percent, load_1, load_5, load_15, \
     memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes, \
     cpu_per_core::text AS cpu_per_core, disks::text AS disks, networks::text AS networks, \
     uptime_seconds, process_count, dropped_batches";

/// Times one metrics write is tried when PostgreSQL aborts it to break a
/// deadlock or a serialization conflict (each try is a new transaction).
pub(crate) const INGEST_ATTEMPTS: u32 = 3;

/// Whether PostgreSQL aborted the transaction to let a concurrent one
/// through (`40P01` deadlock detected, `40001` serialization failure): the
/// same transaction can succeed when tried again.
pub(crate) fn is_aborted_by_a_conflict(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

impl PostgresStore {
    /// One try of [`TelemetryStore::ingest_metrics`], in one transaction.
    pub(crate) async fn ingest_metrics_once(&self, ingest: &MetricsIngest) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if !ingest.metrics.is_empty() {
            insert_metrics(&mut tx, ingest).await?;
        }
        if !ingest.containers.is_empty() {
            replace_container_sets(&mut tx, &ingest.containers).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// One column of a bulk insert: `f` of every row.
pub(crate) fn column<'a, T, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

/// Inserts every point of `ingest` in one statement (one array per column,
/// so no bind limit however many points); a `(server_id, seq)` already
/// stored, or seen earlier in the same ingest, is skipped. Rows go in key
/// order so replicas inserting the same replayed batches cannot deadlock.
pub(crate) async fn insert_metrics(
    conn: &mut sqlx::PgConnection,
    ingest: &MetricsIngest,
) -> StoreResult<()> {
    let m = ingest.metrics.as_slice();
    // The lists go in as the text they were serialized to, which the `json`
    // columns check and keep (serde_json writes a NUL as `\u0000`).
    let cpu_per_core = column(m, |r| r.cpu_per_core.as_str());
    let disks = column(m, |r| r.disks.as_str());
    let networks = column(m, |r| r.networks.as_str());
    sqlx::query(
        "INSERT INTO metrics (server_id, seq, ts, received_at, cpu_percent, load_1, load_5, load_15,
             memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core,
             disks, networks, uptime_seconds, process_count, dropped_batches)
         SELECT server_id, seq, ts, $1, cpu_percent, load_1, load_5, load_15, memory_used_bytes,
                memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core::json,
                disks::json, networks::json, uptime_seconds, process_count, dropped_batches
         FROM UNNEST($2::uuid[], $3::bigint[], $4::timestamptz[], $5::float8[], $6::float8[],
                     $7::float8[], $8::float8[], $9::bigint[], $10::bigint[], $11::bigint[],
                     $12::bigint[], $13::text[], $14::text[], $15::text[], $16::bigint[],
                     $17::bigint[], $18::bigint[])
             WITH ORDINALITY AS u (server_id, seq, ts, cpu_percent, load_1, load_5, load_15,
                 memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes,
                 cpu_per_core, disks, networks, uptime_seconds, process_count, dropped_batches,
                 ordinal)
         ORDER BY server_id, seq, ordinal
         ON CONFLICT (server_id, seq) DO NOTHING",
    )
    .bind(ingest.received_at)
    .bind(column(m, |r| r.server_id))
    .bind(column(m, |r| r.seq))
    .bind(column(m, |r| r.ts))
    .bind(column(m, |r| r.cpu_percent))
    .bind(column(m, |r| r.load_1))
    .bind(column(m, |r| r.load_5))
    .bind(column(m, |r| r.load_15))
    .bind(column(m, |r| r.memory_used_bytes))
    .bind(column(m, |r| r.memory_total_bytes))
    .bind(column(m, |r| r.swap_used_bytes))
    .bind(column(m, |r| r.swap_total_bytes))
    .bind(&cpu_per_core)
    .bind(&disks)
    .bind(&networks)
    .bind(column(m, |r| r.uptime_seconds))
    .bind(column(m, |r| r.process_count))
    .bind(column(m, |r| r.dropped_batches))
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores container sets newer than the stored ones. Per server only the
/// newest set of `sets` counts (the first of equals), so one upsert
/// statement never touches a row twice; reports are upserted in server
/// order, and the report row lock serialises writers of one server's
/// containers.
pub(crate) async fn replace_container_sets(
    conn: &mut sqlx::PgConnection,
    sets: &[ContainerSet],
) -> StoreResult<()> {
    let docker_versions = column(sets, |s| s.docker_version.as_deref().map(without_nul));
    let errors = column(sets, |s| s.error.as_deref().map(without_nul));
    let accepted: Vec<(Uuid, i64)> = sqlx::query_as(
        "WITH incoming AS (
             SELECT DISTINCT ON (server_id) server_id, seq, docker_version, error, updated_at, ordinal
             FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::timestamptz[])
                 WITH ORDINALITY AS u (server_id, seq, docker_version, error, updated_at, ordinal)
             ORDER BY server_id, seq DESC, ordinal),
         replaced AS (
             INSERT INTO container_reports AS r (server_id, seq, docker_version, error, updated_at)
             SELECT server_id, seq, docker_version, error, updated_at FROM incoming
             ORDER BY server_id
             ON CONFLICT (server_id) DO UPDATE SET
                 seq = excluded.seq,
                 docker_version = excluded.docker_version,
                 error = excluded.error,
                 updated_at = excluded.updated_at
             WHERE excluded.seq > r.seq
             RETURNING r.server_id)
         SELECT i.server_id, i.ordinal FROM incoming i JOIN replaced USING (server_id)
         ORDER BY i.server_id",
    )
    .bind(column(sets, |s| s.server_id))
    .bind(column(sets, |s| s.seq))
    .bind(docker_versions)
    .bind(errors)
    .bind(column(sets, |s| s.updated_at))
    .fetch_all(&mut *conn)
    .await?;
    if accepted.is_empty() {
        return Ok(());
    }
    let servers = column(&accepted, |(id, _)| *id);
    sqlx::query("DELETE FROM containers WHERE server_id = ANY($1)")
        .bind(&servers)
        .execute(&mut *conn)
        .await?;
    let mut rows: Vec<(Uuid, &ContainerRecord)> = Vec::new();
    for (_, ordinal) in &accepted {
        let set = usize::try_from(*ordinal - 1)
            .ok()
            .and_then(|i| sets.get(i))
            .ok_or_else(|| StoreError::Corrupt(format!("no container set at {ordinal}")))?;
        rows.extend(set.containers.iter().map(|c| (set.server_id, c)));
    }
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO containers (server_id, container_id, name, image, state, health, restart_count,
             started_at, cpu_percent, memory_usage_bytes, memory_limit_bytes, net_rx_bytes,
             net_tx_bytes, block_read_bytes, block_write_bytes)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                              $7::bigint[], $8::text[], $9::float8[], $10::bigint[], $11::bigint[],
                              $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[])
         ON CONFLICT (server_id, container_id) DO NOTHING",
    )
    .bind(column(&rows, |(id, _)| *id))
    .bind(column(&rows, |(_, c)| without_nul(&c.container_id)))
    .bind(column(&rows, |(_, c)| without_nul(&c.name)))
    .bind(column(&rows, |(_, c)| without_nul(&c.image)))
    .bind(column(&rows, |(_, c)| without_nul(&c.state)))
    .bind(column(&rows, |(_, c)| c.health.as_deref().map(without_nul)))
    .bind(column(&rows, |(_, c)| c.restart_count))
    .bind(column(&rows, |(_, c)| c.started_at.as_deref().map(without_nul)))
    .bind(column(&rows, |(_, c)| c.cpu_percent))
    .bind(column(&rows, |(_, c)| c.memory_usage_bytes))
    .bind(column(&rows, |(_, c)| c.memory_limit_bytes))
    .bind(column(&rows, |(_, c)| c.net_rx_bytes))
    .bind(column(&rows, |(_, c)| c.net_tx_bytes))
    .bind(column(&rows, |(_, c)| c.block_read_bytes))
    .bind(column(&rows, |(_, c)| c.block_write_bytes))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Container reports of live servers with their containers, one row per
/// container (or one row with NULL container columns for an empty report).
/// One statement, so a report and its containers come from one snapshot.
pub(crate) const CONTAINER_SETS_SELECT: &str = "SELECT r.server_id, r.seq, r.docker_version, r.error, \
     r.updated_at, c.container_id, c.name, c.image, c.state, c.health, c.restart_count, c.started_at, \
     c.cpu_percent, c.memory_usage_bytes, c.memory_limit_bytes, c.net_rx_bytes, c.net_tx_bytes, \
     c.block_read_bytes, c.block_write_bytes
     FROM container_reports r
     JOIN servers s ON s.id = r.server_id
     LEFT JOIN containers c ON c.server_id = r.server_id";

/// Groups rows of [`CONTAINER_SETS_SELECT`] (ordered by server) into sets.
pub(crate) fn container_sets_from_rows(rows: &[PgRow]) -> StoreResult<Vec<ContainerSet>> {
    let mut sets: Vec<ContainerSet> = Vec::new();
    for row in rows {
        let server_id: Uuid = row.try_get("server_id")?;
        if sets.last().map(|s| s.server_id) != Some(server_id) {
            sets.push(ContainerSet {
                server_id,
                seq: row.try_get("seq")?,
                docker_version: row.try_get("docker_version")?,
                error: row.try_get("error")?,
                updated_at: row.try_get("updated_at")?,
                containers: Vec::new(),
            });
        }
        let Some(container_id) = row.try_get::<Option<String>, _>("container_id")? else {
            continue;
        };
        let container = ContainerRecord {
            container_id,
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
        };
        if let Some(set) = sets.last_mut() {
            set.containers.push(container);
        }
    }
    Ok(sets)
}
