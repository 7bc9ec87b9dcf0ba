//! `tether-bench store`: the store alone, without QUIC or HTTP. Stores the
//! same realistic reports through `Store::ingest_metrics` in transactions of
//! a given number of reports, the way the control plane's writer task does,
//! so the per-report cost of the database can be told apart from the cost of
//! the transport in the fleet figures.

use std::path::PathBuf;
use std::time::Instant;

use crate::error::Context;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tether_control_plane::gateway::ingest::records;
use tether_control_plane::store::MetricsIngest;

use crate::fleet::Database;
use crate::procfs::{self, CpuMark};
use crate::report::realistic_batch;

/// `tether-bench store`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    #[arg(long, value_enum, default_value_t = Database::Sqlite)]
    pub database: Database,
    /// PostgreSQL admin URL (a fresh database is created) [default: $TETHER_BENCH_POSTGRES_URL].
    #[arg(long, env = "TETHER_BENCH_POSTGRES_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Servers the reports are spread over.
    #[arg(long, default_value_t = 1000)]
    pub servers: u32,
    /// Reports stored per transaction size.
    #[arg(long, default_value_t = 20_000)]
    pub reports: u64,
    /// Transaction sizes (reports per `ingest_metrics` call) to try.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,2048")]
    pub batch_sizes: Vec<usize>,
    /// Work directory [default: /var/tmp/tether-bench].
    #[arg(long, default_value = "/var/tmp/tether-bench")]
    pub work_dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// One transaction size.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StoreRow {
    pub batch_size: usize,
    pub reports: u64,
    pub seconds: f64,
    pub reports_per_second: f64,
    /// CPU of this process (SQLite runs in it) per report, microseconds.
    pub process_cpu_us_per_report: f64,
    /// PostgreSQL server processes per report, microseconds.
    pub db_cpu_us_per_report: Option<f64>,
    /// Of which: turning a batch into records (JSON columns), microseconds.
    pub records_cpu_us_per_report: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StoreResult {
    pub database: String,
    pub servers: u32,
    pub rows: Vec<StoreRow>,
}

/// Runs `tether-bench store`.
pub async fn run(args: StoreArgs) -> crate::error::Result<StoreResult> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let dir = args.work_dir.join(format!("store-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let (url, pg) = match args.database {
        Database::Sqlite => (format!("sqlite://{}", dir.join("store.db").display()), None),
        Database::Postgres => {
            let admin = args.database_url.clone().context(
                "--database postgres needs --database-url (or TETHER_BENCH_POSTGRES_URL)",
            )?;
            let name = format!("tether_bench_store_{}", uuid::Uuid::new_v4().simple());
            let url = crate::control_plane::create_postgres_database(&admin, &name).await?;
            (url, Some((admin, name)))
        }
    };
    let result = measure(&args, &url).await;
    if let Some((admin, name)) = &pg {
        let _ = crate::control_plane::drop_postgres_database(admin, name).await;
    }
    let result = result?;
    print(&result);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
}

async fn measure(args: &StoreArgs, url: &str) -> crate::error::Result<StoreResult> {
    let store = tether_control_plane::store::open(url).await?;
    let servers = crate::http_baseline::create_servers(&store, args.servers).await?;
    let ids: Vec<uuid::Uuid> = servers.iter().map(|(_, id)| *id).collect();
    let pid = procfs::self_pid();
    let is_pg = args.database == Database::Postgres;
    let mut rows = Vec::new();
    let mut seq_base = 0u64;
    for &batch_size in &args.batch_sizes {
        let batch_size = batch_size.max(1);
        let mut stored = 0u64;
        let mut records_cpu = 0.0;
        let start_cpu = CpuMark::of(pid);
        let start_db = is_pg.then(|| CpuMark::of_name("postgres"));
        let start = Instant::now();
        while stored < args.reports {
            let n = (batch_size as u64).min(args.reports - stored);
            let build = procfs::thread_cpu_seconds();
            let now = Utc::now();
            let mut ingest = MetricsIngest {
                received_at: now,
                metrics: Vec::with_capacity(n as usize),
                containers: Vec::new(),
            };
            for k in 0..n {
                let i = stored + k;
                let server = (i % ids.len() as u64) as usize;
                // Every report of a server gets the next seq.
                let seq = seq_base + i / ids.len() as u64 + 1;
                let batch = realistic_batch(server as u32, seq);
                let (metrics, containers) = records(ids[server], batch, now);
                ingest.metrics.push(metrics);
                ingest.containers.extend(containers);
            }
            records_cpu += procfs::thread_cpu_seconds() - build;
            store.ingest_metrics(&ingest).await?;
            stored += n;
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu = CpuMark::of(pid).cpu_since(&start_cpu);
        let db = start_db.map(|s| CpuMark::of_name("postgres").cpu_since(&s));
        seq_base += args.reports / ids.len() as u64 + 1;
        let per = |c: f64| 1e6 * c / stored as f64;
        let row = StoreRow {
            batch_size,
            reports: stored,
            seconds,
            reports_per_second: stored as f64 / seconds,
            process_cpu_us_per_report: per(cpu),
            db_cpu_us_per_report: db.map(per),
            records_cpu_us_per_report: per(records_cpu),
        };
        println!(
            "store: {} reports in transactions of {}: {:.0} reports/s, {:.0} µs process CPU per report",
            row.reports, row.batch_size, row.reports_per_second, row.process_cpu_us_per_report
        );
        rows.push(row);
    }
    Ok(StoreResult {
        database: format!("{:?}", args.database).to_lowercase(),
        servers: args.servers,
        rows,
    })
}

/// Prints a store bench result as a table.
pub fn print(result: &StoreResult) {
    println!();
    println!(
        "### store alone: {}, reports spread over {} servers",
        result.database, result.servers
    );
    println!();
    println!("| reports per transaction | reports/s | process CPU per report | PostgreSQL CPU per report | of which building records |");
    println!("|---:|---:|---:|---:|---:|");
    for row in &result.rows {
        println!(
            "| {} | {:.0} reports/s | {:.0} µs | {} | {:.1} µs |",
            row.batch_size,
            row.reports_per_second,
            row.process_cpu_us_per_report,
            row.db_cpu_us_per_report
                .map(|c| format!("{c:.0} µs"))
                .unwrap_or_else(|| "-".into()),
            row.records_cpu_us_per_report
        );
    }
    println!();
}
