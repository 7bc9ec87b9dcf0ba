//! The terraform process: one working directory per deployment, a clean
//! environment (credentials and the bootstrap user-data only as environment
//! variables, never in argv or files), `-json` output turned into
//! [`TerraformEvent`]s, and a process that dies with the control plane
//! (parent-death signal) so no apply outlives the job that owns it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::failure::{classify, classify_text, FailureKind};

/// Failures of a terraform command.
#[derive(Debug, thiserror::Error)]
pub enum TerraformError {
    /// The binary could not be started (not installed, not executable).
    #[error("could not run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    /// Terraform ran and failed; `diagnostics` is what it said was wrong,
    /// `kind` whether running it again may help.
    #[error("terraform {command} failed: {diagnostics}")]
    Failed {
        command: String,
        diagnostics: String,
        kind: FailureKind,
    },
    /// Reading its output failed.
    #[error("reading terraform output: {0}")]
    Io(#[from] std::io::Error),
}

/// What terraform reported while it ran, from its `-json` stream (or its
/// plain output for commands without one).
#[derive(Debug, Clone, PartialEq)]
pub enum TerraformEvent {
    /// A human-readable line.
    Log { level: String, message: String },
    /// An error or warning with its summary and detail.
    Diagnostic {
        severity: String,
        summary: String,
        detail: String,
    },
    /// A resource operation started (`apply_start`).
    ResourceStarted { address: String, action: String },
    /// A resource operation finished (`apply_complete`).
    ResourceDone {
        address: String,
        action: String,
        id: Option<String>,
        elapsed_seconds: f64,
    },
    /// A resource operation failed (`apply_errored`).
    ResourceFailed { address: String, action: String },
}

impl TerraformError {
    /// Whether running the command again may help (never for a binary that
    /// does not start or output that cannot be read).
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            Self::Failed { kind, .. } => *kind,
            Self::Spawn { .. } | Self::Io(_) => FailureKind::Permanent,
        }
    }
}

impl TerraformEvent {
    /// Parses one line of `terraform ... -json` output.
    pub fn from_json_line(line: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(line).ok()?;
        let text = |v: &Value, key: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let hook = v.get("hook").cloned().unwrap_or(Value::Null);
        let resource = hook.get("resource").cloned().unwrap_or(Value::Null);
        let address = text(&resource, "addr");
        let action = text(&hook, "action");
        Some(
            match v.get("type").and_then(Value::as_str).unwrap_or_default() {
                "diagnostic" => {
                    let d = v.get("diagnostic").cloned().unwrap_or(Value::Null);
                    Self::Diagnostic {
                        severity: text(&d, "severity"),
                        summary: text(&d, "summary"),
                        detail: text(&d, "detail"),
                    }
                }
                "apply_start" => Self::ResourceStarted { address, action },
                "apply_complete" => Self::ResourceDone {
                    address,
                    action,
                    id: hook
                        .get("id_value")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    elapsed_seconds: hook
                        .get("elapsed_seconds")
                        .and_then(Value::as_f64)
                        .unwrap_or_default(),
                },
                "apply_errored" => Self::ResourceFailed { address, action },
                _ => Self::Log {
                    level: text(&v, "@level"),
                    message: text(&v, "@message"),
                },
            },
        )
    }
}

/// A terraform binary bound to one deployment's working directory and
/// environment.
pub struct Terraform {
    binary: PathBuf,
    workdir: PathBuf,
    env: Vec<(String, String)>,
}

impl std::fmt::Debug for Terraform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The environment holds credentials: names only.
        f.debug_struct("Terraform")
            .field("binary", &self.binary)
            .field("workdir", &self.workdir)
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Most diagnostic text kept for `error_message`.
const MAX_DIAGNOSTICS: usize = 4000;

impl Terraform {
    pub fn new(binary: &Path, workdir: &Path, env: Vec<(String, String)>) -> Self {
        Self {
            binary: binary.to_path_buf(),
            workdir: workdir.to_path_buf(),
            env,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .current_dir(&self.workdir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &self.workdir)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill the child when this process dies, so a crashed control plane
        // leaves no terraform running on its own.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Runs `terraform <args>`, handing each output event to `on_event`.
    /// Output lines that are not JSON become [`TerraformEvent::Log`].
    pub async fn run(
        &self,
        args: &[&str],
        mut on_event: impl FnMut(TerraformEvent),
    ) -> Result<(), TerraformError> {
        let command_name = args.first().copied().unwrap_or_default().to_string();
        let mut child = self
            .command(args)
            .spawn()
            .map_err(|source| TerraformError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
        let mut readers = Vec::new();
        for (is_stderr, pipe) in [
            (
                false,
                stdout.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                true,
                stderr.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send((is_stderr, line)).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(tx);
        let mut diagnostics = Vec::new();
        let mut stderr_text = Vec::new();
        while let Some((is_stderr, line)) = rx.recv().await {
            let line = strip_ansi(&line);
            if line.trim().is_empty() {
                continue;
            }
            let event =
                TerraformEvent::from_json_line(&line).unwrap_or_else(|| TerraformEvent::Log {
                    level: if is_stderr {
                        "error".into()
                    } else {
                        "info".into()
                    },
                    message: line.clone(),
                });
            match &event {
                TerraformEvent::Diagnostic {
                    severity,
                    summary,
                    detail,
                } if severity == "error" => {
                    diagnostics.push(if detail.is_empty() {
                        summary.clone()
                    } else {
                        format!("{summary}: {detail}")
                    });
                }
                _ if is_stderr => stderr_text.push(line.clone()),
                _ => {}
            }
            on_event(event);
        }
        for reader in readers {
            let _ = reader.await;
        }
        let status = child.wait().await?;
        if status.success() {
            return Ok(());
        }
        let kind = if diagnostics.is_empty() {
            classify_text(&stderr_text.join("\n"))
        } else {
            classify(diagnostics.iter().map(String::as_str))
        };
        let mut text = if diagnostics.is_empty() {
            stderr_text.join("\n")
        } else {
            diagnostics.join("; ")
        };
        if text.trim().is_empty() {
            text = format!("exited with {status}");
        }
        if text.len() > MAX_DIAGNOSTICS {
            let mut cut = MAX_DIAGNOSTICS;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        Err(TerraformError::Failed {
            command: command_name,
            diagnostics: text,
            kind,
        })
    }

    /// `terraform output -json`: the outputs, sensitive ones left out.
    pub async fn outputs(&self) -> Result<serde_json::Map<String, Value>, TerraformError> {
        let output = self
            .command(&["output", "-json"])
            .output()
            .await
            .map_err(|source| TerraformError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            let diagnostics = strip_ansi(&String::from_utf8_lossy(&output.stderr));
            return Err(TerraformError::Failed {
                command: "output".into(),
                kind: classify_text(&diagnostics),
                diagnostics,
            });
        }
        let all: serde_json::Map<String, Value> =
            serde_json::from_slice(&output.stdout).unwrap_or_default();
        Ok(all
            .into_iter()
            .filter(|(_, v)| v.get("sensitive").and_then(Value::as_bool) != Some(true))
            .filter_map(|(k, v)| v.get("value").cloned().map(|value| (k, value)))
            .collect())
    }

    /// `terraform state list`: the addresses still in the state.
    pub async fn state_list(&self) -> Result<Vec<String>, TerraformError> {
        let output = self
            .command(&["state", "list"])
            .output()
            .await
            .map_err(|source| TerraformError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            let diagnostics = strip_ansi(&String::from_utf8_lossy(&output.stderr));
            return Err(TerraformError::Failed {
                command: "state list".into(),
                kind: classify_text(&diagnostics),
                diagnostics,
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}

/// Removes terminal colour sequences (terraform colours plain output).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_events() {
        let line = r#"{"@level":"info","@message":"module.server.terraform_data.server: Creation complete after 1s [id=abc]","type":"apply_complete","hook":{"resource":{"addr":"module.server.terraform_data.server"},"action":"create","id_key":"id","id_value":"abc","elapsed_seconds":1}}"#;
        assert_eq!(
            TerraformEvent::from_json_line(line),
            Some(TerraformEvent::ResourceDone {
                address: "module.server.terraform_data.server".into(),
                action: "create".into(),
                id: Some("abc".into()),
                elapsed_seconds: 1.0,
            })
        );
        let diag = r#"{"@level":"error","@message":"Error: bad","type":"diagnostic","diagnostic":{"severity":"error","summary":"bad","detail":"worse"}}"#;
        assert!(matches!(
            TerraformEvent::from_json_line(diag),
            Some(TerraformEvent::Diagnostic { severity, .. }) if severity == "error"
        ));
        assert_eq!(TerraformEvent::from_json_line("not json"), None);
    }

    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(strip_ansi("\u{1b}[31mError:\u{1b}[0m bad"), "Error: bad");
    }
}
