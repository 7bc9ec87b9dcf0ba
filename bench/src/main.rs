//! `tether-bench`: Tether's benchmarks.
//!
//! * `fleet` — N simulated agents (real keys, real enrollment, real mutual-TLS
//!   QUIC sessions) against one real `tether serve`, with an HTTP+JSON
//!   ingestion baseline of the same reports in the same run.
//! * `http-baseline-server` — the baseline's server process (started by `fleet`).
//! * `footprint` — the idle footprint of `tether-agent` next to
//!   prometheus-node-exporter.
//! * `store` — the store alone (`Store::ingest_metrics`), to tell the
//!   database's share of the per-report cost from the transport's.
//! * `commands` — command round trip (API call to terminal status) with N
//!   connected simulated agents that answer `RunCommand` at once.
//! * `branch-commands` — the cross-branch command round trip (two peered
//!   control planes), with the local round trip as baseline.
//! * `summary` — the tables of result files written with `--json-out`.
//!
//! See bench/README.md and docs/performance.md.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod branch_commands;
mod commands;
mod control_plane;
mod error;
mod fleet;
mod footprint;
mod http_baseline;
mod procfs;
mod report;
mod store_bench;
mod summary;

#[derive(Parser)]
#[command(
    name = "tether-bench",
    about = "Tether benchmarks: fleet simulator and agent footprint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulated fleet against a real control plane (plus the HTTP+JSON baseline).
    Fleet(fleet::FleetArgs),
    /// The HTTP+JSON baseline server (started by `fleet`).
    HttpBaselineServer(http_baseline::ServerArgs),
    /// Idle footprint of tether-agent and prometheus-node-exporter.
    Footprint(footprint::FootprintArgs),
    /// The store alone: realistic reports through Store::ingest_metrics.
    Store(store_bench::StoreArgs),
    /// Command round trip: POST a command, follow its SSE to the final status.
    Commands(commands::CommandsArgs),
    /// Cross-branch command round trip: POST on branch A, run on branch B's agent, SSE on A.
    BranchCommands(branch_commands::BranchCommandsArgs),
    /// Prints the tables of result files written with --json-out.
    Summary(summary::SummaryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tether_certs::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            // The result is printed here, so the measuring modules never
            // import the summary that reads their results.
            Command::Fleet(args) => fleet::run(args).await.map(|r| summary::print_fleet(&r)),
            Command::HttpBaselineServer(args) => http_baseline::serve(args).await,
            Command::Footprint(args) => footprint::run(args)
                .await
                .map(|r| summary::print_footprint(&r)),
            Command::Store(args) => store_bench::run(args).await.map(|_| ()),
            Command::Commands(args) => commands::run(args).await,
            Command::BranchCommands(args) => branch_commands::run(args).await,
            Command::Summary(args) => summary::run(args),
        }
    });
    // Tasks still holding connections are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
