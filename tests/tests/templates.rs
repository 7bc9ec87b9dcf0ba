//! Provisioning templates with the real tools: `terraform fmt` on every
//! module, `cloud-init schema` and terraform's `yamldecode` on the rendered
//! user-data, `sh -n`/`busybox sh -n` on the scripts, and the `local` and
//! `docker` targets booting a "server" for real: `terraform
//! init/apply/destroy` against a tiny HTTP server that plays the control
//! plane (serves the agent, records the boot stages). Missing tools (and a
//! Docker engine that does not answer) fail the tests; nothing is skipped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_control_plane::provision::bootstrap::{
    render_agent_toml, render_user_data, AgentChecksum, BootstrapParams, AGENT_SYSTEMD_UNIT,
    BOOTSTRAP_SCRIPT, DESTROY_USER_DATA, USER_DATA_MAX_BYTES,
};
use tether_control_plane::provision::templates::{self, PROVIDERS};

/// A token with everything that could break YAML, TOML, JSON or a shell.
const AWKWARD_TOKEN: &str = "sekr1t-marker\"quote'apos#hash: $(touch PWNED) `tick` \\back %s end";
const MARKER: &str = "sekr1t-marker";
const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// The path of a required tool; fails loudly when it is not installed.
fn tool(name: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; these tests need it ({hint})"))
}

fn terraform() -> PathBuf {
    tool(
        "terraform",
        "terraform >= 1.5 on PATH, e.g. /usr/local/bin/terraform",
    )
}

/// A terraform command in `dir`: no CLI config, no checkpoint calls, no prompts.
fn terraform_in(dir: &Path) -> Command {
    let config = dir.join(".terraformrc-empty");
    std::fs::write(&config, "").expect("write empty terraform CLI config");
    let mut command = Command::new(terraform());
    command
        .current_dir(dir)
        .env("TF_CLI_CONFIG_FILE", &config)
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env_remove("TF_LOG");
    command
}

/// Runs `command` to completion within `limit`, capturing its output.
fn run(mut command: Command, limit: Duration) -> Output {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {description}: {err}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{description} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn sha256_hex(path: &Path) -> String {
    let output = run(
        {
            let mut c = Command::new(tool("sha256sum", "coreutils"));
            c.arg(path);
            c
        },
        Duration::from_secs(10),
    );
    assert!(output.status.success(), "sha256sum: {}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

fn params(api_url: &str, deployment_id: &str, checksums: Vec<AgentChecksum>) -> BootstrapParams {
    BootstrapParams {
        api_url: api_url.to_string(),
        quic_address: "127.0.0.1:7443".to_string(),
        ca_fingerprint: PIN.to_string(),
        token: AWKWARD_TOKEN.to_string(),
        deployment_id: deployment_id.to_string(),
        agent_checksums: checksums,
        agent_user: None,
        install_docker: false,
    }
}

fn sample_checksums() -> Vec<AgentChecksum> {
    vec![
        AgentChecksum::of_binary("linux", "amd64", b"agent for amd64"),
        AgentChecksum::of_binary("linux", "arm64", b"agent for arm64"),
    ]
}

#[test]
fn terraform_fmt_accepts_every_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = terraform_in(dir.path());
    command
        .args(["fmt", "-check", "-recursive", "-diff"])
        .arg(repo_root().join("terraform-templates"));
    let output = run(command, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "terraform fmt -check -recursive terraform-templates/ failed:\n{}",
        text(&output)
    );
}

#[test]
fn rendered_user_data_passes_cloud_init_schema_for_every_target() {
    let cloud_init = tool("cloud-init", "apt-get install -y cloud-init");
    let dir = tempfile::tempdir().expect("tempdir");
    // Every target, with Docker installed at boot and without.
    for provider in PROVIDERS {
        for install_docker in [false, true] {
            let mut p = params(
                "https://tether.example.com:8443/",
                &format!("0b7c2d4e-{provider}-#1"),
                sample_checksums(),
            );
            p.install_docker = install_docker;
            let user_data = render_user_data(&p).expect("render user-data");
            assert!(user_data.starts_with("#cloud-config\n"));
            assert!(user_data.len() <= USER_DATA_MAX_BYTES);
            assert_eq!(
                user_data.contains("TETHER_INSTALL_DOCKER='1'"),
                install_docker,
                "{provider}"
            );
            let file = dir
                .path()
                .join(format!("{provider}-docker-{install_docker}.yaml"));
            std::fs::write(&file, &user_data).expect("write user-data");
            let mut command = Command::new(&cloud_init);
            command.args(["schema", "--config-file"]).arg(&file);
            let output = run(command, Duration::from_secs(120));
            let report = text(&output);
            assert!(
                output.status.success() && report.contains("Valid cloud-config"),
                "cloud-init schema refused the {provider} user-data (install_docker {install_docker}):\n{report}"
            );
            assert!(!report.contains(MARKER), "cloud-init printed the token");
        }
    }
    // With a dedicated agent user too.
    let mut with_user = params(
        "https://tether.example.com:8443/",
        "d-user",
        sample_checksums(),
    );
    with_user.agent_user = Some("tether".into());
    let user_data = render_user_data(&with_user).expect("render user-data");
    assert!(user_data.contains("TETHER_AGENT_USER='tether'"));
    assert!(user_data.len() <= USER_DATA_MAX_BYTES);
    let file = dir.path().join("with-user.yaml");
    std::fs::write(&file, &user_data).expect("write user-data");
    let mut command = Command::new(&cloud_init);
    command.args(["schema", "--config-file"]).arg(&file);
    let output = run(command, Duration::from_secs(120));
    let report = text(&output);
    assert!(
        output.status.success() && report.contains("Valid cloud-config"),
        "cloud-init schema refused the user-data with an agent user:\n{report}"
    );
}

/// Decodes the user-data with terraform's own `yamldecode` (what the local
/// module does) and checks every file comes back byte for byte.
#[test]
fn terraform_yamldecode_gives_back_every_file_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = params("http://127.0.0.1:8080", "d-yaml", sample_checksums());
    let user_data = render_user_data(&p).expect("render");
    std::fs::write(
        dir.path().join("main.tf"),
        r#"
variable "user_data" {
  type      = string
  sensitive = true
}

output "decoded" {
  value     = yamldecode(var.user_data)
  sensitive = true
}
"#,
    )
    .expect("write main.tf");
    let mut init = terraform_in(dir.path());
    init.args(["init", "-input=false", "-no-color"]);
    let output = run(init, Duration::from_secs(120));
    assert!(output.status.success(), "init: {}", text(&output));
    let mut apply = terraform_in(dir.path());
    apply
        .args(["apply", "-auto-approve", "-input=false", "-no-color"])
        .env("TF_VAR_user_data", &user_data);
    let output = run(apply, Duration::from_secs(120));
    assert!(output.status.success(), "apply: {}", text(&output));
    assert!(
        !text(&output).contains(MARKER),
        "terraform printed the token"
    );
    let mut show = terraform_in(dir.path());
    show.args(["output", "-json", "decoded"]);
    let output = run(show, Duration::from_secs(60));
    assert!(output.status.success(), "output: {}", text(&output));
    let decoded: Value = serde_json::from_slice(&output.stdout).expect("output json");

    let files: BTreeMap<String, (String, String)> = decoded["write_files"]
        .as_array()
        .expect("write_files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_string(),
                (
                    f["permissions"].as_str().expect("permissions").to_string(),
                    f["content"].as_str().expect("content").to_string(),
                ),
            )
        })
        .collect();
    let agent_toml = &files["/etc/tether/agent.toml"];
    assert_eq!(agent_toml.0, "0600");
    assert_eq!(agent_toml.1, render_agent_toml(&p).expect("agent.toml"));
    assert!(agent_toml.1.contains(MARKER), "{}", agent_toml.1);
    let env = &files["/var/lib/tether/bootstrap.env"];
    assert_eq!(env.0, "0600");
    assert!(env.1.contains("TETHER_API_URL='http://127.0.0.1:8080'\n"));
    let unit = &files["/etc/systemd/system/tether-agent.service"];
    assert_eq!(unit.1, AGENT_SYSTEMD_UNIT);
    let script = &files["/var/lib/tether/bootstrap.sh"];
    assert_eq!(script.0, "0700");
    assert_eq!(script.1, BOOTSTRAP_SCRIPT);
    assert_eq!(
        decoded["runcmd"],
        serde_json::json!([["sh", "/var/lib/tether/bootstrap.sh", "--mode", "systemd"]])
    );
}

#[test]
fn shell_scripts_parse_with_sh_and_busybox() {
    let root = repo_root();
    let scripts = [
        root.join("packaging/bootstrap/bootstrap.sh"),
        root.join("terraform-templates/local/scripts/boot.sh"),
        root.join("terraform-templates/local/scripts/stop.sh"),
        root.join("terraform-templates/docker/scripts/up.sh"),
        root.join("terraform-templates/docker/scripts/down.sh"),
    ];
    let mut shells = vec![vec!["sh".to_string()]];
    let busybox = Path::new("/bin/busybox");
    if busybox.is_file() {
        shells.push(vec![busybox.display().to_string(), "sh".to_string()]);
    }
    for script in &scripts {
        for shell in &shells {
            let mut command = Command::new(&shell[0]);
            command.args(&shell[1..]).arg("-n").arg(script);
            let output = run(command, Duration::from_secs(10));
            assert!(
                output.status.success(),
                "{shell:?} -n {}: {}",
                script.display(),
                text(&output)
            );
        }
    }
}

/// A tiny HTTP/1.1 server playing the control plane: serves the "agent" at
/// `/agent/download/linux/<arch>` and records the boot stages posted.
struct FakeApi {
    url: String,
    stages: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    fn start(agent: Vec<u8>) -> Self {
        Self::start_on("127.0.0.1", "127.0.0.1", agent)
    }

    /// Listens on `bind`; the URL names `host` (how the server reaches it).
    fn start_on(bind: &str, host: &str, agent: Vec<u8>) -> Self {
        let listener = TcpListener::bind((bind, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let url = format!("http://{host}:{port}");
        let stages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (recorded, stopped) = (stages.clone(), stop.clone());
        let agent = Arc::new(agent);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (agent, recorded) = (agent.clone(), recorded.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &agent, &recorded);
                });
            }
        });
        Self { url, stages, stop }
    }

    fn stages(&self) -> Vec<Value> {
        self.stages.lock().expect("stages").clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(
            &self
                .url
                .trim_start_matches("http://")
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 9))),
            Duration::from_secs(1),
        );
    }
}

fn serve(stream: TcpStream, agent: &[u8], stages: &Mutex<Vec<Value>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, payload): (&str, &[u8]) = match (method, path) {
        ("GET", "/agent/download/linux/amd64" | "/agent/download/linux/arm64") => ("200 OK", agent),
        ("POST", "/api/v1/infrastructure/boot-stages") => {
            let report: Value = serde_json::from_slice(&body).unwrap_or_else(|err| {
                serde_json::json!({ "unparsable": err.to_string(), "raw": String::from_utf8_lossy(&body) })
            });
            stages.lock().expect("stages").push(report);
            ("204 No Content", b"")
        }
        _ => ("404 Not Found", b"not found\n"),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    stream.write_all(payload)?;
    stream.flush()
}

/// The "agent": records its argv in its state dir, then ignores SIGTERM and
/// sleeps (so destroy has to escalate to SIGKILL).
const FAKE_AGENT: &str = r#"#!/bin/sh
state=
prev=
for arg in "$@"; do
    [ "$prev" = --state-dir ] && state=$arg
    prev=$arg
done
printf '%s\n' "$@" >"$state/fake-agent-argv"
trap '' TERM
while :; do sleep 1; done
"#;

/// Whether `pid` runs and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X' | 'x')))
        }
        Err(_) => false,
    }
}

fn cmdline(pid: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process's argv that mentions one of `needles`.
fn argv_leaks(needles: &[&str]) -> Vec<String> {
    let mut leaks = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return leaks;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let argv = cmdline(&name).join(" ");
        if needles.iter().any(|needle| argv.contains(needle)) {
            leaks.push(format!("pid {name}: {argv}"));
        }
    }
    leaks
}

/// Watches every process's argv while it lives; collects what leaked.
struct ArgvWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ArgvWatch {
    fn start(needles: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            let mut leaks = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                leaks.extend(argv_leaks(&needles));
                std::thread::sleep(Duration::from_millis(10));
            }
            leaks
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|thread| thread.join().expect("argv watcher"))
            .unwrap_or_default()
    }
}

/// A working dir with a root module calling the embedded `local` module.
/// Dropping it kills whatever agent is left and removes the server root.
struct LocalDeployment {
    _dir: tempfile::TempDir,
    tf: PathBuf,
    root: PathBuf,
    user_data: String,
}

impl LocalDeployment {
    fn new(user_data: String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tf = dir.path().join("work dir");
        let written = templates::write_module("local", &tf.join("modules/local"))
            .expect("write the local module");
        assert!(written.iter().any(|p| p.ends_with("scripts/boot.sh")));
        std::fs::write(
            tf.join("main.tf"),
            r#"
variable "user_data" {
  type      = string
  sensitive = true
}

module "server" {
  source               = "./modules/local"
  server_name          = "test-local"
  user_data            = var.user_data
  stop_timeout_seconds = 2
}

output "instance_id" { value = module.server.instance_id }
output "public_ip" { value = module.server.public_ip }
output "private_ip" { value = module.server.private_ip }
output "root" { value = module.server.root }
output "pid_file" { value = module.server.pid_file }
"#,
        )
        .expect("write main.tf");
        let root = tf.join("local-server");
        Self {
            _dir: dir,
            tf,
            root,
            user_data,
        }
    }

    /// Runs terraform; `destroy` gets [`DESTROY_USER_DATA`], as the control
    /// plane gives it once the token is spent.
    fn terraform(&self, args: &[&str]) -> Output {
        let mut command = terraform_in(&self.tf);
        let user_data = if args.first() == Some(&"destroy") {
            DESTROY_USER_DATA
        } else {
            &self.user_data
        };
        command
            .args(args)
            .arg("-no-color")
            .env("TF_VAR_user_data", user_data);
        run(command, Duration::from_secs(180))
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("run/tether-agent.pid"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }
}

impl Drop for LocalDeployment {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            if alive(pid) {
                // SAFETY: kill(2) on the process group the agent leads.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn assert_no_secret_in(what: &str, output: &str) {
    for needle in [MARKER, "TETHER_REPORT_FIELDS", "#cloud-config"] {
        assert!(
            !output.contains(needle),
            "{what} shows {needle:?}:\n{output}"
        );
    }
}

fn stage_names(stages: &[Value]) -> Vec<String> {
    stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn local_module_boots_an_agent_reports_stages_and_destroy_removes_it() {
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let agent_file = agent_dir.path().join("agent");
    std::fs::write(&agent_file, FAKE_AGENT).expect("write fake agent");
    let sha = sha256_hex(&agent_file);
    let api = FakeApi::start(FAKE_AGENT.as_bytes().to_vec());
    let checksums = vec![
        AgentChecksum {
            os: "linux".into(),
            arch: "amd64".into(),
            sha256_hex: sha.clone(),
        },
        AgentChecksum {
            os: "linux".into(),
            arch: "arm64".into(),
            sha256_hex: sha,
        },
    ];
    let user_data = render_user_data(&params(&api.url, "d-local-1", checksums)).expect("render");
    let deployment = LocalDeployment::new(user_data);

    let watch = ArgvWatch::start(vec![MARKER.into(), "TETHER_REPORT_FIELDS".into()]);
    let init = deployment.terraform(&["init", "-input=false"]);
    assert!(init.status.success(), "terraform init: {}", text(&init));
    let apply = deployment.terraform(&["apply", "-auto-approve", "-input=false"]);
    let leaks = watch.finish();
    assert!(apply.status.success(), "terraform apply: {}", text(&apply));
    assert_no_secret_in("terraform init", &text(&init));
    assert_no_secret_in("terraform apply", &text(&apply));
    assert!(leaks.is_empty(), "secrets on a command line: {leaks:#?}");

    // Boot stages, in order, each naming the deployment with the exact token.
    let stages = api.stages();
    assert_eq!(
        stage_names(&stages),
        ["downloaded", "installed", "started"],
        "{stages:#?}"
    );
    for stage in &stages {
        assert_eq!(stage["deployment_id"], "d-local-1");
        assert_eq!(stage["token"], AWKWARD_TOKEN, "token intact in the report");
    }

    // Outputs.
    let outputs = deployment.terraform(&["output", "-json"]);
    assert!(outputs.status.success(), "output: {}", text(&outputs));
    let outputs: Value = serde_json::from_slice(&outputs.stdout).expect("outputs json");
    assert_eq!(outputs["public_ip"]["value"], "127.0.0.1");
    assert_eq!(outputs["private_ip"]["value"], "127.0.0.1");
    assert!(!outputs["instance_id"]["value"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
    let root = deployment.root.canonicalize().expect("server root exists");
    assert_eq!(
        Path::new(outputs["root"]["value"].as_str().unwrap_or_default()),
        root,
        "default root is <working dir>/local-server"
    );

    // The files cloud-init would write, with their modes.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|err| panic!("{p}: {err}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/tether/agent.toml"), 0o600);
    assert_eq!(mode("usr/local/bin/tether-agent"), 0o755);
    assert_eq!(mode("var/lib/tether"), 0o700);
    assert!(
        !root.join("var/lib/tether/bootstrap.env").exists(),
        "bootstrap.env is removed once the agent runs"
    );
    assert!(!root.join("PWNED").exists() && !deployment.tf.join("PWNED").exists());

    // The agent runs detached, with the expected paths and a clean environment.
    let pid = deployment.pid().expect("pid file");
    assert!(alive(pid), "the agent (pid {pid}) runs");
    let config = root.join("etc/tether/agent.toml").display().to_string();
    let state = root.join("var/lib/tether").display().to_string();
    let argv = cmdline(&pid.to_string());
    assert!(
        argv.windows(2)
            .any(|w| w[0] == "--config" && w[1] == config)
            && argv
                .windows(2)
                .any(|w| w[0] == "--state-dir" && w[1] == state)
            && argv.iter().any(|a| a == "run"),
        "agent argv: {argv:?}"
    );
    let recorded = std::fs::read_to_string(root.join("var/lib/tether/fake-agent-argv"))
        .expect("the agent recorded its argv");
    assert_eq!(
        recorded,
        format!("run\n--state-dir\n{state}\n--config\n{config}\n")
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(MARKER)
            && !environ.contains("TF_VAR_")
            && !environ.contains("TETHER_FILE_"),
        "the agent's environment is clean: {environ}"
    );
    let leaks = argv_leaks(&[MARKER, "TETHER_REPORT_FIELDS"]);
    assert!(leaks.is_empty(), "secrets on a command line: {leaks:#?}");

    // Destroy: TERM is ignored, so KILL after the 2 s timeout; root removed.
    let destroy = deployment.terraform(&["destroy", "-auto-approve", "-input=false"]);
    assert!(
        destroy.status.success(),
        "terraform destroy: {}",
        text(&destroy)
    );
    assert_no_secret_in("terraform destroy", &text(&destroy));
    assert!(!alive(pid), "the agent is gone after destroy");
    assert!(!deployment.root.exists(), "the server root is removed");
}

#[test]
fn local_module_with_a_wrong_checksum_fails_reports_why_and_runs_nothing() {
    let api = FakeApi::start(FAKE_AGENT.as_bytes().to_vec());
    let checksums = vec![
        AgentChecksum::of_binary("linux", "amd64", b"some other binary"),
        AgentChecksum::of_binary("linux", "arm64", b"some other binary"),
    ];
    let user_data = render_user_data(&params(&api.url, "d-local-2", checksums)).expect("render");
    let deployment = LocalDeployment::new(user_data);
    let init = deployment.terraform(&["init", "-input=false"]);
    assert!(init.status.success(), "terraform init: {}", text(&init));
    let apply = deployment.terraform(&["apply", "-auto-approve", "-input=false"]);
    assert!(!apply.status.success(), "apply must fail: {}", text(&apply));
    assert_no_secret_in("terraform apply", &text(&apply));

    let stages = api.stages();
    assert_eq!(stage_names(&stages), ["failed"], "{stages:#?}");
    assert_eq!(stages[0]["step"], "download");
    assert_eq!(stages[0]["token"], AWKWARD_TOKEN);
    let detail = stages[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("checksum"), "detail: {detail}");
    assert!(!detail.contains('\n'));

    assert!(deployment.pid().is_none(), "no agent was started");
    assert!(
        !deployment.root.exists(),
        "a failed boot removes its root (the tainted resource's destroy provisioner would not run)"
    );
    let leaks = argv_leaks(&[MARKER]);
    assert!(leaks.is_empty(), "{leaks:#?}");

    // The tainted resource is still destroyed cleanly.
    let destroy = deployment.terraform(&["destroy", "-auto-approve", "-input=false"]);
    assert!(
        destroy.status.success(),
        "terraform destroy: {}",
        text(&destroy)
    );
    assert!(!deployment.root.exists(), "the server root is removed");
}

fn docker(args: &[&str]) -> Output {
    let mut command = Command::new(tool("docker", "the docker CLI and a running engine"));
    command.args(args);
    run(command, Duration::from_secs(120))
}

/// A working dir with a root module calling the embedded `docker` module on
/// its own network. Dropping it removes the container and the network.
struct DockerDeployment {
    _dir: tempfile::TempDir,
    tf: PathBuf,
    container: String,
    network: String,
    user_data: String,
}

const DOCKER_SUBNET: &str = "172.31.251.0/24";
const DOCKER_GATEWAY: &str = "172.31.251.1";

impl DockerDeployment {
    fn new(user_data: String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tf = dir.path().join("work");
        templates::write_module("docker", &tf.join("modules/docker")).expect("write module");
        let name = format!("tmpl-test-{}", std::process::id());
        let network = format!("tether-test-{}", std::process::id());
        std::fs::write(
            tf.join("main.tf"),
            format!(
                r#"
variable "user_data" {{
  type      = string
  sensitive = true
}}

module "server" {{
  source         = "./modules/docker"
  server_name    = "{name}"
  user_data      = var.user_data
  docker_network = "{network}"
  docker_subnet  = "{DOCKER_SUBNET}"
  tags           = {{ role = "test" }}
}}

output "instance_id" {{ value = module.server.instance_id }}
output "public_ip" {{ value = module.server.public_ip }}
output "private_ip" {{ value = module.server.private_ip }}
output "host_address" {{ value = module.server.host_address }}
output "container_name" {{ value = module.server.container_name }}
"#
            ),
        )
        .expect("write main.tf");
        Self {
            _dir: dir,
            tf,
            container: format!("tether-{name}"),
            network,
            user_data,
        }
    }

    /// Runs terraform; `destroy` gets [`DESTROY_USER_DATA`].
    fn terraform(&self, args: &[&str]) -> Output {
        let mut command = terraform_in(&self.tf);
        let user_data = if args.first() == Some(&"destroy") {
            DESTROY_USER_DATA
        } else {
            &self.user_data
        };
        command
            .args(args)
            .arg("-no-color")
            .env("TF_VAR_user_data", user_data);
        run(command, Duration::from_secs(300))
    }

    fn exec(&self, script: &str) -> Output {
        docker(&["exec", &self.container, "/bin/sh", "-c", script])
    }
}

impl Drop for DockerDeployment {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["network", "rm", &self.network]);
    }
}

#[test]
fn docker_module_boots_an_agent_in_its_own_container_and_destroy_removes_it() {
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let agent_file = agent_dir.path().join("agent");
    std::fs::write(&agent_file, FAKE_AGENT).expect("write fake agent");
    let sha = sha256_hex(&agent_file);
    let api = FakeApi::start_on("0.0.0.0", DOCKER_GATEWAY, FAKE_AGENT.as_bytes().to_vec());
    let checksums = ["amd64", "arm64"]
        .iter()
        .map(|arch| AgentChecksum {
            os: "linux".into(),
            arch: arch.to_string(),
            sha256_hex: sha.clone(),
        })
        .collect();
    let user_data = render_user_data(&params(&api.url, "d-docker-1", checksums)).expect("render");
    let deployment = DockerDeployment::new(user_data);

    let watch = ArgvWatch::start(vec![MARKER.into(), "TETHER_REPORT_FIELDS".into()]);
    let init = deployment.terraform(&["init", "-input=false"]);
    assert!(init.status.success(), "terraform init: {}", text(&init));
    let apply = deployment.terraform(&["apply", "-auto-approve", "-input=false"]);
    let leaks = watch.finish();
    assert!(apply.status.success(), "terraform apply: {}", text(&apply));
    assert_no_secret_in("terraform apply", &text(&apply));
    assert!(leaks.is_empty(), "secrets on a command line: {leaks:#?}");

    let stages = api.stages();
    assert_eq!(
        stage_names(&stages),
        ["downloaded", "installed", "started"],
        "{stages:#?}"
    );
    for stage in &stages {
        assert_eq!(stage["deployment_id"], "d-docker-1");
        assert_eq!(stage["token"], AWKWARD_TOKEN);
    }

    // Its own address on the network, as the outputs say.
    let outputs = deployment.terraform(&["output", "-json"]);
    assert!(outputs.status.success(), "output: {}", text(&outputs));
    let outputs: Value = serde_json::from_slice(&outputs.stdout).expect("outputs json");
    assert_eq!(outputs["host_address"]["value"], DOCKER_GATEWAY);
    assert_eq!(outputs["container_name"]["value"], deployment.container);
    let ip = outputs["public_ip"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("172.31.251.") && ip != DOCKER_GATEWAY,
        "{ip}"
    );
    assert_eq!(outputs["private_ip"]["value"], ip.as_str());
    let inspect = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &deployment.container,
    ]);
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), ip);

    // Inside: the agent runs with the expected paths; the files have their modes.
    let argv = deployment.exec("cat /var/lib/tether/fake-agent-argv");
    assert!(argv.status.success(), "{}", text(&argv));
    assert_eq!(
        String::from_utf8_lossy(&argv.stdout),
        "run\n--state-dir\n/var/lib/tether\n--config\n/etc/tether/agent.toml\n"
    );
    let running = deployment.exec(
        "pid=$(cat /run/tether-agent.pid) && kill -0 \"$pid\" && tr '\\0' ' ' </proc/$pid/cmdline",
    );
    assert!(
        running.status.success(),
        "agent running: {}",
        text(&running)
    );
    assert!(String::from_utf8_lossy(&running.stdout).contains("--config /etc/tether/agent.toml"));
    let modes = deployment.exec(
        "stat -c '%a %n' /etc /etc/tether/agent.toml /usr/local/bin/tether-agent /var/lib/tether; \
         test ! -e /var/lib/tether/bootstrap.env && echo env-removed",
    );
    assert_eq!(
        String::from_utf8_lossy(&modes.stdout),
        "755 /etc\n600 /etc/tether/agent.toml\n755 /usr/local/bin/tether-agent\n700 /var/lib/tether\nenv-removed\n",
        "{}",
        text(&modes)
    );

    let destroy = deployment.terraform(&["destroy", "-auto-approve", "-input=false"]);
    assert!(
        destroy.status.success(),
        "terraform destroy: {}",
        text(&destroy)
    );
    assert!(
        !docker(&["container", "inspect", &deployment.container])
            .status
            .success(),
        "the container is removed"
    );
    assert!(
        !docker(&["network", "inspect", &deployment.network])
            .status
            .success(),
        "the network is removed with its last container"
    );
}

/// `bootstrap.sh --mode systemd` with `TETHER_AGENT_USER`, on this machine
/// (as root, the way cloud-init runs it) under a scratch root, with a
/// `systemctl` that only records its arguments: the user exists, is in the
/// docker group, owns the state dir and agent.toml, and the unit's drop-in
/// runs the agent as it.
#[test]
fn bootstrap_installs_the_agent_under_a_dedicated_user_in_the_docker_group() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates a user: run it as root (CI does)"
    );
    let user = format!("tta{}", std::process::id());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(&self.0).output();
        }
    }
    let _remove = Remove(user.clone());
    let api = FakeApi::start(FAKE_AGENT.as_bytes().to_vec());
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let state = root.join("var/lib/tether");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(root.join("etc/tether")).unwrap();
    std::fs::write(root.join("etc/tether/agent.toml"), "# test\n").unwrap();
    let sum = AgentChecksum::of_binary("linux", "amd64", FAKE_AGENT.as_bytes()).sha256_hex;
    std::fs::write(
        state.join("bootstrap.env"),
        format!(
            "TETHER_API_URL='{}'\nTETHER_AGENT_SHA256='linux/amd64={sum} linux/arm64={sum}'\nTETHER_REPORT_FIELDS='\"deployment_id\":\"d-user\",\"token\":\"t\"'\nTETHER_AGENT_USER='{user}'\n",
            api.url
        ),
    )
    .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = dir.path().join("systemctl.calls");
    std::fs::write(
        bin.join("systemctl"),
        format!("#!/bin/sh\necho \"$*\" >>'{}'\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("sh");
    command
        .arg(repo_root().join("packaging/bootstrap/bootstrap.sh"))
        .arg("--root")
        .arg(&root)
        .args(["--mode", "systemd"])
        .env("PATH", path);
    let output = run(command, Duration::from_secs(60));
    assert!(output.status.success(), "bootstrap.sh: {}", text(&output));

    let groups = Command::new("id").args(["-nG", &user]).output().unwrap();
    let groups = String::from_utf8_lossy(&groups.stdout).to_string();
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "{user} is in the docker group: {groups}"
    );
    let uid = Command::new("id").args(["-u", &user]).output().unwrap();
    let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
    assert_ne!(uid, 0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&state).unwrap().uid(), uid);
    assert_eq!(
        std::fs::metadata(root.join("etc/tether/agent.toml"))
            .unwrap()
            .uid(),
        uid
    );
    let dropin = std::fs::read_to_string(
        root.join("etc/systemd/system/tether-agent.service.d/10-user.conf"),
    )
    .unwrap();
    assert_eq!(
        dropin,
        format!("[Service]\nUser={user}\nGroup={user}\nSupplementaryGroups=docker\n")
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(
        calls.contains("enable --now tether-agent.service"),
        "{calls}"
    );
    assert_eq!(
        stage_names(&api.stages()),
        ["downloaded", "installed", "started"]
    );
}

/// A scratch server for `bootstrap.sh --mode systemd` with
/// `TETHER_INSTALL_DOCKER=1`: a root with agent.toml and bootstrap.env, and
/// a PATH of this machine's tools without any Docker, package manager or
/// `systemctl` (those are the recording stand-ins in `fake_bin`).
struct DockerServer {
    _dir: tempfile::TempDir,
    root: PathBuf,
    fake_bin: PathBuf,
    calls: PathBuf,
    path: String,
    api: FakeApi,
}

impl DockerServer {
    fn new(agent_user: Option<&str>) -> Self {
        let api = FakeApi::start(FAKE_AGENT.as_bytes().to_vec());
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let state = root.join("var/lib/tether");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(root.join("etc/tether")).unwrap();
        std::fs::write(root.join("etc/tether/agent.toml"), "# test\n").unwrap();
        let sum = AgentChecksum::of_binary("linux", "amd64", FAKE_AGENT.as_bytes()).sha256_hex;
        let user_line = agent_user
            .map(|user| format!("TETHER_AGENT_USER='{user}'\n"))
            .unwrap_or_default();
        std::fs::write(
            state.join("bootstrap.env"),
            format!(
                "TETHER_API_URL='{}'\nTETHER_AGENT_SHA256='linux/amd64={sum} linux/arm64={sum}'\nTETHER_REPORT_FIELDS='\"deployment_id\":\"d-docker\",\"token\":\"t\"'\n{user_line}TETHER_INSTALL_DOCKER='1'\n",
                api.url
            ),
        )
        .unwrap();
        // This machine's tools, less what a fresh cloud image lacks or what
        // the test records instead.
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let hidden = [
            "docker",
            "dockerd",
            "apt-get",
            "apt",
            "dnf",
            "yum",
            "systemctl",
        ];
        for system_dir in [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ] {
            let Ok(entries) = std::fs::read_dir(system_dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let link = tools.join(&name);
                if hidden.contains(&name.to_string_lossy().as_ref()) || link.exists() {
                    continue;
                }
                let _ = std::os::unix::fs::symlink(entry.path(), link);
            }
        }
        let fake_bin = dir.path().join("bin");
        std::fs::create_dir_all(&fake_bin).unwrap();
        let calls = dir.path().join("calls");
        let path = format!("{}:{}", fake_bin.display(), tools.display());
        let server = Self {
            _dir: dir,
            root,
            fake_bin,
            calls,
            path,
            api,
        };
        server.fake(
            "systemctl",
            &format!("echo \"systemctl $*\" >>'{}'\n", server.calls.display()),
        );
        server
    }

    /// Puts an executable `name` running `body` first on the PATH.
    fn fake(&self, name: &str, body: &str) {
        let path = self.fake_bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }

    /// An `apt-get` that records its arguments (and DEBIAN_FRONTEND) and,
    /// on `install`, puts a `docker` on the PATH as the package would.
    fn with_apt_get(&self) {
        self.fake(
            "apt-get",
            &format!(
                "echo \"apt-get $DEBIAN_FRONTEND $*\" >>'{calls}'\ncase \" $* \" in *' install '*)\n  printf '#!/bin/sh\\necho \"Docker version 26.1.5+dfsg1, build a72d7cd\"\\n' >'{bin}/docker'\n  chmod 755 '{bin}/docker' ;;\nesac\n",
                calls = self.calls.display(),
                bin = self.fake_bin.display(),
            ),
        );
    }

    fn bootstrap(&self) -> Output {
        let mut command = Command::new("/bin/sh");
        command
            .arg(repo_root().join("packaging/bootstrap/bootstrap.sh"))
            .arg("--root")
            .arg(&self.root)
            .args(["--mode", "systemd"])
            .env_clear()
            .env("PATH", &self.path);
        run(command, Duration::from_secs(60))
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// `TETHER_INSTALL_DOCKER=1` on a Debian-like server without Docker: the
/// engine is installed with apt-get (`docker.io`) and started before the
/// agent, the stage `docker_installed` is reported with its version, and the
/// dedicated agent user is then in the docker group.
#[test]
fn bootstrap_installs_docker_from_the_distribution_packages_before_the_agent_starts() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates a user: run it as root (CI does)"
    );
    let user = format!("ttd{}", std::process::id());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(&self.0).output();
        }
    }
    let _remove = Remove(user.clone());
    let server = DockerServer::new(Some(&user));
    server.with_apt_get();
    let output = server.bootstrap();
    assert!(output.status.success(), "bootstrap.sh: {}", text(&output));

    assert_eq!(
        server.calls(),
        [
            "apt-get noninteractive -o DPkg::Lock::Timeout=300 update -q",
            "apt-get noninteractive -o DPkg::Lock::Timeout=300 install -y -q docker.io",
            "systemctl enable --now docker.service",
            "systemctl daemon-reload",
            "systemctl enable --now tether-agent.service",
        ]
    );
    let stages = server.api.stages();
    assert_eq!(
        stage_names(&stages),
        ["downloaded", "installed", "docker_installed", "started"]
    );
    assert!(
        stages[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Docker version 26.1.5")),
        "{stages:?}"
    );
    let groups = Command::new("id").args(["-nG", &user]).output().unwrap();
    let groups = String::from_utf8_lossy(&groups.stdout).to_string();
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "{user} is in the docker group: {groups}"
    );
}

/// A server with Docker already installed keeps it: no package manager runs.
#[test]
fn bootstrap_keeps_a_docker_that_is_already_installed() {
    let server = DockerServer::new(None);
    server.fake("docker", "echo 'Docker version 27.0.3, build 7d4bcd8'\n");
    server.with_apt_get();
    let output = server.bootstrap();
    assert!(output.status.success(), "bootstrap.sh: {}", text(&output));
    assert!(
        !server.calls().iter().any(|c| c.starts_with("apt-get")),
        "{:?}",
        server.calls()
    );
    let stages = server.api.stages();
    assert_eq!(
        stage_names(&stages),
        ["downloaded", "installed", "docker_installed", "started"]
    );
    assert!(stages[2]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("27.0.3")));
}

/// Without apt-get, dnf or yum the bootstrap reports the failed `docker`
/// step with the reason and starts no agent.
#[test]
fn bootstrap_without_a_package_manager_fails_the_docker_step_and_starts_nothing() {
    let server = DockerServer::new(None);
    let output = server.bootstrap();
    assert!(!output.status.success(), "bootstrap.sh: {}", text(&output));
    let stages = server.api.stages();
    assert_eq!(stage_names(&stages), ["downloaded", "installed", "failed"]);
    assert_eq!(stages[2]["step"], "docker");
    assert!(
        stages[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no apt-get, dnf or yum")),
        "{stages:?}"
    );
    assert!(
        !server
            .calls()
            .iter()
            .any(|c| c.contains("tether-agent.service")),
        "{:?}",
        server.calls()
    );
}
