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

use anyhow::Context;

use crate::config::ServeConfig;
use crate::secrets::{MasterKey, Sealer};

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The sealer of a control plane: the current key, plus `.next` and
/// `.previous` when a rotation left them.
pub fn load_sealer(key_file: &Path) -> anyhow::Result<Sealer> {
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

pub async fn rotate(config: &ServeConfig) -> anyhow::Result<Rotation> {
    let key_file = &config.master_key_file;
    let current = MasterKey::load(key_file).context("loading the current master key")?;
    let next_path = sibling(key_file, ".next");
    let next = if next_path.exists() {
        MasterKey::load(&next_path)?
    } else {
        let key = MasterKey::generate();
        crate::fsutil::write_private(&next_path, key.hex().as_bytes())
            .with_context(|| format!("writing {}", next_path.display()))?;
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
            .with_context(|| format!("opening {:?} {}", secret.kind, secret.id))?;
        let fresh = sealer.seal(&plain, &secret.context);
        if !store.replace_sealed_secret(&secret, &fresh).await? {
            anyhow::bail!(
                "{:?} {} changed during the rotation; run it again",
                secret.kind,
                secret.id
            );
        }
        resealed += 1;
    }
    let previous_path = sibling(key_file, ".previous");
    std::fs::copy(key_file, &previous_path)
        .with_context(|| format!("keeping the old key as {}", previous_path.display()))?;
    std::fs::rename(&next_path, key_file)
        .with_context(|| format!("installing the new key as {}", key_file.display()))?;
    Ok(Rotation {
        old_key_id: current.id().to_string(),
        new_key_id: next.id().to_string(),
        resealed,
    })
}
