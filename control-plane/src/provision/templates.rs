//! The Terraform modules of `terraform-templates/`, embedded in the binary so
//! `tether` provisions without the repository at hand.
//!
//! Owns the list of targets ([`PROVIDERS`]), each target's files
//! ([`module_files`]) and writing a module into a job's working directory
//! ([`write_module`]). Every module takes the same inputs (`server_name`,
//! `region`, `instance_type`, `image`, `disk_size_gb`, `ssh_public_keys`,
//! `tags`, `user_data`) and gives the same outputs (`instance_id`,
//! `public_ip`, `private_ip`); cloud credentials reach them only through the
//! providers' standard environment variables. A unit test checks that every
//! file under `terraform-templates/<target>/` is embedded here.

use std::io;
use std::path::{Path, PathBuf};

/// The targets, each a folder of `terraform-templates/`.
pub const PROVIDERS: &[&str] = &[
    "aws",
    "digitalocean",
    "hetzner",
    "gcp",
    "azure",
    "local",
    "docker",
];

/// The inputs every module declares.
pub const COMMON_VARIABLES: &[&str] = &[
    "server_name",
    "region",
    "instance_type",
    "image",
    "disk_size_gb",
    "ssh_public_keys",
    "tags",
    "user_data",
];

/// The outputs every module gives.
pub const COMMON_OUTPUTS: &[&str] = &["instance_id", "public_ip", "private_ip"];

/// The files of one module: `(path relative to the module, contents)`.
pub type ModuleFiles = &'static [(&'static str, &'static str)];

macro_rules! module {
    ($target:literal: $($file:literal),+ $(,)?) => {
        &[$((
            $file,
            include_str!(concat!("../../../terraform-templates/", $target, "/", $file)),
        )),+]
    };
}

const AWS: ModuleFiles = module!("aws": "versions.tf", "variables.tf", "main.tf", "outputs.tf");
const DIGITALOCEAN: ModuleFiles =
    module!("digitalocean": "versions.tf", "variables.tf", "main.tf", "outputs.tf");
const HETZNER: ModuleFiles =
    module!("hetzner": "versions.tf", "variables.tf", "main.tf", "outputs.tf");
const GCP: ModuleFiles = module!("gcp": "versions.tf", "variables.tf", "main.tf", "outputs.tf");
const AZURE: ModuleFiles = module!("azure": "versions.tf", "variables.tf", "main.tf", "outputs.tf");
const LOCAL: ModuleFiles = module!(
    "local": "versions.tf",
    "variables.tf",
    "main.tf",
    "outputs.tf",
    "scripts/boot.sh",
    "scripts/stop.sh",
);
const DOCKER: ModuleFiles = module!(
    "docker": "versions.tf",
    "variables.tf",
    "main.tf",
    "outputs.tf",
    "scripts/up.sh",
    "scripts/down.sh",
);

/// The files of one target's module, (relative file name, contents);
/// `None` for an unknown target.
pub fn module_files(provider: &str) -> Option<ModuleFiles> {
    match provider {
        "aws" => Some(AWS),
        "digitalocean" => Some(DIGITALOCEAN),
        "hetzner" => Some(HETZNER),
        "gcp" => Some(GCP),
        "azure" => Some(AZURE),
        "local" => Some(LOCAL),
        "docker" => Some(DOCKER),
        _ => None,
    }
}

/// Writes the module of `provider` into `dir` (created, with any
/// subdirectory; scripts 0755, other files 0644) and returns the paths
/// written. An unknown target is `InvalidInput`.
pub fn write_module(provider: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let files = module_files(provider).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown provisioning target {provider:?}"),
        )
    })?;
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::with_capacity(files.len());
    for (name, contents) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, contents)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = if name.ends_with(".sh") { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn templates_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../terraform-templates")
    }

    fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // Terraform's own droppings from a manual run are not sources.
            if name.starts_with(".terraform") || name.starts_with("terraform.tfstate") {
                continue;
            }
            if path.is_dir() {
                files_under(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap();
                out.insert(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }

    #[test]
    fn every_file_of_every_target_is_embedded() {
        let on_disk: BTreeSet<String> = std::fs::read_dir(templates_dir())
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().to_string())
            .collect();
        let listed: BTreeSet<String> = PROVIDERS.iter().map(|p| p.to_string()).collect();
        assert_eq!(on_disk, listed, "terraform-templates/ folders vs PROVIDERS");
        for provider in PROVIDERS {
            let dir = templates_dir().join(provider);
            let mut disk = BTreeSet::new();
            files_under(&dir, &dir, &mut disk);
            let files = module_files(provider).unwrap();
            let embedded: BTreeSet<String> = files.iter().map(|(n, _)| n.to_string()).collect();
            assert_eq!(disk, embedded, "files of terraform-templates/{provider}/");
            for (name, contents) in files {
                let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
                assert_eq!(&on_disk, contents, "{provider}/{name}");
            }
        }
    }

    #[test]
    fn every_module_declares_the_common_inputs_and_outputs() {
        for provider in PROVIDERS {
            let files = module_files(provider).unwrap();
            let all: String = files.iter().map(|(_, c)| *c).collect();
            for variable in COMMON_VARIABLES {
                assert!(
                    all.contains(&format!("variable \"{variable}\" {{")),
                    "{provider} lacks variable {variable}"
                );
            }
            for output in COMMON_OUTPUTS {
                assert!(
                    all.contains(&format!("output \"{output}\" {{")),
                    "{provider} lacks output {output}"
                );
            }
            assert!(
                files
                    .iter()
                    .any(|(name, c)| *name == "versions.tf" && c.contains("terraform {")),
                "{provider} has a versions.tf"
            );
        }
    }

    #[test]
    fn no_module_takes_a_credential_as_a_variable() {
        for provider in PROVIDERS {
            for (name, contents) in module_files(provider).unwrap() {
                for line in contents.lines() {
                    let line = line.trim();
                    let Some(rest) = line.strip_prefix("variable \"") else {
                        continue;
                    };
                    let variable = rest.split('"').next().unwrap_or_default().to_lowercase();
                    let credential = ["token", "secret", "password", "credential", "access_key"]
                        .iter()
                        .any(|word| variable.contains(word));
                    assert!(!credential, "{provider}/{name}: variable {variable}");
                }
            }
        }
    }

    #[test]
    fn write_module_writes_every_file_and_refuses_unknown_targets() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_module("local", &dir.path().join("m")).unwrap();
        assert_eq!(written.len(), module_files("local").unwrap().len());
        assert!(dir.path().join("m/scripts/boot.sh").is_file());
        let err = write_module("nope", dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(module_files("nope").is_none());
    }
}
