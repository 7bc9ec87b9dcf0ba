//! A real `tether serve` process for a benchmark: started on loopback port 0,
//! found through `DATA_DIR/endpoints.json`, driven through its HTTP API with
//! the admin token it wrote at first start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{bail, Context};
use serde_json::Value;

/// Directory holding the release binaries (`$CARGO_TARGET_DIR/release`, or
/// the directory of this executable, which is the same when built together).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TETHER_BENCH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a built binary, failing with a hint when it is missing.
pub fn binary(name: &str) -> crate::error::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --release --bins -p tether-control-plane -p tether-agent -p tether-bench)",
            path.display()
        );
    }
    Ok(path)
}

/// Sends a signal to a child process.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid this process spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `tether serve`.
pub struct ControlPlane {
    pub api_url: String,
    pub quic_addr: SocketAddr,
    pub ca_fingerprint: String,
    pub admin_token: String,
    pub log_path: PathBuf,
    child: Child,
    http: reqwest::Client,
}

impl ControlPlane {
    /// Starts `tether serve` with a fresh data dir.
    pub async fn start(
        data_dir: &Path,
        database_url: Option<&str>,
        extra_args: &[&str],
    ) -> crate::error::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.join("control-plane.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary("tether")?);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--api-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ])
            .args(["--api-rate-limit-admin", "100000000"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(url) = database_url {
            // Through the environment, not argv: the URL carries a password.
            command.env("TETHER_DATABASE_URL", url);
        }
        let mut child = command.spawn().context("spawning tether serve")?;
        let pid = child.id();
        let endpoints = data_dir.join("endpoints.json");
        let started = Instant::now();
        let info: Value = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "tether serve exited early with {status}; see {}",
                    log_path.display()
                );
            }
            let parsed = std::fs::read_to_string(&endpoints)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .filter(|info| info["pid"].as_u64() == Some(u64::from(pid)));
            if let Some(info) = parsed {
                break info;
            }
            if started.elapsed() > Duration::from_secs(60) {
                stop_child(&mut child, Duration::from_secs(2));
                bail!(
                    "tether serve wrote no endpoints.json in 60 s; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .context("reading admin.token")?
            .trim()
            .to_string();
        Ok(Self {
            api_url: info["api_url"].as_str().context("api_url")?.to_string(),
            quic_addr: info["quic_listen"]
                .as_str()
                .context("quic_listen")?
                .parse()?,
            ca_fingerprint: info["ca_fingerprint"]
                .as_str()
                .context("ca_fingerprint")?
                .to_string(),
            admin_token,
            log_path,
            child,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(256)
                .build()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates one enrollment token through the API; returns it in clear.
    pub async fn enrollment_token(&self, server_name: &str) -> crate::error::Result<String> {
        let response = self
            .http
            .post(format!("{}/api/v1/enrollment-tokens", self.api_url))
            .bearer_auth(&self.admin_token)
            .json(&serde_json::json!({ "server_name": server_name, "ttl_seconds": 86400 }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("POST /api/v1/enrollment-tokens: {status} {body}");
        }
        Ok(body["token"].as_str().context("token")?.to_string())
    }

    /// `GET` on the API with the admin token; returns the JSON body.
    pub async fn get(&self, path_and_query: &str) -> crate::error::Result<Value> {
        let response = self
            .http
            .get(format!("{}{}", self.api_url, path_and_query))
            .bearer_auth(&self.admin_token)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path_and_query}: {status} {body}");
        }
        Ok(body)
    }

    /// `POST` of `body` on the API with the admin token; returns the status
    /// and the JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> crate::error::Result<(reqwest::StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}{}", self.api_url, path))
            .bearer_auth(&self.admin_token)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Stops the process (SIGTERM, SIGKILL after 15 s).
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(15));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// A fresh PostgreSQL database on the server of `admin_url`; returns its URL.
pub async fn create_postgres_database(admin_url: &str, name: &str) -> crate::error::Result<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                tether_control_plane::store::redact_url(admin_url)
            )
        })?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let (base, _db) = admin_url
        .rsplit_once('/')
        .context("database URL has no database name")?;
    Ok(format!("{base}/{name}"))
}

/// Drops a database made by [`create_postgres_database`].
pub async fn drop_postgres_database(admin_url: &str, name: &str) -> crate::error::Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await?;
    // An autovacuum worker on the fresh database makes FORCE fail for a
    // non-superuser; it finishes soon, so try again for a while.
    let mut attempt = 0;
    loop {
        let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await;
        match dropped {
            Ok(_) => break,
            Err(_) if attempt < 30 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await?;
    Ok(())
}
