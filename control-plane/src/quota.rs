//! Quotas along the organization tree: an organization's use counts against
//! its own limits and those of every ancestor, so a child never gets more than
//! its ancestors have left. The checks made before a request; the check made
//! inside the enrollment's transaction, and the limit type itself, belong to
//! the store (`store::quota`).

use uuid::Uuid;

pub use crate::store::quota::QuotaExceeded;
use crate::store::quota::{amounts, limits};
use crate::store::{Quotas, Store, StoreError, Usage};

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
        let with_cost = |q: &Quotas| {
            let [a, b, c] = limits(q);
            [a, b, c, ("max_monthly_cost_usd", q.max_monthly_cost_usd)]
        };
        for ((field, wanted), (_, allowed)) in with_cost(quotas)
            .into_iter()
            .zip(with_cost(&ancestor.quotas))
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
