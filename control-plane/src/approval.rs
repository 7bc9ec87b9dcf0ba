//! Approval policies as provisioning applies them: which policy governs an
//! organization (its own, else its nearest ancestor's) and whether it
//! catches a provision. The policies are stored by `store` (area
//! `provisioning`) and set through `api::governance`; the provision handler
//! asks [`reason`] before it creates anything.

use uuid::Uuid;

use crate::store::{ApprovalPolicy, Store, StoreError};

/// The policy that applies to `organization_id` and the organization whose
/// policy it is: its own, else its nearest ancestor's.
pub async fn effective_policy(
    store: &dyn Store,
    organization_id: Uuid,
) -> Result<Option<(Uuid, ApprovalPolicy)>, StoreError> {
    for org in store.organization_ancestors(organization_id).await? {
        if let Some(policy) = store.approval_policy(org.id).await? {
            return Ok(Some((org.id, policy)));
        }
    }
    Ok(None)
}

/// Why the approval policy that applies to `organization_id` catches a
/// provision of `provider` in `region` estimated at `monthly_usd`, or
/// `None` when it may run at once.
pub async fn reason(
    store: &dyn Store,
    organization_id: Uuid,
    provider: &str,
    region: &str,
    monthly_usd: f64,
) -> Result<Option<String>, StoreError> {
    let Some((owner, policy)) = effective_policy(store, organization_id).await? else {
        return Ok(None);
    };
    Ok(reason_of(&policy, owner, provider, region, monthly_usd))
}

/// Whether `policy` (of organization `owner`) catches a provision, and why.
fn reason_of(
    policy: &ApprovalPolicy,
    owner: Uuid,
    provider: &str,
    region: &str,
    monthly_usd: f64,
) -> Option<String> {
    if policy.require == "always" {
        Some(format!(
            "the approval policy of organization {owner} requires approval for every provision"
        ))
    } else if let Some(above) = policy.above_monthly_usd.filter(|a| monthly_usd > *a) {
        Some(format!(
            "the monthly estimate {monthly_usd:.2} USD is above the {above:.2} USD the approval policy of organization {owner} allows without approval"
        ))
    } else if policy.providers.iter().any(|p| p == provider) {
        Some(format!(
            "the approval policy of organization {owner} requires approval for provider {provider}"
        ))
    } else if policy.regions.iter().any(|r| r == region) {
        Some(format!(
            "the approval policy of organization {owner} requires approval for region {region}"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        require: &str,
        above: Option<f64>,
        providers: &[&str],
        regions: &[&str],
    ) -> ApprovalPolicy {
        ApprovalPolicy {
            require: require.into(),
            above_monthly_usd: above,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_policy_catches_always_above_its_cost_or_its_providers_and_regions_only() {
        let owner = Uuid::now_v7();
        assert!(reason_of(
            &policy("always", None, &[], &[]),
            owner,
            "local",
            "local",
            0.0
        )
        .is_some_and(|r| r.contains("every provision")));
        let never = policy("never", Some(10.0), &["aws"], &["fsn1"]);
        assert_eq!(reason_of(&never, owner, "hetzner", "nbg1", 10.0), None);
        assert!(reason_of(&never, owner, "hetzner", "nbg1", 10.01)
            .is_some_and(|r| r.contains("above the 10.00 USD")));
        assert!(reason_of(&never, owner, "aws", "us-east-1", 0.0)
            .is_some_and(|r| r.contains("provider aws")));
        assert!(reason_of(&never, owner, "hetzner", "fsn1", 0.0)
            .is_some_and(|r| r.contains("region fsn1")));
    }
}
