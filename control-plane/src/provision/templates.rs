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
//!
//! Each target also declares which of its other inputs API callers may set
//! in `terraform_variables` ([`api_variables`]); the rest keep the module's
//! defaults. Inputs that name paths, images, networks, addresses or binaries
//! on the control-plane host (`local_root`, `container_image`,
//! `docker_network`, `busybox_path`, ...) are never among them.
//!
//! The operator may replace a target's module with their own
//! (`tether serve --templates-dir DIR`: `DIR/<target>/`, operator-trusted,
//! never set through the API): [`overridden_targets`] checks such a
//! directory at start, and [`write_module_for`] copies the replacement
//! instead of the embedded files. The target's settable inputs stay the
//! target's ([`api_variables`]).

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

/// The inputs of `provider`'s module that API callers may set in
/// `terraform_variables` (empty for an unknown target). Anything else is
/// refused by the API, naming the variable.
pub fn api_variables(provider: &str) -> &'static [&'static str] {
    // What every cloud target lets callers set: things in the cloud account
    // of the deployment's own credential, never on this host.
    macro_rules! cloud {
        ($($extra:literal),* $(,)?) => {
            &[
                "image",
                "disk_size_gb",
                "ssh_public_keys",
                "control_plane_cidr",
                "control_plane_quic_port",
                "control_plane_api_port",
                "restrict_egress",
                "allow_ssh",
                "ssh_source_cidrs",
                $($extra),*
            ]
        };
    }
    match provider {
        "aws" => cloud!("subnet_id", "associate_public_ip"),
        "digitalocean" | "hetzner" => cloud!(),
        "gcp" => cloud!("project", "zone", "network", "subnetwork", "ssh_user"),
        "azure" => cloud!("admin_username", "vnet_cidr"),
        // The host targets: only inputs that do not say where on this
        // machine the server lives or what it runs.
        "local" => &[
            "disk_size_gb",
            "ssh_public_keys",
            "stop_timeout_seconds",
            "keep_failed_root",
        ],
        "docker" => &["disk_size_gb", "ssh_public_keys", "keep_failed_root"],
        _ => &[],
    }
}

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

/// Why a `--templates-dir` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TemplatesDirError {
    /// The directory (or one of its entries) cannot be read.
    #[error("reading the templates dir {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A subdirectory that names no target.
    #[error("the templates dir has {name}/, which is not a target (targets: {})", PROVIDERS.join(", "))]
    UnknownTarget { name: String },
    /// A target's directory without a `.tf` file.
    #[error("the templates dir's {name}/ holds no .tf file")]
    NoTerraform { name: String },
}

/// The targets whose module `dir` replaces (its subdirectories, each named
/// after a target and holding at least one `.tf` file), sorted. Anything
/// else in it is an error, so a misspelt target does not pass unnoticed.
pub fn overridden_targets(dir: &Path) -> Result<Vec<String>, TemplatesDirError> {
    let read = |path: &Path| {
        let path = path.display().to_string();
        move |source| TemplatesDirError::Read { path, source }
    };
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read(dir))? {
        let entry = entry.map_err(read(dir))?;
        if !entry.file_type().map_err(read(&entry.path()))?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().to_string();
        if !PROVIDERS.contains(&name.as_str()) {
            return Err(TemplatesDirError::UnknownTarget { name });
        }
        let has_tf = std::fs::read_dir(entry.path())
            .map_err(read(&entry.path()))?
            .filter_map(Result::ok)
            .any(|file| file.file_name().to_string_lossy().ends_with(".tf"));
        if !has_tf {
            return Err(TemplatesDirError::NoTerraform { name });
        }
        targets.push(name);
    }
    targets.sort();
    Ok(targets)
}

/// Writes the module of `provider` into `dir`: a copy of
/// `templates_dir/<provider>/` when the operator gave one with that target,
/// otherwise the embedded module ([`write_module`]).
pub fn write_module_for(
    provider: &str,
    dir: &Path,
    templates_dir: Option<&Path>,
) -> io::Result<Vec<PathBuf>> {
    if module_files(provider).is_none() {
        return write_module(provider, dir);
    }
    match templates_dir.map(|root| root.join(provider)) {
        Some(source) if source.is_dir() => {
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            let mut written = Vec::new();
            copy_module(&source, dir, &mut written)?;
            Ok(written)
        }
        _ => write_module(provider, dir),
    }
}

/// Copies a module directory (files keep their mode; terraform's own
/// droppings and symbolic links are left out).
fn copy_module(from: &Path, to: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with(".terraform") || text.starts_with("terraform.tfstate") {
            continue;
        }
        let kind = entry.file_type()?;
        let target = to.join(&name);
        if kind.is_dir() {
            copy_module(&entry.path(), &target, written)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
            written.push(target);
        }
    }
    Ok(())
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

    /// Names of the `variable` blocks of a target's module.
    fn declared_variables(provider: &str) -> BTreeSet<String> {
        module_files(provider)
            .unwrap()
            .iter()
            .flat_map(|(_, contents)| contents.lines())
            .filter_map(|line| line.trim().strip_prefix("variable \""))
            .map(|rest| rest.split('"').next().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn every_api_settable_variable_is_a_declared_non_fixed_input_of_its_module() {
        for provider in PROVIDERS {
            let declared = declared_variables(provider);
            let settable = api_variables(provider);
            assert!(!settable.is_empty(), "{provider} declares no list");
            for name in settable {
                assert!(declared.contains(*name), "{provider} has no input {name}");
                assert!(
                    !crate::provision::job::FIXED_VARIABLES.contains(name),
                    "{provider}: {name} is set by the control plane"
                );
            }
        }
        assert!(api_variables("nope").is_empty());
    }

    #[test]
    fn host_targets_never_let_the_api_choose_paths_images_networks_or_binaries() {
        for provider in ["local", "docker"] {
            let declared = declared_variables(provider);
            for name in [
                "local_root",
                "container_image",
                "busybox_path",
                "docker_network",
                "docker_subnet",
                "container_ip",
                "image",
            ] {
                if declared.contains(name) {
                    assert!(
                        !api_variables(provider).contains(&name),
                        "{provider}: {name} is settable"
                    );
                }
            }
            for name in api_variables(provider) {
                for word in [
                    "root", "path", "dir", "image", "network", "subnet", "ip", "bin",
                ] {
                    let part_of_name = name.split('_').any(|part| part == word);
                    let is_the_keep_switch = *name == "keep_failed_root";
                    assert!(
                        !part_of_name || is_the_keep_switch,
                        "{provider}: {name} looks like a host resource"
                    );
                }
            }
        }
    }

    #[test]
    fn a_templates_dir_replaces_only_the_targets_it_holds() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("local/scripts")).unwrap();
        std::fs::write(root.path().join("local/main.tf"), "# mine\n").unwrap();
        std::fs::write(root.path().join("local/scripts/x.sh"), "#!/bin/sh\n").unwrap();
        std::fs::write(root.path().join("README"), "not a target\n").unwrap();
        assert_eq!(overridden_targets(root.path()).unwrap(), ["local"]);

        let out = tempfile::tempdir().unwrap();
        let local = out.path().join("local");
        write_module_for("local", &local, Some(root.path())).unwrap();
        assert_eq!(
            std::fs::read_to_string(local.join("main.tf")).unwrap(),
            "# mine\n"
        );
        assert!(local.join("scripts/x.sh").is_file());
        assert!(
            !local.join("variables.tf").exists(),
            "only the operator's files"
        );
        let docker = out.path().join("docker");
        write_module_for("docker", &docker, Some(root.path())).unwrap();
        assert!(docker.join("scripts/up.sh").is_file(), "embedded module");

        std::fs::create_dir_all(root.path().join("aws2")).unwrap();
        assert!(matches!(
            overridden_targets(root.path()),
            Err(TemplatesDirError::UnknownTarget { name }) if name == "aws2"
        ));
        std::fs::remove_dir(root.path().join("aws2")).unwrap();
        std::fs::create_dir_all(root.path().join("gcp")).unwrap();
        assert!(matches!(
            overridden_targets(root.path()),
            Err(TemplatesDirError::NoTerraform { name }) if name == "gcp"
        ));
        assert!(matches!(
            overridden_targets(&root.path().join("missing")),
            Err(TemplatesDirError::Read { .. })
        ));
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
