//! Printing results: one table per bench run, and `tether-bench summary`
//! over the JSON files of a whole `bench/run.sh`, each figure with its unit
//! and, where the issue set one, the goal and whether it is met.

use std::path::PathBuf;

use crate::fleet::FleetResult;
use crate::footprint::{FootprintResult, ProcessFootprint};

/// Goal: connected agents on one control plane.
pub const GOAL_AGENTS: u64 = 10_000;
/// Goal: sustained acked reports per second.
pub const GOAL_REPORTS_PER_SECOND: f64 = 20_000.0;
/// Goal: control-plane memory per connected agent, KiB.
pub const GOAL_KIB_PER_AGENT: f64 = 30.0;
/// Goal: agent idle RSS, KiB (5 MB = 5,000,000 bytes).
pub const GOAL_AGENT_RSS_KIB: f64 = 5_000_000.0 / 1024.0;
/// Goal: agent CPU, percent of one core.
pub const GOAL_AGENT_CPU_PERCENT: f64 = 0.1;

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn row(what: &str, value: String, goal: &str, met: Option<bool>) {
    let verdict = met.map(verdict).unwrap_or("");
    println!("| {what:<52} | {value:>24} | {goal:<18} | {verdict:<7} |");
}

fn header(title: &str) {
    println!();
    println!("### {title}");
    println!();
    println!(
        "| {:<52} | {:>24} | {:<18} | {:<7} |",
        "figure", "value", "goal", "verdict"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(54),
        "-".repeat(26),
        "-".repeat(20),
        "-".repeat(9)
    );
}

/// Prints one fleet run.
pub fn print_fleet(r: &FleetResult) {
    header(&format!(
        "fleet: {} agents x {} reports ({} per stream), {:?}",
        r.agents_requested, r.reports_per_agent, r.batches_per_stream, r.database
    ));
    row(
        "enrollment tokens via the API",
        format!("{:.0} tokens/s", r.tokens.per_second),
        "",
        None,
    );
    row(
        "enrollments (QUIC, CSR signed, token redeemed)",
        format!("{:.0} enrollments/s", r.enrollment.per_second),
        "",
        None,
    );
    row(
        "  control-plane CPU per enrollment",
        format!("{:.2} ms", r.enrollment.cp_cpu_ms_per_item),
        "",
        None,
    );
    row(
        "session set-ups (mTLS handshake + Hello/Welcome)",
        format!("{:.0} sessions/s", r.sessions.per_second),
        "",
        None,
    );
    row(
        "connected agents",
        format!("{} agents", r.idle.connected_agents),
        &format!(">= {GOAL_AGENTS}"),
        Some(r.idle.connected_agents >= GOAL_AGENTS),
    );
    row(
        "control-plane RSS after enrollment, no session",
        format!(
            "{:.1} MiB",
            r.idle.cp_rss_after_enrollment_kib as f64 / 1024.0
        ),
        "",
        None,
    );
    row(
        "control-plane RSS, fleet connected and idle",
        format!("{:.1} MiB", r.idle.cp_rss_connected_kib as f64 / 1024.0),
        "",
        None,
    );
    row(
        "  per connected agent (RSS growth / agents)",
        format!("{:.1} KiB/agent", r.idle.kib_per_agent_marginal),
        &format!("< {GOAL_KIB_PER_AGENT:.0} KiB/agent"),
        Some(r.idle.kib_per_agent_marginal < GOAL_KIB_PER_AGENT),
    );
    row(
        "  per connected agent (whole RSS / agents)",
        format!("{:.1} KiB/agent", r.idle.kib_per_agent_total),
        &format!("< {GOAL_KIB_PER_AGENT:.0} KiB/agent"),
        Some(r.idle.kib_per_agent_total < GOAL_KIB_PER_AGENT),
    );
    row(
        "control-plane CPU, idle fleet",
        format!("{:.2} % of a core", r.idle.cp_cpu_percent_of_core),
        "",
        None,
    );
    row(
        "  per 1,000 connected agents",
        format!("{:.3} % of a core", r.idle.cp_cpu_percent_per_1000_agents),
        "",
        None,
    );
    if let Some(db) = r.idle.db_cpu_percent_of_core {
        row(
            "  PostgreSQL CPU, idle fleet",
            format!("{db:.2} % of a core"),
            "",
            None,
        );
    }
    row(
        "  machine CPU (other processes) during idle",
        format!(
            "{:.0} % ({:.0} %) of a core",
            r.idle.machine_cpu_percent, r.idle.other_processes_cpu_percent
        ),
        "",
        None,
    );
    row(
        "idle traffic (keep-alives + heartbeats)",
        format!("{:.0} B/agent/min", r.idle.udp_bytes_per_agent_per_minute),
        "",
        None,
    );
    row(
        "acked reports, sustained (every agent sending)",
        format!("{:.0} reports/s", r.load.reports_per_second_sustained),
        &format!(">= {GOAL_REPORTS_PER_SECOND:.0}/s"),
        Some(r.load.reports_per_second_sustained >= GOAL_REPORTS_PER_SECOND),
    );
    row(
        "  acked / errors",
        format!("{} / {}", r.load.acked, r.load.errors),
        "",
        None,
    );
    row(
        "  control-plane CPU during load",
        format!("{:.0} % of a core", r.load.cp_cpu_percent_of_core),
        "",
        None,
    );
    row(
        "  control-plane CPU per 1,000 reports",
        format!("{:.3} CPU-s", r.load.cp_cpu_seconds_per_1000_reports),
        "",
        None,
    );
    if let Some(db) = r.load.db_cpu_seconds_per_1000_reports {
        row(
            "  PostgreSQL CPU per 1,000 reports",
            format!("{db:.3} CPU-s"),
            "",
            None,
        );
    }
    row(
        "  simulator (client) CPU per 1,000 reports",
        format!("{:.3} CPU-s", r.load.client_cpu_seconds_per_1000_reports),
        "",
        None,
    );
    row(
        "  MetricsBatch frame / Ack frame",
        format!(
            "{} B / {} B",
            r.load.batch_frame_bytes, r.load.ack_frame_bytes
        ),
        "",
        None,
    );
    row(
        "  QUIC UDP payload per report (both ways)",
        format!(
            "{:.0} B in {:.1} dgrams",
            r.load.udp_payload_bytes_per_report, r.load.udp_datagrams_per_report
        ),
        "",
        None,
    );
    row(
        "  on the wire per report (+ IPv4/UDP headers)",
        format!("{:.0} B", r.load.ip_bytes_per_report),
        "",
        None,
    );
    row(
        "  same, less idle keep-alive/heartbeat traffic",
        format!("{:.0} B", r.load.ip_bytes_per_report_net_of_idle),
        "",
        None,
    );
    row(
        "  machine CPU (other processes) during load",
        format!(
            "{:.0} % ({:.0} %) of a core",
            r.load.machine_cpu_percent, r.load.other_processes_cpu_percent
        ),
        "",
        None,
    );
    row(
        "  QUIC packets lost (simulator's view)",
        format!("{} packets", r.load.lost_packets),
        "",
        None,
    );
    row(
        "control-plane UDP socket drops: enroll/sess/idle/load",
        format!(
            "{}/{}/{}/{}",
            r.cp_socket_drops.enrollment,
            r.cp_socket_drops.sessions,
            r.cp_socket_drops.idle,
            r.cp_socket_drops.load
        ),
        "",
        None,
    );
    row(
        "control-plane peak RSS (VmHWM)",
        format!("{:.1} MiB", r.load.cp_peak_rss_kib as f64 / 1024.0),
        "",
        None,
    );
    if let Some(h) = &r.http {
        row(
            "HTTP+JSON baseline: acked reports, sustained",
            format!("{:.0} reports/s", h.reports_per_second_sustained),
            "",
            None,
        );
        row(
            "  server CPU during load",
            format!("{:.0} % of a core", h.server_cpu_percent_of_core),
            "",
            None,
        );
        row(
            "  server CPU per 1,000 reports",
            format!("{:.3} CPU-s", h.server_cpu_seconds_per_1000_reports),
            "",
            None,
        );
        if let Some(db) = h.db_cpu_seconds_per_1000_reports {
            row(
                "  PostgreSQL CPU per 1,000 reports",
                format!("{db:.3} CPU-s"),
                "",
                None,
            );
        }
        row(
            "  client CPU per 1,000 reports",
            format!("{:.3} CPU-s", h.client_cpu_seconds_per_1000_reports),
            "",
            None,
        );
        row(
            "  JSON body / HTTP request+response",
            format!("{} B / {:.0} B", h.body_bytes, h.http_bytes_per_report),
            "",
            None,
        );
        row(
            "  on the wire per report (+ IPv4/TCP headers)",
            format!(
                "{:.0} B ({:.1} segs)",
                h.ip_bytes_per_report, h.tcp_segments_per_report
            ),
            "",
            None,
        );
        row(
            "  machine CPU (other processes) during load",
            format!(
                "{:.0} % ({:.0} %) of a core",
                h.machine_cpu_percent, h.other_processes_cpu_percent
            ),
            "",
            None,
        );
    }
    if let Some(q) = &r.ratios {
        row(
            "QUIC/HTTP: bytes on the wire per report",
            format!("{:.2} x", q.bytes_per_report),
            "",
            None,
        );
        row(
            "QUIC/HTTP: server CPU per report",
            format!("{:.2} x", q.server_cpu_per_report),
            "",
            None,
        );
        row(
            "QUIC/HTTP: client CPU per report",
            format!("{:.2} x", q.client_cpu_per_report),
            "",
            None,
        );
        row(
            "QUIC/HTTP: sustained reports/s",
            format!("{:.2} x", q.throughput),
            "",
            None,
        );
    }
    println!();
}

fn footprint_rows(p: &ProcessFootprint, goals: bool) {
    let rss_goal = format!("< {GOAL_AGENT_RSS_KIB:.0} KiB (5 MB)");
    let cpu_goal = format!("< {GOAL_AGENT_CPU_PERCENT} % of a core");
    // The goal is the idle RSS: the mean over the window (reports every
    // 30 s included). The one-second maximum, during a report's collection,
    // is printed beside it and not judged.
    row(
        &format!("{}: RSS mean (judged) / max (VmRSS)", p.name),
        format!("{:.0} / {} KiB", p.rss_kib_mean, p.rss_kib_max),
        if goals { &rss_goal } else { "" },
        goals.then_some(p.rss_kib_mean < GOAL_AGENT_RSS_KIB),
    );
    row(
        &format!("{}: PSS at the end (smaps_rollup)", p.name),
        p.pss_kib_end
            .map(|k| format!("{k} KiB"))
            .unwrap_or_else(|| "n/a".into()),
        if goals { &rss_goal } else { "" },
        goals
            .then(|| p.pss_kib_end.map(|k| (k as f64) < GOAL_AGENT_RSS_KIB))
            .flatten(),
    );
    row(
        &format!("{}: RSS anon / file-backed at the end", p.name),
        format!("{} / {} KiB", p.rss_anon_kib_end, p.rss_file_kib_end),
        "",
        None,
    );
    row(
        &format!("{}: executable size", p.name),
        format!("{:.1} MiB", p.binary_bytes as f64 / 1048576.0),
        "",
        None,
    );
    row(
        &format!("{}: peak RSS since start (VmHWM)", p.name),
        format!("{} KiB", p.peak_rss_kib),
        "",
        None,
    );
    row(
        &format!("{}: CPU over the window", p.name),
        format!("{:.4} % of a core", p.cpu_percent_of_core),
        if goals { &cpu_goal } else { "" },
        goals.then_some(p.cpu_percent_of_core < GOAL_AGENT_CPU_PERCENT),
    );
}

/// Prints the footprint run.
pub fn print_footprint(r: &FootprintResult) {
    header(&format!(
        "footprint: {} containers, {} s interval, {:.0} s window after {} s warm-up",
        r.containers, r.interval_seconds, r.window_seconds, r.warmup_seconds
    ));
    for (i, agent) in r.agents.iter().enumerate() {
        footprint_rows(agent, true);
        row(
            &format!("{}: reports stored in the window", agent.name),
            r.agent_reports_stored_in_window
                .get(i)
                .copied()
                .flatten()
                .map(|n| format!("{n} reports"))
                .unwrap_or_else(|| "n/a".into()),
            "",
            None,
        );
    }
    if let Some(ne) = &r.node_exporter {
        footprint_rows(ne, false);
        row(
            "prometheus-node-exporter: scrapes in window",
            format!(
                "{} x {} B",
                r.node_exporter_scrapes_in_window, r.node_exporter_scrape_bytes
            ),
            "",
            None,
        );
        for agent in &r.agents {
            row(
                &format!("RSS {} / node-exporter", agent.name),
                format!("{:.2} x", agent.rss_kib_mean / ne.rss_kib_mean.max(1.0)),
                "",
                None,
            );
            row(
                &format!("CPU {} / node-exporter", agent.name),
                format!(
                    "{:.2} x",
                    agent.cpu_percent_of_core / ne.cpu_percent_of_core.max(1e-9)
                ),
                "",
                None,
            );
        }
    }
    println!("Coolify Sentinel: {}", r.sentinel);
    println!();
}

/// `tether-bench summary FILE...`: the tables of several runs' JSON files.
#[derive(Debug, Clone, clap::Args)]
pub struct SummaryArgs {
    /// JSON files written with --json-out.
    pub files: Vec<PathBuf>,
}

pub fn run(args: SummaryArgs) -> crate::error::Result<()> {
    for path in &args.files {
        let text = std::fs::read_to_string(path)?;
        if let Ok(fleet) = serde_json::from_str::<FleetResult>(&text) {
            print_fleet(&fleet);
        } else if let Ok(fp) = serde_json::from_str::<FootprintResult>(&text) {
            print_footprint(&fp);
        } else if let Ok(store) = serde_json::from_str::<crate::store_bench::StoreResult>(&text) {
            crate::store_bench::print(&store);
        } else {
            eprintln!("{}: not a tether-bench result", path.display());
        }
    }
    Ok(())
}
