//! The state dir (default `/var/lib/tether`): the agent's private key
//! (`agent.key`), its certificate chain (`agent.crt`) and who it is
//! (`identity.toml`).
//!
//! Every file is written to a temporary file in the same directory, synced and
//! renamed into place. Files that must change together (a new key and the
//! certificate for it) are first written as `<name>.pending`; a journal file
//! then lists them and they are renamed one by one. Whoever opens the state
//! dir next finishes a journalled commit or discards an unjournalled one, so a
//! crash never leaves a half-written file or a key without its certificate.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rand::Rng;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tether_certs::authority::{chain_to_pem, pem_to_chain};
use tether_certs::{agent_client_config, AgentKey, CaFingerprint, CertError, CertificateInfo};

/// Where the agent keeps its identity when told nothing.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";

const KEY_FILE: &str = "agent.key";
const CERT_FILE: &str = "agent.crt";
const IDENTITY_FILE: &str = "identity.toml";
const JOURNAL_FILE: &str = "commit.journal";
const MANAGED_FILES: [&str; 3] = [KEY_FILE, CERT_FILE, IDENTITY_FILE];

/// Who the agent is, as recorded in `identity.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub server_id: String,
    pub branch_id: String,
    /// The control plane address enrolled against, `host:port`.
    pub server: String,
    pub ca_fingerprint: CaFingerprint,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    server_id: String,
    branch_id: String,
    server: String,
    ca_fingerprint: String,
}

/// A certificate chain with its key, checked against each other, the pinned
/// CA and the identity they belong to.
pub struct Credentials {
    pub key: AgentKey,
    /// Leaf first, CA last.
    pub chain: Vec<CertificateDer<'static>>,
    /// What the leaf says about itself.
    pub certificate: CertificateInfo,
    /// The mutual-TLS client configuration made of them.
    pub tls: rustls::ClientConfig,
}

/// Why a certificate chain is not acceptable for this agent.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate chain does not end with the pinned CA {0}")]
    WrongCa(CaFingerprint),
    #[error("leaf certificate is unreadable: {0}")]
    Unreadable(CertError),
    #[error("leaf certificate carries no tether identity")]
    NoIdentity,
    #[error(
        "certificate names server {found}/{found_branch}, expected {expected}/{expected_branch}"
    )]
    WrongIdentity {
        found: String,
        found_branch: String,
        expected: String,
        expected_branch: String,
    },
    #[error("certificate does not match the agent key: {0}")]
    KeyMismatch(CertError),
}

impl Credentials {
    /// Checks `chain` (leaf first, CA last) for `key`: it must end with the
    /// pinned CA, its leaf must name `server_id` in `branch_id`, and it must
    /// belong to `key`.
    pub fn new(
        key: AgentKey,
        chain: Vec<CertificateDer<'static>>,
        pin: CaFingerprint,
        server_id: &str,
        branch_id: &str,
    ) -> Result<Self, CredentialError> {
        let (leaf, ca) = match (chain.first(), chain.last()) {
            (Some(leaf), Some(ca)) if chain.len() >= 2 => (leaf, ca),
            (Some(_), _) => return Err(CredentialError::WrongCa(pin)),
            _ => return Err(CredentialError::EmptyChain),
        };
        if !pin.matches(ca) {
            return Err(CredentialError::WrongCa(pin));
        }
        let certificate = CertificateInfo::from_der(leaf).map_err(CredentialError::Unreadable)?;
        let identity = certificate
            .identity
            .as_ref()
            .ok_or(CredentialError::NoIdentity)?;
        if identity.server_id != server_id || identity.branch_id != branch_id {
            return Err(CredentialError::WrongIdentity {
                found: identity.server_id.clone(),
                found_branch: identity.branch_id.clone(),
                expected: server_id.to_string(),
                expected_branch: branch_id.to_string(),
            });
        }
        let tls = agent_client_config(pin, Some((chain.clone(), key.private_key_der())))
            .map_err(CredentialError::KeyMismatch)?;
        Ok(Self {
            key,
            chain,
            certificate,
            tls,
        })
    }

    /// True once the certificate's validity has ended.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.certificate.not_after
    }
}

/// A complete, checked identity as loaded from the state dir.
pub struct AgentState {
    pub identity: Identity,
    pub credentials: Credentials,
}

/// Why the state dir could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("state dir {} holds an incomplete identity: {missing} is missing", dir.display())]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("{} is invalid: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the directory (mode 0700) if needed, settles any interrupted
    /// commit and proves the directory is writable, so that a one-time token
    /// is never spent on an identity that cannot be saved.
    pub fn prepare(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_error("create state dir", &self.dir))?;
        self.recover()?;
        let probe = ".write-probe";
        write_atomic(&self.dir, probe, b"")?;
        let path = self.file(probe);
        fs::remove_file(&path).map_err(io_error("remove", &path))
    }

    /// The stored identity; `None` when the agent has not enrolled yet.
    pub fn load(&self) -> Result<Option<AgentState>, StateError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        self.recover()?;
        let texts = MANAGED_FILES.map(|name| read_optional(&self.file(name)));
        let [key_pem, chain_pem, identity_toml] = texts;
        let (key_pem, chain_pem, identity_toml) = match (key_pem?, chain_pem?, identity_toml?) {
            (None, None, None) => return Ok(None),
            (Some(k), Some(c), Some(i)) => (k, c, i),
            (k, c, _) => {
                let missing = match (k, c) {
                    (None, _) => KEY_FILE,
                    (_, None) => CERT_FILE,
                    _ => IDENTITY_FILE,
                };
                return Err(StateError::Incomplete {
                    dir: self.dir.clone(),
                    missing,
                });
            }
        };
        let invalid = |name: &str, message: String| StateError::Invalid {
            path: self.file(name),
            message,
        };
        let file: IdentityFile = toml::from_str(&identity_toml)
            .map_err(|e| invalid(IDENTITY_FILE, e.message().to_string()))?;
        let ca_fingerprint = file
            .ca_fingerprint
            .parse()
            .map_err(|e: CertError| invalid(IDENTITY_FILE, e.to_string()))?;
        let identity = Identity {
            server_id: file.server_id,
            branch_id: file.branch_id,
            server: file.server,
            ca_fingerprint,
        };
        let key = AgentKey::from_pem(&key_pem).map_err(|e| invalid(KEY_FILE, e.to_string()))?;
        let chain = pem_to_chain(&chain_pem).map_err(|e| invalid(CERT_FILE, e.to_string()))?;
        let credentials = Credentials::new(
            key,
            chain,
            identity.ca_fingerprint,
            &identity.server_id,
            &identity.branch_id,
        )
        .map_err(|e| invalid(CERT_FILE, e.to_string()))?;
        Ok(Some(AgentState {
            identity,
            credentials,
        }))
    }

    /// Stores a new identity with its key and certificate, all or nothing.
    pub fn save_identity(
        &self,
        identity: &Identity,
        credentials: &Credentials,
    ) -> Result<(), StateError> {
        let file = IdentityFile {
            server_id: identity.server_id.clone(),
            branch_id: identity.branch_id.clone(),
            server: identity.server.clone(),
            ca_fingerprint: identity.ca_fingerprint.to_string(),
        };
        let identity_toml = toml::to_string(&file).map_err(|e| StateError::Invalid {
            path: self.file(IDENTITY_FILE),
            message: e.to_string(),
        })?;
        self.prepare()?;
        self.commit(&[
            (KEY_FILE, credentials.key.to_pem().as_bytes()),
            (CERT_FILE, chain_to_pem(&credentials.chain).as_bytes()),
            (IDENTITY_FILE, identity_toml.as_bytes()),
        ])
    }

    /// Replaces the key and certificate (after a renewal), both or neither.
    pub fn save_credentials(&self, credentials: &Credentials) -> Result<(), StateError> {
        self.commit(&[
            (KEY_FILE, credentials.key.to_pem().as_bytes()),
            (CERT_FILE, chain_to_pem(&credentials.chain).as_bytes()),
        ])
    }

    fn commit(&self, files: &[(&str, &[u8])]) -> Result<(), StateError> {
        self.recover()?;
        let staged = files.iter().try_for_each(|(name, contents)| {
            write_atomic(&self.dir, &pending_name(name), contents)
        });
        let journal = files
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join("\n");
        if let Err(err) =
            staged.and_then(|()| write_atomic(&self.dir, JOURNAL_FILE, journal.as_bytes()))
        {
            let _ = self.discard_pending();
            return Err(err);
        }
        self.roll_forward()
    }

    /// Finishes a journalled commit, or discards files staged without one.
    fn recover(&self) -> Result<(), StateError> {
        if self.file(JOURNAL_FILE).exists() {
            self.roll_forward()
        } else {
            self.discard_pending()
        }
    }

    fn roll_forward(&self) -> Result<(), StateError> {
        let journal = self.file(JOURNAL_FILE);
        let names = fs::read_to_string(&journal).map_err(io_error("read", &journal))?;
        for name in names.lines().filter(|line| !line.is_empty()) {
            if !MANAGED_FILES.contains(&name) {
                return Err(StateError::Invalid {
                    path: journal,
                    message: format!("names unknown file {name:?}"),
                });
            }
            let staged = self.file(&pending_name(name));
            if staged.exists() {
                let target = self.file(name);
                fs::rename(&staged, &target).map_err(io_error("install", &target))?;
            }
        }
        sync_dir(&self.dir)?;
        fs::remove_file(&journal).map_err(io_error("remove", &journal))?;
        sync_dir(&self.dir)
    }

    fn discard_pending(&self) -> Result<(), StateError> {
        let entries = fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let staged = MANAGED_FILES
                .iter()
                .any(|managed| name == pending_name(managed));
            let temporary = name.starts_with('.') && name.ends_with(".tmp");
            if staged || temporary {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
            }
        }
        Ok(())
    }
}

fn pending_name(name: &str) -> String {
    format!("{name}.pending")
}

fn read_optional(path: &Path) -> Result<Option<String>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `dir/name` through a synced temporary file (mode 0600) and a rename.
fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), StateError> {
    let target = dir.join(name);
    let temporary = dir.join(format!(".{name}.{:016x}.tmp", rand::rng().random::<u64>()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(StateError::Io {
            action: "write",
            path: target,
            source,
        });
    }
    sync_dir(dir)
}

/// Makes renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error("sync", dir))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use tether_certs::{AgentIdentity, CertificateAuthority};

    use super::*;

    /// A CA and a certificate it issued for a fresh key, as a control plane
    /// would hand them out.
    pub(crate) fn issued(
        ca: &CertificateAuthority,
        server_id: &str,
    ) -> (AgentKey, Vec<CertificateDer<'static>>) {
        let key = AgentKey::generate().unwrap();
        let csr = key.csr_der("host").unwrap();
        let cert = ca
            .sign_agent_csr(
                &csr,
                &AgentIdentity::new("b1", server_id),
                Duration::from_secs(3600),
            )
            .unwrap();
        (key, vec![cert.der, ca.cert_der().clone()])
    }

    fn identity(ca: &CertificateAuthority) -> Identity {
        Identity {
            server_id: "s1".into(),
            branch_id: "b1".into(),
            server: "cp.example.com:7443".into(),
            ca_fingerprint: ca.fingerprint(),
        }
    }

    fn credentials(ca: &CertificateAuthority) -> Credentials {
        let (key, chain) = issued(ca, "s1");
        Credentials::new(key, chain, ca.fingerprint(), "s1", "b1").unwrap()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn empty_or_missing_state_dir_means_not_enrolled() {
        let root = tempfile::tempdir().unwrap();
        assert!(StateDir::new(root.path().join("absent"))
            .load()
            .unwrap()
            .is_none());
        assert!(StateDir::new(root.path()).load().unwrap().is_none());
    }

    #[test]
    fn saved_identity_loads_back_with_private_files_and_private_dir() {
        let root = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let state = StateDir::new(root.path().join("state"));
        let creds = credentials(&ca);
        state.save_identity(&identity(&ca), &creds).unwrap();

        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.identity, identity(&ca));
        assert_eq!(loaded.credentials.chain, creds.chain);
        assert_eq!(loaded.credentials.key.to_pem(), creds.key.to_pem());
        assert_eq!(
            listing(state.path()),
            ["agent.crt", "agent.key", "identity.toml"]
        );
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(state.path().to_path_buf()), 0o700);
        for name in MANAGED_FILES {
            assert_eq!(mode(state.file(name)), 0o600, "{name}");
        }
        let key_pem = fs::read_to_string(state.file(KEY_FILE)).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let crt_pem = fs::read_to_string(state.file(CERT_FILE)).unwrap();
        assert_eq!(crt_pem.matches("BEGIN CERTIFICATE").count(), 2);
        let toml = fs::read_to_string(state.file(IDENTITY_FILE)).unwrap();
        assert!(toml.contains("server_id = \"s1\"") && toml.contains("ca_fingerprint = \"sha256:"));
    }

    #[test]
    fn renewed_credentials_replace_key_and_certificate_together() {
        let root = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let state = StateDir::new(root.path());
        state
            .save_identity(&identity(&ca), &credentials(&ca))
            .unwrap();
        let renewed = credentials(&ca);
        state.save_credentials(&renewed).unwrap();
        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.credentials.key.to_pem(), renewed.key.to_pem());
        assert_eq!(loaded.credentials.chain, renewed.chain);
        assert_eq!(
            listing(state.path()),
            ["agent.crt", "agent.key", "identity.toml"]
        );
    }

    #[test]
    fn interrupted_commit_with_journal_is_finished_on_next_load() {
        let root = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let state = StateDir::new(root.path());
        state
            .save_identity(&identity(&ca), &credentials(&ca))
            .unwrap();
        // Crash after the journal was written and the key renamed, before the
        // certificate was: the old certificate sits beside the new key.
        let renewed = credentials(&ca);
        write_atomic(
            state.path(),
            &pending_name(CERT_FILE),
            chain_to_pem(&renewed.chain).as_bytes(),
        )
        .unwrap();
        write_atomic(state.path(), KEY_FILE, renewed.key.to_pem().as_bytes()).unwrap();
        write_atomic(state.path(), JOURNAL_FILE, b"agent.key\nagent.crt").unwrap();

        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.credentials.chain, renewed.chain);
        assert_eq!(
            listing(state.path()),
            ["agent.crt", "agent.key", "identity.toml"]
        );
    }

    #[test]
    fn staged_files_without_journal_are_discarded_and_old_identity_kept() {
        let root = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let state = StateDir::new(root.path());
        let original = credentials(&ca);
        state.save_identity(&identity(&ca), &original).unwrap();
        let renewed = credentials(&ca);
        write_atomic(
            state.path(),
            &pending_name(KEY_FILE),
            renewed.key.to_pem().as_bytes(),
        )
        .unwrap();
        fs::write(state.file(".agent.crt.0123456789abcdef.tmp"), "half a cert").unwrap();

        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.credentials.key.to_pem(), original.key.to_pem());
        assert_eq!(
            listing(state.path()),
            ["agent.crt", "agent.key", "identity.toml"]
        );
    }

    #[test]
    fn partial_identity_is_an_error_naming_the_missing_file() {
        let root = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("b1").unwrap();
        let state = StateDir::new(root.path());
        state
            .save_identity(&identity(&ca), &credentials(&ca))
            .unwrap();
        fs::remove_file(state.file(CERT_FILE)).unwrap();
        let err = state.load().err().unwrap();
        assert!(err.to_string().contains("agent.crt is missing"), "{err}");
    }

    #[test]
    fn credentials_reject_foreign_ca_other_server_and_other_key() {
        let ca = CertificateAuthority::generate("b1").unwrap();
        let other_ca = CertificateAuthority::generate("b2").unwrap();
        let (key, chain) = issued(&ca, "s1");
        let wrong_pin = Credentials::new(key, chain.clone(), other_ca.fingerprint(), "s1", "b1");
        assert!(matches!(wrong_pin, Err(CredentialError::WrongCa(_))));
        let (key, _) = issued(&ca, "s1");
        let wrong_server = Credentials::new(key, chain.clone(), ca.fingerprint(), "s2", "b1");
        assert!(matches!(
            wrong_server,
            Err(CredentialError::WrongIdentity { .. })
        ));
        let (other_key, _) = issued(&ca, "s1");
        let wrong_key = Credentials::new(other_key, chain.clone(), ca.fingerprint(), "s1", "b1");
        assert!(matches!(wrong_key, Err(CredentialError::KeyMismatch(_))));
        let (key, _) = issued(&ca, "s1");
        let leaf_only = Credentials::new(key, chain[..1].to_vec(), ca.fingerprint(), "s1", "b1");
        assert!(matches!(leaf_only, Err(CredentialError::WrongCa(_))));
    }
}
