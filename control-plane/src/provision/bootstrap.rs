//! The cloud-init user-data every target boots with, rendered per deployment.
//!
//! Owns the rendering of `packaging/cloud-init/user-data.yaml` (embedded, with
//! the bootstrap script `packaging/bootstrap/bootstrap.sh` and the agent's
//! systemd unit `packaging/systemd/tether-agent.service`) from
//! [`BootstrapParams`], and the boot-stage report the script posts back
//! ([`BootStageReport`]).
//!
//! What a server gets (paths relative to its root, `/` on a real server):
//!
//! * `/etc/tether/agent.toml` (0600): `server`, `ca_fingerprint`, `token`,
//!   `deployment_id`, the agent's own format (`agent/src/config.rs`).
//! * `/var/lib/tether/bootstrap.env` (0600): what the script needs to
//!   download and check the agent and to report boot stages (API URL, the
//!   agent checksums, the deployment id and bootstrap token as JSON members).
//!   The script removes it once the agent runs.
//! * `/etc/systemd/system/tether-agent.service` and
//!   `/var/lib/tether/bootstrap.sh`, run once by `runcmd`.
//! * With [`BootstrapParams::agent_user`] (`tether serve
//!   --provision-agent-user`), the script creates that system user, adds it
//!   to the `docker` group (created when missing), gives it the agent's
//!   state dir and `agent.toml`, and runs the unit as that user through the
//!   drop-in `/etc/systemd/system/tether-agent.service.d/10-user.conf`
//!   (`systemd` mode only).
//!
//! Values are escaped for each place they land: YAML double-quoted scalars
//! (everything outside printable ASCII as `\u` escapes), TOML by the `toml`
//! crate, shell single quotes, JSON by serde_json. Values no file could
//! carry faithfully (control characters, surrounding whitespace the agent
//! would trim, malformed addresses) are refused with a [`BootstrapError`].

use std::fmt::{self, Write as _};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `packaging/cloud-init/user-data.yaml`: the template, `@TETHER_...@` placeholders.
pub const USER_DATA_TEMPLATE: &str = include_str!("../../../packaging/cloud-init/user-data.yaml");
/// `packaging/bootstrap/bootstrap.sh`: download, verify, install, start, report.
pub const BOOTSTRAP_SCRIPT: &str = include_str!("../../../packaging/bootstrap/bootstrap.sh");
/// `packaging/systemd/tether-agent.service`: the agent's unit on a real server.
pub const AGENT_SYSTEMD_UNIT: &str =
    include_str!("../../../packaging/systemd/tether-agent.service");

/// The smallest user-data limit of the supported clouds (AWS: 16 KiB).
pub const USER_DATA_MAX_BYTES: usize = 16 * 1024;

/// The `user_data` to give a module when destroying: Terraform needs the
/// variable set (and the `local`/`docker` modules decode it), not the token,
/// which is spent by then. Valid `#cloud-config` that writes nothing.
pub const DESTROY_USER_DATA: &str =
    "#cloud-config\n# Placeholder: destroying needs the variable, not a token.\n{}\n";

/// Where the agent's configuration is written (under the server's root).
pub const AGENT_CONFIG_PATH: &str = "/etc/tether/agent.toml";
/// Where the bootstrap script is written (under the server's root).
pub const BOOTSTRAP_SCRIPT_PATH: &str = "/var/lib/tether/bootstrap.sh";
/// The script's settings, removed once the agent runs (under the root).
pub const BOOTSTRAP_ENV_PATH: &str = "/var/lib/tether/bootstrap.env";
/// In `process` mode (the `local` target), the agent's pid file (under the root).
pub const AGENT_PID_FILE: &str = "/run/tether-agent.pid";
/// In `process` mode, the agent's stdout and stderr (under the root).
pub const AGENT_LOG_FILE: &str = "/var/log/tether-agent.log";
/// Where the script posts [`BootStageReport`]s, relative to the API URL.
pub const BOOT_STAGES_PATH: &str = "/api/v1/infrastructure/boot-stages";

/// Where the script downloads the agent, relative to the API URL.
pub fn agent_download_path(os: &str, arch: &str) -> String {
    format!("/agent/download/{os}/{arch}")
}

/// Everything a new server needs to find and join its control plane.
#[derive(Clone)]
pub struct BootstrapParams {
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:8080` (agent
    /// download and boot stages).
    pub api_url: String,
    /// `host:port` agents dial over QUIC.
    pub quic_address: String,
    /// The CA the agent pins, `sha256:<hex>`.
    pub ca_fingerprint: String,
    /// One-time bootstrap token. A secret: never in `Debug` output.
    pub token: String,
    /// The deployment this server belongs to.
    pub deployment_id: String,
    /// The agent binaries the control plane serves, one per platform.
    pub agent_checksums: Vec<AgentChecksum>,
    /// Runs the agent as this dedicated system user, in the `docker` group,
    /// instead of root (a lowercase user name, see [`valid_user_name`]).
    pub agent_user: Option<String>,
    /// Install Docker Engine from the distribution's packages before the
    /// agent starts (`TETHER_INSTALL_DOCKER=1` in `bootstrap.env`; reported
    /// as [`BootStageKind::DockerInstalled`]).
    pub install_docker: bool,
}

impl fmt::Debug for BootstrapParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapParams")
            .field("api_url", &self.api_url)
            .field("quic_address", &self.quic_address)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("token", &"<redacted>")
            .field("deployment_id", &self.deployment_id)
            .field("agent_checksums", &self.agent_checksums)
            .field("agent_user", &self.agent_user)
            .field("install_docker", &self.install_docker)
            .finish()
    }
}

/// The SHA-256 of the agent binary served for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentChecksum {
    /// `linux`.
    pub os: String,
    /// `amd64` or `arm64` (what the script maps `uname -m` to).
    pub arch: String,
    /// 64 hex digits.
    pub sha256_hex: String,
}

impl AgentChecksum {
    /// The checksum of `binary`, served for `os`/`arch`.
    pub fn of_binary(os: &str, arch: &str, binary: &[u8]) -> Self {
        Self {
            os: os.to_string(),
            arch: arch.to_string(),
            sha256_hex: hex::encode(Sha256::digest(binary)),
        }
    }
}

/// Why user-data could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// A required value is empty.
    #[error("{field} is empty")]
    Empty {
        /// The [`BootstrapParams`] field.
        field: &'static str,
    },
    /// A value holds a control character (newline, tab, NUL, ...).
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// The [`BootstrapParams`] field.
        field: &'static str,
    },
    /// A value starts or ends with whitespace, which the agent would trim.
    #[error("{field} starts or ends with whitespace")]
    SurroundingWhitespace {
        /// The [`BootstrapParams`] field.
        field: &'static str,
    },
    /// `api_url` is not an absolute `http://` or `https://` URL without spaces.
    #[error("api_url must be an absolute http:// or https:// URL without whitespace, got {0:?}")]
    InvalidApiUrl(String),
    /// `quic_address` is not `host:port`.
    #[error("quic_address must be host:port, got {0:?}")]
    InvalidQuicAddress(String),
    /// `ca_fingerprint` is not `sha256:<64 hex digits>`.
    #[error("ca_fingerprint must be sha256:<64 hex digits>, got {0:?}")]
    InvalidCaFingerprint(String),
    /// No agent checksum: the server could not verify what it downloads.
    #[error("no agent checksum given: the server could not verify the agent it downloads")]
    NoAgentChecksum,
    /// An os or arch name is not lowercase letters, digits and `_`.
    #[error("agent platform {os:?}/{arch:?} must be lowercase letters, digits and _")]
    InvalidPlatform {
        /// As given.
        os: String,
        /// As given.
        arch: String,
    },
    /// A checksum is not 64 hex digits.
    #[error("the agent checksum for {os}/{arch} must be 64 hex digits")]
    InvalidChecksum {
        /// As given.
        os: String,
        /// As given.
        arch: String,
    },
    /// Two checksums for one platform.
    #[error("two agent checksums for {os}/{arch}")]
    DuplicateChecksum {
        /// As given.
        os: String,
        /// As given.
        arch: String,
    },
    /// The rendered document exceeds what every cloud accepts.
    #[error("the user-data is {size} bytes, over the {limit} bytes every cloud accepts")]
    TooLarge {
        /// Bytes rendered.
        size: usize,
        /// [`USER_DATA_MAX_BYTES`].
        limit: usize,
    },
    /// A packaged file or the template cannot be used as is (a bug in `packaging/`).
    #[error("packaging/{name} cannot be embedded in user-data: {reason}")]
    Packaging {
        /// The packaged file.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `agent_user` is not a portable user name.
    #[error("agent_user must be 1-32 lowercase letters, digits, '_' or '-', starting with a letter or '_', got {0:?}")]
    InvalidAgentUser(String),
    /// `agent.toml` could not be serialized.
    #[error("agent.toml could not be written: {0}")]
    Toml(String),
}

/// The one-line report `bootstrap.sh` posts to [`BOOT_STAGES_PATH`] after
/// each step (best effort, 5 s timeout). JSON:
/// `{"deployment_id", "token", "stage", "step"?, "detail"?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStageReport {
    /// The deployment the server belongs to.
    pub deployment_id: String,
    /// The deployment's bootstrap token (proves the report's origin). Secret.
    pub token: String,
    /// What was reached.
    pub stage: BootStageKind,
    /// With `failed`: the step that failed (`download`, `install`,
    /// `docker`, `start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// One line: the reason of a failure (`checksum mismatch ...`, `HTTP
    /// error: ...`, `systemctl error: ...`), or what a step did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Debug for BootStageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootStageReport")
            .field("deployment_id", &self.deployment_id)
            .field("token", &"<redacted>")
            .field("stage", &self.stage)
            .field("step", &self.step)
            .field("detail", &self.detail)
            .finish()
    }
}

/// The stages `bootstrap.sh` reports, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootStageKind {
    /// The agent was downloaded and its SHA-256 matched.
    Downloaded,
    /// The agent is at `/usr/local/bin/tether-agent` (0755).
    Installed,
    /// Docker Engine is installed and running (only when the deployment
    /// asked for it: `install_docker`).
    #[serde(rename = "docker_installed")]
    DockerInstalled,
    /// The agent runs (systemd unit enabled and started, or detached process).
    Started,
    /// A step failed; `step` and `detail` say which and why.
    Failed,
}

impl BootStageKind {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloaded => "downloaded",
            Self::Installed => "installed",
            Self::DockerInstalled => "docker_installed",
            Self::Started => "started",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for BootStageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `#cloud-config` document for a new server.
pub fn render_user_data(params: &BootstrapParams) -> Result<String, BootstrapError> {
    let checked = Checked::new(params)?;
    let agent_toml = render_toml(&checked)?;
    let env = render_env(&checked)?;
    let mut out = String::with_capacity(USER_DATA_TEMPLATE.len() + BOOTSTRAP_SCRIPT.len() + 2048);
    let mut seen = [false; 4];
    for line in USER_DATA_TEMPLATE.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        match line.trim() {
            "@TETHER_SYSTEMD_UNIT@" => {
                seen[0] = true;
                push_block(
                    &mut out,
                    indent,
                    "systemd/tether-agent.service",
                    AGENT_SYSTEMD_UNIT,
                )?;
            }
            "@TETHER_BOOTSTRAP_SCRIPT@" => {
                seen[1] = true;
                push_block(&mut out, indent, "bootstrap/bootstrap.sh", BOOTSTRAP_SCRIPT)?;
            }
            _ if line.contains("\"@TETHER_AGENT_TOML@\"") => {
                seen[2] = true;
                out.push_str(&line.replace("\"@TETHER_AGENT_TOML@\"", &yaml_quoted(&agent_toml)));
                out.push('\n');
            }
            _ if line.contains("\"@TETHER_BOOTSTRAP_ENV@\"") => {
                seen[3] = true;
                out.push_str(&line.replace("\"@TETHER_BOOTSTRAP_ENV@\"", &yaml_quoted(&env)));
                out.push('\n');
            }
            _ if line.contains("@TETHER_") => {
                return Err(BootstrapError::Packaging {
                    name: "cloud-init/user-data.yaml",
                    reason: "unknown or misplaced placeholder",
                })
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if seen.contains(&false) {
        return Err(BootstrapError::Packaging {
            name: "cloud-init/user-data.yaml",
            reason: "a placeholder is missing",
        });
    }
    if out.len() > USER_DATA_MAX_BYTES {
        return Err(BootstrapError::TooLarge {
            size: out.len(),
            limit: USER_DATA_MAX_BYTES,
        });
    }
    Ok(out)
}

/// The `agent.toml` the user-data writes (exactly as written).
pub fn render_agent_toml(params: &BootstrapParams) -> Result<String, BootstrapError> {
    render_toml(&Checked::new(params)?)
}

/// Parameters checked and normalised.
struct Checked<'a> {
    api_url: &'a str,
    quic_address: &'a str,
    ca_fingerprint: String,
    token: &'a str,
    deployment_id: &'a str,
    checksums: Vec<(String, String, String)>,
    agent_user: Option<&'a str>,
    install_docker: bool,
}

impl<'a> Checked<'a> {
    fn new(params: &'a BootstrapParams) -> Result<Self, BootstrapError> {
        let api_url = one_line("api_url", &params.api_url)?.trim_end_matches('/');
        let rest = api_url
            .strip_prefix("http://")
            .or_else(|| api_url.strip_prefix("https://"));
        if !rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
            || api_url.chars().any(char::is_whitespace)
        {
            return Err(BootstrapError::InvalidApiUrl(params.api_url.clone()));
        }

        let quic_address = one_line("quic_address", &params.quic_address)?;
        let valid_quic = quic_address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
        });
        if !valid_quic || quic_address.chars().any(char::is_whitespace) {
            return Err(BootstrapError::InvalidQuicAddress(
                params.quic_address.clone(),
            ));
        }

        let ca_fingerprint = tether_certs::CaFingerprint::from_str(&params.ca_fingerprint)
            .map_err(|_| BootstrapError::InvalidCaFingerprint(params.ca_fingerprint.clone()))?
            .to_string();

        let token = one_line("token", &params.token)?;
        let deployment_id = one_line("deployment_id", &params.deployment_id)?;

        if params.agent_checksums.is_empty() {
            return Err(BootstrapError::NoAgentChecksum);
        }
        let mut checksums: Vec<(String, String, String)> = Vec::new();
        for sum in &params.agent_checksums {
            let name_ok = |name: &str| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            };
            if !name_ok(&sum.os) || !name_ok(&sum.arch) {
                return Err(BootstrapError::InvalidPlatform {
                    os: sum.os.clone(),
                    arch: sum.arch.clone(),
                });
            }
            if sum.sha256_hex.len() != 64 || !sum.sha256_hex.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(BootstrapError::InvalidChecksum {
                    os: sum.os.clone(),
                    arch: sum.arch.clone(),
                });
            }
            if checksums
                .iter()
                .any(|(os, arch, _)| *os == sum.os && *arch == sum.arch)
            {
                return Err(BootstrapError::DuplicateChecksum {
                    os: sum.os.clone(),
                    arch: sum.arch.clone(),
                });
            }
            checksums.push((
                sum.os.clone(),
                sum.arch.clone(),
                sum.sha256_hex.to_ascii_lowercase(),
            ));
        }

        let agent_user = match params.agent_user.as_deref() {
            Some(user) if !valid_user_name(user) => {
                return Err(BootstrapError::InvalidAgentUser(user.to_string()))
            }
            other => other,
        };

        Ok(Self {
            api_url,
            quic_address,
            ca_fingerprint,
            token,
            deployment_id,
            checksums,
            agent_user,
            install_docker: params.install_docker,
        })
    }
}

/// Whether `name` is a portable user name: 1-32 of `[a-z0-9_-]`, starting
/// with `[a-z_]` (what `useradd` accepts everywhere; safe in shell, systemd
/// and YAML without quoting).
pub fn valid_user_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && name.len() <= 32
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// A non-empty value without control characters or surrounding whitespace.
fn one_line<'a>(field: &'static str, value: &'a str) -> Result<&'a str, BootstrapError> {
    if value.is_empty() {
        return Err(BootstrapError::Empty { field });
    }
    if value.chars().any(char::is_control) {
        return Err(BootstrapError::ControlCharacter { field });
    }
    if value.trim() != value {
        return Err(BootstrapError::SurroundingWhitespace { field });
    }
    Ok(value)
}

fn render_toml(checked: &Checked<'_>) -> Result<String, BootstrapError> {
    #[derive(Serialize)]
    struct AgentToml<'a> {
        server: &'a str,
        ca_fingerprint: &'a str,
        token: &'a str,
        deployment_id: &'a str,
    }
    let body = toml::to_string(&AgentToml {
        server: checked.quic_address,
        ca_fingerprint: &checked.ca_fingerprint,
        token: checked.token,
        deployment_id: checked.deployment_id,
    })
    // The error names a field or a type, never a value.
    .map_err(|err| BootstrapError::Toml(err.to_string()))?;
    Ok(format!(
        "# Written at provisioning by the Tether control plane. Holds a one-time\n\
         # bootstrap token: keep this file 0600.\n{body}"
    ))
}

fn render_env(checked: &Checked<'_>) -> Result<String, BootstrapError> {
    let sums: Vec<String> = checked
        .checksums
        .iter()
        .map(|(os, arch, hex)| format!("{os}/{arch}={hex}"))
        .collect();
    let json = |value: &str| {
        serde_json::to_string(value).map_err(|err| BootstrapError::Toml(err.to_string()))
    };
    let report_fields = format!(
        "\"deployment_id\":{},\"token\":{}",
        json(checked.deployment_id)?,
        json(checked.token)?
    );
    let mut env = format!(
        "# Read by {BOOTSTRAP_SCRIPT_PATH}, which removes this file once the agent runs.\n\
         TETHER_API_URL={}\n\
         TETHER_AGENT_SHA256={}\n\
         TETHER_REPORT_FIELDS={}\n",
        shell_quoted(checked.api_url),
        shell_quoted(&sums.join(" ")),
        shell_quoted(&report_fields),
    );
    if let Some(user) = checked.agent_user {
        let _ = writeln!(env, "TETHER_AGENT_USER={}", shell_quoted(user));
    }
    if checked.install_docker {
        env.push_str("TETHER_INSTALL_DOCKER='1'\n");
    }
    Ok(env)
}

/// A POSIX shell single-quoted word.
fn shell_quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A YAML double-quoted scalar holding exactly `value`: printable ASCII as
/// is, everything else escaped, so no character can end or fold the scalar.
fn yaml_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08X}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// Appends `content` as the lines of a YAML literal block (`|`) indented by
/// `indent`. Only for packaged files: printable ASCII and tabs, one final
/// newline, no leading blank on the first line.
fn push_block(
    out: &mut String,
    indent: &str,
    name: &'static str,
    content: &str,
) -> Result<(), BootstrapError> {
    let fail = |reason| Err(BootstrapError::Packaging { name, reason });
    let Some(body) = content.strip_suffix('\n') else {
        return fail("it must end with a newline");
    };
    if body.ends_with('\n') || body.is_empty() {
        return fail("it must end with exactly one newline and not be empty");
    }
    if body.starts_with([' ', '\t']) {
        return fail("its first line must not start with a blank");
    }
    if !body
        .bytes()
        .all(|b| b == b'\n' || b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return fail("it must be printable ASCII");
    }
    for line in body.split('\n') {
        if !line.is_empty() {
            out.push_str(indent);
            out.push_str(line);
        }
        out.push('\n');
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn params(token: &str) -> BootstrapParams {
        BootstrapParams {
            api_url: "http://127.0.0.1:8080/".into(),
            quic_address: "cp.example.com:7443".into(),
            ca_fingerprint: PIN.into(),
            token: token.into(),
            deployment_id: "0b7c2d4e-1111-4222-8333-444455556666".into(),
            agent_checksums: vec![
                AgentChecksum::of_binary("linux", "amd64", b"agent-amd64"),
                AgentChecksum::of_binary("linux", "arm64", b"agent-arm64"),
            ],
            agent_user: None,
            install_docker: false,
        }
    }

    /// Undoes `yaml_quoted` (the escapes it emits only).
    fn yaml_unquote(quoted: &str) -> String {
        let inner = &quoted[1..quoted.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next().unwrap() {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                'U' => {
                    let hex: String = chars.by_ref().take(8).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn awkward_tokens_round_trip_through_agent_toml() {
        for token in [
            "plain-token",
            r#"q"uo'te#hash\back$(x)`y`"#,
            "'''\"\"\"",
            "uni\u{2028}code\u{feff}é😀",
            "in ner",
        ] {
            let text = render_agent_toml(&params(token)).unwrap();
            let value: toml::Table = toml::from_str(&text).unwrap();
            assert_eq!(value["token"].as_str(), Some(token), "{text}");
            assert_eq!(value["server"].as_str(), Some("cp.example.com:7443"));
            assert_eq!(value["ca_fingerprint"].as_str(), Some(PIN));
            assert_eq!(
                value["deployment_id"].as_str(),
                Some("0b7c2d4e-1111-4222-8333-444455556666")
            );
            assert_eq!(value.len(), 4, "only the agent's keys: {text}");
        }
    }

    #[test]
    fn yaml_quoting_keeps_every_character_on_one_line() {
        for value in [
            "a\"b\\c#d: e\n- f\tg",
            "\u{85}\u{2028}\u{2029}\u{feff}\u{1F600}",
            "",
        ] {
            let quoted = yaml_quoted(value);
            assert!(!quoted.contains('\n'));
            assert!(
                quoted.bytes().all(|b| (b' '..=b'~').contains(&b)),
                "{quoted}"
            );
            assert_eq!(yaml_unquote(&quoted), value);
        }
    }

    #[test]
    fn user_data_is_cloud_config_with_every_placeholder_filled() {
        let token = r#"tok"en'#\$`x`"#;
        let text = render_user_data(&params(token)).unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        assert!(!text.contains("@TETHER_"), "{text}");
        assert!(text.len() <= USER_DATA_MAX_BYTES);
        // The agent.toml line holds the escaped TOML, the token intact.
        let line = text
            .lines()
            .find(|line| {
                line.trim_start()
                    .starts_with("content: \"# Written at provisioning")
            })
            .unwrap();
        let quoted = line.trim_start().trim_start_matches("content: ");
        let toml_text = yaml_unquote(quoted);
        assert_eq!(toml_text, render_agent_toml(&params(token)).unwrap());
        // The script and the unit are there verbatim (indented).
        assert!(text.contains("      #!/bin/sh\n"));
        assert!(text.contains("      ExecStart=/usr/local/bin/tether-agent run"));
        assert!(text.contains("TETHER_REPORT_FIELDS="));
    }

    #[test]
    fn env_file_quotes_the_report_fields_for_the_shell_and_json() {
        let checked_params = params("it's\"a\\token");
        let checked = Checked::new(&checked_params).unwrap();
        let env = render_env(&checked).unwrap();
        assert!(
            env.contains("TETHER_API_URL='http://127.0.0.1:8080'\n"),
            "{env}"
        );
        let fields = env
            .lines()
            .find_map(|line| line.strip_prefix("TETHER_REPORT_FIELDS="))
            .unwrap();
        // Undo the shell quoting, then the JSON must parse to the token.
        let unquoted = fields[1..fields.len() - 1].replace(r"'\''", "'");
        let json: serde_json::Value = serde_json::from_str(&format!("{{{unquoted}}}")).unwrap();
        assert_eq!(json["token"], "it's\"a\\token");
        let sums = env
            .lines()
            .find_map(|line| line.strip_prefix("TETHER_AGENT_SHA256="))
            .unwrap();
        assert!(sums.starts_with("'linux/amd64=") && sums.contains(" linux/arm64="));
    }

    #[test]
    fn unrepresentable_values_are_refused_by_name() {
        type Edit = fn(&mut BootstrapParams);
        let cases: Vec<(Edit, BootstrapError)> = vec![
            (
                |p| p.token = String::new(),
                BootstrapError::Empty { field: "token" },
            ),
            (
                |p| p.token = "a\nb".into(),
                BootstrapError::ControlCharacter { field: "token" },
            ),
            (
                |p| p.token = " a".into(),
                BootstrapError::SurroundingWhitespace { field: "token" },
            ),
            (
                |p| p.deployment_id = "d\0".into(),
                BootstrapError::ControlCharacter {
                    field: "deployment_id",
                },
            ),
            (
                |p| p.api_url = "ftp://x".into(),
                BootstrapError::InvalidApiUrl("ftp://x".into()),
            ),
            (
                |p| p.api_url = "http://a b".into(),
                BootstrapError::InvalidApiUrl("http://a b".into()),
            ),
            (
                |p| p.quic_address = "host".into(),
                BootstrapError::InvalidQuicAddress("host".into()),
            ),
            (
                |p| p.quic_address = "host:0".into(),
                BootstrapError::InvalidQuicAddress("host:0".into()),
            ),
            (
                |p| p.ca_fingerprint = "md5:00".into(),
                BootstrapError::InvalidCaFingerprint("md5:00".into()),
            ),
            (
                |p| p.agent_checksums.clear(),
                BootstrapError::NoAgentChecksum,
            ),
            (
                |p| p.agent_checksums[0].sha256_hex = "abc".into(),
                BootstrapError::InvalidChecksum {
                    os: "linux".into(),
                    arch: "amd64".into(),
                },
            ),
            (
                |p| p.agent_checksums[0].arch = "AMD64; rm".into(),
                BootstrapError::InvalidPlatform {
                    os: "linux".into(),
                    arch: "AMD64; rm".into(),
                },
            ),
            (
                |p| p.agent_checksums[1].arch = "amd64".into(),
                BootstrapError::DuplicateChecksum {
                    os: "linux".into(),
                    arch: "amd64".into(),
                },
            ),
        ];
        for (edit, expected) in cases {
            let mut p = params("t");
            edit(&mut p);
            assert_eq!(render_user_data(&p).unwrap_err(), expected);
        }
        assert!(render_user_data(&params("t")).is_ok());
    }

    #[test]
    fn ipv6_quic_address_and_uppercase_pins_are_accepted() {
        let mut p = params("t");
        p.quic_address = "[2001:db8::1]:7443".into();
        p.ca_fingerprint = PIN.to_uppercase().replace("SHA256:", "sha256:");
        let text = render_agent_toml(&p).unwrap();
        assert!(text.contains(PIN), "normalised pin: {text}");
    }

    #[test]
    fn token_is_redacted_in_debug_output() {
        let p = params("sekrit-token");
        let report = BootStageReport {
            deployment_id: "d".into(),
            token: "sekrit-token".into(),
            stage: BootStageKind::Failed,
            step: Some("download".into()),
            detail: None,
        };
        let debug = format!("{p:?} {report:?}");
        assert!(!debug.contains("sekrit"), "{debug}");
        let err = render_user_data(&BootstrapParams {
            token: "sekrit-token\n".into(),
            ..p
        })
        .unwrap_err();
        assert!(!err.to_string().contains("sekrit"));
    }

    #[test]
    fn boot_stage_report_parses_what_the_script_sends() {
        let body = r#"{"deployment_id":"d-1","token":"t","stage":"failed","step":"download","detail":"checksum mismatch"}"#;
        let report: BootStageReport = serde_json::from_str(body).unwrap();
        assert_eq!(report.stage, BootStageKind::Failed);
        assert_eq!(report.step.as_deref(), Some("download"));
        let ok: BootStageReport =
            serde_json::from_str(r#"{"deployment_id":"d","token":"t","stage":"started"}"#).unwrap();
        assert_eq!(ok.stage, BootStageKind::Started);
        assert_eq!(ok.detail, None);
    }

    #[test]
    fn a_dedicated_agent_user_reaches_the_env_file_and_bad_names_are_refused() {
        let mut p = params("t");
        let checked = Checked::new(&p).unwrap();
        assert!(!render_env(&checked).unwrap().contains("TETHER_AGENT_USER"));
        p.agent_user = Some("tether".into());
        let checked = Checked::new(&p).unwrap();
        assert!(render_env(&checked)
            .unwrap()
            .contains("\nTETHER_AGENT_USER='tether'\n"));
        for bad in ["", "Root", "1abc", "a b", "a;rm", "x'y", &"a".repeat(33)] {
            p.agent_user = Some(bad.into());
            assert_eq!(
                render_user_data(&p).unwrap_err(),
                BootstrapError::InvalidAgentUser(bad.into())
            );
        }
        assert!(valid_user_name("_tether-agent2"));
    }

    #[test]
    fn install_docker_reaches_the_env_file_only_when_asked() {
        let mut p = params("t");
        let checked = Checked::new(&p).unwrap();
        assert!(!render_env(&checked)
            .unwrap()
            .contains("TETHER_INSTALL_DOCKER"));
        p.install_docker = true;
        let checked = Checked::new(&p).unwrap();
        assert!(render_env(&checked)
            .unwrap()
            .contains("\nTETHER_INSTALL_DOCKER='1'\n"));
        let text = render_user_data(&p).unwrap();
        assert!(text.len() <= USER_DATA_MAX_BYTES, "{} bytes", text.len());
        let stage: BootStageReport = serde_json::from_str(
            r#"{"deployment_id":"d","token":"t","stage":"docker_installed","detail":"Docker version 26.1.5"}"#,
        )
        .unwrap();
        assert_eq!(stage.stage, BootStageKind::DockerInstalled);
        assert_eq!(stage.stage.as_str(), "docker_installed");
    }

    #[test]
    fn destroy_user_data_is_cloud_config_without_a_token() {
        assert!(DESTROY_USER_DATA.starts_with("#cloud-config\n"));
        assert!(!DESTROY_USER_DATA.contains("token ="));
    }

    #[test]
    fn packaged_files_embed_as_blocks() {
        let mut out = String::new();
        push_block(&mut out, "  ", "bootstrap/bootstrap.sh", BOOTSTRAP_SCRIPT).unwrap();
        push_block(
            &mut out,
            "  ",
            "systemd/tether-agent.service",
            AGENT_SYSTEMD_UNIT,
        )
        .unwrap();
        assert!(push_block(&mut out, "", "x", " lead\n").is_err());
        assert!(push_block(&mut out, "", "x", "no newline").is_err());
        assert!(push_block(&mut out, "", "x", "two\n\n").is_err());
        assert!(push_block(&mut out, "", "x", "é\n").is_err());
    }
}
