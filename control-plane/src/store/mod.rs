//! Persistent state of a control plane behind one [`Store`] trait.
//!
//! [`Store`] holds the core (instance, organizations, API and enrollment
//! tokens, servers, certificates, audit log, sealed secrets) and is made of
//! one area trait per concern, each in its folder with one implementation
//! per database (`sqlite.rs`, `postgres.rs`): webhooks, health, operations,
//! federation, provisioning, telemetry. Each database writes its own dialect;
//! how it encodes ids, times and JSON is said once in `row.rs` (its
//! `StoreRow`), so a table's row is mapped to its domain type once. One
//! behaviour suite (`control-plane/tests/store_*.rs`) runs against every
//! implementation. Callers see domain types only; ids are UUIDs, times UTC.
//! Every read that serves an API caller takes an organization scope (the
//! caller's organization and its descendants).
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod federation;
pub mod health;
pub mod operations;
pub mod postgres;
pub mod provisioning;
pub mod quota;
mod row;
pub mod selector;
pub mod sqlite;
pub mod telemetry;
pub mod webhooks;

pub use federation::{
    branch_client_key_context, federation_key_context, BranchHealth, BranchInvite, BranchPeer,
    BranchStatus, FederationKey, FederationStore, RelayedCommandRecord, RelayedCommandUpdate,
    RemoteServer,
};
pub use health::HealthStore;
pub use operations::{
    command_env_context, command_stdin_context, CancelOutcome, ClaimedCommand, CommandFinish,
    CommandRecord, CommandState, NewCommand, NewCommandRequest, OperationsStore,
};
pub use provisioning::*;
pub use quota::QuotaExceeded;
pub use selector::ServerSelector;
pub use telemetry::*;
pub use webhooks::*;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Labels attached to servers and tokens (`env=prod`).
pub type Labels = BTreeMap<String, String>;

/// This control plane's identity and CA, created once per database.
#[derive(Debug, Clone)]
pub struct Instance {
    pub branch_id: Uuid,
    pub branch_name: String,
    pub root_organization_id: Uuid,
    pub ca_cert_pem: String,
    /// The CA key sealed under the master key (see `secrets`).
    pub ca_key_sealed: String,
    pub created_at: DateTime<Utc>,
}

/// Resource limits of an organization; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quotas {
    pub max_servers: Option<i64>,
    pub max_cpu_cores: Option<i64>,
    pub max_memory_gb: Option<i64>,
    /// Most committed monthly cost in whole USD (catalog list prices of the
    /// running deployments, hourly × 730).
    #[serde(default)]
    pub max_monthly_cost_usd: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub parent_id: Option<Uuid>,
    pub quotas: Quotas,
    pub created_at: DateTime<Utc>,
}

/// An API token's record. The token itself is a JWT whose `jti` is `id`.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A one-time enrollment (bootstrap) token; only its hash is stored.
#[derive(Debug, Clone)]
pub struct NewEnrollmentToken {
    pub id: Uuid,
    pub token_hash: String,
    pub organization_id: Uuid,
    pub server_name: Option<String>,
    pub labels: Labels,
    pub deployment_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Connection state of a server, as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerStatus {
    /// Enrolled (or provisioned) but no session yet.
    Connecting,
    Online,
    Offline,
    /// Never came up within the registration timeout.
    Timeout,
}

impl ServerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "connecting" => Self::Connecting,
            "online" => Self::Online,
            "offline" => Self::Offline,
            "timeout" => Self::Timeout,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub hostname: String,
    pub labels: Labels,
    pub status: ServerStatus,
    pub status_reason: Option<String>,
    pub agent_version: Option<String>,
    pub facts: serde_json::Value,
    pub deployment_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// A certificate issued to a server (the certificate itself is not stored).
#[derive(Debug, Clone)]
pub struct CertificateRecord {
    pub serial: String,
    pub server_id: Uuid,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
}

/// An agent redeeming an enrollment token.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token_hash: String,
    pub server_id: Uuid,
    pub hostname: String,
    pub agent_version: String,
    pub facts: serde_json::Value,
    pub certificate: CertificateRecord,
    pub at: DateTime<Utc>,
}

/// Why a token could not be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentRefusal {
    UnknownToken,
    ExpiredToken,
    TokenAlreadyUsed,
    /// The token's organization was deleted.
    OrganizationDeleted,
    /// The new server would break a limit of the token's organization or
    /// of an ancestor (checked in the enrollment's transaction, against
    /// what the tree uses then, the new server included).
    QuotaExceeded {
        organization_id: Uuid,
        resource: &'static str,
        limit: i64,
        usage: i64,
    },
}

/// Whether a certificate-authenticated connection may start a session.
#[derive(Debug, Clone)]
pub enum SessionAdmission {
    Admitted(Box<Server>),
    UnknownServer,
    ServerRemoved,
    UnknownCertificate,
    CertificateRevoked,
}

/// A filtered, paginated server listing.
#[derive(Debug, Clone, Default)]
pub struct ServerQuery {
    /// Organizations whose servers may be listed.
    pub scope: Vec<Uuid>,
    pub status: Option<ServerStatus>,
    pub labels: Vec<(String, String)>,
    pub limit: u32,
    /// List servers with ids greater than this one.
    pub after: Option<Uuid>,
}

/// One append-only audit log entry.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub organization_id: Option<Uuid>,
    pub action: String,
    pub target: Option<String>,
    pub source_ip: Option<String>,
    pub outcome: String,
    pub detail: serde_json::Value,
}

/// Changes to an organization (`None` leaves a field as it is).
#[derive(Debug, Clone, Default)]
pub struct OrganizationUpdate {
    pub name: Option<String>,
    pub quotas: Option<Quotas>,
}

/// What deleting an organization did, or why it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrganizationDeletion {
    /// Soft-deleted, with this many organizations (itself included) and
    /// servers; `server_ids` are those servers (their sessions are to be
    /// closed). The subtree's API tokens are revoked and its unused
    /// enrollment tokens expired in the same transaction.
    Deleted {
        organizations: u64,
        servers: u64,
        server_ids: Vec<Uuid>,
    },
    /// Refused without cascade: it has child organizations.
    HasChildren,
    /// Refused without cascade: it has servers.
    HasServers,
    NotFound,
}

/// Resources used by an organization and its descendants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub servers: i64,
    /// vCPUs: catalog sizes of running deployments, plus the reported cores
    /// of servers enrolled without a deployment.
    pub cpu_cores: i64,
    /// Memory in GiB, rounded up per server, counted the same way.
    pub memory_gb: i64,
    /// Monthly list price (USD, hourly × 730) of the running deployments
    /// (neither destroyed, failed, nor waiting for approval).
    #[serde(default)]
    pub committed_monthly_cost_usd: f64,
}

/// A filtered audit log listing, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Organizations whose entries may be listed.
    pub scope: Vec<Uuid>,
    /// Also list entries tied to no organization (refused enrollments...).
    pub include_unscoped: bool,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub limit: u32,
    /// List entries older than this sequence number.
    pub before_seq: Option<i64>,
}

/// An audit log entry with its position in the log.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub seq: i64,
    pub entry: AuditEntry,
}

/// Sealing context of the instance's CA key.
pub const INSTANCE_CA_KEY_CONTEXT: &str = "instance/ca-key";

/// Sealing context of the instance secret called `name`.
pub fn instance_secret_context(name: &str) -> String {
    format!("instance/secret/{name}")
}

/// The sealed values of an instance as [`Store::sealed_secrets`] lists them:
/// its CA key(s), its named secrets, then the sealed values of rows
/// (credentials, Terraform states, bootstrap tokens) by kind and row id.
pub(crate) fn sealed_secret_list(
    ca_keys: Vec<String>,
    named: Vec<(String, String)>,
    rows: Vec<(SealedKind, Uuid, String)>,
) -> Vec<SealedSecret> {
    let ca = ca_keys.into_iter().map(|sealed| SealedSecret {
        kind: SealedKind::InstanceCaKey,
        id: "1".into(),
        context: INSTANCE_CA_KEY_CONTEXT.into(),
        sealed,
    });
    let named = named.into_iter().map(|(name, sealed)| SealedSecret {
        kind: SealedKind::InstanceSecret,
        context: instance_secret_context(&name),
        id: name,
        sealed,
    });
    let rows = rows.into_iter().map(|(kind, id, sealed)| SealedSecret {
        kind,
        context: match kind {
            SealedKind::CloudCredential => cloud_credential_context(id),
            SealedKind::TerraformState => terraform_state_context(id),
            SealedKind::TerraformStateVersion => terraform_state_version_context(id),
            SealedKind::BootstrapToken => bootstrap_token_context(id),
            SealedKind::WebhookSecret => webhooks::webhook_secret_context(id),
            SealedKind::CommandEnv => command_env_context(id),
            SealedKind::CommandStdin => command_stdin_context(id),
            SealedKind::InstanceCaKey => INSTANCE_CA_KEY_CONTEXT.into(),
            SealedKind::InstanceSecret => instance_secret_context(&id.to_string()),
            SealedKind::BranchClientKey => branch_client_key_context(id),
            SealedKind::FederationSigningKey => federation_key_context(id),
        },
        id: id.to_string(),
        sealed,
    });
    ca.chain(named).chain(rows).collect()
}

/// The statuses a worker drives, as an SQL list of literals.
pub(crate) fn active_statuses_sql() -> String {
    DeploymentStatus::ACTIVE
        .iter()
        .map(|status| format!("'{}'", status.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Kinds of values sealed under the master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedKind {
    /// The CA private key of the instance.
    InstanceCaKey,
    /// A random secret of the instance (see `Store::ensure_instance_secret`).
    InstanceSecret,
    /// The fields of a cloud credential (id: the credential's).
    CloudCredential,
    /// A deployment's Terraform state (id: the deployment's).
    TerraformState,
    /// A kept version of a deployment's Terraform state (id: the version's).
    TerraformStateVersion,
    /// A deployment's bootstrap token, kept while it may be rendered again.
    BootstrapToken,
    /// A webhook's signing secret (id: the webhook's).
    WebhookSecret,
    /// A command request's environment (id: the request's), kept until
    /// its commands end.
    CommandEnv,
    /// A command request's stdin (id: the request's), kept until its
    /// commands end.
    CommandStdin,
    /// The private key of a branch certificate a peer issued (id: the peer's branch id).
    BranchClientKey,
    /// A key signing inter-branch JWTs (id: its kid).
    FederationSigningKey,
}

impl SealedKind {
    /// Where sealed values of a row kind live: (table, column, key column).
    /// `None` for the instance's own values.
    pub(crate) fn row_location(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Self::CloudCredential => Some(("cloud_credentials", "credentials_sealed", "id")),
            Self::TerraformState => Some(("terraform_states", "state_sealed", "deployment_id")),
            Self::TerraformStateVersion => Some(("terraform_state_versions", "state_sealed", "id")),
            Self::BootstrapToken => Some(("deployments", "bootstrap_token_sealed", "id")),
            Self::WebhookSecret => Some(("webhooks", "secret_sealed", "id")),
            Self::CommandEnv => Some(("command_requests", "env_sealed", "id")),
            Self::CommandStdin => Some(("command_requests", "stdin_sealed", "id")),
            Self::BranchClientKey => Some(("branch_peers", "client_key_sealed", "id")),
            Self::FederationSigningKey => Some(("federation_keys", "private_key_sealed", "kid")),
            Self::InstanceCaKey | Self::InstanceSecret => None,
        }
    }

    /// The kinds stored in rows.
    pub(crate) const ROW_KINDS: [Self; 9] = [
        Self::CloudCredential,
        Self::TerraformState,
        Self::TerraformStateVersion,
        Self::BootstrapToken,
        Self::WebhookSecret,
        Self::CommandEnv,
        Self::CommandStdin,
        Self::BranchClientKey,
        Self::FederationSigningKey,
    ];
}

/// A sealed value as stored, for re-sealing under a new master key.
#[derive(Debug, Clone)]
pub struct SealedSecret {
    pub kind: SealedKind,
    /// Row id of the value (the instance has one row: "1").
    pub id: String,
    /// Sealing context (see `Sealer::seal`).
    pub context: String,
    pub sealed: String,
}

/// `s` as every store keeps it: PostgreSQL's `text` refuses NUL characters,
/// which agents could send, and one such string must not fail a whole
/// batched write, so NUL becomes U+FFFD (on SQLite too, so both backends
/// return the same); borrowed unless `s` has any.
pub(crate) fn without_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A JSON document as a column holds it: serialized once, where the record
/// is built (for metrics, in each session's own task rather than in the one
/// metrics writer), then written and read back as text by both stores.
/// Readers that look inside, or embed it in a JSON answer, parse it
/// ([`JsonText::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonText(String);

impl JsonText {
    /// `value` serialized (`null` if it cannot be, which the plain data
    /// structures stored here never are).
    pub fn of<T: serde::Serialize + ?Sized>(value: &T) -> Self {
        Self(serde_json::to_string(value).unwrap_or_else(|_| "null".into()))
    }

    /// Text read back from a column that only [`JsonText::of`] writes.
    pub fn stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The document as a JSON value (`null` if the stored text is not JSON).
    pub fn parse(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl From<serde_json::Value> for JsonText {
    fn from(value: serde_json::Value) -> Self {
        Self::of(&value)
    }
}

/// The control plane's storage. One implementation per database.
#[async_trait::async_trait]
pub trait Store:
    WebhookStore
    + HealthStore
    + OperationsStore
    + FederationStore
    + ProvisioningStore
    + TelemetryStore
    + Send
    + Sync
    + 'static
{
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Creates the instance, its root organization and the first admin token
    /// unless an instance exists. Returns the instance and whether this call
    /// created it (a replica joining an initialised database gets `false`).
    async fn init_instance(
        &self,
        instance: &Instance,
        root: &Organization,
        admin_token: &ApiToken,
    ) -> StoreResult<(Instance, bool)>;

    async fn instance(&self) -> StoreResult<Option<Instance>>;

    /// An organization and all its descendants (not deleted).
    async fn organization_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>>;

    /// An organization and all its descendants, deleted ones included (the
    /// audit log outlives what it records).
    async fn organization_history_scope(&self, organization_id: Uuid) -> StoreResult<Vec<Uuid>>;

    async fn api_token(&self, id: Uuid) -> StoreResult<Option<ApiToken>>;

    async fn create_enrollment_token(&self, token: &NewEnrollmentToken) -> StoreResult<()>;

    /// Redeems a token and creates its server in one transaction: of several
    /// agents racing with one token, exactly one gets a server.
    async fn enroll(
        &self,
        enrollment: &Enrollment,
    ) -> StoreResult<Result<Server, EnrollmentRefusal>>;

    /// Why the enrollment token with this hash could not be redeemed at
    /// `at`, or `None` when it could (a read: [`Store::enroll`] still
    /// redeems it atomically). Enrollment asks this before it signs anything.
    async fn enrollment_token_refusal(
        &self,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<EnrollmentRefusal>>;

    async fn record_certificate(&self, certificate: &CertificateRecord) -> StoreResult<()>;

    /// Revokes the server's certificates issued before the one with
    /// `serial` (once that one is in use, the older ones are never needed
    /// again); returns how many it revoked.
    async fn revoke_certificates_older_than(
        &self,
        server_id: Uuid,
        serial: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<u64>;

    /// Checks a server and the certificate it connected with.
    async fn admit_session(&self, server_id: Uuid, serial: &str) -> StoreResult<SessionAdmission>;

    async fn mark_online(
        &self,
        server_id: Uuid,
        agent_version: &str,
        facts: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    async fn mark_offline(
        &self,
        server_id: Uuid,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Records that these servers' sessions were alive at `at`.
    async fn touch_servers(&self, server_ids: &[Uuid], at: DateTime<Utc>) -> StoreResult<()>;

    async fn server(&self, scope: &[Uuid], id: Uuid) -> StoreResult<Option<Server>>;

    async fn list_servers(&self, query: &ServerQuery) -> StoreResult<Vec<Server>>;

    /// Soft-deletes a server and revokes its certificates. `false` when it
    /// was not found in `scope`.
    async fn remove_server(&self, scope: &[Uuid], id: Uuid, at: DateTime<Utc>)
        -> StoreResult<bool>;

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;

    /// Entries matching `query`, newest first.
    async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;

    async fn create_organization(&self, organization: &Organization) -> StoreResult<()>;

    /// A live (not deleted) organization.
    async fn organization(&self, id: Uuid) -> StoreResult<Option<Organization>>;

    /// Live organizations in `scope`, ordered by id.
    async fn list_organizations(
        &self,
        scope: &[Uuid],
        limit: u32,
        after: Option<Uuid>,
    ) -> StoreResult<Vec<Organization>>;

    /// Applies `update`; `None` when the organization is not live.
    async fn update_organization(
        &self,
        id: Uuid,
        update: &OrganizationUpdate,
    ) -> StoreResult<Option<Organization>>;

    /// Soft-deletes an organization; with `cascade`, its descendants and all
    /// their servers too (certificates revoked).
    async fn delete_organization(
        &self,
        id: Uuid,
        cascade: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<OrganizationDeletion>;

    /// The organization and its ancestors, itself first, root last.
    async fn organization_ancestors(&self, id: Uuid) -> StoreResult<Vec<Organization>>;

    /// What the organization and its descendants use.
    async fn organization_usage(&self, id: Uuid) -> StoreResult<Usage>;

    async fn create_api_token(&self, token: &ApiToken) -> StoreResult<()>;

    /// Revokes a token of an organization in `scope`; `false` when not found.
    async fn revoke_api_token(
        &self,
        scope: &[Uuid],
        id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// The sealed instance secret called `name`: stores `candidate` if there
    /// is none yet, and returns whichever value is stored (so replicas racing
    /// at first start agree on one).
    async fn ensure_instance_secret(&self, name: &str, candidate: &str) -> StoreResult<String>;

    /// Every value sealed under the master key.
    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>>;

    /// Replaces a sealed value if it still is `secret.sealed` (compare and
    /// swap); `false` when it changed meanwhile.
    async fn replace_sealed_secret(
        &self,
        secret: &SealedSecret,
        resealed: &str,
    ) -> StoreResult<bool>;
}

/// Opens the store named by a database URL and runs its migrations.
pub async fn open(url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    let store: std::sync::Arc<dyn Store> = if url.starts_with("sqlite:") {
        std::sync::Arc::new(sqlite::SqliteStore::connect(url).await?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        std::sync::Arc::new(postgres::PostgresStore::connect(url).await?)
    } else {
        return Err(StoreError::UnsupportedUrl(redact_url(url)));
    };
    store.migrate().await?;
    Ok(store)
}

/// A database URL with its password removed, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_string(),
    }
}
