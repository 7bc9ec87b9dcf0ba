//! [`super::ProvisioningStore`] on PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::*;
use crate::store::postgres::*;
use crate::store::*;

#[async_trait::async_trait]
impl ProvisioningStore for PostgresStore {
    async fn create_cloud_credential(&self, c: &CloudCredential) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO cloud_credentials (id, organization_id, name, provider, default_region,
               credentials_sealed, is_validated, created_at, last_used_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(c.id)
        .bind(c.organization_id)
        .bind(&c.name)
        .bind(&c.provider)
        .bind(&c.default_region)
        .bind(&c.credentials_sealed)
        .bind(c.is_validated)
        .bind(c.created_at)
        .bind(c.last_used_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
    ) -> StoreResult<Option<CloudCredential>> {
        let row = sqlx::query(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM cloud_credentials
             WHERE deleted_at IS NULL AND id = $1 AND organization_id = ANY($2)"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(credential_from_row).transpose()
    }

    async fn list_cloud_credentials(&self, scope: &[Uuid]) -> StoreResult<Vec<CloudCredential>> {
        let rows = sqlx::query(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM cloud_credentials
             WHERE deleted_at IS NULL AND organization_id = ANY($1) ORDER BY created_at, id"
        ))
        .bind(scope)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_from_row).collect()
    }

    async fn mark_cloud_credential(
        &self,
        id: Uuid,
        validated: Option<bool>,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE cloud_credentials SET is_validated = COALESCE($1, is_validated), last_used_at = $2
             WHERE id = $3",
        )
        .bind(validated)
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE cloud_credentials SET deleted_at = $1, credentials_sealed = ''
             WHERE deleted_at IS NULL AND id = $2 AND organization_id = ANY($3)",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn create_deployment(
        &self,
        d: &Deployment,
        token: &NewEnrollmentToken,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO deployments (id, organization_id, provider, credential_id, status, server_id,
               record, bootstrap_token_sealed, created_at, updated_at, completed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(d.id)
        .bind(d.organization_id)
        .bind(&d.provider)
        .bind(d.credential_id)
        .bind(d.status.as_str())
        .bind(d.server_id)
        .bind(Json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(d.created_at)
        .bind(d.updated_at)
        .bind(d.completed_at)
        .execute(&mut *tx)
        .await?;
        insert_enrollment_token(&mut *tx, token).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_deployments_within_quota(
        &self,
        deployments: &[(Deployment, Option<NewEnrollmentToken>)],
        demand: &Demand,
    ) -> StoreResult<Result<(), QuotaExceeded>> {
        let Some((first, _)) = deployments.first() else {
            return Ok(Ok(()));
        };
        let mut tx = self.pool.begin().await?;
        // The organization and its ancestors locked (id order, as the
        // enrollment does): racing requests and enrollments into a limited
        // tree count one another.
        let Some(limited) = lock_limited_ancestors(&mut tx, first.organization_id).await? else {
            tx.rollback().await?;
            return Err(StoreError::Corrupt(format!(
                "organization {} is gone",
                first.organization_id
            )));
        };
        for org in &limited {
            let used = committed_on(&mut tx, org.id).await?;
            if let Some(q) = crate::store::quota::exceeded_by_demand(org, &used, demand) {
                tx.rollback().await?;
                return Ok(Err(q));
            }
        }
        for (d, token) in deployments {
            insert_deployment(&mut tx, d).await?;
            if let Some(token) = token {
                insert_enrollment_token(&mut *tx, token).await?;
            }
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn approve_deployment_within_quota(
        &self,
        d: &Deployment,
        token: &NewEnrollmentToken,
        demand: &Demand,
    ) -> StoreResult<Result<bool, QuotaExceeded>> {
        let mut tx = self.pool.begin().await?;
        let Some(limited) = lock_limited_ancestors(&mut tx, d.organization_id).await? else {
            tx.rollback().await?;
            return Ok(Ok(false));
        };
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM deployments WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
        )
        .bind(d.id)
        .fetch_optional(&mut *tx)
        .await?;
        if status.as_deref() != Some(DeploymentStatus::PendingApproval.as_str()) {
            tx.rollback().await?;
            return Ok(Ok(false));
        }
        for org in &limited {
            let used = committed_on(&mut tx, org.id).await?;
            if let Some(q) = crate::store::quota::exceeded_by_demand(org, &used, demand) {
                tx.rollback().await?;
                return Ok(Err(q));
            }
        }
        let moved = sqlx::query(
            "UPDATE deployments SET status = 'pending', record = $1, bootstrap_token_sealed = $2,
               updated_at = $3
             WHERE id = $4 AND deleted_at IS NULL AND status = 'pending_approval'",
        )
        .bind(Json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(d.updated_at)
        .bind(d.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !moved {
            tx.rollback().await?;
            return Ok(Ok(false));
        }
        insert_enrollment_token(&mut *tx, token).await?;
        tx.commit().await?;
        Ok(Ok(true))
    }

    async fn close_pending_deployment(
        &self,
        d: &Deployment,
        to: DeploymentStatus,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE deployments SET status = $1, record = $2, updated_at = $3, completed_at = $4
             WHERE id = $5 AND deleted_at IS NULL AND status = 'pending_approval'",
        )
        .bind(to.as_str())
        .bind(Json(&d.record))
        .bind(d.updated_at)
        .bind(d.completed_at)
        .bind(d.id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn pending_approvals(&self) -> StoreResult<Vec<Deployment>> {
        let rows = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE deleted_at IS NULL AND status = 'pending_approval' ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn batch_deployments(
        &self,
        scope: &[Uuid],
        batch_id: Uuid,
    ) -> StoreResult<Vec<Deployment>> {
        let rows = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE deleted_at IS NULL AND record ->> 'batch_id' = $1 AND organization_id = ANY($2)
             ORDER BY id"
        ))
        .bind(batch_id.to_string())
        .bind(scope)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn deployments_created_before(
        &self,
        scope: &[Uuid],
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<Deployment>> {
        let rows = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE created_at < $1 AND organization_id = ANY($2) ORDER BY created_at, id"
        ))
        .bind(before)
        .bind(scope)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn approval_policy(&self, organization_id: Uuid) -> StoreResult<Option<ApprovalPolicy>> {
        let row = sqlx::query(
            "SELECT require, above_monthly_usd, providers, regions, updated_at
             FROM approval_policies WHERE organization_id = $1",
        )
        .bind(organization_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| -> StoreResult<ApprovalPolicy> {
            let providers: Json<Vec<String>> = row.try_get("providers")?;
            let regions: Json<Vec<String>> = row.try_get("regions")?;
            Ok(ApprovalPolicy {
                require: row.try_get("require")?,
                above_monthly_usd: row.try_get("above_monthly_usd")?,
                providers: providers.0,
                regions: regions.0,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .transpose()
    }

    async fn set_approval_policy(
        &self,
        organization_id: Uuid,
        p: &ApprovalPolicy,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO approval_policies
               (organization_id, require, above_monthly_usd, providers, regions, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (organization_id) DO UPDATE SET require = excluded.require,
               above_monthly_usd = excluded.above_monthly_usd, providers = excluded.providers,
               regions = excluded.regions, updated_at = excluded.updated_at",
        )
        .bind(organization_id)
        .bind(&p.require)
        .bind(p.above_monthly_usd)
        .bind(Json(&p.providers))
        .bind(Json(&p.regions))
        .bind(p.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployment(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<Deployment>> {
        let row = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE deleted_at IS NULL AND id = $1 AND ($2::uuid[] IS NULL OR organization_id = ANY($2))"
        ))
        .bind(id)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    async fn list_deployments(
        &self,
        scope: &[Uuid],
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<Vec<Deployment>> {
        let rows = sqlx::query(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE deleted_at IS NULL AND organization_id = ANY($1) AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(scope)
        .bind(cursor)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn claim_deployment(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Deployment>> {
        // Replicas claim concurrently: SKIP LOCKED hands each a different row.
        let active = active_statuses_sql();
        let row = sqlx::query(&format!(
            "UPDATE deployments SET claimed_by = $1, lease_until = $2
             WHERE id = (SELECT id FROM deployments
                         WHERE deleted_at IS NULL AND status IN ({active})
                           AND (lease_until IS NULL OR lease_until < $3)
                         ORDER BY created_at, id LIMIT 1
                         FOR UPDATE SKIP LOCKED)
             RETURNING {DEPLOYMENT_COLUMNS}"
        ))
        .bind(worker)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    async fn save_deployment(
        &self,
        d: &Deployment,
        worker: &str,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let lease = d.status.is_active().then_some(lease_until);
        let claimed_by = d.status.is_active().then_some(worker);
        let result = sqlx::query(
            "UPDATE deployments SET status = $1, server_id = $2, record = $3, bootstrap_token_sealed = $4,
               updated_at = $5, completed_at = $6, lease_until = $7, claimed_by = $8
             WHERE id = $9 AND claimed_by = $10",
        )
        .bind(d.status.as_str())
        .bind(d.server_id)
        .bind(Json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(d.updated_at)
        .bind(d.completed_at)
        .bind(lease)
        .bind(claimed_by)
        .bind(d.id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn transition_deployment(
        &self,
        scope: &[Uuid],
        id: Uuid,
        from: &[DeploymentStatus],
        to: DeploymentStatus,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let result = sqlx::query(
            "UPDATE deployments SET status = $1, updated_at = $2
             WHERE deleted_at IS NULL AND id = $3 AND organization_id = ANY($4) AND status = ANY($5)",
        )
        .bind(to.as_str())
        .bind(at)
        .bind(id)
        .bind(scope)
        .bind(&from)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn append_deployment_event(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
        kind: &str,
        body: &serde_json::Value,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO deployment_events (deployment_id, at, kind, body) VALUES ($1, $2, $3, $4)
             RETURNING seq",
        )
        .bind(deployment_id)
        .bind(at)
        .bind(kind)
        .bind(body)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn deployment_events(
        &self,
        deployment_id: Uuid,
        after_seq: i64,
        limit: u32,
    ) -> StoreResult<Vec<DeploymentEvent>> {
        let rows = sqlx::query(
            "SELECT seq, deployment_id, at, kind, body FROM deployment_events
             WHERE deployment_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(deployment_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeploymentEvent {
                    seq: row.try_get("seq")?,
                    deployment_id: row.try_get("deployment_id")?,
                    at: row.try_get("at")?,
                    kind: row.try_get("kind")?,
                    body: row.try_get("body")?,
                })
            })
            .collect()
    }

    async fn deployment_token_hash(&self, deployment_id: Uuid) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT token_hash FROM enrollment_tokens WHERE deployment_id = $1 ORDER BY created_at LIMIT 1",
        )
        .bind(deployment_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn expire_deployment_token(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE enrollment_tokens SET expires_at = LEAST(expires_at, $1)
             WHERE deployment_id = $2 AND used_at IS NULL",
        )
        .bind(at)
        .bind(deployment_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployment_server(&self, deployment_id: Uuid) -> StoreResult<Option<(Server, bool)>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS}, EXISTS (SELECT 1 FROM metrics m WHERE m.server_id = servers.id) AS reported
             FROM servers WHERE deleted_at IS NULL AND deployment_id = $1 ORDER BY created_at LIMIT 1"
        ))
        .bind(deployment_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((server_from_row(&row)?, row.try_get("reported")?)))
            .transpose()
    }

    async fn terraform_state(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Option<TerraformStateRecord>> {
        let row = sqlx::query(
            "SELECT state_sealed, lock_id, lock_info FROM terraform_states WHERE deployment_id = $1",
        )
        .bind(deployment_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(TerraformStateRecord {
                state_sealed: row.try_get("state_sealed")?,
                lock_id: row.try_get("lock_id")?,
                lock_info: row.try_get("lock_info")?,
            })
        })
        .transpose()
    }

    async fn write_terraform_state(
        &self,
        deployment_id: Uuid,
        state_sealed: Option<&str>,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome> {
        let mut tx = self.pool.begin().await?;
        let (held, info) = locked_state_row(&mut tx, deployment_id, at).await?;
        if let Some(held) = held {
            if Some(held.as_str()) != lock_id {
                return Ok(LockOutcome::HeldBy(info.unwrap_or_default()));
            }
        }
        sqlx::query(
            "UPDATE terraform_states SET state_sealed = $1, updated_at = $2 WHERE deployment_id = $3",
        )
        .bind(state_sealed)
        .bind(at)
        .bind(deployment_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(LockOutcome::Done)
    }

    async fn lock_terraform_state(
        &self,
        deployment_id: Uuid,
        lock_id: &str,
        info: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome> {
        let mut tx = self.pool.begin().await?;
        let (held, holder) = locked_state_row(&mut tx, deployment_id, at).await?;
        let outcome = if held.is_some() {
            LockOutcome::HeldBy(holder.unwrap_or_default())
        } else {
            sqlx::query(
                "UPDATE terraform_states SET lock_id = $1, lock_info = $2, updated_at = $3
                 WHERE deployment_id = $4",
            )
            .bind(lock_id)
            .bind(info)
            .bind(at)
            .bind(deployment_id)
            .execute(&mut *tx)
            .await?;
            LockOutcome::Done
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn unlock_terraform_state(
        &self,
        deployment_id: Uuid,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome> {
        let mut tx = self.pool.begin().await?;
        let released = sqlx::query(
            "UPDATE terraform_states SET lock_id = NULL, lock_info = NULL, updated_at = $1
             WHERE deployment_id = $2 AND ($3::text IS NULL OR lock_id IS NULL OR lock_id = $3)",
        )
        .bind(at)
        .bind(deployment_id)
        .bind(lock_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let held: Option<Option<serde_json::Value>> =
            sqlx::query_scalar("SELECT lock_info FROM terraform_states WHERE deployment_id = $1")
                .bind(deployment_id)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(match (released, held) {
            (0, Some(info)) => LockOutcome::HeldBy(info.unwrap_or_default()),
            _ => LockOutcome::Done,
        })
    }
}

/// Inserts one deployment row.
async fn insert_deployment(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    d: &Deployment,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO deployments (id, organization_id, provider, credential_id, status, server_id,
           record, bootstrap_token_sealed, created_at, updated_at, completed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(d.id)
    .bind(d.organization_id)
    .bind(&d.provider)
    .bind(d.credential_id)
    .bind(d.status.as_str())
    .bind(d.server_id)
    .bind(Json(&d.record))
    .bind(&d.bootstrap_token_sealed)
    .bind(d.created_at)
    .bind(d.updated_at)
    .bind(d.completed_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
