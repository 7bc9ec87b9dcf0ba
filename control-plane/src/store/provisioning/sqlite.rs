//! [`super::ProvisioningStore`] on SQLite.

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::store::sqlite::*;
use crate::store::*;

#[async_trait::async_trait]
impl ProvisioningStore for SqliteStore {
    async fn create_cloud_credential(&self, c: &CloudCredential) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO cloud_credentials (id, organization_id, name, provider, default_region,
               credentials_sealed, is_validated, created_at, last_used_at, validation_status,
               validated_at, validation_error, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(c.id.to_string())
        .bind(c.organization_id.to_string())
        .bind(&c.name)
        .bind(&c.provider)
        .bind(&c.default_region)
        .bind(&c.credentials_sealed)
        .bind(c.is_validated)
        .bind(ms(c.created_at))
        .bind(c.last_used_at.map(ms))
        .bind(c.validation.status.as_str())
        .bind(c.validation.at.map(ms))
        .bind(&c.validation.error)
        .bind(c.updated_at.map(ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
    ) -> StoreResult<Option<CloudCredential>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM cloud_credentials WHERE deleted_at IS NULL AND id = "
        ));
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(credential_from_row).transpose()
    }

    async fn list_cloud_credentials(&self, scope: &[Uuid]) -> StoreResult<Vec<CloudCredential>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM cloud_credentials WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", scope);
        builder.push(" ORDER BY created_at, id");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(credential_from_row).collect()
    }

    async fn mark_cloud_credential(
        &self,
        id: Uuid,
        validated: Option<bool>,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE cloud_credentials SET is_validated = COALESCE(?, is_validated), last_used_at = ?
             WHERE id = ?",
        )
        .bind(validated)
        .bind(ms(at))
        .bind(id.to_string())
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
        let mut builder = QueryBuilder::new("UPDATE cloud_credentials SET deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(", credentials_sealed = '' WHERE deleted_at IS NULL AND id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        Ok(builder.build().execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn update_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        update: &CredentialUpdate,
    ) -> StoreResult<CredentialUpdateOutcome> {
        let mut builder = QueryBuilder::new("UPDATE cloud_credentials SET updated_at = ");
        builder.push_bind(ms(update.at));
        if let Some(name) = &update.name {
            builder.push(", name = ");
            builder.push_bind(name.clone());
        }
        if let Some(region) = &update.default_region {
            builder.push(", default_region = ");
            builder.push_bind(region.clone());
        }
        if let Some((sealed, _)) = &update.credentials_sealed {
            builder.push(", credentials_sealed = ");
            builder.push_bind(sealed.clone());
            builder.push(
                ", is_validated = 0, validation_status = 'unvalidated', validated_at = NULL, \
                 validation_error = NULL",
            );
        }
        builder.push(" WHERE deleted_at IS NULL AND id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        if let Some((_, previous)) = &update.credentials_sealed {
            builder.push(" AND credentials_sealed = ");
            builder.push_bind(previous.clone());
        }
        builder.push(format!(" RETURNING {CREDENTIAL_COLUMNS}"));
        if let Some(row) = builder.build().fetch_optional(&self.pool).await? {
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
            "UPDATE cloud_credentials SET is_validated = ?, validation_status = ?, validated_at = ?,
               validation_error = ?, last_used_at = COALESCE(?, last_used_at)
             WHERE id = ? AND deleted_at IS NULL",
        )
        .bind(validation.status == ValidationStatus::Valid)
        .bind(validation.status.as_str())
        .bind(validation.at.map(ms))
        .bind(&validation.error)
        .bind(validation.at.map(ms))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployments_using_credential(
        &self,
        credential_id: Uuid,
        limit: u32,
    ) -> StoreResult<(Vec<Uuid>, u64)> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM deployments
             WHERE credential_id = ? AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL
             ORDER BY created_at, id LIMIT ?",
        )
        .bind(credential_id.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments
             WHERE credential_id = ? AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL",
        )
        .bind(credential_id.to_string())
        .fetch_one(&self.pool)
        .await?;
        let ids = ids
            .iter()
            .map(|id| uuid(id))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok((ids, u64::try_from(count).unwrap_or(0)))
    }

    async fn delete_unused_cloud_credential(
        &self,
        scope: &[Uuid],
        id: Uuid,
        force: bool,
        limit: u32,
        at: DateTime<Utc>,
    ) -> StoreResult<CredentialDeletion> {
        // One transaction: SQLite serialises writers, so no deployment is
        // created for the credential between the look and the delete.
        let mut tx = self.pool.begin().await?;
        let mut builder = QueryBuilder::new("UPDATE cloud_credentials SET deleted_at = ");
        builder.push_bind(ms(at));
        builder.push(", credentials_sealed = '' WHERE deleted_at IS NULL AND id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        let deleted = builder.build().execute(&mut *tx).await?.rows_affected() == 1;
        if !deleted {
            return Ok(CredentialDeletion::NotFound);
        }
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM deployments
             WHERE credential_id = ? AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL
             ORDER BY created_at, id LIMIT ?",
        )
        .bind(id.to_string())
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments
             WHERE credential_id = ? AND status NOT IN ('destroyed', 'rejected', 'expired') AND deleted_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let ids = ids
            .iter()
            .map(|id| uuid(id))
            .collect::<StoreResult<Vec<_>>>()?;
        let count = u64::try_from(count).unwrap_or(0);
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
        let mut builder = QueryBuilder::new("UPDATE deployments SET status = ");
        builder.push_bind(DeploymentStatus::Destroying.as_str());
        builder.push(", record = json_set(record, '$.delete_server_data', json(");
        builder.push_bind(if delete_server_data { "true" } else { "false" });
        builder.push(")), updated_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE deleted_at IS NULL AND id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        builder.push(" AND status IN (");
        let mut list = builder.separated(", ");
        for status in from {
            list.push_bind(status.as_str());
        }
        list.push_unseparated(")");
        Ok(builder.build().execute(&self.pool).await?.rows_affected() == 1)
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(d.id.to_string())
        .bind(d.organization_id.to_string())
        .bind(&d.provider)
        .bind(d.credential_id.map(|c| c.to_string()))
        .bind(d.status.as_str())
        .bind(d.server_id.map(|s| s.to_string()))
        .bind(to_json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(ms(d.created_at))
        .bind(ms(d.updated_at))
        .bind(d.completed_at.map(ms))
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
        let organization_id = first.organization_id.to_string();
        let mut tx = self.pool.begin().await?;
        // A write first: SQLite's one writer is ours from here to the commit,
        // so racing requests into a limited tree count one another.
        // (`name = name`, not the key: no foreign-key checks.)
        sqlx::query("UPDATE organizations SET name = name WHERE id = ?")
            .bind(&organization_id)
            .execute(&mut *tx)
            .await?;
        for org in any_limited_ancestors(&mut tx, &organization_id).await? {
            let used = committed_on(&mut tx, org.id).await?;
            if let Some(q) = crate::store::quota::exceeded_by_demand(&org, &used, demand) {
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
        let moved = sqlx::query(
            "UPDATE deployments SET status = 'pending', record = ?, bootstrap_token_sealed = ?,
               updated_at = ?
             WHERE id = ? AND deleted_at IS NULL AND status = 'pending_approval'",
        )
        .bind(to_json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(ms(d.updated_at))
        .bind(d.id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !moved {
            tx.rollback().await?;
            return Ok(Ok(false));
        }
        // The deployment counts from here on: check what was used before it.
        let organization_id = d.organization_id.to_string();
        for org in any_limited_ancestors(&mut tx, &organization_id).await? {
            let mut used = committed_on(&mut tx, org.id).await?;
            used.servers -= demand.servers;
            used.cpu_cores -= demand.cpu_cores;
            used.memory_gb -= demand.memory_gb;
            used.monthly_cost_usd -= demand.monthly_cost_usd;
            if let Some(q) = crate::store::quota::exceeded_by_demand(&org, &used, demand) {
                tx.rollback().await?;
                return Ok(Err(q));
            }
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
            "UPDATE deployments SET status = ?, record = ?, updated_at = ?, completed_at = ?
             WHERE id = ? AND deleted_at IS NULL AND status = 'pending_approval'",
        )
        .bind(to.as_str())
        .bind(to_json(&d.record))
        .bind(ms(d.updated_at))
        .bind(d.completed_at.map(ms))
        .bind(d.id.to_string())
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
        let mut builder = QueryBuilder::new(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments
             WHERE deleted_at IS NULL AND json_extract(record, '$.batch_id') = "
        ));
        builder.push_bind(batch_id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        builder.push(" ORDER BY id");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn deployments_created_before(
        &self,
        scope: &[Uuid],
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<Deployment>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE created_at < "
        ));
        builder.push_bind(ms(before));
        push_scope(&mut builder, "organization_id", scope);
        builder.push(" ORDER BY created_at, id");
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn approval_policy(&self, organization_id: Uuid) -> StoreResult<Option<ApprovalPolicy>> {
        let row = sqlx::query(
            "SELECT require, above_monthly_usd, providers, regions, updated_at
             FROM approval_policies WHERE organization_id = ?",
        )
        .bind(organization_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(policy_from_row).transpose()
    }

    async fn set_approval_policy(
        &self,
        organization_id: Uuid,
        p: &ApprovalPolicy,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO approval_policies
               (organization_id, require, above_monthly_usd, providers, regions, updated_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (organization_id) DO UPDATE SET require = excluded.require,
               above_monthly_usd = excluded.above_monthly_usd, providers = excluded.providers,
               regions = excluded.regions, updated_at = excluded.updated_at",
        )
        .bind(organization_id.to_string())
        .bind(&p.require)
        .bind(p.above_monthly_usd)
        .bind(to_json(&p.providers))
        .bind(to_json(&p.regions))
        .bind(ms(p.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployment(
        &self,
        scope: Option<&[Uuid]>,
        id: Uuid,
    ) -> StoreResult<Option<Deployment>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deleted_at IS NULL AND id = "
        ));
        builder.push_bind(id.to_string());
        if let Some(scope) = scope {
            push_scope(&mut builder, "organization_id", scope);
        }
        let row = builder.build().fetch_optional(&self.pool).await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    async fn list_deployments(
        &self,
        scope: &[Uuid],
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<Vec<Deployment>> {
        let mut builder = QueryBuilder::new(format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deleted_at IS NULL"
        ));
        push_scope(&mut builder, "organization_id", scope);
        if let Some(cursor) = cursor {
            builder.push(" AND id < ");
            builder.push_bind(cursor.to_string());
        }
        builder.push(" ORDER BY id DESC LIMIT ");
        builder.push_bind(i64::from(limit));
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(deployment_from_row).collect()
    }

    async fn claim_deployment(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Deployment>> {
        // One statement: SQLite serialises writers, so two workers never
        // claim the same row.
        let active = active_statuses_sql();
        let row = sqlx::query(&format!(
            "UPDATE deployments SET claimed_by = ?, lease_until = ?
             WHERE id = (SELECT id FROM deployments
                         WHERE deleted_at IS NULL AND status IN ({active})
                           AND (lease_until IS NULL OR lease_until < ?)
                         ORDER BY created_at, id LIMIT 1)
             RETURNING {DEPLOYMENT_COLUMNS}"
        ))
        .bind(worker)
        .bind(ms(lease_until))
        .bind(ms(now))
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
        let lease = d.status.is_active().then(|| ms(lease_until));
        let claimed_by = d.status.is_active().then_some(worker);
        let result = sqlx::query(
            "UPDATE deployments SET status = ?, server_id = ?, record = ?, bootstrap_token_sealed = ?,
               updated_at = ?, completed_at = ?, lease_until = ?, claimed_by = ?
             WHERE id = ? AND claimed_by = ?",
        )
        .bind(d.status.as_str())
        .bind(d.server_id.map(|s| s.to_string()))
        .bind(to_json(&d.record))
        .bind(&d.bootstrap_token_sealed)
        .bind(ms(d.updated_at))
        .bind(d.completed_at.map(ms))
        .bind(lease)
        .bind(claimed_by)
        .bind(d.id.to_string())
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
        let mut builder = QueryBuilder::new("UPDATE deployments SET status = ");
        builder.push_bind(to.as_str());
        builder.push(", updated_at = ");
        builder.push_bind(ms(at));
        builder.push(" WHERE deleted_at IS NULL AND id = ");
        builder.push_bind(id.to_string());
        push_scope(&mut builder, "organization_id", scope);
        builder.push(" AND status IN (");
        let mut list = builder.separated(", ");
        for status in from {
            list.push_bind(status.as_str());
        }
        list.push_unseparated(")");
        Ok(builder.build().execute(&self.pool).await?.rows_affected() == 1)
    }

    async fn append_deployment_event(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
        kind: &str,
        body: &serde_json::Value,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO deployment_events (deployment_id, at, kind, body) VALUES (?, ?, ?, ?)
             RETURNING seq",
        )
        .bind(deployment_id.to_string())
        .bind(ms(at))
        .bind(kind)
        .bind(body.to_string())
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
             WHERE deployment_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(deployment_id.to_string())
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeploymentEvent {
                    seq: row.try_get("seq")?,
                    deployment_id: uuid(row.try_get("deployment_id")?)?,
                    at: from_ms(row.try_get("at")?),
                    kind: row.try_get("kind")?,
                    body: json(row.try_get("body")?)?,
                })
            })
            .collect()
    }

    async fn deployment_token_hash(&self, deployment_id: Uuid) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT token_hash FROM enrollment_tokens WHERE deployment_id = ? ORDER BY created_at LIMIT 1",
        )
        .bind(deployment_id.to_string())
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn expire_deployment_token(
        &self,
        deployment_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE enrollment_tokens SET expires_at = MIN(expires_at, ?)
             WHERE deployment_id = ? AND used_at IS NULL",
        )
        .bind(ms(at))
        .bind(deployment_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn deployment_server(&self, deployment_id: Uuid) -> StoreResult<Option<(Server, bool)>> {
        let row = sqlx::query(&format!(
            "SELECT {SERVER_COLUMNS}, EXISTS (SELECT 1 FROM metrics m WHERE m.server_id = servers.id) AS reported
             FROM servers WHERE deleted_at IS NULL AND deployment_id = ? ORDER BY created_at LIMIT 1"
        ))
        .bind(deployment_id.to_string())
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
            "SELECT state_sealed, lock_id, lock_info FROM terraform_states WHERE deployment_id = ?",
        )
        .bind(deployment_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let info: Option<String> = row.try_get("lock_info")?;
            Ok(TerraformStateRecord {
                state_sealed: row.try_get("state_sealed")?,
                lock_id: row.try_get("lock_id")?,
                lock_info: info.as_deref().map(json).transpose()?,
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
        // Writing first takes SQLite's write lock for the whole check-and-set.
        ensure_state_row(&mut tx, deployment_id, at).await?;
        let (held, info): (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT lock_id, lock_info FROM terraform_states WHERE deployment_id = ?",
        )
        .bind(deployment_id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if let Some(held) = held {
            if Some(held.as_str()) != lock_id {
                let info = info.as_deref().map(json).transpose()?;
                return Ok(LockOutcome::HeldBy(info.unwrap_or_default()));
            }
        }
        sqlx::query(
            "UPDATE terraform_states SET state_sealed = ?, updated_at = ? WHERE deployment_id = ?",
        )
        .bind(state_sealed)
        .bind(ms(at))
        .bind(deployment_id.to_string())
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
        ensure_state_row(&mut tx, deployment_id, at).await?;
        let (held, info): (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT lock_id, lock_info FROM terraform_states WHERE deployment_id = ?",
        )
        .bind(deployment_id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if let Some(held) = held {
            if Some(held.as_str()) != lock_id {
                let info = info.as_deref().map(json).transpose()?;
                return Ok(LockOutcome::HeldBy(info.unwrap_or_default()));
            }
        }
        sqlx::query(
            "UPDATE terraform_states SET state_sealed = ?, updated_at = ? WHERE deployment_id = ?",
        )
        .bind(&state.state_sealed)
        .bind(ms(at))
        .bind(deployment_id.to_string())
        .execute(&mut *tx)
        .await?;
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM terraform_state_versions WHERE deployment_id = ?",
        )
        .bind(deployment_id.to_string())
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO terraform_state_versions (id, deployment_id, version, state_sealed, sha256,
               size_bytes, serial, restored_from, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(state.version_id.to_string())
        .bind(deployment_id.to_string())
        .bind(version)
        .bind(&state.version_sealed)
        .bind(&state.sha256)
        .bind(state.size_bytes)
        .bind(state.serial)
        .bind(state.restored_from)
        .bind(ms(at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM terraform_state_versions WHERE deployment_id = ? AND version <= ?",
        )
        .bind(deployment_id.to_string())
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
             WHERE deployment_id = ? ORDER BY version DESC"
        ))
        .bind(deployment_id.to_string())
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
             WHERE deployment_id = ? AND version = ?"
        ))
        .bind(deployment_id.to_string())
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
        ensure_state_row(&mut tx, deployment_id, at).await?;
        let taken = sqlx::query(
            "UPDATE terraform_states SET lock_id = ?, lock_info = ?, updated_at = ?
             WHERE deployment_id = ? AND lock_id IS NULL",
        )
        .bind(lock_id)
        .bind(info.to_string())
        .bind(ms(at))
        .bind(deployment_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if taken {
            LockOutcome::Done
        } else {
            let holder: Option<String> = sqlx::query_scalar(
                "SELECT lock_info FROM terraform_states WHERE deployment_id = ?",
            )
            .bind(deployment_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
            LockOutcome::HeldBy(holder.as_deref().map(json).transpose()?.unwrap_or_default())
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
            "UPDATE terraform_states SET lock_id = NULL, lock_info = NULL, updated_at = ?
             WHERE deployment_id = ? AND (? IS NULL OR lock_id IS NULL OR lock_id = ?)",
        )
        .bind(ms(at))
        .bind(deployment_id.to_string())
        .bind(lock_id)
        .bind(lock_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let held: Option<Option<String>> =
            sqlx::query_scalar("SELECT lock_info FROM terraform_states WHERE deployment_id = ?")
                .bind(deployment_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(match (released, held) {
            (0, Some(info)) => {
                LockOutcome::HeldBy(info.as_deref().map(json).transpose()?.unwrap_or_default())
            }
            _ => LockOutcome::Done,
        })
    }
}

/// Inserts one deployment row.
async fn insert_deployment(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    d: &Deployment,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO deployments (id, organization_id, provider, credential_id, status, server_id,
           record, bootstrap_token_sealed, created_at, updated_at, completed_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(d.id.to_string())
    .bind(d.organization_id.to_string())
    .bind(&d.provider)
    .bind(d.credential_id.map(|c| c.to_string()))
    .bind(d.status.as_str())
    .bind(d.server_id.map(|s| s.to_string()))
    .bind(to_json(&d.record))
    .bind(&d.bootstrap_token_sealed)
    .bind(ms(d.created_at))
    .bind(ms(d.updated_at))
    .bind(d.completed_at.map(ms))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An `approval_policies` row.
fn policy_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<ApprovalPolicy> {
    let list = |column: &str| -> StoreResult<Vec<String>> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
    };
    Ok(ApprovalPolicy {
        require: row.try_get("require")?,
        above_monthly_usd: row.try_get("above_monthly_usd")?,
        providers: list("providers")?,
        regions: list("regions")?,
        updated_at: row.time("updated_at")?,
    })
}
