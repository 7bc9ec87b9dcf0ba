//! Secrets at rest: the master key and AES-256-GCM sealing.
//!
//! Everything secret the control plane stores (the CA key; later cloud
//! credentials, Terraform state, webhook secrets) is sealed under the master
//! key. A sealed value carries the id of the key that sealed it
//! (`v1:<key-id>:<base64 nonce||ciphertext>`), so the master key can rotate:
//! values sealed under an older key stay readable while they are re-sealed.
//! Random instance secrets (API token signing, QUIC reset keys) are sealed
//! like any other secret, so rotating the master key keeps them.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Errors opening or using secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("master key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("master key file {0} does not hold a 32-byte hex key")]
    MalformedKey(String),
    #[error(
        "master key file {path} is readable by its group or by others (mode {mode:04o}); \
         restrict it with `chmod 600 {path}` and start again"
    )]
    KeyFileExposed { path: String, mode: u32 },
    #[error("sealed value is malformed")]
    MalformedSealed,
    #[error("sealed value was sealed under key {0}, which is not loaded")]
    UnknownKey(String),
    #[error("sealed value failed authentication (wrong key or tampered)")]
    Authentication,
}

/// The 256-bit master key.
#[derive(Clone)]
pub struct MasterKey {
    bytes: [u8; 32],
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id={})", self.id)
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: [u8; 32]) -> Self {
        let digest = Sha256::digest(bytes);
        let id = hex::encode(&digest[..4]);
        Self { bytes, id }
    }

    /// The key as stored in a key file (hex). A secret.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The key's public id (first 4 bytes of its SHA-256, hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads the key file, or creates it (mode 0600) when it does not exist.
    /// An existing file that its group or others may access is refused
    /// ([`SecretError::KeyFileExposed`]), and left as it is.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), SecretError> {
        let err = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(SecretError::KeyFile { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = Self::generate();
                crate::fsutil::write_private(path, hex::encode(key.bytes).as_bytes())
                    .map_err(err)?;
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Loads an existing key file; refuses one its group or others may
    /// access (the check is made on the opened file, so it is the file read).
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let err = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(err)?;
        let mode = file.metadata().map_err(err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SecretError::KeyFileExposed {
                path: path.display().to_string(),
                mode: mode & 0o7777,
            });
        }
        let mut text = String::new();
        // A key file is 64 hex digits: anything much longer is not one.
        (&mut file)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(err)?;
        Self::parse(text.trim(), path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, SecretError> {
        let bytes =
            hex::decode(text).map_err(|_| SecretError::MalformedKey(path.display().to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SecretError::MalformedKey(path.display().to_string()))?;
        Ok(Self::from_bytes(bytes))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.bytes))
    }
}

/// Seals and opens secrets. Holds the current master key and, during a
/// rotation, older keys that can still open values.
#[derive(Debug, Clone)]
pub struct Sealer {
    current: MasterKey,
    previous: Vec<MasterKey>,
}

const SEALED_VERSION: &str = "v1";

impl Sealer {
    pub fn new(current: MasterKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }

    /// Adds a key that may still open older values.
    pub fn with_previous(mut self, key: MasterKey) -> Self {
        self.previous.push(key);
        self
    }

    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// Seals `plaintext`, binding it to `context` (e.g. the row it belongs
    /// to) so a sealed value cannot be moved to another row.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let payload = aes_gcm::aead::Payload {
            msg: plaintext,
            aad: context.as_bytes(),
        };
        // Encryption with a valid key and nonce cannot fail for in-memory input.
        let ciphertext = self
            .current
            .cipher()
            .encrypt(&nonce, payload)
            .unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        format!(
            "{SEALED_VERSION}:{}:{}",
            self.current.id,
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    /// Opens a value sealed by [`Sealer::seal`] under any loaded key.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, SecretError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(SEALED_VERSION), Some(key_id), Some(body)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(SecretError::MalformedSealed);
        };
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| SecretError::UnknownKey(key_id.to_string()))?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SecretError::MalformedSealed)?;
        if blob.len() < 12 {
            return Err(SecretError::MalformedSealed);
        }
        let (nonce, ciphertext) = blob.split_at(12);
        key.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                aes_gcm::aead::Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Authentication)
    }

    /// The id of the key a sealed value was sealed under.
    pub fn key_id_of(sealed: &str) -> Option<&str> {
        sealed.split(':').nth(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_open_to_group_or_others_is_refused_and_left_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let (created, fresh) = MasterKey::load_or_create(&path).unwrap();
        assert!(fresh);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "created {mode:o}");
        let before = std::fs::read(&path).unwrap();
        for exposed in [0o640, 0o604, 0o660, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(exposed)).unwrap();
            let err = MasterKey::load_or_create(&path).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, SecretError::KeyFileExposed { .. }),
                "{exposed:o}: {text}"
            );
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), before);
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                exposed
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(MasterKey::load(&path).unwrap().id(), created.id());
    }

    #[test]
    fn sealed_value_opens_only_with_its_key_and_context() {
        let sealer = Sealer::new(MasterKey::generate());
        let sealed = sealer.seal(b"ca private key", "ca");
        assert!(!sealed.contains("ca private key"));
        assert_eq!(sealer.open(&sealed, "ca").unwrap(), b"ca private key");
        assert!(matches!(
            sealer.open(&sealed, "other"),
            Err(SecretError::Authentication)
        ));
        let stranger = Sealer::new(MasterKey::generate());
        assert!(matches!(
            stranger.open(&sealed, "ca"),
            Err(SecretError::UnknownKey(_))
        ));
    }

    #[test]
    fn rotated_sealer_still_opens_values_of_the_previous_key() {
        let old = MasterKey::generate();
        let sealed = Sealer::new(old.clone()).seal(b"secret", "x");
        let rotated = Sealer::new(MasterKey::generate()).with_previous(old);
        assert_eq!(rotated.open(&sealed, "x").unwrap(), b"secret");
        assert_ne!(
            Sealer::key_id_of(&rotated.seal(b"secret", "x")),
            Sealer::key_id_of(&sealed)
        );
    }

    #[test]
    fn tampered_or_malformed_values_are_refused() {
        let sealer = Sealer::new(MasterKey::generate());
        let mut sealed = sealer.seal(b"secret", "x");
        sealed.pop();
        sealed.push('A');
        assert!(sealer.open(&sealed, "x").is_err());
        for bad in ["", "v1", "v1:abc", "v2:abc:def", "v1:zz:!!!"] {
            assert!(sealer.open(bad, "x").is_err());
        }
    }
}
