//! `tether-agent`: command line only; the work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tether_agent::config::{BootstrapToken, Config};
use tether_agent::enroll::{enroll, EnrollParams};
use tether_agent::state::{StateDir, DEFAULT_STATE_DIR};
use tether_agent::{check, facts, format_time, session};
use tether_certs::CaFingerprint;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "Tether agent: enrolls with a control plane and keeps a session with it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this server with a control plane using a one-time token.
    Enroll(EnrollArgs),
    /// Keep a session with the control plane (enrolling first when agent.toml
    /// holds server, ca_fingerprint and token).
    Run(RunArgs),
    /// Check the stored identity and whether the control plane answers.
    Check(RunArgs),
}

#[derive(Args)]
struct StateArgs {
    /// Where the key, certificate and identity are kept.
    #[arg(long, value_name = "DIR", env = "TETHER_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args)]
struct EnrollArgs {
    /// Control plane QUIC address.
    #[arg(long, value_name = "HOST:PORT", env = "TETHER_AGENT_SERVER")]
    server: String,
    /// One-time enrollment token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TETHER_AGENT_TOKEN",
        hide_env_values = true
    )]
    token: String,
    /// SHA-256 fingerprint of the control plane's CA certificate.
    #[arg(long, value_name = "sha256:HEX", env = "TETHER_AGENT_CA_FINGERPRINT")]
    ca_fingerprint: String,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Agent configuration [default: /etc/tether/agent.toml, optional].
    #[arg(long, value_name = "FILE", env = "TETHER_AGENT_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    run_without_thread_cache();
    limit_heap_retention();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The glibc tunables `tether-agent run` runs under: no per-thread cache
/// of freed blocks. The cache keeps up to 7 freed blocks of each size up to
/// 1 KiB out of the allocator's reach, and the pages they sit on resident:
/// ~240 KiB of an idle agent's RSS (docs/performance-log.md §5). An idle agent
/// allocates a few thousand blocks per report, so the cache buys nothing.
const MALLOC_TUNABLES: &str = "glibc.malloc.tcache_count=0";
/// Set in the environment of the re-executed agent, removed at once.
const TUNED_MARKER: &str = "TETHER_AGENT_MALLOC_TUNED";

/// glibc reads its tunables from `GLIBC_TUNABLES` when the process starts,
/// and `mallopt` has no knob for the thread cache, so `run` re-executes
/// itself once (same pid, same arguments) with [`MALLOC_TUNABLES`]. The
/// re-executed agent removes both variables again, so the commands and
/// checks it starts see the environment the agent was started with. An
/// operator's own `GLIBC_TUNABLES` is left alone (no re-exec), and if the
/// re-exec fails the agent carries on with glibc's defaults.
fn run_without_thread_cache() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(TUNED_MARKER).is_some() {
            // Single-threaded still: nothing reads the environment concurrently.
            std::env::remove_var(TUNED_MARKER);
            std::env::remove_var("GLIBC_TUNABLES");
            return;
        }
        let mut args = std::env::args_os();
        let argv0 = args.next();
        let rest: Vec<std::ffi::OsString> = args.collect();
        if rest.first().is_none_or(|command| command != "run")
            || std::env::var_os("GLIBC_TUNABLES").is_some()
        {
            return;
        }
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(argv0) = argv0 {
            command.arg0(argv0);
        }
        // `exec` only returns when it failed.
        let err = command
            .args(rest)
            .env("GLIBC_TUNABLES", MALLOC_TUNABLES)
            .env(TUNED_MARKER, "1")
            .exec();
        eprintln!(
            "tether-agent: running with glibc's default allocator settings (re-exec failed: {err})"
        );
    }
}

/// glibc raises its mmap threshold to the size of the largest block freed
/// (up to 32 MiB): after the first QUIC endpoint (whose receive buffer is a
/// few MiB) or a burst of Docker responses, such buffers come from the heap,
/// are zeroed there, and stay resident after they are freed. A fixed
/// threshold keeps large buffers in their own mappings, returned to the
/// kernel on free, so an idle agent's RSS does not ratchet up.
fn limit_heap_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
        // One heap for every thread: the runtime is single-threaded, only
        // the blocking pool's threads (file and Docker-socket work) would
        // otherwise each get an arena of their own whose free pages stay.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// How often a running agent hands its heap's free pages back to the kernel
/// besides after each report ([`tether_agent::release_free_heap`]).
const HEAP_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

async fn trim_heap_periodically() {
    let mut tick = tokio::time::interval(HEAP_TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        tether_agent::release_free_heap();
    }
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    tether_certs::install_crypto_provider();
    let result = match cli.command {
        Command::Enroll(args) => {
            init_logging("error");
            enroll_command(args).await
        }
        Command::Run(args) => {
            init_logging("info");
            tokio::spawn(trim_heap_periodically());
            run_command(args).await
        }
        Command::Check(args) => {
            init_logging("error");
            check_command(args).await
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // Every error message already names its cause; one line only.
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default_filter: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `Targets` (RUST_LOG as `level` or `target=level,...`) rather than
    // `EnvFilter`, whose span and field directives bring a regex engine:
    // ~0.5 MiB more code resident in every agent (docs/performance-log.md §5).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .or_else(|| default_filter.parse::<Targets>().ok())
        .unwrap_or_default();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(filter)
        .try_init();
}

async fn enroll_command(args: EnrollArgs) -> anyhow::Result<ExitCode> {
    let ca_fingerprint: CaFingerprint = args.ca_fingerprint.parse()?;
    let token: BootstrapToken = args.token.parse()?;
    let params = EnrollParams {
        server: args.server,
        ca_fingerprint,
        token,
    };
    let state = StateDir::new(args.state.state_dir);
    let enrolled = enroll(&state, &params, facts::collect()).await?;
    println!(
        "enrolled as server {} (branch {}); certificate valid until {}; identity saved in {}",
        enrolled.identity.server_id,
        enrolled.identity.branch_id,
        format_time(enrolled.certificate.not_after),
        state.path().display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_sources(args.config.as_deref())?;
    let state = StateDir::new(args.state.state_dir);
    tracing::info!(
        version = facts::AGENT_VERSION,
        state_dir = %state.path().display(),
        deployment_id = config.deployment_id.as_deref().unwrap_or("-"),
        "tether-agent starting"
    );
    let shutdown = CancellationToken::new();
    let signals = signal_listener(shutdown.clone())
        .map_err(|err| anyhow::anyhow!("cannot listen for SIGTERM/SIGINT: {err}"))?;
    let result = session::run(&state, &config, &shutdown).await;
    signals.abort();
    result?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn check_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_sources(args.config.as_deref())?;
    let lines = check::check(&StateDir::new(args.state.state_dir), &config).await;
    for line in &lines {
        println!("{line}");
    }
    Ok(if lines.iter().all(|line| line.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn signal_listener(shutdown: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!("received {name}, closing the session");
        shutdown.cancel();
    }))
}
