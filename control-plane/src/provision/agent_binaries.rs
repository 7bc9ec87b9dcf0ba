//! The agent binaries a control plane serves at
//! `GET /agent/download/{os}/{arch}` and their SHA-256 checksums, which the
//! bootstrap of every provisioned server verifies before installing.
//!
//! A directory holds `tether-agent-<os>-<arch>` files, and/or `tether-agent`
//! for this machine's own platform (the default directory is the one the
//! `tether` executable runs from, where `cargo build` puts both binaries).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// One servable binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBinary {
    pub os: String,
    pub arch: String,
    pub path: PathBuf,
    pub sha256_hex: String,
}

/// This machine's platform in download names (`linux`, `amd64`/`arm64`).
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    (std::env::consts::OS, arch)
}

/// Whether a download name part is safe to put in a file name.
fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 16
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The agent binaries of a directory, with checksums cached by file
/// modification time and size.
#[derive(Debug)]
pub struct AgentBinaries {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, (SystemTime, u64, String)>>,
}

impl AgentBinaries {
    /// Binaries of `dir`, or of the running executable's directory.
    pub fn new(dir: Option<&Path>) -> Self {
        let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."))
        });
        Self {
            dir,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn path_for(&self, os: &str, arch: &str) -> Option<PathBuf> {
        if !valid_part(os) || !valid_part(arch) {
            return None;
        }
        let specific = self.dir.join(format!("tether-agent-{os}-{arch}"));
        if specific.is_file() {
            return Some(specific);
        }
        let native = self.dir.join("tether-agent");
        (host_platform() == (os, arch) && native.is_file()).then_some(native)
    }

    fn checksum(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let modified = meta.modified()?;
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, len, sum)) = cache.get(path) {
                if *at == modified && *len == meta.len() {
                    return Ok(sum.clone());
                }
            }
        }
        // Reading and hashing a binary (a debug build is over 100 MiB) takes
        // seconds: never under the cache's lock. Callers on the runtime reach
        // this through `spawn_blocking` (`provision::job`, `api::agent_download`).
        let sum = hex::encode(Sha256::digest(std::fs::read(path)?));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), (modified, meta.len(), sum.clone()));
        Ok(sum)
    }

    /// The binary for a platform, if served.
    pub fn find(&self, os: &str, arch: &str) -> std::io::Result<Option<AgentBinary>> {
        let Some(path) = self.path_for(os, arch) else {
            return Ok(None);
        };
        let sha256_hex = self.checksum(&path)?;
        Ok(Some(AgentBinary {
            os: os.to_string(),
            arch: arch.to_string(),
            path,
            sha256_hex,
        }))
    }

    /// Every served binary (the bootstrap picks its own by `uname -m`).
    pub fn all(&self) -> std::io::Result<Vec<AgentBinary>> {
        let mut platforms = vec![(host_platform().0.to_string(), host_platform().1.to_string())];
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(rest) = name.strip_prefix("tether-agent-") {
                    if let Some((os, arch)) = rest.split_once('-') {
                        platforms.push((os.to_string(), arch.to_string()));
                    }
                }
            }
        }
        platforms.sort();
        platforms.dedup();
        let mut found = Vec::new();
        for (os, arch) in platforms {
            if let Some(binary) = self.find(&os, &arch)? {
                found.push(binary);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_named_binaries_and_the_native_one_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tether-agent"), b"native").unwrap();
        std::fs::write(dir.path().join("tether-agent-linux-arm64"), b"arm").unwrap();
        let binaries = AgentBinaries::new(Some(dir.path()));
        let (os, arch) = host_platform();
        let native = binaries.find(os, arch).unwrap().unwrap();
        assert_eq!(native.sha256_hex, hex::encode(Sha256::digest(b"native")));
        let arm = binaries.find("linux", "arm64").unwrap().unwrap();
        assert_eq!(arm.sha256_hex, hex::encode(Sha256::digest(b"arm")));
        assert!(binaries.find("windows", "amd64").unwrap().is_none());
        assert!(binaries.find("../etc", "passwd").unwrap().is_none());
        assert!(binaries.all().unwrap().len() >= 2);
    }
}
