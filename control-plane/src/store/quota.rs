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
