//! Webhook events of the control plane (being written: deliveries signed
//! with HMAC-SHA256, retried with backoff, recorded).

use uuid::Uuid;

use crate::app::ControlPlane;
use crate::store::Deployment;

/// Emits `event` (e.g. `server.offline`) of `organization_id` with `data`
/// to the webhooks subscribed to it.
pub async fn emit(cp: &ControlPlane, organization_id: Uuid, event: &str, data: serde_json::Value) {
    let _ = cp;
    tracing::info!(%organization_id, event, %data, "event");
}

/// Emits a deployment event (`infrastructure.*`) with the deployment's view.
pub async fn emit_deployment(cp: &ControlPlane, deployment: &Deployment, event: &str) {
    let data = serde_json::json!({
        "deployment_id": deployment.id,
        "status": deployment.status,
        "provider": deployment.provider,
        "server_name": deployment.record.server_name,
        "server_id": deployment.server_id,
        "error_message": deployment.record.error_message,
    });
    emit(cp, deployment.organization_id, event, data).await;
}
