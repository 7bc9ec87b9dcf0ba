//! Background upkeep of stored telemetry: 5-minute and 1-hour rollups of the
//! points received since the last run, and retention of raw points and
//! rollups. Runs on every replica; the work is idempotent.

use std::sync::Arc;

use chrono::Utc;

use crate::context::ControlPlane;

/// Rollup steps, in seconds.
pub const ROLLUP_STEPS: [i64; 2] = [300, 3600];

/// Rollups only look at points received more than this long ago: longer
/// than a write can wait for its transaction and than replicas' clocks
/// disagree, so no point commits behind the watermark.
const ROLLUP_MARGIN: chrono::Duration = chrono::Duration::minutes(2);

/// Runs rollups and retention every `--rollup-interval` until shutdown.
pub async fn maintenance_loop(cp: Arc<ControlPlane>) {
    let mut tick = tokio::time::interval(cp.config.rollup_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cp.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = run_once(&cp).await {
            tracing::warn!(error = %e, "telemetry upkeep failed; retrying next round");
        }
    }
}

/// One round of rollups and retention.
pub async fn run_once(cp: &ControlPlane) -> Result<(), crate::store::StoreError> {
    let now = Utc::now();
    for step in ROLLUP_STEPS {
        let written = cp.store.compute_rollups(step, now - ROLLUP_MARGIN).await?;
        if written > 0 {
            tracing::debug!(step, written, "rollups computed");
        }
    }
    let raw_before = now
        - chrono::Duration::from_std(cp.config.metrics_retention)
            .unwrap_or(chrono::Duration::days(7));
    let rollups_before = now
        - chrono::Duration::from_std(cp.config.rollup_retention)
            .unwrap_or(chrono::Duration::days(90));
    let pruned = cp.store.prune_metrics(raw_before, rollups_before).await?;
    if pruned > 0 {
        tracing::info!(pruned, "expired metrics removed");
    }
    Ok(())
}
