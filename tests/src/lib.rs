//! Harness for Tether's end-to-end tests: starts the real `tether` and
//! `tether-agent` binaries on loopback, talks to the real HTTP API, and reads
//! what the processes logged.
//!
//! The binaries are found next to the test executable's target directory
//! (`target/<profile>/`); `cargo test --workspace` builds them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("test executable dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, failing loudly when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a pid we spawned.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Asserts that `connection` is closed within `within`, with Tether close
/// code `expected`.
pub async fn assert_closed_with(
    connection: &quinn::Connection,
    within: Duration,
    expected: tether_protocol::CloseCode,
) {
    let closed = tokio::time::timeout(within, connection.closed())
        .await
        .unwrap_or_else(|_| panic!("the connection was not closed within {within:?}"));
    assert_eq!(
        tether_transport::close_code_of(&closed),
        Some(expected),
        "{closed}"
    );
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `tether serve` process.
pub struct ControlPlane {
    pub data_dir: PathBuf,
    pub api_url: String,
    pub quic_addr: std::net::SocketAddr,
    pub ca_fingerprint: String,
    pub branch_id: String,
    extra_args: Vec<String>,
    /// Whether it runs with `--enable-host-targets` (the default here).
    host_targets: bool,
    child: Option<Child>,
    log_path: PathBuf,
    http: reqwest::Client,
}

impl ControlPlane {
    /// Starts a control plane on loopback ports chosen by the OS, with the
    /// host targets (`local`, `docker`) enabled, as the tests provision
    /// through them.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(data_dir, "127.0.0.1:0", "127.0.0.1:0", extra_args).await
    }

    /// Like [`Self::start`] but without `--enable-host-targets`: the
    /// operator's default.
    pub async fn start_without_host_targets(
        data_dir: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cp = Self::new(data_dir, extra_args, false)?;
        cp.spawn("127.0.0.1:0", "127.0.0.1:0").await?;
        Ok(cp)
    }

    /// Starts a control plane listening on `api` and `quic` (e.g.
    /// `0.0.0.0:0` for containers to reach it).
    pub async fn start_on(
        data_dir: &Path,
        api: &str,
        quic: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cp = Self::new(data_dir, extra_args, true)?;
        cp.spawn(api, quic).await?;
        Ok(cp)
    }

    fn new(data_dir: &Path, extra_args: &[&str], host_targets: bool) -> anyhow::Result<Self> {
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            api_url: String::new(),
            quic_addr: "127.0.0.1:0".parse()?,
            ca_fingerprint: String::new(),
            branch_id: String::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            host_targets,
            child: None,
            log_path: data_dir.join("control-plane.log"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn spawn(&mut self, api: &str, quic: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let endpoints = self.data_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(binary("tether"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--api-listen", api, "--quic-listen", quic])
            .args(self.host_targets.then_some("--enable-host-targets"))
            .args(&self.extra_args)
            .env_remove("TETHER_ENABLE_HOST_TARGETS")
            .env("RUST_LOG", "info,tether_control_plane=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning tether serve")?;
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        let info: Value = loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("tether serve exited early with {status}: {}", self.log());
                }
            }
            let parsed = std::fs::read_to_string(&endpoints)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .filter(|info| info["pid"].as_u64() == Some(u64::from(pid)));
            if let Some(info) = parsed {
                break info;
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "tether serve did not write endpoints.json in 20 s: {}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.api_url = info["api_url"].as_str().context("api_url")?.to_string();
        self.quic_addr = info["quic_listen"]
            .as_str()
            .context("quic_listen")?
            .parse()?;
        self.ca_fingerprint = info["ca_fingerprint"]
            .as_str()
            .context("ca_fingerprint")?
            .to_string();
        self.branch_id = info["branch_id"].as_str().context("branch_id")?.to_string();
        Ok(())
    }

    /// Stops (SIGTERM, or SIGKILL when `kill`) and waits for the process.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            signal(&child, if kill { libc::SIGKILL } else { libc::SIGTERM });
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same addresses and data dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let api = self.api_url.trim_start_matches("http://").to_string();
        let quic = self.quic_addr.to_string();
        self.spawn(&api, &quic).await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin token written at first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// A request to the API with the admin token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.api_url, path))
            .bearer_auth(self.admin_token())
    }

    /// A request with no token.
    pub fn anonymous(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.api_url, path))
    }

    /// A request to the API with `token`.
    pub fn request_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.api_url, path))
            .bearer_auth(token)
    }

    /// Calls the API with `token` and an optional JSON body; returns the
    /// status, headers and JSON body (`Null` when empty). A non-empty body
    /// that is not JSON is an error.
    pub async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<ApiResponse> {
        let mut request = self.request_as(token, method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        ApiResponse::read(request.send().await?).await
    }

    /// Creates an organization as `token`; returns its 201 body.
    pub async fn create_organization(&self, token: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .call(
                token,
                reqwest::Method::POST,
                "/api/v1/organizations",
                Some(&body),
            )
            .await?;
        if response.status != reqwest::StatusCode::CREATED {
            bail!("create organization {body}: {response:?}");
        }
        Ok(response.body)
    }

    /// Creates an API token as `token`; returns (id, token).
    pub async fn create_token(
        &self,
        token: &str,
        organization_id: &str,
        scopes: &[&str],
    ) -> anyhow::Result<(String, String)> {
        let body = serde_json::json!({
            "name": format!("test token {}", scopes.join(" ")),
            "organization_id": organization_id,
            "scopes": scopes,
        });
        let response = self
            .call(token, reqwest::Method::POST, "/api/v1/tokens", Some(&body))
            .await?;
        if response.status != reqwest::StatusCode::CREATED {
            bail!("create token {body}: {response:?}");
        }
        Ok((
            response.body["id"].as_str().context("id")?.to_string(),
            response.body["token"]
                .as_str()
                .context("token")?
                .to_string(),
        ))
    }

    /// Creates an enrollment token; returns the whole 201 body.
    pub async fn enrollment_token(&self, body: Value) -> anyhow::Result<Value> {
        let response = self
            .request(reqwest::Method::POST, "/api/v1/enrollment-tokens")
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("enrollment token: {status} {body}");
        }
        Ok(body)
    }

    /// `GET /api/v1/servers` with a query string; returns `data`.
    pub async fn servers(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        let response = self
            .request(reqwest::Method::GET, &format!("/api/v1/servers{query}"))
            .send()
            .await?
            .error_for_status()?;
        let body: Value = response.json().await?;
        Ok(body["data"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until a server has `status`; returns it.
    pub async fn wait_for_status(
        &self,
        server_id: &str,
        status: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        eventually(
            timeout,
            &format!("server {server_id} to be {status}"),
            || async {
                let servers = self.servers("").await?;
                Ok(servers
                    .into_iter()
                    .find(|s| s["id"] == server_id && s["status"] == status))
            },
        )
        .await
    }

    /// `GET /api/v1/commands/{id}`; fails unless it answered 200.
    pub async fn command(&self, id: &str) -> anyhow::Result<Value> {
        let response = self
            .call(
                &self.admin_token(),
                reqwest::Method::GET,
                &format!("/api/v1/commands/{id}"),
                None,
            )
            .await?;
        if response.status != 200 {
            bail!("command {id}: {} {}", response.status, response.body);
        }
        Ok(response.body)
    }

    /// Creates a branch invite granting `scopes`; returns its text.
    pub async fn branch_invite(&self, scopes: &[&str]) -> anyhow::Result<String> {
        let created = self
            .call(
                &self.admin_token(),
                reqwest::Method::POST,
                "/api/v1/branches/invites",
                Some(&serde_json::json!({ "name": "peer", "scopes": scopes, "ttl_seconds": 600 })),
            )
            .await?;
        if created.status != 201 {
            bail!("branch invite: {} {}", created.status, created.body);
        }
        created.body["invite"]
            .as_str()
            .map(str::to_string)
            .context("the invite answer has no `invite`")
    }

    /// `POST /api/v1/branches` with another branch's invite text: peers
    /// this control plane with it. Returns the answer, whatever its status.
    pub async fn join_branch(&self, invite: &str) -> anyhow::Result<ApiResponse> {
        self.call(
            &self.admin_token(),
            reqwest::Method::POST,
            "/api/v1/branches",
            Some(&serde_json::json!({ "invite": invite })),
        )
        .await
    }

    /// `GET /api/v1/branches/{id}`'s body; a failed request gives
    /// `{"request_failed": "..."}`, so callers can poll through outages.
    pub async fn branch(&self, id: &str) -> Value {
        self.call(
            &self.admin_token(),
            reqwest::Method::GET,
            &format!("/api/v1/branches/{id}"),
            None,
        )
        .await
        .map(|r| r.body)
        .unwrap_or_else(|e| serde_json::json!({ "request_failed": e.to_string() }))
    }

    /// Waits until a peer branch's server is listed here (`?branch=all`),
    /// online; returns it.
    pub async fn remote_server_online(
        &self,
        server_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        eventually(
            timeout,
            &format!("the peer's server {server_id} listed here, online"),
            || async {
                let servers = self.servers("?branch=all").await?;
                Ok(servers
                    .into_iter()
                    .find(|s| s["id"] == server_id && s["status"] == "online"))
            },
        )
        .await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// An API answer: status, headers and the JSON body (`Null` when empty).
#[derive(Debug)]
pub struct ApiResponse {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl ApiResponse {
    /// Reads a response, failing when a non-empty body is not JSON.
    pub async fn read(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{status}: body is not JSON: {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A `tether-agent` state dir and, while running, its process.
pub struct Agent {
    pub state_dir: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Agent {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            child: None,
            log_path: state_dir.with_extension("log"),
        }
    }

    /// Runs `tether-agent enroll`; returns (success, stderr).
    pub fn enroll(&self, cp: &ControlPlane, token: &str) -> anyhow::Result<(bool, String)> {
        let output = self.enroll_command(cp, token).output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// The `tether-agent enroll` command, not yet started.
    pub fn enroll_command(&self, cp: &ControlPlane, token: &str) -> Command {
        let mut command = Command::new(binary("tether-agent"));
        command
            .arg("enroll")
            .args(["--server", &cp.quic_addr.to_string()])
            .args(["--token", token])
            .args(["--ca-fingerprint", &cp.ca_fingerprint])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null());
        command
    }

    /// Starts `tether-agent run`.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let config = self.state_dir.with_extension("toml");
        if !config.exists() {
            std::fs::write(&config, "# agent.toml of an end-to-end test\n")?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(binary("tether-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,tether_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning tether-agent run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the agent (SIGTERM, or SIGKILL when `kill`).
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            signal(&child, if kill { libc::SIGKILL } else { libc::SIGTERM });
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The server id the agent enrolled as (from its certificate).
    pub fn server_id(&self) -> anyhow::Result<String> {
        let info = self.certificate()?;
        Ok(info.require_identity()?.server_id.clone())
    }

    /// The agent's current leaf certificate.
    pub fn certificate(&self) -> anyhow::Result<tether_certs::CertificateInfo> {
        let pem = std::fs::read_to_string(self.state_dir.join("agent.crt"))?;
        let chain = tether_certs::authority::pem_to_chain(&pem)?;
        Ok(tether_certs::CertificateInfo::from_der(&chain[0])?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Enrolls a new agent with a fresh token (`tether-agent enroll`) without
/// starting it; returns it with its server id.
pub async fn enrolled_agent(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
) -> anyhow::Result<(Agent, String)> {
    let token = cp
        .enrollment_token(serde_json::json!({ "server_name": name }))
        .await?;
    let agent = Agent::new(&dir.join(name));
    let (ok, stderr) = agent.enroll(cp, token["token"].as_str().context("token")?)?;
    if !ok {
        bail!("enroll failed: {stderr}");
    }
    let server_id = agent.server_id()?;
    Ok((agent, server_id))
}

/// Enrolls a new agent with a fresh token and starts it; returns it with its server id.
pub async fn enrolled_running_agent(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
) -> anyhow::Result<(Agent, String)> {
    let (mut agent, server_id) = enrolled_agent(cp, dir, name).await?;
    agent.run()?;
    Ok((agent, server_id))
}

/// Enrolls a new agent whose local config (`<state dir>.toml`) is
/// `config_toml`, starts it and waits until it is online; returns it with
/// its server id.
pub async fn online_agent_with_config(
    cp: &ControlPlane,
    dir: &Path,
    name: &str,
    config_toml: &str,
) -> anyhow::Result<(Agent, String)> {
    std::fs::write(dir.join(name).with_extension("toml"), config_toml)?;
    let (agent, server_id) = enrolled_running_agent(cp, dir, name).await?;
    cp.wait_for_status(&server_id, "online", Duration::from_secs(15))
        .await?;
    Ok((agent, server_id))
}

/// Docker helpers for tests that need real containers. Images are built
/// locally from Debian's busybox-static (no registry is reachable).
pub mod docker {
    use std::process::Command;

    use anyhow::{bail, Context};

    /// The local image every test container runs.
    pub const IMAGE: &str = "tether-test-busybox:local";

    fn docker(args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("docker")
            .args(args)
            .output()
            .context("running docker")?;
        if !output.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Builds [`IMAGE`] from /bin/busybox unless it exists.
    pub fn ensure_image() -> anyhow::Result<()> {
        if docker(&["image", "inspect", IMAGE]).is_ok() {
            return Ok(());
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .context("busybox-static is not installed (apt-get install busybox-static)")?;
        let root = tempfile::tempdir()?;
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy(busybox, bin.join("busybox"))?;
        for applet in ["sh", "sleep", "yes", "cat", "true"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C {} -c . | docker import - {IMAGE}",
                root.path().display()
            ))
            .status()?;
        if !status.success() {
            bail!("docker import of {IMAGE} failed");
        }
        Ok(())
    }

    /// A container removed when dropped.
    pub struct Container {
        pub name: String,
        pub id: String,
    }

    impl Container {
        /// Runs `command` in a detached container named `name`.
        pub fn run(name: &str, command: &[&str]) -> anyhow::Result<Self> {
            ensure_image()?;
            let _ = docker(&["rm", "-f", name]);
            let mut args = vec!["run", "-d", "--name", name, IMAGE];
            args.extend_from_slice(command);
            let id = docker(&args)?;
            Ok(Self {
                name: name.to_string(),
                id,
            })
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = docker(&["rm", "-f", &self.name]);
        }
    }

    /// Label put on every container and network made by the helpers below,
    /// so leftovers of a killed test run can be found (`docker ps -a
    /// --filter label=tether-tests`).
    pub const LABEL: &str = "tether-tests=e2e";

    /// Fails loudly when no Docker engine answers (CI requires one).
    pub fn require_engine() -> anyhow::Result<String> {
        docker(&["version", "--format", "{{.Server.Version}}"])
            .context("a Docker engine must answer for this test (is dockerd running?)")
    }

    /// A name unique to this process and moment: `<prefix>-<pid>-<nanos>`
    /// (lowercase letters, digits and dashes, so it is also a DNS name).
    pub fn unique_name(prefix: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{prefix}-{}-{nanos:x}", std::process::id())
    }

    /// A user-defined bridge network, removed (with any container still
    /// attached to it) when dropped.
    pub struct Network {
        pub name: String,
    }

    impl Network {
        /// Creates the network `name`.
        pub fn create(name: &str) -> anyhow::Result<Self> {
            docker(&[
                "network", "create", "--driver", "bridge", "--label", LABEL, name,
            ])?;
            Ok(Self {
                name: name.to_string(),
            })
        }

        /// `docker network disconnect`: the container loses this network.
        pub fn disconnect(&self, container: &Container) -> anyhow::Result<()> {
            docker(&["network", "disconnect", &self.name, &container.name]).map(drop)
        }

        /// `docker network connect`: the container joins this network again.
        pub fn connect(&self, container: &Container) -> anyhow::Result<()> {
            docker(&["network", "connect", &self.name, &container.name]).map(drop)
        }
    }

    impl Drop for Network {
        fn drop(&mut self) {
            let attached = docker(&[
                "network",
                "inspect",
                "--format",
                "{{range .Containers}}{{.Name}} {{end}}",
                &self.name,
            ])
            .unwrap_or_default();
            for container in attached.split_whitespace() {
                let _ = docker(&["rm", "-f", container]);
            }
            let _ = docker(&["network", "rm", &self.name]);
        }
    }

    /// Read-only bind mounts (`HOST:CONTAINER:ro`) of the shared libraries
    /// `ldd` lists for `binaries`, at the paths the dynamic loader looks
    /// for them, so host-built (glibc) binaries run in [`IMAGE`].
    pub fn library_mounts(binaries: &[&std::path::Path]) -> anyhow::Result<Vec<String>> {
        let mut mounts = std::collections::BTreeSet::new();
        for binary in binaries {
            let output = Command::new("ldd")
                .arg(binary)
                .output()
                .context("running ldd")?;
            if !output.status.success() {
                bail!(
                    "ldd {}: {}",
                    binary.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
                // `/lib64/ld-linux-x86-64.so.2 (0x...)`; vdso has no path.
                let path = match line.split_once("=>") {
                    Some((_, right)) => right.split_whitespace().next(),
                    None => line.split_whitespace().next(),
                };
                let Some(path) = path.filter(|p| p.starts_with('/')) else {
                    continue;
                };
                let host = std::fs::canonicalize(path)
                    .with_context(|| format!("resolving {path} (from ldd)"))?;
                mounts.insert(format!("{}:{path}:ro", host.display()));
            }
        }
        Ok(mounts.into_iter().collect())
    }

    impl Container {
        /// Runs `command` in a detached container named `name` with extra
        /// `docker run` options (network, mounts...) placed before the image.
        pub fn run_with(name: &str, options: &[String], command: &[&str]) -> anyhow::Result<Self> {
            ensure_image()?;
            let _ = docker(&["rm", "-f", name]);
            let mut args: Vec<&str> = vec!["run", "-d", "--name", name, "--label", LABEL];
            args.extend(options.iter().map(String::as_str));
            args.push(IMAGE);
            args.extend_from_slice(command);
            let id = docker(&args)?;
            Ok(Self {
                name: name.to_string(),
                id,
            })
        }

        /// The container's IPv4 address on `network`.
        pub fn ip(&self, network: &str) -> anyhow::Result<std::net::IpAddr> {
            let format = format!(
                "{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}"
            );
            let ip = docker(&["inspect", "--format", &format, &self.name])?;
            ip.parse()
                .with_context(|| format!("{} has no address on {network}: {ip:?}", self.name))
        }

        /// Runs `command` in the container and waits; returns
        /// (success, stdout, stderr).
        pub fn exec(&self, command: &[&str]) -> anyhow::Result<(bool, String, String)> {
            let output = Command::new("docker")
                .args(["exec", &self.name])
                .args(command)
                .output()
                .context("running docker exec")?;
            Ok((
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ))
        }

        /// Starts `command` in the container in the background (`exec -d`).
        pub fn exec_detached(&self, command: &[&str]) -> anyhow::Result<()> {
            let mut args = vec!["exec", "-d", &self.name];
            args.extend_from_slice(command);
            docker(&args).map(drop)
        }

        /// What the container wrote to its stdout and stderr.
        pub fn logs(&self) -> String {
            Command::new("docker")
                .args(["logs", &self.name])
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default()
        }
    }

    /// Where the binaries and the data dir appear inside a branch container.
    pub const BIN_IN_CONTAINER: &str = "/opt/tether";
    pub const DATA_IN_CONTAINER: &str = "/data";
    /// The ports `tether serve` listens on inside a branch container.
    pub const API_PORT: u16 = 8080;
    pub const QUIC_PORT: u16 = 7443;

    /// `tether serve` running in its own container on a Docker network: the
    /// host's `tether` and `tether-agent` binaries and their libraries are
    /// bind-mounted read-only, the data dir is a host directory mounted at
    /// [`DATA_IN_CONTAINER`], the API and QUIC listen on all interfaces, and
    /// the branch advertises `<container name>:7443` (resolved by Docker's
    /// DNS on the network) as its public QUIC address.
    ///
    /// Derefs to a [`ControlPlane`] whose `api_url` is the container's
    /// address on the network (reachable from the host), so the usual API
    /// helpers work; the process is the container's, so use the methods
    /// here rather than `stop`/`restart` (not reachable through `Deref`).
    pub struct BranchContainer {
        pub container: Container,
        pub network: String,
        cp: crate::ControlPlane,
    }

    impl std::ops::Deref for BranchContainer {
        type Target = crate::ControlPlane;
        fn deref(&self) -> &crate::ControlPlane {
            &self.cp
        }
    }

    impl BranchContainer {
        /// Starts `tether serve` in a container named `name` on `network`,
        /// with its data in `data_dir` (a host directory), and waits until it
        /// wrote `endpoints.json` and answers `GET /health`.
        pub async fn start(
            network: &Network,
            name: &str,
            data_dir: &std::path::Path,
        ) -> anyhow::Result<Self> {
            let tether = crate::binary("tether");
            let agent = crate::binary("tether-agent");
            std::fs::create_dir_all(data_dir)?;
            let data_dir = std::fs::canonicalize(data_dir)?;
            let endpoints = data_dir.join("endpoints.json");
            let _ = std::fs::remove_file(&endpoints);
            // SAFETY: getuid/getgid cannot fail.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let mut options = vec![
                "--network".to_string(),
                network.name.clone(),
                "--hostname".to_string(),
                name.to_string(),
                "--user".to_string(),
                format!("{uid}:{gid}"),
                "--tmpfs".to_string(),
                "/tmp".to_string(),
                "-e".to_string(),
                "RUST_LOG=info,tether_control_plane=debug".to_string(),
                "-v".to_string(),
                format!("{}:{DATA_IN_CONTAINER}", data_dir.display()),
                "-v".to_string(),
                format!("{}:{BIN_IN_CONTAINER}/tether:ro", tether.display()),
                "-v".to_string(),
                format!("{}:{BIN_IN_CONTAINER}/tether-agent:ro", agent.display()),
            ];
            for mount in library_mounts(&[&tether, &agent])? {
                options.push("-v".to_string());
                options.push(mount);
            }
            let serve = format!(
                "exec {BIN_IN_CONTAINER}/tether serve --data-dir {DATA_IN_CONTAINER} \
                 --api-listen 0.0.0.0:{API_PORT} --quic-listen 0.0.0.0:{QUIC_PORT} \
                 --public-quic-addr {name}:{QUIC_PORT} --branch-name {name} \
                 >>{DATA_IN_CONTAINER}/control-plane.log 2>&1"
            );
            let container = Container::run_with(name, &options, &["sh", "-c", &serve])?;
            let log_path = data_dir.join("control-plane.log");
            let started = std::time::Instant::now();
            let info: serde_json::Value = loop {
                let parsed = std::fs::read_to_string(&endpoints)
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok());
                if let Some(info) = parsed {
                    break info;
                }
                let running = docker(&["inspect", "--format", "{{.State.Running}}", name])?;
                if running != "true" || started.elapsed() > std::time::Duration::from_secs(30) {
                    bail!(
                        "tether serve in container {name} did not start (running: {running}): {}{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default(),
                        container.logs()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            };
            let ip = container.ip(&network.name)?;
            let cp = crate::ControlPlane {
                data_dir: data_dir.clone(),
                api_url: format!("http://{ip}:{API_PORT}"),
                quic_addr: std::net::SocketAddr::new(ip, QUIC_PORT),
                ca_fingerprint: info["ca_fingerprint"]
                    .as_str()
                    .context("ca_fingerprint")?
                    .to_string(),
                branch_id: info["branch_id"].as_str().context("branch_id")?.to_string(),
                extra_args: Vec::new(),
                host_targets: false,
                child: None,
                log_path,
                http: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(10))
                    .build()?,
            };
            let branch = Self {
                container,
                network: network.name.clone(),
                cp,
            };
            branch.wait_until_answering().await?;
            Ok(branch)
        }

        /// Waits until `GET /health` answers 200 at the current address.
        async fn wait_until_answering(&self) -> anyhow::Result<()> {
            crate::eventually(
                std::time::Duration::from_secs(20),
                &format!("{} answering on {}", self.container.name, self.cp.api_url),
                || async {
                    let ok = self
                        .cp
                        .anonymous(reqwest::Method::GET, "/health")
                        .send()
                        .await?
                        .status()
                        .is_success();
                    Ok(ok.then_some(()))
                },
            )
            .await
        }

        /// The public QUIC address the branch advertises (`name:7443`).
        pub fn public_quic_addr(&self) -> String {
            format!("{}:{QUIC_PORT}", self.container.name)
        }

        /// Re-reads the container's address on its network (it may change
        /// after a disconnect and reconnect) and waits for the API there.
        pub async fn refresh_address(&mut self) -> anyhow::Result<()> {
            let ip = self.container.ip(&self.network)?;
            self.cp.api_url = format!("http://{ip}:{API_PORT}");
            self.cp.quic_addr = std::net::SocketAddr::new(ip, QUIC_PORT);
            self.wait_until_answering().await
        }

        /// Enrolls a `tether-agent` inside this container (over the
        /// container's loopback) and starts `tether-agent run` there;
        /// returns its server id. State in `DATA_DIR/<name>`, log in
        /// `DATA_DIR/<name>.log`.
        pub async fn start_agent(&self, name: &str) -> anyhow::Result<String> {
            let token = self
                .cp
                .enrollment_token(serde_json::json!({ "server_name": name }))
                .await?;
            let token = token["token"].as_str().context("token")?;
            let state = format!("{DATA_IN_CONTAINER}/{name}");
            let server = format!("127.0.0.1:{QUIC_PORT}");
            let (ok, stdout, stderr) = self.container.exec(&[
                &format!("{BIN_IN_CONTAINER}/tether-agent"),
                "enroll",
                "--server",
                &server,
                "--token",
                token,
                "--ca-fingerprint",
                &self.cp.ca_fingerprint,
                "--state-dir",
                &state,
            ])?;
            if !ok {
                bail!(
                    "tether-agent enroll in {}: {stdout}{stderr}",
                    self.container.name
                );
            }
            let config = self.cp.data_dir.join(format!("{name}.toml"));
            std::fs::write(&config, "# agent.toml of an end-to-end test\n")?;
            let run = format!(
                "exec {BIN_IN_CONTAINER}/tether-agent run --state-dir {state} \
                 --config {DATA_IN_CONTAINER}/{name}.toml >>{state}.log 2>&1"
            );
            self.container.exec_detached(&["sh", "-c", &run])?;
            crate::Agent::new(&self.cp.data_dir.join(name)).server_id()
        }

        /// What the agent `name` started by [`Self::start_agent`] logged.
        pub fn agent_log(&self, name: &str) -> String {
            std::fs::read_to_string(self.cp.data_dir.join(format!("{name}.log")))
                .unwrap_or_default()
        }
    }
}

/// Drops UDP packets to a loopback port while it lives (iptables), so a test
/// can cut an agent off its control plane and heal the cut.
pub struct UdpCut {
    port: u16,
}

impl UdpCut {
    fn rule(action: &str, port: u16) -> anyhow::Result<()> {
        let port = port.to_string();
        let status = Command::new("iptables")
            .args([
                action, "INPUT", "-i", "lo", "-p", "udp", "--dport", &port, "-j", "DROP",
            ])
            .status()
            .context("running iptables (root and the iptables package are needed)")?;
        if !status.success() {
            bail!("iptables {action} for udp port {port} failed");
        }
        Ok(())
    }

    /// Starts dropping UDP to `port` on the loopback interface.
    pub fn new(port: u16) -> anyhow::Result<Self> {
        Self::rule("-I", port)?;
        Ok(Self { port })
    }
}

impl Drop for UdpCut {
    fn drop(&mut self) {
        let _ = Self::rule("-D", self.port);
    }
}

/// Raw metrics points of a server (oldest first), as the API serves them.
pub async fn raw_points(
    cp: &ControlPlane,
    server_id: &str,
    from: &str,
) -> anyhow::Result<Vec<Value>> {
    let response = cp
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/servers/{server_id}/metrics"),
        )
        .query(&[("from", from), ("limit", "10000")])
        .send()
        .await?
        .error_for_status()?;
    let body: Value = response.json().await?;
    Ok(body["data"].as_array().cloned().unwrap_or_default())
}

/// Sequence numbers of `points`, checked to be contiguous without duplicates.
pub fn contiguous_seqs(points: &[Value]) -> Result<Vec<i64>, String> {
    let mut seqs: Vec<i64> = points.iter().filter_map(|p| p["seq"].as_i64()).collect();
    seqs.sort_unstable();
    for pair in seqs.windows(2) {
        if pair[1] == pair[0] {
            return Err(format!("duplicate seq {}", pair[0]));
        }
        if pair[1] != pair[0] + 1 {
            return Err(format!("gap between seq {} and {}", pair[0], pair[1]));
        }
    }
    Ok(seqs)
}
