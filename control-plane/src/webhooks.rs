//! Webhook events of the control plane (being written).

use crate::app::ControlPlane;
use crate::store::Deployment;

/// Emits a deployment event to the organization's webhooks.
pub async fn emit_deployment(cp: &ControlPlane, deployment: &Deployment, event: &str) {
    let _ = cp;
    tracing::info!(deployment_id = %deployment.id, event, "deployment event");
}
