//! [`super::FederationStore`] on SQLite.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::{
    BranchHealth, BranchInvite, BranchPeer, BranchStatus, FederationKey, FederationStore,
    RelayedCommandRecord, RelayedCommandUpdate, RemoteServer, RELAYED_DELIVER_WITHIN,
    RELAYED_MAX_OUTPUT_BYTES,
};
use crate::store::sqlite::{from_ms, ms, opt_ms, push_scope, uuid, SqliteStore};
use crate::store::{StoreError, StoreResult};

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

fn invite_from_row(row: &SqliteRow) -> StoreResult<BranchInvite> {
    Ok(BranchInvite {
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        name: row.try_get("name")?,
        secret_hash: row.try_get("secret_hash")?,
        scopes: json(row.try_get("scopes")?)?,
        created_at: from_ms(row.try_get("created_at")?),
        expires_at: from_ms(row.try_get("expires_at")?),
        used_at: opt_ms(row.try_get("used_at")?),
    })
}

const PEER_COLUMNS: &str = "id, organization_id, name, address, ca_cert_pem, client_chain, \
     client_key_sealed, peer_keys, granted_scopes, remote_scopes, remote_organization_id, \
     status, last_seen_at, latency_ms, server_count, created_at";

fn peer_from_row(row: &SqliteRow) -> StoreResult<BranchPeer> {
    Ok(BranchPeer {
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
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
        last_seen_at: opt_ms(row.try_get("last_seen_at")?),
        latency_ms: row.try_get("latency_ms")?,
        server_count: row.try_get("server_count")?,
        created_at: from_ms(row.try_get("created_at")?),
    })
}

fn remote_from_row(row: &SqliteRow) -> StoreResult<RemoteServer> {
    Ok(RemoteServer {
        branch_id: uuid(row.try_get("branch_id")?)?,
        id: uuid(row.try_get("id")?)?,
        organization_id: uuid(row.try_get("organization_id")?)?,
        name: row.try_get("name")?,
        hostname: row.try_get("hostname")?,
        labels: json(row.try_get("labels")?)?,
        status: row.try_get("status")?,
        last_seen_at: opt_ms(row.try_get("last_seen_at")?),
        agent_version: row.try_get("agent_version")?,
        cpu_percent: row.try_get("cpu_percent")?,
        memory_used_bytes: row.try_get("memory_used_bytes")?,
        memory_total_bytes: row.try_get("memory_total_bytes")?,
        synced_at: from_ms(row.try_get("synced_at")?),
    })
}

const RELAYED_COLUMNS: &str = "id, organization_id, branch_id, remote_server_id, \
     remote_command_id, argv, timeout_ms, status, exit_code, reason, output, output_truncated, \
     created_by, created_at, started_at, finished_at";

fn relayed_from_row(row: &SqliteRow) -> StoreResult<RelayedCommandRecord> {
    let argv: String = row.try_get("argv")?;
    let status: String = row.try_get("status")?;
    let created_at = from_ms(row.try_get("created_at")?);
    Ok(RelayedCommandRecord {
        branch_id: uuid(&row.try_get::<String, _>("branch_id")?)?,
        remote_command_id: row.try_get("remote_command_id")?,
        command: crate::store::CommandRecord {
            id: uuid(&row.try_get::<String, _>("id")?)?,
            organization_id: uuid(&row.try_get::<String, _>("organization_id")?)?,
            server_id: uuid(&row.try_get::<String, _>("remote_server_id")?)?,
            argv: serde_json::from_str(&argv)
                .map_err(|e| StoreError::Corrupt(format!("relayed command argv: {e}")))?,
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
            started_at: opt_ms(row.try_get("started_at")?),
            finished_at: opt_ms(row.try_get("finished_at")?),
            claimed_by: None,
            deliver_by: created_at + RELAYED_DELIVER_WITHIN,
        },
    })
}

#[async_trait::async_trait]
impl FederationStore for SqliteStore {
    async fn create_branch_invite(&self, invite: &BranchInvite) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO branch_invites (id, organization_id, name, secret_hash, scopes, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(invite.id.to_string())
        .bind(invite.organization_id.to_string())
        .bind(&invite.name)
        .bind(&invite.secret_hash)
        .bind(to_json(&invite.scopes))
        .bind(ms(invite.created_at))
        .bind(ms(invite.expires_at))
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
            "UPDATE branch_invites SET used_at = ?, used_by = ?
             WHERE id = ? AND secret_hash = ? AND used_at IS NULL AND expires_at > ?
             RETURNING {INVITE_COLUMNS}"
        ))
        .bind(ms(now))
        .bind(used_by)
        .bind(id.to_string())
        .bind(secret_hash)
        .bind(ms(now))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(invite_from_row).transpose()
    }

    async fn upsert_branch_peer(&self, peer: &BranchPeer) -> StoreResult<bool> {
        let stored = sqlx::query(&format!(
            "INSERT INTO branch_peers ({PEER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET organization_id = excluded.organization_id, name = excluded.name, address = excluded.address, ca_cert_pem = excluded.ca_cert_pem, client_chain = excluded.client_chain, client_key_sealed = excluded.client_key_sealed, peer_keys = excluded.peer_keys, granted_scopes = excluded.granted_scopes, remote_scopes = excluded.remote_scopes, remote_organization_id = excluded.remote_organization_id, status = excluded.status, last_seen_at = excluded.last_seen_at, latency_ms = excluded.latency_ms, server_count = excluded.server_count
             WHERE branch_peers.organization_id = excluded.organization_id
               AND branch_peers.ca_cert_pem = excluded.ca_cert_pem"
        ))
        .bind(peer.id.to_string())
        .bind(peer.organization_id.to_string())
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
        .bind(peer.last_seen_at.map(ms))
        .bind(peer.latency_ms)
        .bind(peer.server_count)
        .bind(ms(peer.created_at))
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
        let mut builder = QueryBuilder::new(format!(
            "SELECT {PEER_COLUMNS} FROM branch_peers WHERE id = "
        ));
        builder.push_bind(id.to_string());
        if let Some(scope) = scope {
            push_scope(&mut builder, "organization_id", scope);
        }
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(peer_from_row).transpose()
    }

    async fn list_branch_peers(&self, scope: Option<&[Uuid]>) -> StoreResult<Vec<BranchPeer>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {PEER_COLUMNS} FROM branch_peers WHERE 1 = 1"
        ));
        if let Some(scope) = scope {
            push_scope(&mut builder, "organization_id", scope);
        }
        builder.push(" ORDER BY id");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(peer_from_row).collect()
    }

    async fn delete_branch_peer(&self, scope: Option<&[Uuid]>, id: Uuid) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let mut builder = QueryBuilder::new("DELETE FROM branch_peers WHERE id = ");
        builder.push_bind(id.to_string());
        if let Some(scope) = scope {
            push_scope(&mut builder, "organization_id", scope);
        }
        let deleted = builder.build().execute(&mut *tx).await?.rows_affected() == 1;
        sqlx::query("DELETE FROM remote_servers WHERE branch_id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn record_branch_health(
        &self,
        id: Uuid,
        health: &BranchHealth,
    ) -> StoreResult<Option<BranchStatus>> {
        let mut tx = self.pool.begin().await?;
        let before: Option<String> =
            sqlx::query_scalar("SELECT status FROM branch_peers WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(before) = before else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE branch_peers SET status = ?,
                 last_seen_at = COALESCE(?, last_seen_at),
                 latency_ms = COALESCE(?, latency_ms),
                 server_count = COALESCE(?, server_count)
             WHERE id = ?",
        )
        .bind(health.status.as_str())
        .bind(health.last_seen_at.map(ms))
        .bind(health.latency_ms)
        .bind(health.server_count)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(status(&before)?))
    }

    async fn set_branch_peer_keys(
        &self,
        id: Uuid,
        keys: &[tether_protocol::VerificationKey],
    ) -> StoreResult<()> {
        sqlx::query("UPDATE branch_peers SET peer_keys = ? WHERE id = ?")
            .bind(to_json(&keys))
            .bind(id.to_string())
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
        sqlx::query("DELETE FROM remote_servers WHERE branch_id = ?")
            .bind(branch_id.to_string())
            .execute(&mut *tx)
            .await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM branch_peers WHERE id = ?")
            .bind(branch_id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            for s in servers {
                sqlx::query(
                    "INSERT INTO remote_servers (branch_id, id, name, hostname, labels, status,
                     last_seen_at, agent_version, cpu_percent, memory_used_bytes, memory_total_bytes, synced_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(branch_id.to_string())
                .bind(s.id.to_string())
                .bind(&s.name)
                .bind(&s.hostname)
                .bind(to_json(&s.labels))
                .bind(&s.status)
                .bind(s.last_seen_at.map(ms))
                .bind(&s.agent_version)
                .bind(s.cpu_percent)
                .bind(s.memory_used_bytes)
                .bind(s.memory_total_bytes)
                .bind(ms(s.synced_at))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_remote_servers(&self, scope: &[Uuid]) -> StoreResult<Vec<RemoteServer>> {
        let mut builder = QueryBuilder::new(
            "SELECT r.branch_id, r.id, p.organization_id, r.name, r.hostname, r.labels, r.status,
                    r.last_seen_at, r.agent_version, r.cpu_percent, r.memory_used_bytes,
                    r.memory_total_bytes, r.synced_at
             FROM remote_servers r JOIN branch_peers p ON p.id = r.branch_id WHERE 1 = 1",
        );
        push_scope(&mut builder, "p.organization_id", scope);
        builder.push(" ORDER BY r.branch_id, r.id");
        let rows = builder.build().fetch_all(&self.pool).await?;
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
                    kid: uuid(row.try_get("kid")?)?,
                    private_key_sealed: row.try_get("private_key_sealed")?,
                    x: row.try_get("x")?,
                    y: row.try_get("y")?,
                    created_at: from_ms(row.try_get("created_at")?),
                    retired_at: opt_ms(row.try_get("retired_at")?),
                })
            })
            .collect()
    }

    async fn rotate_federation_key(&self, key: &FederationKey) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE federation_keys SET retired_at = ? WHERE retired_at IS NULL")
            .bind(ms(key.created_at))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO federation_keys (kid, private_key_sealed, x, y, created_at, retired_at)
             VALUES (?, ?, ?, ?, ?, NULL)",
        )
        .bind(key.kid.to_string())
        .bind(&key.private_key_sealed)
        .bind(&key.x)
        .bind(&key.y)
        .bind(ms(key.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_relayed_command(&self, relayed: &RelayedCommandRecord) -> StoreResult<()> {
        let c = &relayed.command;
        let argv = serde_json::to_string(&c.argv)
            .map_err(|e| StoreError::Corrupt(format!("relayed command argv: {e}")))?;
        sqlx::query(&format!(
            "INSERT INTO relayed_commands ({RELAYED_COLUMNS})
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(c.id.to_string())
        .bind(c.organization_id.to_string())
        .bind(relayed.branch_id.to_string())
        .bind(c.server_id.to_string())
        .bind(&relayed.remote_command_id)
        .bind(argv)
        .bind(c.timeout_ms)
        .bind(c.status.as_str())
        .bind(c.exit_code)
        .bind(&c.reason)
        .bind(&c.output)
        .bind(c.output_truncated)
        .bind(&c.created_by)
        .bind(ms(c.created_at))
        .bind(c.started_at.map(ms))
        .bind(c.finished_at.map(ms))
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
            "UPDATE relayed_commands SET status = ?, exit_code = ?, reason = ?, output = ?,
                    output_truncated = ?, started_at = ?, finished_at = ?
             WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(update.status.as_str())
        .bind(update.exit_code)
        .bind(&update.reason)
        .bind(&update.output)
        .bind(update.output_truncated)
        .bind(update.started_at.map(ms))
        .bind(update.finished_at.map(ms))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn relayed_command(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<RelayedCommandRecord>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {RELAYED_COLUMNS} FROM relayed_commands WHERE id = "
        ));
        builder.push_bind(id.to_string());
        if let Some(scope) = scope {
            push_scope(&mut builder, "organization_id", scope);
        }
        let row = builder.build().fetch_optional(&self.pool).await?;
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
