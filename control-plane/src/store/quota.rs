//! What a quota limit is and whether growth breaks one: the check the
//! stores make inside an enrollment's transaction (the checks made before a
//! request are `crate::quota`'s).

use serde::Serialize;
use uuid::Uuid;

use super::{Organization, Quotas, Usage};

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

pub(crate) fn limits(quotas: &Quotas) -> [(&'static str, Option<i64>); 3] {
    [
        ("max_servers", quotas.max_servers),
        ("max_cpu_cores", quotas.max_cpu_cores),
        ("max_memory_gb", quotas.max_memory_gb),
    ]
}

pub(crate) fn amounts(usage: &Usage) -> [i64; 3] {
    [usage.servers, usage.cpu_cores, usage.memory_gb]
}

/// The first limit of `org` that its use broke by growing from `before` to
/// `after` (a resource that did not grow never counts: a server that takes
/// the place a deployment reserved adds nothing to `servers`). The stores
/// call this inside the enrollment's transaction.
pub fn exceeded_by_growth(
    org: &Organization,
    before: Usage,
    after: Usage,
) -> Option<QuotaExceeded> {
    limits(&org.quotas)
        .into_iter()
        .zip(amounts(&before))
        .zip(amounts(&after))
        .find_map(|(((resource, limit), before), after)| {
            let limit = limit?;
            (after > before && after > limit).then_some(QuotaExceeded {
                organization_id: org.id,
                resource,
                limit,
                usage: before,
                requested: after - before,
            })
        })
}

/// The first limit of `org` that `demand` would break on top of `used`
/// (servers as the enrollment counts them; CPU, memory and monthly cost from
/// the catalog sizes of committed deployments). The stores call this inside
/// the transaction that creates or approves deployments. Money is compared
/// exactly; `usage` and `requested` of a cost refusal are whole dollars
/// rounded up.
pub fn exceeded_by_demand(
    org: &Organization,
    used: &super::Demand,
    demand: &super::Demand,
) -> Option<QuotaExceeded> {
    let q = &org.quotas;
    let refusal = |resource, limit, usage, requested| QuotaExceeded {
        organization_id: org.id,
        resource,
        limit,
        usage,
        requested,
    };
    for (resource, limit, usage, requested) in [
        ("max_servers", q.max_servers, used.servers, demand.servers),
        (
            "max_cpu_cores",
            q.max_cpu_cores,
            used.cpu_cores,
            demand.cpu_cores,
        ),
        (
            "max_memory_gb",
            q.max_memory_gb,
            used.memory_gb,
            demand.memory_gb,
        ),
    ] {
        if let Some(limit) = limit {
            if requested > 0 && usage.saturating_add(requested) > limit {
                return Some(refusal(resource, limit, usage, requested));
            }
        }
    }
    if let Some(limit) = q.max_monthly_cost_usd {
        // Costs are sums of catalog prices (each at most 10 000 USD/h):
        // far inside i64 once rounded.
        if demand.monthly_cost_usd > 0.0
            && used.monthly_cost_usd + demand.monthly_cost_usd > limit as f64 + 1e-9
        {
            return Some(refusal(
                "max_monthly_cost_usd",
                limit,
                used.monthly_cost_usd.ceil() as i64,
                demand.monthly_cost_usd.ceil() as i64,
            ));
        }
    }
    None
}

/// Whether an organization sets any limit [`exceeded_by_demand`] checks.
pub fn has_any_limit(org: &Organization) -> bool {
    let q = &org.quotas;
    q.max_servers.is_some()
        || q.max_cpu_cores.is_some()
        || q.max_memory_gb.is_some()
        || q.max_monthly_cost_usd.is_some()
}

/// What the committed deployments (catalog sizes) of a set of records use.
pub(crate) fn committed_of(records: &[super::DeploymentRecord]) -> super::Demand {
    let mut used = super::Demand::default();
    for size in records.iter().filter_map(|r| r.size) {
        // Servers are counted by the store from the servers table.
        let one = super::Demand::of(size, 1);
        used.cpu_cores += one.cpu_cores;
        used.memory_gb += one.memory_gb;
        used.monthly_cost_usd += one.monthly_cost_usd;
    }
    used
}

/// SQL list of [`super::DeploymentStatus::COMMITTED`].
pub(crate) fn committed_statuses_sql() -> String {
    super::DeploymentStatus::COMMITTED
        .iter()
        .map(|status| format!("'{}'", status.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}
