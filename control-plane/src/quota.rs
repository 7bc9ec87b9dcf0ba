//! Quotas along the organization tree: an organization's use counts against
//! its own limits and those of every ancestor, so a child never gets more than
//! its ancestors have left.

use serde::Serialize;
use uuid::Uuid;

use crate::api::ApiError;
use crate::store::{Quotas, Store, StoreError, Usage};

/// A limit that adding resources would break.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaExceeded {
    pub organization_id: Uuid,
    pub resource: &'static str,
    pub limit: i64,
    pub usage: i64,
    pub requested: i64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} quota of organization {} is {} and {} are in use",
            self.resource, self.organization_id, self.limit, self.usage
        )
    }
}

impl From<QuotaExceeded> for ApiError {
    fn from(q: QuotaExceeded) -> Self {
        ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "quota_exceeded",
            q.to_string(),
        )
        .with_detail("organization_id", q.organization_id.to_string())
        .with_detail("resource", q.resource)
        .with_detail("limit", q.limit)
        .with_detail("usage", q.usage)
        .with_detail("requested", q.requested)
    }
}

fn limits(quotas: &Quotas) -> [(&'static str, Option<i64>); 3] {
    [
        ("max_servers", quotas.max_servers),
        ("max_cpu_cores", quotas.max_cpu_cores),
        ("max_memory_gb", quotas.max_memory_gb),
    ]
}

fn amounts(usage: &Usage) -> [i64; 3] {
    [usage.servers, usage.cpu_cores, usage.memory_gb]
}

/// Checks that `organization_id` (and every ancestor) can take `additional`.
pub async fn check(
    store: &dyn Store,
    organization_id: Uuid,
    additional: Usage,
) -> Result<Result<(), QuotaExceeded>, StoreError> {
    for org in store.organization_ancestors(organization_id).await? {
        let has_limit = limits(&org.quotas).iter().any(|(_, l)| l.is_some());
        if !has_limit {
            continue;
        }
        let usage = store.organization_usage(org.id).await?;
        for (((resource, limit), used), requested) in limits(&org.quotas)
            .into_iter()
            .zip(amounts(&usage))
            .zip(amounts(&additional))
        {
            if let Some(limit) = limit {
                if requested > 0 && used + requested > limit {
                    return Ok(Err(QuotaExceeded {
                        organization_id: org.id,
                        resource,
                        limit,
                        usage: used,
                        requested,
                    }));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// Checks that quotas given to a child of `parent_id` fit within what every
/// ancestor allows; returns the first offending field.
pub async fn check_child_limits(
    store: &dyn Store,
    parent_id: Uuid,
    quotas: &Quotas,
) -> Result<Result<(), String>, StoreError> {
    for ancestor in store.organization_ancestors(parent_id).await? {
        for ((field, wanted), (_, allowed)) in
            limits(quotas).into_iter().zip(limits(&ancestor.quotas))
        {
            if let (Some(wanted), Some(allowed)) = (wanted, allowed) {
                if wanted > allowed {
                    return Ok(Err(format!(
                        "{field} {wanted} exceeds the {allowed} allowed by ancestor organization {}",
                        ancestor.id
                    )));
                }
            }
        }
    }
    Ok(Ok(()))
}
