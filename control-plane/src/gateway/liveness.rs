//! Server liveness and connection states, owned by the gateway (which owns
//! the sessions): the [`liveness_loop`] (started with the other background
//! loops by `crate::app`) records this replica's live sessions in the store
//! and [`sweep`]s (`offline` for servers no replica holds, `timeout` for
//! servers that never opened a session); the `server.online`,
//! `server.offline` and `server.timeout` events ([`emit_state`]) and the
//! `status_reason` texts of each state change.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::context::ControlPlane;
use crate::store::health::ServerRef;

/// Keeps liveness current: records that this replica's sessions are alive,
/// then sweeps (see [`sweep`]): servers whose sessions went silent on any
/// replica go offline, servers that never connected time out. Refreshing
/// first means a sweep never marks a server this replica holds; a server
/// held by another live replica is refreshed by that replica every period
/// (at most a third of `--offline-after`), so it is never stale.
pub async fn liveness_loop(cp: Arc<ControlPlane>) {
    let period =
        (cp.config.offline_after / 3).clamp(Duration::from_millis(300), Duration::from_secs(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Utc::now();
        let live = cp.sessions.server_ids();
        if !live.is_empty() {
            if let Err(e) = cp.store.touch_servers(&live, now).await {
                // Sweeping now could mark this replica's own servers offline.
                tracing::warn!(error = %e, "could not record session liveness; not sweeping");
                continue;
            }
        }
        sweep(&cp, now).await;
    }
}

/// Emits a connection-state event (`server.online`, `server.offline`,
/// `server.timeout`).
pub async fn emit_state(
    cp: &ControlPlane,
    server: &ServerRef,
    event: &str,
    status: &str,
    reason: Option<&str>,
) {
    crate::events::emit(
        cp,
        server.organization_id,
        event,
        json!({
            "server_id": server.id,
            "server_name": server.name,
            "status": status,
            "status_reason": reason,
        }),
    )
    .await;
}

/// The `status_reason` of a server whose session on this replica ended for
/// `why` (what the gateway observed): what happened, then what to check.
pub fn session_end_reason(why: &str) -> String {
    format!(
        "{why}; the agent reconnects by itself, so if the server stays offline check that the \
         host is up, that tether-agent is running on it (systemctl status tether-agent; \
         journalctl -u tether-agent) and that it reaches the control plane over UDP"
    )
}

/// The `status_reason` of a server the sweeper marks offline.
pub fn stale_reason(offline_after: Duration) -> String {
    format!(
        "no heartbeat recorded for {} and no control-plane replica holds its session (the \
         replica that held it may have stopped); the agent reconnects by itself, so if the \
         server stays offline check the host and journalctl -u tether-agent",
        humantime::format_duration(offline_after)
    )
}

/// The `status_reason` of a server that never opened a session.
pub fn timeout_reason(registration_timeout: Duration, quic_addr: &str) -> String {
    format!(
        "the agent enrolled but opened no session within {}; check that tether-agent is \
         running on the host (systemctl status tether-agent; journalctl -u tether-agent) and \
         that it can reach {quic_addr} over UDP",
        humantime::format_duration(registration_timeout)
    )
}

/// One sweep (run by [`liveness_loop`] right after it refreshed
/// `last_seen_at` of this replica's sessions, so none of them is stale):
/// servers still `online` that no replica refreshed within `--offline-after`
/// go `offline`; servers still `connecting` past the registration timeout
/// go `timeout`. Each change is an event.
pub async fn sweep(cp: &ControlPlane, now: DateTime<Utc>) {
    let offline_after = cp.config.offline_after;
    if let Ok(window) = chrono::Duration::from_std(offline_after) {
        let reason = stale_reason(offline_after);
        match cp.store.mark_stale_offline(now - window, &reason).await {
            Ok(servers) => {
                for server in servers {
                    tracing::info!(server_id = %server.id, %reason, "server offline");
                    emit_state(cp, &server, "server.offline", "offline", Some(&reason)).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sweep silent servers"),
        }
    }
    let registration = cp.config.registration_timeout;
    if let Ok(window) = chrono::Duration::from_std(registration) {
        let reason = timeout_reason(registration, &cp.public_quic_addr);
        match cp
            .store
            .mark_registration_timeouts(now - window, &reason)
            .await
        {
            Ok(servers) => {
                for server in servers {
                    tracing::info!(server_id = %server.id, %reason, "server timed out");
                    emit_state(cp, &server, "server.timeout", "timeout", Some(&reason)).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sweep servers that never connected"),
        }
    }
}
