//! [`super::FederationStore`] on PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::{
    BranchHealth, BranchInvite, BranchPeer, BranchStatus, FederationKey, FederationStore,
    RelayedCommandRecord, RelayedCommandUpdate, RemoteServer, RELAYED_DELIVER_WITHIN,
    RELAYED_MAX_OUTPUT_BYTES,
};
use crate::store::postgres::PostgresStore;
use crate::store::{Labels, StoreError, StoreResult};

fn json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("invalid json: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn status(s: &str) -> StoreResult<BranchStatus> {
    BranchStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("branch status {s:?}")))
}

const INVITE_COLUMNS: &str =
    "id, organization_id, name, secret_hash, scopes, created_at, expires_at, used_at";

fn invite_from_row(row: &PgRow) -> StoreResult<BranchInvite> {
    Ok(BranchInvite {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        secret_hash: row.try_get("secret_hash")?,
        scopes: json(row.try_get("scopes")?)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used_at: row.try_get("used_at")?,
    })
}

const PEER_COLUMNS: &str = "id, organization_id, name, address, ca_cert_pem, client_chain, \
     client_key_sealed, peer_keys, granted_scopes, remote_scopes, remote_organization_id, \
     status, last_seen_at, latency_ms, server_count, created_at";

fn peer_from_row(row: &PgRow) -> StoreResult<BranchPeer> {
    Ok(BranchPeer {
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        address: row.try_get("address")?,
        ca_cert_pem: row.try_get("ca_cert_pem")?,
        client_chain: json(row.try_get("client_chain")?)?,
        client_key_sealed: row.try_get("client_key_sealed")?,
        peer_keys: json(row.try_get("peer_keys")?)?,
        granted_scopes: json(row.try_get("granted_scopes")?)?,
        remote_scopes: json(row.try_get("remote_scopes")?)?,
        remote_organization_id: row.try_get("remote_organization_id")?,
        status: status(row.try_get("status")?)?,
        last_seen_at: row.try_get("last_seen_at")?,
        latency_ms: row.try_get("latency_ms")?,
        server_count: row.try_get("server_count")?,
        created_at: row.try_get("created_at")?,
    })
}

fn remote_from_row(row: &PgRow) -> StoreResult<RemoteServer> {
    let labels: Json<Labels> = row.try_get("labels")?;
    Ok(RemoteServer {
        branch_id: row.try_get("branch_id")?,
        id: row.try_get("id")?,
        organization_id: row.try_get("organization_id")?,
        name: row.try_get("name")?,
        hostname: row.try_get("hostname")?,
        labels: labels.0,
        status: row.try_get("status")?,
        last_seen_at: row.try_get("last_seen_at")?,
        agent_version: row.try_get("agent_version")?,
        cpu_percent: row.try_get("cpu_percent")?,
        memory_used_bytes: row.try_get("memory_used_bytes")?,
        memory_total_bytes: row.try_get("memory_total_bytes")?,
        synced_at: row.try_get("synced_at")?,
    })
}

/// `scope` as a bound uuid array, or every organization.
fn scope_clause(scope: Option<&[Uuid]>, n: usize) -> String {
    match scope {
        Some(_) => format!(" AND organization_id = ANY(${n})"),
        None => String::new(),
    }
}

const RELAYED_COLUMNS: &str = "id, organization_id, branch_id, remote_server_id, \
     remote_command_id, argv, timeout_ms, status, exit_code, reason, output, output_truncated, \
     created_by, created_at, started_at, finished_at";

fn relayed_from_row(row: &PgRow) -> StoreResult<RelayedCommandRecord> {
    let Json(argv): Json<Vec<String>> = row.try_get("argv")?;
    let status: String = row.try_get("status")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    Ok(RelayedCommandRecord {
        branch_id: row.try_get("branch_id")?,
        remote_command_id: row.try_get("remote_command_id")?,
        command: crate::store::CommandRecord {
            id: row.try_get("id")?,
            organization_id: row.try_get("organization_id")?,
            server_id: row.try_get("remote_server_id")?,
            argv,
            timeout_ms: row.try_get("timeout_ms")?,
            max_output_bytes: RELAYED_MAX_OUTPUT_BYTES,
            status: crate::store::CommandState::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown command status {status:?}")))?,
            exit_code: row.try_get("exit_code")?,
            signal: None,
            reason: row.try_get("reason")?,
            output: row.try_get("output")?,
            output_truncated: row.try_get("output_truncated")?,
            cancel_requested: false,
            created_by: row.try_get("created_by")?,
            created_at,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            claimed_by: None,
            deliver_by: created_at + RELAYED_DELIVER_WITHIN,
        },
    })
}

#[async_trait::async_trait]
impl FederationStore for PostgresStore {
    async fn create_branch_invite(&self, invite: &BranchInvite) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO branch_invites (id, organization_id, name, secret_hash, scopes, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(invite.id)
        .bind(invite.organization_id)
        .bind(&invite.name)
        .bind(&invite.secret_hash)
        .bind(to_json(&invite.scopes))
        .bind(invite.created_at)
        .bind(invite.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn redeem_branch_invite(
        &self,
        id: Uuid,
        secret_hash: &str,
        used_by: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<BranchInvite>> {
        let row = sqlx::query(&format!(
            "UPDATE branch_invites SET used_at = $1, used_by = $2
             WHERE id = $3 AND secret_hash = $4 AND used_at IS NULL AND expires_at > $1
             RETURNING {INVITE_COLUMNS}"
        ))
        .bind(now)
        .bind(used_by)
        .bind(id)
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(invite_from_row).transpose()
    }

    async fn upsert_branch_peer(&self, peer: &BranchPeer) -> StoreResult<bool> {
        let stored = sqlx::query(&format!(
            "INSERT INTO branch_peers ({PEER_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (id) DO UPDATE SET organization_id = excluded.organization_id, name = excluded.name, address = excluded.address, ca_cert_pem = excluded.ca_cert_pem, client_chain = excluded.client_chain, client_key_sealed = excluded.client_key_sealed, peer_keys = excluded.peer_keys, granted_scopes = excluded.granted_scopes, remote_scopes = excluded.remote_scopes, remote_organization_id = excluded.remote_organization_id, status = excluded.status, last_seen_at = excluded.last_seen_at, latency_ms = excluded.latency_ms, server_count = excluded.server_count
             WHERE branch_peers.organization_id = excluded.organization_id
               AND branch_peers.ca_cert_pem = excluded.ca_cert_pem"
        ))
        .bind(peer.id)
        .bind(peer.organization_id)
        .bind(&peer.name)
        .bind(&peer.address)
        .bind(&peer.ca_cert_pem)
        .bind(to_json(&peer.client_chain))
        .bind(&peer.client_key_sealed)
        .bind(to_json(&peer.peer_keys))
        .bind(to_json(&peer.granted_scopes))
        .bind(to_json(&peer.remote_scopes))
        .bind(&peer.remote_organization_id)
        .bind(peer.status.as_str())
        .bind(peer.last_seen_at)
        .bind(peer.latency_ms)
        .bind(peer.server_count)
        .bind(peer.created_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(stored == 1)
    }

    async fn branch_peer(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<BranchPeer>> {
        let sql = format!(
            "SELECT {PEER_COLUMNS} FROM branch_peers WHERE id = $1{}",
            scope_clause(scope, 2)
        );
        let mut query = sqlx::query(&sql).bind(id);
        if let Some(scope) = scope {
            query = query.bind(scope.to_vec());
        }
        let row = query.fetch_optional(&self.pool).await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    async fn list_branch_peers(&self, scope: Option<&[Uuid]>) -> StoreResult<Vec<BranchPeer>> {
        let sql = format!(
            "SELECT {PEER_COLUMNS} FROM branch_peers WHERE TRUE{} ORDER BY id",
            scope_clause(scope, 1)
        );
        let mut query = sqlx::query(&sql);
        if let Some(scope) = scope {
            query = query.bind(scope.to_vec());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(peer_from_row).collect()
    }

    async fn delete_branch_peer(&self, scope: Option<&[Uuid]>, id: Uuid) -> StoreResult<bool> {
        let sql = format!(
            "DELETE FROM branch_peers WHERE id = $1{}",
            scope_clause(scope, 2)
        );
        let mut query = sqlx::query(&sql).bind(id);
        if let Some(scope) = scope {
            query = query.bind(scope.to_vec());
        }
        // remote_servers rows go with the peering (ON DELETE CASCADE).
        Ok(query.execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn record_branch_health(
        &self,
        id: Uuid,
        health: &BranchHealth,
    ) -> StoreResult<Option<BranchStatus>> {
        let before: Option<String> = sqlx::query_scalar(
            "UPDATE branch_peers p SET status = $1,
                 last_seen_at = COALESCE($2, p.last_seen_at),
                 latency_ms = COALESCE($3, p.latency_ms),
                 server_count = COALESCE($4, p.server_count)
             FROM (SELECT id, status FROM branch_peers WHERE id = $5 FOR UPDATE) old
             WHERE p.id = old.id
             RETURNING old.status",
        )
        .bind(health.status.as_str())
        .bind(health.last_seen_at)
        .bind(health.latency_ms)
        .bind(health.server_count)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        before.as_deref().map(status).transpose()
    }

    async fn set_branch_peer_keys(
        &self,
        id: Uuid,
        keys: &[tether_protocol::VerificationKey],
    ) -> StoreResult<()> {
        sqlx::query("UPDATE branch_peers SET peer_keys = $1 WHERE id = $2")
            .bind(to_json(&keys))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn replace_remote_servers(
        &self,
        branch_id: Uuid,
        servers: &[RemoteServer],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Locks the peering: a concurrent delete waits, or this sees it gone.
        let exists: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM branch_peers WHERE id = $1 FOR UPDATE")
                .bind(branch_id)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM remote_servers WHERE branch_id = $1")
            .bind(branch_id)
            .execute(&mut *tx)
            .await?;
        if exists.is_some() {
            for s in servers {
                sqlx::query(
                    "INSERT INTO remote_servers (branch_id, id, name, hostname, labels, status,
                     last_seen_at, agent_version, cpu_percent, memory_used_bytes, memory_total_bytes, synced_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .bind(branch_id)
                .bind(s.id)
                .bind(&s.name)
                .bind(&s.hostname)
                .bind(Json(&s.labels))
                .bind(&s.status)
                .bind(s.last_seen_at)
                .bind(&s.agent_version)
                .bind(s.cpu_percent)
                .bind(s.memory_used_bytes)
                .bind(s.memory_total_bytes)
                .bind(s.synced_at)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_remote_servers(&self, scope: &[Uuid]) -> StoreResult<Vec<RemoteServer>> {
        let rows = sqlx::query(
            "SELECT r.branch_id, r.id, p.organization_id, r.name, r.hostname, r.labels, r.status,
                    r.last_seen_at, r.agent_version, r.cpu_percent, r.memory_used_bytes,
                    r.memory_total_bytes, r.synced_at
             FROM remote_servers r JOIN branch_peers p ON p.id = r.branch_id
             WHERE p.organization_id = ANY($1)
             ORDER BY r.branch_id, r.id",
        )
        .bind(scope.to_vec())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(remote_from_row).collect()
    }

    async fn federation_keys(&self) -> StoreResult<Vec<FederationKey>> {
        let rows = sqlx::query(
            "SELECT kid, private_key_sealed, x, y, created_at, retired_at
             FROM federation_keys ORDER BY created_at, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(FederationKey {
                    kid: row.try_get("kid")?,
                    private_key_sealed: row.try_get("private_key_sealed")?,
                    x: row.try_get("x")?,
                    y: row.try_get("y")?,
                    created_at: row.try_get("created_at")?,
                    retired_at: row.try_get("retired_at")?,
                })
            })
            .collect()
    }

    async fn rotate_federation_key(&self, key: &FederationKey) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE federation_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(key.created_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO federation_keys (kid, private_key_sealed, x, y, created_at, retired_at)
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(key.kid)
        .bind(&key.private_key_sealed)
        .bind(&key.x)
        .bind(&key.y)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_relayed_command(&self, relayed: &RelayedCommandRecord) -> StoreResult<()> {
        let c = &relayed.command;
        sqlx::query(&format!(
            "INSERT INTO relayed_commands ({RELAYED_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        ))
        .bind(c.id)
        .bind(c.organization_id)
        .bind(relayed.branch_id)
        .bind(c.server_id)
        .bind(&relayed.remote_command_id)
        .bind(Json(&c.argv))
        .bind(c.timeout_ms)
        .bind(c.status.as_str())
        .bind(c.exit_code)
        .bind(&c.reason)
        .bind(&c.output)
        .bind(c.output_truncated)
        .bind(&c.created_by)
        .bind(c.created_at)
        .bind(c.started_at)
        .bind(c.finished_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn update_relayed_command(
        &self,
        id: Uuid,
        update: &RelayedCommandUpdate,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE relayed_commands SET status = $1, exit_code = $2, reason = $3, output = $4,
                    output_truncated = $5, started_at = $6, finished_at = $7
             WHERE id = $8 AND status IN ('queued', 'running')",
        )
        .bind(update.status.as_str())
        .bind(update.exit_code)
        .bind(&update.reason)
        .bind(&update.output)
        .bind(update.output_truncated)
        .bind(update.started_at)
        .bind(update.finished_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn relayed_command(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<RelayedCommandRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RELAYED_COLUMNS} FROM relayed_commands
             WHERE id = $1 AND ($2::uuid[] IS NULL OR organization_id = ANY($2))"
        ))
        .bind(id)
        .bind(scope.map(<[Uuid]>::to_vec))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(relayed_from_row).transpose()
    }

    async fn unfinished_relayed_commands(&self) -> StoreResult<Vec<RelayedCommandRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RELAYED_COLUMNS} FROM relayed_commands
             WHERE status IN ('queued', 'running') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(relayed_from_row).collect()
    }
}
