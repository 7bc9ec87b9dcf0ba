//! What every store test file shares: running one body on SQLite and on
//! PostgreSQL (`store_tests!`), direct database access, and builders of
//! instances, organizations, tokens and enrollments.

#![allow(dead_code, unused_imports)]

pub use std::collections::BTreeSet;
pub use std::future::Future;
pub use std::sync::Arc;

pub use chrono::{DateTime, Duration, Utc};
pub use serde_json::json;
pub use sqlx::Connection;
pub use tether_control_plane::store::{
    self, ApiToken, AuditEntry, AuditQuery, CertificateRecord, Enrollment, EnrollmentRefusal,
    Instance, Labels, NewEnrollmentToken, Organization, OrganizationDeletion, OrganizationUpdate,
    Quotas, SealedKind, Server, ServerQuery, ServerStatus, SessionAdmission, Store, Usage,
};
pub use tether_control_plane::store::{
    CloudCredential, Deployment, DeploymentRecord, DeploymentStatus, DeploymentStep, LockOutcome,
    StepStatus,
};
pub use tether_control_plane::store::{
    ContainerRecord, ContainerSet, MetricsIngest, MetricsRecord, RollupRecord,
};
pub use tokio::sync::Semaphore;
pub use uuid::Uuid;

// ---------------------------------------------------------------------------
// Running one body on both backends.
// ---------------------------------------------------------------------------

pub const DATABASE_URL_VAR: &str = "TETHER_TEST_DATABASE_URL";

/// PostgreSQL tests running at once (each holds a database and connections).
pub static POSTGRES_SLOTS: Semaphore = Semaphore::const_new(8);

/// Direct access to the database behind a store, for what the trait cannot
/// express (checking the database itself refuses something). Statements
/// must be valid in both dialects.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(String),
    Postgres(String),
}

impl Database {
    /// Runs one statement on a connection of its own.
    pub async fn execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self {
            Self::Sqlite(url) => {
                let mut conn = sqlx::SqliteConnection::connect(url).await?;
                let result = sqlx::query(sql).execute(&mut conn).await;
                conn.close().await?;
                Ok(result?.rows_affected())
            }
            Self::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let result = sqlx::query(sql).execute(&mut conn).await;
                conn.close().await?;
                Ok(result?.rows_affected())
            }
        }
    }

    /// Runs a query returning one integer (`SELECT COUNT(*) ...`).
    pub async fn count(&self, sql: &str) -> i64 {
        let result = match self {
            Self::Sqlite(url) => {
                let mut conn = sqlx::SqliteConnection::connect(url)
                    .await
                    .expect("connect to the SQLite file");
                sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut conn).await
            }
            Self::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url)
                    .await
                    .expect("connect to the test database");
                sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut conn).await
            }
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

pub async fn on_sqlite<F, Fut>(body: F)
where
    F: FnOnce(Arc<dyn Store>, Database) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("tether.db").display());
    let store = store::open(&url).await.expect("open the SQLite store");
    let outcome = tokio::spawn(body(store, Database::Sqlite(url))).await;
    drop(dir);
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

pub async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(Arc<dyn Store>, Database) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(admin_url) = std::env::var(DATABASE_URL_VAR) else {
        panic!(
            "{DATABASE_URL_VAR} is not set: the PostgreSQL half of the store suite needs a server. \
             Start one and export its URL with `export {DATABASE_URL_VAR}=$(scripts/postgres.sh)` \
             (from the repository root, as root), then run the suite again."
        );
    };
    let _slot = POSTGRES_SLOTS
        .acquire()
        .await
        .expect("semaphore is never closed");
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to {DATABASE_URL_VAR} ({}): {e}; is PostgreSQL running? \
                 (scripts/postgres.sh starts it)",
                store::redact_url(&admin_url)
            )
        });
    let name = format!("tether_test_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e} (the role needs CREATEDB)"));
    let url = with_database(&admin_url, &name);
    let outcome: Result<(), Box<dyn std::any::Any + Send>> = match store::open(&url).await {
        Ok(store) => tokio::spawn(body(store, Database::Postgres(url)))
            .await
            .map_err(|e| e.into_panic()),
        Err(e) => Err(Box::new(format!("open the PostgreSQL store: {e}"))),
    };
    // FORCE ends the connections the store's pool may still hold. It fails
    // while an autovacuum worker is in the database (a non-superuser may not
    // terminate it); such a worker is short-lived, so try again.
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let mut attempts = 0;
    while let Err(e) = sqlx::query(&drop).execute(&mut admin).await {
        attempts += 1;
        assert!(attempts < 20, "DROP DATABASE {name}: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let _ = admin.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Turns `async fn name(store: Arc<dyn Store>)` (or, with `[database]`,
/// `async fn name(store: Arc<dyn Store>, database: Database)`) into tests
/// `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! store_tests {
    ($($name:ident $([$database:ident])?),* $(,)?) => {
        $(store_tests!(@one $name $([$database])?);)*
    };
    (@one $name:ident) => {
        store_tests!(@both $name, |store, _database| super::$name(store));
    };
    (@one $name:ident [database]) => {
        store_tests!(@both $name, |store, database| super::$name(store, database));
    };
    (@both $name:ident, $body:expr) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::on_sqlite($body).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::on_postgres($body).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Fixtures.
// ---------------------------------------------------------------------------

/// Now, at the millisecond (every backend keeps at least that).
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).expect("current time is representable")
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn new_instance(root: Uuid, at: DateTime<Utc>) -> Instance {
    Instance {
        branch_id: Uuid::now_v7(),
        branch_name: "eu-west".into(),
        root_organization_id: root,
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ca_key_sealed: format!("v1:0000:{}", Uuid::new_v4().simple()),
        created_at: at,
    }
}

pub fn admin_token(organization_id: Uuid, at: DateTime<Utc>) -> ApiToken {
    ApiToken {
        id: Uuid::now_v7(),
        organization_id,
        name: "admin".into(),
        scopes: vec!["admin".into()],
        created_at: at,
        expires_at: Some(at + Duration::days(365)),
        revoked_at: None,
    }
}

/// Initialises the instance; returns it (its root organization is
/// `root_organization_id`).
pub async fn init(store: &dyn Store) -> Instance {
    let at = now();
    let root = Organization {
        id: Uuid::now_v7(),
        name: "root".into(),
        parent_id: None,
        quotas: Quotas::default(),
        created_at: at,
    };
    let (instance, created) = store
        .init_instance(&new_instance(root.id, at), &root, &admin_token(root.id, at))
        .await
        .expect("init_instance");
    assert!(created);
    instance
}

pub async fn create_org(store: &dyn Store, parent: Uuid, name: &str) -> Uuid {
    let org = Organization {
        id: Uuid::now_v7(),
        name: name.into(),
        parent_id: Some(parent),
        quotas: Quotas::default(),
        created_at: now(),
    };
    store
        .create_organization(&org)
        .await
        .expect("create_organization");
    org.id
}

/// A token for `organization_id`; returns its hash.
pub async fn create_token(
    store: &dyn Store,
    organization_id: Uuid,
    server_name: Option<&str>,
    token_labels: Labels,
    expires_at: DateTime<Utc>,
) -> String {
    let token_hash = format!("sha256:{}", Uuid::new_v4().simple());
    store
        .create_enrollment_token(&NewEnrollmentToken {
            id: Uuid::now_v7(),
            token_hash: token_hash.clone(),
            organization_id,
            server_name: server_name.map(str::to_string),
            labels: token_labels,
            deployment_id: None,
            created_at: now(),
            expires_at,
        })
        .await
        .expect("create_enrollment_token");
    token_hash
}

pub fn enrollment(token_hash: &str, hostname: &str) -> Enrollment {
    let at = now();
    let server_id = Uuid::now_v7();
    Enrollment {
        token_hash: token_hash.into(),
        server_id,
        hostname: hostname.into(),
        agent_version: "0.1.0".into(),
        facts: json!({ "hostname": hostname, "cpu_cores": 2, "memory_bytes": 2_147_483_648u64 }),
        certificate: certificate(server_id, at),
        at,
    }
}

pub fn certificate(server_id: Uuid, at: DateTime<Utc>) -> CertificateRecord {
    CertificateRecord {
        serial: Uuid::new_v4().simple().to_string(),
        server_id,
        not_before: at,
        not_after: at + Duration::days(90),
        issued_at: at,
    }
}

pub async fn try_enroll(
    store: &dyn Store,
    enrollment: &Enrollment,
) -> Result<Server, EnrollmentRefusal> {
    store.enroll(enrollment).await.expect("enroll")
}

/// Enrolls a server into `organization_id`; returns it and its certificate serial.
pub async fn enroll_server(
    store: &dyn Store,
    organization_id: Uuid,
    hostname: &str,
    server_labels: Labels,
) -> (Server, String) {
    let token = create_token(
        store,
        organization_id,
        None,
        server_labels,
        now() + Duration::hours(1),
    )
    .await;
    let e = enrollment(&token, hostname);
    let server = try_enroll(store, &e)
        .await
        .unwrap_or_else(|refusal| panic!("enrollment of {hostname} refused: {refusal:?}"));
    (server, e.certificate.serial)
}

pub fn query(scope: &[Uuid]) -> ServerQuery {
    ServerQuery {
        scope: scope.to_vec(),
        limit: 100,
        ..ServerQuery::default()
    }
}

pub async fn listed_ids(store: &dyn Store, q: &ServerQuery) -> Vec<Uuid> {
    store
        .list_servers(q)
        .await
        .expect("list_servers")
        .into_iter()
        .map(|s| s.id)
        .collect()
}

pub async fn server_by_id(store: &dyn Store, scope: &[Uuid], id: Uuid) -> Server {
    store
        .server(scope, id)
        .await
        .expect("server")
        .unwrap_or_else(|| panic!("server {id} not found"))
}

pub async fn scope_of(store: &dyn Store, organization_id: Uuid) -> Vec<Uuid> {
    store
        .organization_scope(organization_id)
        .await
        .expect("organization_scope")
}

pub fn set(ids: impl IntoIterator<Item = Uuid>) -> BTreeSet<Uuid> {
    ids.into_iter().collect()
}

pub fn audit_entry(
    actor: &str,
    organization_id: Option<Uuid>,
    action: &str,
    at: DateTime<Utc>,
) -> AuditEntry {
    AuditEntry {
        id: Uuid::now_v7(),
        at,
        actor: actor.into(),
        organization_id,
        action: action.into(),
        target: Some("server/1".into()),
        source_ip: Some("192.0.2.7".into()),
        outcome: "success".into(),
        detail: json!({ "note": action }),
    }
}

/// A metrics point with every field set.
pub fn point(server_id: Uuid, seq: i64, ts: DateTime<Utc>) -> MetricsRecord {
    MetricsRecord {
        server_id,
        seq,
        ts,
        cpu_percent: 12.5,
        load_1: 0.5,
        load_5: 0.25,
        load_15: 0.125,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 4 << 30,
        swap_used_bytes: 1 << 20,
        swap_total_bytes: 1 << 30,
        cpu_per_core: json!([10.0, 15.0]).into(),
        disks: json!([{
            "mount_point": "/", "device": "/dev/sda1", "filesystem": "ext4",
            "total_bytes": 100_000_000_000u64, "used_bytes": 50_000_000_000u64,
            "inodes_total": 6_000_000, "inodes_used": 300_000,
        }])
        .into(),
        networks: json!([{
            "interface": "eth0", "rx_bytes": 1_000_000, "tx_bytes": 2_000_000,
            "rx_packets": 3_000, "tx_packets": 4_000, "rx_errors": 0, "tx_errors": 1,
        }])
        .into(),
        uptime_seconds: 86_400,
        process_count: 120,
        dropped_batches: 0,
    }
}

pub async fn ingest(
    store: &dyn Store,
    received_at: DateTime<Utc>,
    metrics: Vec<MetricsRecord>,
    containers: Vec<ContainerSet>,
) {
    store
        .ingest_metrics(&MetricsIngest {
            received_at,
            metrics,
            containers,
        })
        .await
        .expect("ingest_metrics");
}
