//! [`super::ProvisioningStore`] on PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::*;

fn count_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
use crate::store::postgres::*;
use crate::store::*;

#[async_trait::async_trait]
impl ProvisioningStore for PostgresStore {
    async fn create_cloud_credential(&self, c: &CloudCredential) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO cloud_credentials (id, organization_id, name, provider, default_region,
               credentials_sealed, is_validated, created_at, last_used_at, validation_status,
               validated_at, validation_error, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
        .bind(c.validation.status.as_str())
        .bind(c.validation.at)
        .bind(&c.validation.error)
        .bind(c.updated_at)
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

    async fn update_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        update: &CredentialUpdate,
    ) -> StoreResult<CredentialUpdateOutcome> {
        let (sealed, previous) = match &update.credentials_sealed {
            Some((sealed, previous)) => (Some(sealed.as_str()), Some(previous.as_str())),
            None => (None, None),
        };
        let row = sqlx::query(&format!(
            "UPDATE cloud_credentials SET updated_at = $1,
               name = COALESCE($2, name),
               default_region = COALESCE($3, default_region),
               credentials_sealed = COALESCE($4, credentials_sealed),
               is_validated = CASE WHEN $4::text IS NULL THEN is_validated ELSE false END,
               validation_status = CASE WHEN $4::text IS NULL THEN validation_status ELSE 'unvalidated' END,
               validated_at = CASE WHEN $4::text IS NULL THEN validated_at ELSE NULL END,
               validation_error = CASE WHEN $4::text IS NULL THEN validation_error ELSE NULL END
             WHERE deleted_at IS NULL AND id = $5 AND organization_id = ANY($6)
               AND ($7::text IS NULL OR credentials_sealed = $7)
             RETURNING {CREDENTIAL_COLUMNS}"
        ))
        .bind(update.at)
        .bind(&update.name)
        .bind(&update.default_region)
        .bind(sealed)
        .bind(id)
        .bind(scope)
        .bind(previous)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(CredentialUpdateOutcome::Updated(Box::new(
                credential_from_row(&row)?,
            )));
        }
        Ok(match self.cloud_credential(scope, id).await? {
            Some(_) => CredentialUpdateOutcome::Changed,
            None => CredentialUpdateOutcome::NotFound,
        })
    }

    async fn record_cloud_credential_validation(
        &self,
        id: Uuid,
        validation: &CredentialValidation,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE cloud_credentials SET is_validated = $1, validation_status = $2, validated_at = $3,
               validation_error = $4, last_used_at = COALESCE($3, last_used_at)
             WHERE id = $5 AND deleted_at IS NULL",
        )
        .bind(validation.status == ValidationStatus::Valid)
        .bind(validation.status.as_str())
        .bind(validation.at)
        .bind(&validation.error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployments_using_credential(
        &self,
        credential_id: Uuid,
        limit: u32,
    ) -> StoreResult<(Vec<Uuid>, u64)> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM deployments
             WHERE credential_id = $1 AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL
             ORDER BY created_at, id LIMIT $2",
        )
        .bind(credential_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments
             WHERE credential_id = $1 AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL",
        )
        .bind(credential_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((ids, count_of(count)))
    }

    async fn delete_unused_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        force: bool,
        limit: u32,
        at: DateTime<Utc>,
    ) -> StoreResult<CredentialDeletion> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query(
            "UPDATE cloud_credentials SET deleted_at = $1, credentials_sealed = ''
             WHERE deleted_at IS NULL AND id = $2 AND organization_id = ANY($3)",
        )
        .bind(at)
        .bind(id)
        .bind(scope)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !deleted {
            return Ok(CredentialDeletion::NotFound);
        }
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM deployments
             WHERE credential_id = $1 AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL
             ORDER BY created_at, id LIMIT $2",
        )
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments
             WHERE credential_id = $1 AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let count = count_of(count);
        if count > 0 && !force {
            tx.rollback().await?;
            return Ok(CredentialDeletion::InUse {
                deployment_ids: ids,
                count,
            });
        }
        tx.commit().await?;
        Ok(CredentialDeletion::Deleted {
            orphaned: ids,
            orphaned_count: count,
        })
    }

    async fn request_destroy(
        &self,
        scope: &[Uuid],
        id: Uuid,
        from: &[DeploymentStatus],
        delete_server_data: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let result = sqlx::query(
            "UPDATE deployments SET status = $1,
               record = jsonb_set(record, '{delete_server_data}', to_jsonb($2::boolean)),
               updated_at = $3
             WHERE deleted_at IS NULL AND id = $4 AND organization_id = ANY($5) AND status = ANY($6)",
        )
        .bind(DeploymentStatus::Destroying.as_str())
        .bind(delete_server_data)
        .bind(at)
        .bind(id)
        .bind(scope)
        .bind(&from)
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

    async fn write_terraform_state_version(
        &self,
        deployment_id: Uuid,
        state: &StateWrite,
        lock_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<LockOutcome> {
        let mut tx = self.pool.begin().await?;
        // The state row stays locked to the end: versions are numbered in turn.
        let (held, info) = locked_state_row(&mut tx, deployment_id, at).await?;
        if let Some(held) = held {
            if Some(held.as_str()) != lock_id {
                return Ok(LockOutcome::HeldBy(info.unwrap_or_default()));
            }
        }
        sqlx::query(
            "UPDATE terraform_states SET state_sealed = $1, updated_at = $2 WHERE deployment_id = $3",
        )
        .bind(&state.state_sealed)
        .bind(at)
        .bind(deployment_id)
        .execute(&mut *tx)
        .await?;
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM terraform_state_versions WHERE deployment_id = $1",
        )
        .bind(deployment_id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO terraform_state_versions (id, deployment_id, version, state_sealed, sha256,
               size_bytes, serial, restored_from, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(state.version_id)
        .bind(deployment_id)
        .bind(version)
        .bind(&state.version_sealed)
        .bind(&state.sha256)
        .bind(state.size_bytes)
        .bind(state.serial)
        .bind(state.restored_from)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM terraform_state_versions WHERE deployment_id = $1 AND version <= $2",
        )
        .bind(deployment_id)
        .bind(version - STATE_VERSIONS_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(LockOutcome::Done)
    }

    async fn terraform_state_versions(
        &self,
        deployment_id: Uuid,
    ) -> StoreResult<Vec<TerraformStateVersion>> {
        let rows = sqlx::query(&format!(
            "SELECT {STATE_VERSION_COLUMNS} FROM terraform_state_versions
             WHERE deployment_id = $1 ORDER BY version DESC"
        ))
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(state_version_from_row).collect()
    }

    async fn terraform_state_version(
        &self,
        deployment_id: Uuid,
        version: i64,
    ) -> StoreResult<Option<(TerraformStateVersion, String)>> {
        let row = sqlx::query(&format!(
            "SELECT {STATE_VERSION_COLUMNS}, state_sealed FROM terraform_state_versions
             WHERE deployment_id = $1 AND version = $2"
        ))
        .bind(deployment_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((state_version_from_row(&row)?, row.try_get("state_sealed")?)))
            .transpose()
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
