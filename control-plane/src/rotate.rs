//! `tether rotate-master-key`: re-seals every secret in the store under a new
//! master key.
//!
//! Crash-safe order: the new key is written to `<key file>.next` first, the
//! store's values are re-sealed one by one (compare-and-swap), then the old
//! key moves to `<key file>.previous` and the new one takes its place. A
//! control plane opens values with the current key, `.next` and `.previous`,
//! so a rotation interrupted at any point loses nothing; running it again
//! finishes the job.

use std::path::{Path, PathBuf};

use crate::config::ServeConfig;
use crate::secrets::{MasterKey, Sealer, SecretError};
use crate::store::{SealedKind, StoreError};

/// Why a rotation stopped. Whatever it had re-sealed stays valid (the
/// control plane opens values under the old and the new key), and running
/// it again finishes the job.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// A key file could not be loaded.
    #[error(transparent)]
    Key(#[from] SecretError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key file could not be written, kept or moved into place.
    #[error("{action} {}", path.display())]
    KeyFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored value does not open with the loaded keys.
    #[error("opening {kind:?} {id}")]
    Unseal {
        kind: SealedKind,
        id: String,
        #[source]
        source: SecretError,
    },
    /// Another writer changed a value while it was being re-sealed.
    #[error("{kind:?} {id} changed during the rotation; run it again")]
    Raced { kind: SealedKind, id: String },
}

fn key_file_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RotateError {
    let path = path.to_path_buf();
    move |source| RotateError::KeyFile {
        action,
        path,
        source,
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The sealer of a control plane: the current key, plus `.next` and
/// `.previous` when a rotation left them.
pub fn load_sealer(key_file: &Path) -> Result<Sealer, SecretError> {
    let (current, _) = MasterKey::load_or_create(key_file)?;
    let mut sealer = Sealer::new(current);
    for suffix in [".next", ".previous"] {
        let path = sibling(key_file, suffix);
        if path.exists() {
            sealer = sealer.with_previous(MasterKey::load(&path)?);
        }
    }
    Ok(sealer)
}

/// What a rotation did.
#[derive(Debug)]
pub struct Rotation {
    pub old_key_id: String,
    pub new_key_id: String,
    pub resealed: usize,
}

/// Re-seals every stored secret under a new master key (see the module doc
/// for the crash-safe order).
pub async fn rotate(config: &ServeConfig) -> Result<Rotation, RotateError> {
    let key_file = &config.master_key_file;
    let current = MasterKey::load(key_file)?;
    let next_path = sibling(key_file, ".next");
    let next = if next_path.exists() {
        MasterKey::load(&next_path)?
    } else {
        let key = MasterKey::generate();
        crate::fsutil::write_private(&next_path, key.hex().as_bytes())
            .map_err(key_file_error("writing", &next_path))?;
        key
    };
    let opener = load_sealer(key_file)?;
    let sealer = Sealer::new(next.clone());
    let store = crate::store::open(&config.database_url).await?;
    let mut resealed = 0;
    for secret in store.sealed_secrets().await? {
        if Sealer::key_id_of(&secret.sealed) == Some(next.id()) {
            continue;
        }
        let plain = opener
            .open(&secret.sealed, &secret.context)
            .map_err(|source| RotateError::Unseal {
                kind: secret.kind,
                id: secret.id.clone(),
                source,
            })?;
        let fresh = sealer.seal(&plain, &secret.context);
        if !store.replace_sealed_secret(&secret, &fresh).await? {
            return Err(RotateError::Raced {
                kind: secret.kind,
                id: secret.id.clone(),
            });
        }
        resealed += 1;
    }
    let previous_path = sibling(key_file, ".previous");
    std::fs::copy(key_file, &previous_path)
        .map_err(key_file_error("keeping the old key as", &previous_path))?;
    std::fs::rename(&next_path, key_file)
        .map_err(key_file_error("installing the new key as", key_file))?;
    Ok(Rotation {
        old_key_id: current.id().to_string(),
        new_key_id: next.id().to_string(),
        resealed,
    })
}
