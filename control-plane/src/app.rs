//! The wiring of a running control plane: the start sequence that
//! initialises the data dir, opens the store, binds the QUIC and HTTP
//! listeners, builds the shared state ([`ControlPlane`], defined in
//! [`crate::context`]) and starts every background loop, in one place.
//! Imported by nobody but `main.rs` and `quickstart`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use tether_certs::{CertError, CertificateAuthority};
use tether_protocol::CloseCode;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{Scope, TokenAuthority};
use crate::config::ServeConfig;
pub use crate::context::{BoundAddresses, ControlPlane};
use crate::gateway::registry::SessionRegistry;
use crate::pki::Pki;
use crate::secrets::{Sealer, SecretError};
use crate::store::{ApiToken, Instance, Organization, Quotas, Store, StoreError};
use tether_transport::TransportError;

/// Why a control plane could not start. Each variant names the step that
/// failed; the cause is its [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or directory of the data dir could not be created or written.
    #[error("{action} {}", path.display())]
    DataDir {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The master key file (or a `.next`/`.previous` sibling) is unusable.
    #[error(transparent)]
    MasterKey(#[from] SecretError),
    /// The database could not be opened or migrated.
    #[error("opening database {url}")]
    OpenStore {
        url: String,
        #[source]
        source: StoreError,
    },
    /// A store call of the start sequence failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed value of the instance does not open with the loaded keys.
    #[error("opening {what} (is this the master key the database was initialised with?)")]
    Unseal {
        what: String,
        #[source]
        source: SecretError,
    },
    /// The stored CA key is not UTF-8 PEM text.
    #[error("CA key is not PEM text")]
    CaKeyNotPem,
    /// The CA, the server certificate or the TLS configuration.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// The QUIC endpoint could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// `--templates-dir` cannot be used.
    #[error(transparent)]
    TemplatesDir(#[from] crate::provision::templates::TemplatesDirError),
    /// An instance-catalog file (an operator override) is unusable.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// The HTTP API could not listen.
    #[error("binding the API on {addr}")]
    BindApi {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A bound socket did not report its address.
    #[error("reading the {listener} listen address")]
    LocalAddr {
        listener: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    fn data_dir(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| StartError::DataDir {
            action,
            path,
            source,
        }
    }
}

/// Lifetime of the admin token written at first start.
const ADMIN_TOKEN_LIFETIME: chrono::Duration = chrono::Duration::days(365);
/// Lifetime of the QUIC server certificate (re-issued at every start).
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// A started control plane: state, bound addresses and its tasks.
pub struct RunningControlPlane {
    pub state: Arc<ControlPlane>,
    pub addresses: BoundAddresses,
    pub admin_token_file: Option<PathBuf>,
    tasks: JoinSet<()>,
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
pub async fn start(config: ServeConfig) -> Result<RunningControlPlane, StartError> {
    tether_certs::install_crypto_provider();
    if let Some(dir) = &config.templates_dir {
        let targets = crate::provision::templates::overridden_targets(dir)?;
        tracing::warn!(
            dir = %dir.display(),
            targets = %targets.join(","),
            "the operator's templates replace the embedded modules of these targets"
        );
    }
    crate::fsutil::create_private_dir(&config.data_dir)
        .map_err(StartError::data_dir("creating data dir", &config.data_dir))?;
    let sealer = crate::rotate::load_sealer(&config.master_key_file)?;
    let store = crate::store::open(&config.database_url)
        .await
        .map_err(|source| StartError::OpenStore {
            url: crate::store::redact_url(&config.database_url),
            source,
        })?;
    let catalog = crate::catalog::Catalog::load(config.catalog_dir.as_deref())?;
    let tokens =
        TokenAuthority::new(&instance_secret(&*store, &sealer, "api-token-signing").await?);
    let quic_secret = instance_secret(&*store, &sealer, "quic-keys").await?;
    let backend_key = instance_secret(&*store, &sealer, "terraform-backend").await?;

    let (instance, admin_token) = initialise_instance(&*store, &config, &sealer, &tokens).await?;
    let admin_token_file = match admin_token {
        Some(token) => {
            let path = config.data_dir.join("admin.token");
            crate::fsutil::write_private(&path, format!("{token}\n").as_bytes())
                .map_err(StartError::data_dir("writing", &path))?;
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
        .map_err(|source| StartError::Unseal {
            what: "the CA key".into(),
            source,
        })?;
    let ca_key = String::from_utf8(ca_key).map_err(|_| StartError::CaKeyNotPem)?;
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
        .map_err(|source| StartError::LocalAddr {
            listener: "QUIC",
            source,
        })?;

    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| StartError::BindApi {
            addr: config.api_listen,
            source,
        })?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|source| StartError::LocalAddr {
            listener: "API",
            source,
        })?;

    if config.enable_host_targets {
        tracing::warn!("host targets enabled (--enable-host-targets): the root organization may provision local and docker servers on this host");
    }
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
        enroll_failures: crate::enrollment::FailureLog::new(
            config.enroll_failure_limit,
            config.enroll_failure_window,
        ),
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
        health_pushes: Default::default(),
        catalog,
        shutdown: CancellationToken::new(),
    });

    let mut tasks = JoinSet::new();
    spawn_loops(&mut tasks, &state, &endpoint, api_listener);

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

/// A background loop: its name (in logs) and the future that runs it for
/// the life of the control plane.
type BackgroundLoop = (&'static str, BoxFuture<'static, ()>);

/// Starts every background loop of the control plane, the QUIC accept loop
/// and the API server among them, into `tasks`. This is the one list of
/// them: no module starts a long-running loop of its own. (Tasks spawned for
/// one connection, request, push or command end with it; the workers of a
/// handle end with the handle: the metrics writers of
/// [`crate::gateway::ingest::Ingestor`] when it is dropped, the SQLite
/// store's WAL checkpoints when its pool closes.)
fn spawn_loops(
    tasks: &mut JoinSet<()>,
    state: &Arc<ControlPlane>,
    endpoint: &quinn::Endpoint,
    api_listener: tokio::net::TcpListener,
) {
    let cp = || state.clone();
    let limits = crate::api::serve::Limits {
        header_timeout: state.config.http_header_timeout,
        max_connections: state.config.http_max_connections,
    };
    let loops: Vec<BackgroundLoop> = vec![
        (
            "gateway accept",
            Box::pin(crate::gateway::accept_loop(endpoint.clone(), cp())),
        ),
        (
            "gateway liveness",
            Box::pin(crate::gateway::liveness::liveness_loop(cp())),
        ),
        (
            "enrollment failure audit",
            Box::pin(crate::gateway::enrollment::failure_audit_loop(cp())),
        ),
        (
            "health check reconcile",
            Box::pin(crate::health::reconcile_loop(cp())),
        ),
        (
            "telemetry maintenance",
            Box::pin(crate::telemetry::maintenance_loop(cp())),
        ),
        (
            "provisioning worker",
            Box::pin(crate::provision::job::worker_loop(cp())),
        ),
        (
            "federation heartbeat",
            Box::pin(crate::federation::heartbeat_loop(cp())),
        ),
        (
            "federation follower resume",
            Box::pin(crate::federation::relay::resume_followers(cp())),
        ),
        (
            "webhook delivery",
            Box::pin(crate::webhooks::delivery_loop(cp())),
        ),
        ("alert engine", Box::pin(crate::alerts::engine_loop(cp()))),
        (
            "command notices",
            Box::pin(crate::commands::notice_loop(cp())),
        ),
        ("command sweep", Box::pin(crate::commands::sweep_loop(cp()))),
        (
            "api server",
            Box::pin(crate::api::serve::serve(
                api_listener,
                crate::api::router(cp()),
                limits,
                state.shutdown.clone(),
            )),
        ),
    ];
    for (name, run) in loops {
        tracing::debug!(task = name, "background loop started");
        tasks.spawn(async move {
            run.await;
            tracing::debug!(task = name, "background loop ended");
        });
    }
}

/// The instance secret called `name` (32 random bytes), created sealed in
/// the store on first use.
async fn instance_secret(
    store: &dyn Store,
    sealer: &Sealer,
    name: &str,
) -> Result<Vec<u8>, StartError> {
    let context = crate::store::instance_secret_context(name);
    let candidate: [u8; 32] = rand::random();
    let sealed = store
        .ensure_instance_secret(name, &sealer.seal(&candidate, &context))
        .await?;
    sealer
        .open(&sealed, &context)
        .map_err(|source| StartError::Unseal {
            what: format!("the instance secret {name}"),
            source,
        })
}

/// Loads the instance, or creates it (CA, root organization, admin token) on
/// first start. Returns the admin token when this call created the instance.
async fn initialise_instance(
    store: &dyn Store,
    config: &ServeConfig,
    sealer: &Sealer,
    tokens: &TokenAuthority,
) -> Result<(Instance, Option<String>), StartError> {
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
) -> Result<(), StartError> {
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
    // A `Value` of strings and numbers always serialises.
    let text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string());
    crate::fsutil::write_private(&path, text.as_bytes())
        .map_err(StartError::data_dir("writing", &path))
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
