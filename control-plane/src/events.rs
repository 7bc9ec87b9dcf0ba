//! Events of the control plane (`server.offline`, `health.failed`,
//! `infrastructure.*`, ...): [`emit`] hands one to the alert engine (which
//! may answer with follow-up events) and queues it, and the follow-ups, for
//! webhook delivery. Sits above `alerts` and `webhooks`, which do not import
//! each other.

use uuid::Uuid;

use crate::context::ControlPlane;
use crate::store::Deployment;

/// Emits `event` (e.g. `server.offline`) of `organization_id` with `data`
/// to the webhooks subscribed to it, and to the alert engine (offline and
/// health rules). Never blocks on HTTP and never fails the caller: errors
/// are logged.
pub async fn emit(cp: &ControlPlane, organization_id: Uuid, event: &str, data: serde_json::Value) {
    let follow_ups = crate::alerts::on_event(cp, organization_id, event, &data).await;
    crate::webhooks::enqueue(cp, organization_id, event, data).await;
    for (organization_id, event, data) in follow_ups {
        crate::webhooks::enqueue(cp, organization_id, event, data).await;
    }
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
