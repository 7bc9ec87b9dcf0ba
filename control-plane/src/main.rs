//! `tether`: the control plane binary.

use clap::{Parser, Subcommand};

use tether_control_plane::{app, config::ServeArgs, quickstart};

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Tether control plane: provision servers, enroll agents, run your fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (HTTP API + QUIC gateway).
    Serve(ServeArgs),
    /// Start a control plane on the embedded database with local servers, and print what to try.
    Quickstart(quickstart::QuickstartArgs),
    /// Apply database migrations and exit.
    Migrate(ServeArgs),
    /// Re-seal every stored secret under a new master key (then restart the replicas).
    RotateMasterKey(ServeArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,quinn=warn,tower_http=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// glibc's malloc arenas the control plane may use, unless `MALLOC_ARENA_MAX`
/// says otherwise. glibc's default (8 per core) spreads every connected
/// agent's long-lived state over as many heaps as there are threads that
/// touched it, each with its own free space; two keep ~1 KiB per connected
/// agent less resident at 10,000 agents (~29 instead of ~30 KiB), with no
/// measurable cost in reports/s (`docs/performance-log.md`, §3 *Under 30 KiB*).
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]; must run before any other
/// thread starts (arenas are created as threads first allocate).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of glibc's allocator; it is
        // called before the runtime's threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tether: could not start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Quickstart(args) => quickstart::run(args).await.map_err(Into::into),
        Command::Migrate(args) => migrate(args).await,
        Command::RotateMasterKey(args) => rotate_master_key(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let running = app::start(config).await?;
    app::shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn migrate(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    if config.database_url.starts_with("sqlite:") {
        tether_control_plane::fsutil::create_private_dir(&config.data_dir)?;
    }
    tether_control_plane::store::open(&config.database_url).await?;
    println!(
        "migrations applied to {}",
        tether_control_plane::store::redact_url(&config.database_url)
    );
    Ok(())
}

async fn rotate_master_key(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let rotation = tether_control_plane::rotate::rotate(&config).await?;
    println!(
        "master key rotated: {} -> {} ({} secrets re-sealed); restart every replica with the new key file",
        rotation.old_key_id, rotation.new_key_id, rotation.resealed
    );
    Ok(())
}
