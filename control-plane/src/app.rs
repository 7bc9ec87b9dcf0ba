//! A running control plane: its shared state ([`ControlPlane`]) and the start
//! sequence that initialises the data dir, opens the store, binds the QUIC and
//! HTTP listeners and runs the background tasks until shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tether_certs::CertificateAuthority;
use tether_protocol::CloseCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{Scope, TokenAuthority};
use crate::config::ServeConfig;
use crate::gateway::registry::SessionRegistry;
use crate::pki::Pki;
use crate::secrets::Sealer;
use crate::store::{ApiToken, Instance, Organization, Quotas, Store};

/// Lifetime of the admin token written at first start.
const ADMIN_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::days(365);
/// Lifetime of the QUIC server certificate (re-issued at every start).
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Shared state of a running control plane.
pub struct ControlPlane {
    pub config: ServeConfig,
    pub store: Arc<dyn Store>,
    pub sealer: Sealer,
    pub tokens: TokenAuthority,
    pub pki: Pki,
    pub instance: Instance,
    pub sessions: SessionRegistry,
    pub rate_limiter: crate::api::rate_limit::RateLimiter,
    pub ingestor: crate::gateway::ingest::Ingestor,
    /// What agents are told to dial.
    pub public_quic_addr: String,
    /// Base URL of the HTTP API.
    pub api_url: String,
    /// URL of the HTTP API from this machine (terraform's state backend).
    pub local_api_url: String,
    /// Agent binaries served to provisioned servers.
    pub agent_binaries: crate::provision::agent_binaries::AgentBinaries,
    /// Key deriving per-deployment passwords of the Terraform state backend.
    pub backend_key: Vec<u8>,
    /// Identifies this process when it claims jobs.
    pub worker_id: String,
    /// Wakes the provisioning workers when a job is queued here.
    pub provision_wakeup: tokio::sync::Notify,
    /// Branch federation: peer connections and signing keys.
    pub federation: crate::federation::Federation,
    /// Where this process listens (webhook URLs may not point here).
    pub addresses: BoundAddresses,
    /// Wakes the webhook delivery worker when a delivery is queued here.
    pub webhook_wakeup: tokio::sync::Notify,
    /// Commands running on this replica (see `commands`).
    pub commands: crate::commands::CommandRelay,
    pub shutdown: CancellationToken,
}

/// Addresses a started control plane listens on.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BoundAddresses {
    pub api: SocketAddr,
    pub quic: SocketAddr,
}

/// A started control plane: state, bound addresses and its tasks.
pub struct RunningControlPlane {
    pub state: Arc<ControlPlane>,
    pub addresses: BoundAddresses,
    pub admin_token_file: Option<PathBuf>,
    tasks: tokio::task::JoinSet<()>,
    endpoint: quinn::Endpoint,
}

impl RunningControlPlane {
    /// Stops accepting, closes every agent session (agents reconnect to the
    /// next instance) and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        self.state.shutdown.cancel();
        let closed = self.state.sessions.close_all(CloseCode::ShuttingDown);
        let now = Utc::now();
        for server_id in closed {
            if let Err(e) = self
                .state
                .store
                .mark_offline(server_id, "control plane shut down", now)
                .await
            {
                tracing::warn!(%server_id, error = %e, "could not mark server offline at shutdown");
            }
        }
        self.endpoint
            .close(CloseCode::ShuttingDown.code().into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        while tokio::time::timeout(Duration::from_secs(5), self.tasks.join_next())
            .await
            .ok()
            .flatten()
            .is_some()
        {}
    }
}

/// Starts a control plane: initialises the data dir on first start, binds
/// listeners, spawns the gateway, API and background tasks.
pub async fn start(config: ServeConfig) -> anyhow::Result<RunningControlPlane> {
    tether_certs::install_crypto_provider();
    crate::fsutil::create_private_dir(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let sealer = crate::rotate::load_sealer(&config.master_key_file)?;
    let store = crate::store::open(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "opening database {}",
                crate::store::redact_url(&config.database_url)
            )
        })?;
    let tokens =
        TokenAuthority::new(&instance_secret(&*store, &sealer, "api-token-signing").await?);
    let quic_secret = instance_secret(&*store, &sealer, "quic-keys").await?;
    let backend_key = instance_secret(&*store, &sealer, "terraform-backend").await?;

    let (instance, admin_token) = initialise_instance(&*store, &config, &sealer, &tokens).await?;
    let admin_token_file = match admin_token {
        Some(token) => {
            let path = config.data_dir.join("admin.token");
            crate::fsutil::write_private(&path, format!("{token}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "first start: wrote the admin token");
            Some(path)
        }
        None => None,
    };
    let ca_key = sealer
        .open(
            &instance.ca_key_sealed,
            crate::store::INSTANCE_CA_KEY_CONTEXT,
        )
        .context(
            "opening the CA key (is this the master key the database was initialised with?)",
        )?;
    let ca_key = String::from_utf8(ca_key).context("CA key is not PEM text")?;
    let ca = CertificateAuthority::from_pem(&instance.ca_cert_pem, &ca_key)?;

    // QUIC: a fresh server certificate at every start, signed by the branch CA.
    let quic_socket_probe = config.quic_listen;
    let public_quic_addr_hint = config.public_quic_addr.clone();
    let mut names: Vec<String> = Vec::new();
    if let Some(host) = public_quic_addr_hint.as_deref().and_then(host_of) {
        names.push(host);
    }
    if !quic_socket_probe.ip().is_unspecified() {
        names.push(quic_socket_probe.ip().to_string());
    }
    let server_cert = ca.issue_server_certificate(&names, SERVER_CERT_LIFETIME)?;
    let mut chain = tether_certs::authority::pem_to_chain(&server_cert.cert_pem)?;
    chain.push(ca.cert_der().clone());
    let tls = tether_certs::control_plane_server_config(
        ca.cert_der(),
        chain,
        tether_certs::authority::pem_to_private_key(&server_cert.key_pem)?,
    )?;
    let endpoint = tether_transport::server_endpoint(config.quic_listen, tls, &quic_secret)?;
    let quic_addr = endpoint
        .local_addr()
        .context("reading the QUIC listen address")?;

    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API on {}", config.api_listen))?;
    let api_addr = api_listener.local_addr()?;

    let public_quic_addr = config.public_quic_addr.clone().unwrap_or_else(|| {
        let ip = if quic_addr.ip().is_unspecified() {
            tracing::warn!("QUIC listens on all interfaces and --public-quic-addr is not set: agents will be told to dial 127.0.0.1; set --public-quic-addr HOST:PORT for remote agents");
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            quic_addr.ip()
        };
        SocketAddr::new(ip, quic_addr.port()).to_string()
    });
    let api_url = config
        .public_api_url
        .clone()
        .unwrap_or_else(|| format!("http://{api_addr}"))
        .trim_end_matches('/')
        .to_string();

    let local_api_url = if api_addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", api_addr.port())
    } else {
        format!("http://{api_addr}")
    };
    let pki = Pki {
        ca,
        branch_id: instance.branch_id,
        agent_cert_ttl: config.agent_cert_ttl,
    };
    let ingestor = crate::gateway::ingest::Ingestor::start(store.clone());
    let state = Arc::new(ControlPlane {
        config: config.clone(),
        store,
        sealer,
        tokens,
        pki,
        instance,
        sessions: SessionRegistry::default(),
        rate_limiter: Default::default(),
        ingestor,
        public_quic_addr,
        api_url,
        local_api_url,
        agent_binaries: crate::provision::agent_binaries::AgentBinaries::new(
            config.agent_dir.as_deref(),
        ),
        backend_key,
        worker_id: format!("{}/{}", std::process::id(), Uuid::new_v4().simple()),
        provision_wakeup: tokio::sync::Notify::new(),
        federation: Default::default(),
        addresses: BoundAddresses {
            api: api_addr,
            quic: quic_addr,
        },
        webhook_wakeup: tokio::sync::Notify::new(),
        commands: Default::default(),
        shutdown: CancellationToken::new(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::gateway::accept_loop(endpoint.clone(), state.clone()));
    tasks.spawn(crate::gateway::liveness_loop(state.clone()));
    tasks.spawn(crate::telemetry::maintenance_loop(state.clone()));
    tasks.spawn(crate::provision::job::worker_loop(state.clone()));
    tasks.spawn(crate::federation::heartbeat_loop(state.clone()));
    tasks.spawn(crate::federation::relay::resume_followers(state.clone()));
    tasks.spawn(crate::webhooks::delivery_loop(state.clone()));
    tasks.spawn(crate::alerts::engine_loop(state.clone()));
    tasks.spawn(crate::commands::relay_loop(state.clone()));
    let router = crate::api::router(state.clone());
    let shutdown = state.shutdown.clone();
    tasks.spawn(async move {
        // TCP_NODELAY: SSE events are small writes that must not wait for
        // the client's delayed ACK (Nagle), ~40 ms each otherwise.
        use axum::serve::ListenerExt;
        let api_listener = api_listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        let served = axum::serve(
            api_listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "API server failed");
        }
    });

    let addresses = BoundAddresses {
        api: api_addr,
        quic: quic_addr,
    };
    write_endpoints_file(&config.data_dir, &state, addresses)?;
    tracing::info!(
        api = %state.api_url,
        quic = %quic_addr,
        public_quic_addr = %state.public_quic_addr,
        branch_id = %state.instance.branch_id,
        ca_fingerprint = %state.pki.ca.fingerprint(),
        "control plane started"
    );
    Ok(RunningControlPlane {
        state,
        addresses,
        admin_token_file,
        tasks,
        endpoint,
    })
}

/// The instance secret called `name` (32 random bytes), created sealed in
/// the store on first use.
async fn instance_secret(
    store: &dyn Store,
    sealer: &Sealer,
    name: &str,
) -> anyhow::Result<Vec<u8>> {
    let context = crate::store::instance_secret_context(name);
    let candidate: [u8; 32] = rand::random();
    let sealed = store
        .ensure_instance_secret(name, &sealer.seal(&candidate, &context))
        .await?;
    sealer
        .open(&sealed, &context)
        .with_context(|| format!("opening the instance secret {name} (is this the master key the database was initialised with?)"))
}

/// Loads the instance, or creates it (CA, root organization, admin token) on
/// first start. Returns the admin token when this call created the instance.
async fn initialise_instance(
    store: &dyn Store,
    config: &ServeConfig,
    sealer: &Sealer,
    tokens: &TokenAuthority,
) -> anyhow::Result<(Instance, Option<String>)> {
    if let Some(instance) = store.instance().await? {
        return Ok((instance, None));
    }
    let now = Utc::now();
    let ca = CertificateAuthority::generate(&config.branch_name)?;
    let root = Organization {
        id: Uuid::now_v7(),
        name: "root".into(),
        parent_id: None,
        quotas: Quotas::default(),
        created_at: now,
    };
    let instance = Instance {
        branch_id: Uuid::now_v7(),
        branch_name: config.branch_name.clone(),
        root_organization_id: root.id,
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_sealed: sealer.seal(
            ca.key_pem().as_bytes(),
            crate::store::INSTANCE_CA_KEY_CONTEXT,
        ),
        created_at: now,
    };
    let admin = ApiToken {
        id: Uuid::now_v7(),
        organization_id: root.id,
        name: "admin (first start)".into(),
        scopes: vec![Scope::Admin.as_str().into()],
        created_at: now,
        expires_at: Some(now + ADMIN_TOKEN_LIFETIME),
        revoked_at: None,
    };
    let (instance, created) = store.init_instance(&instance, &root, &admin).await?;
    if !created {
        return Ok((instance, None));
    }
    let token = tokens.issue(
        admin.id,
        root.id,
        vec![Scope::Admin],
        now,
        now + ADMIN_TOKEN_LIFETIME,
    );
    Ok((instance, Some(token)))
}

fn host_of(addr: &str) -> Option<String> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// `DATA_DIR/endpoints.json`: where this control plane listens, for tools and
/// tests that start it on port 0.
fn write_endpoints_file(
    dir: &Path,
    state: &ControlPlane,
    addresses: BoundAddresses,
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "api_url": state.api_url,
        "api_listen": addresses.api,
        "quic_listen": addresses.quic,
        "public_quic_addr": state.public_quic_addr,
        "ca_fingerprint": state.pki.ca.fingerprint().to_string(),
        "branch_id": state.instance.branch_id,
        "pid": std::process::id(),
    });
    let path = dir.join("endpoints.json");
    crate::fsutil::write_private(&path, serde_json::to_string_pretty(&body)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
