//! The instance catalog: per provider, its regions and instance types with
//! vCPUs, memory and hourly list price in USD, each file stating its source
//! and date. Owns parsing (the files embedded from `control-plane/catalog/`,
//! or the operator's `--catalog-dir` overrides), lookup, the cost estimate of
//! a size (monthly = hourly × 730) and the nearest matches of an unknown
//! name (edit distance). A leaf: it knows providers by name only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Hours in a month, as cloud price sheets count them (24 × 365 / 12).
pub const HOURS_PER_MONTH: f64 = 730.0;

/// The embedded files, by provider name.
const EMBEDDED: [(&str, &str); 7] = [
    ("aws", include_str!("../catalog/aws.toml")),
    ("digitalocean", include_str!("../catalog/digitalocean.toml")),
    ("hetzner", include_str!("../catalog/hetzner.toml")),
    ("gcp", include_str!("../catalog/gcp.toml")),
    ("azure", include_str!("../catalog/azure.toml")),
    ("local", include_str!("../catalog/local.toml")),
    ("docker", include_str!("../catalog/docker.toml")),
];

/// Most regions or instance types one file may list.
const MAX_ENTRIES: usize = 1000;

/// Why a catalog file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the instance catalog {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the instance catalog {origin} is malformed: {message}")]
    Malformed { origin: String, message: String },
}

/// One instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    pub name: String,
    pub vcpus: u32,
    /// Memory in GB.
    pub memory_gb: f64,
    /// List price in USD per hour.
    pub hourly_usd: f64,
}

/// One provider's file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCatalog {
    /// Where the figures come from.
    pub source: String,
    /// The date the prices were read (YYYY-MM-DD).
    pub as_of: String,
    pub regions: Vec<String>,
    pub instance_types: Vec<InstanceType>,
}

/// A cost estimate: list price per hour and per month (hourly × 730).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostEstimate {
    pub hourly_usd: f64,
    pub monthly_usd: f64,
}

impl CostEstimate {
    /// The estimate of `count` servers at `hourly_usd` each.
    pub fn of(hourly_usd: f64, count: u32) -> Self {
        let hourly = hourly_usd * f64::from(count);
        Self {
            hourly_usd: round_cents(hourly, 6),
            monthly_usd: round_cents(hourly * HOURS_PER_MONTH, 2),
        }
    }
}

fn round_cents(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// What a lookup did not find.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LookupError {
    #[error("the catalog has no provider {0}")]
    Provider(String),
    #[error("{provider} has no region {region:?} in the instance catalog; nearest: {}", nearest.join(", "))]
    Region {
        provider: String,
        region: String,
        nearest: Vec<String>,
    },
    #[error("{provider} has no instance type {instance_type:?} in the instance catalog; nearest: {}", nearest.join(", "))]
    InstanceType {
        provider: String,
        instance_type: String,
        nearest: Vec<String>,
    },
}

/// Every provider's catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    providers: BTreeMap<String, ProviderCatalog>,
}

impl Catalog {
    /// The embedded files, each replaced by `DIR/<provider>.toml` when
    /// `dir` holds one.
    pub fn load(dir: Option<&Path>) -> Result<Self, CatalogError> {
        let mut providers = BTreeMap::new();
        for (name, embedded) in EMBEDDED {
            let override_path = dir.map(|d| d.join(format!("{name}.toml")));
            let parsed = match override_path.filter(|p| p.exists()) {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).map_err(|source| CatalogError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    parse(&path.display().to_string(), &text)?
                }
                None => parse(&format!("embedded {name}.toml"), embedded)?,
            };
            providers.insert(name.to_string(), parsed);
        }
        Ok(Self { providers })
    }

    /// One provider's catalog.
    pub fn provider(&self, provider: &str) -> Option<&ProviderCatalog> {
        self.providers.get(provider)
    }

    /// Every provider's catalog, by name.
    pub fn providers(&self) -> &BTreeMap<String, ProviderCatalog> {
        &self.providers
    }

    /// The instance type `instance_type` of `provider` in `region`, or what
    /// is nearest to what was asked.
    pub fn lookup(
        &self,
        provider: &str,
        region: &str,
        instance_type: &str,
    ) -> Result<&InstanceType, LookupError> {
        let catalog = self
            .providers
            .get(provider)
            .ok_or_else(|| LookupError::Provider(provider.to_string()))?;
        if !catalog.regions.iter().any(|r| r == region) {
            return Err(LookupError::Region {
                provider: provider.to_string(),
                region: region.to_string(),
                nearest: nearest(region, catalog.regions.iter().map(String::as_str)),
            });
        }
        catalog
            .instance_types
            .iter()
            .find(|t| t.name == instance_type)
            .ok_or_else(|| LookupError::InstanceType {
                provider: provider.to_string(),
                instance_type: instance_type.to_string(),
                nearest: nearest(
                    instance_type,
                    catalog.instance_types.iter().map(|t| t.name.as_str()),
                ),
            })
    }
}

/// Up to three names nearest to `wanted` (normalized Levenshtein distance,
/// ties by name).
pub fn nearest<'a>(wanted: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let wanted = wanted.to_ascii_lowercase();
    let mut scored: Vec<(f64, &str)> = names
        .map(|n| {
            (
                strsim::normalized_levenshtein(&wanted, &n.to_ascii_lowercase()),
                n,
            )
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored
        .into_iter()
        .take(3)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// Parses and checks one file.
pub fn parse(origin: &str, text: &str) -> Result<ProviderCatalog, CatalogError> {
    let malformed = |message: String| CatalogError::Malformed {
        origin: origin.to_string(),
        message,
    };
    let catalog: ProviderCatalog = toml::from_str(text).map_err(|e| malformed(e.to_string()))?;
    if catalog.source.trim().is_empty() {
        return Err(malformed(
            "source must say where the figures come from".into(),
        ));
    }
    if chrono::NaiveDate::parse_from_str(&catalog.as_of, "%Y-%m-%d").is_err() {
        return Err(malformed(format!(
            "as_of {:?} is not a date (YYYY-MM-DD)",
            catalog.as_of
        )));
    }
    if catalog.regions.is_empty() || catalog.instance_types.is_empty() {
        return Err(malformed(
            "regions and instance_types must each list at least one entry".into(),
        ));
    }
    if catalog.regions.len() > MAX_ENTRIES || catalog.instance_types.len() > MAX_ENTRIES {
        return Err(malformed(format!(
            "at most {MAX_ENTRIES} regions and {MAX_ENTRIES} instance types"
        )));
    }
    let valid_name =
        |n: &str| !n.trim().is_empty() && n.len() <= 64 && !n.chars().any(char::is_control);
    if let Some(bad) = catalog.regions.iter().find(|r| !valid_name(r)) {
        return Err(malformed(format!(
            "region {bad:?} must be 1-64 printable characters"
        )));
    }
    for t in &catalog.instance_types {
        if !valid_name(&t.name) {
            return Err(malformed(format!(
                "instance type {:?} must be 1-64 printable characters",
                t.name
            )));
        }
        if t.vcpus == 0 || t.vcpus > 4096 {
            return Err(malformed(format!("{}: vcpus must be 1-4096", t.name)));
        }
        if !(t.memory_gb.is_finite() && t.memory_gb > 0.0 && t.memory_gb <= 65536.0) {
            return Err(malformed(format!(
                "{}: memory_gb must be a number above 0 and at most 65536",
                t.name
            )));
        }
        if !(t.hourly_usd.is_finite() && t.hourly_usd >= 0.0 && t.hourly_usd <= 10_000.0) {
            return Err(malformed(format!(
                "{}: hourly_usd must be a number from 0 to 10000",
                t.name
            )));
        }
    }
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_file_parses_and_states_its_source_and_date() {
        let catalog = Catalog::load(None).unwrap();
        assert_eq!(catalog.providers().len(), EMBEDDED.len());
        for (name, c) in catalog.providers() {
            assert!(!c.source.is_empty(), "{name}");
            assert!(c.as_of.len() == 10, "{name}");
        }
    }

    #[test]
    fn the_host_targets_cost_nothing_with_the_types_the_tests_use() {
        let catalog = Catalog::load(None).unwrap();
        let local = catalog.lookup("local", "local", "process").unwrap();
        assert_eq!(local.hourly_usd, 0.0);
        let docker = catalog.lookup("docker", "local", "container").unwrap();
        assert_eq!(docker.hourly_usd, 0.0);
        assert!(catalog.lookup("hetzner", "fsn1", "cx22").is_ok());
    }

    #[test]
    fn an_unknown_type_is_answered_with_the_nearest_names() {
        let catalog = Catalog::load(None).unwrap();
        match catalog.lookup("aws", "us-east-1", "t3.mirco") {
            Err(LookupError::InstanceType { nearest, .. }) => {
                assert_eq!(nearest[0], "t3.micro", "{nearest:?}")
            }
            other => panic!("{other:?}"),
        }
        match catalog.lookup("hetzner", "fsn2", "cx22") {
            Err(LookupError::Region { nearest, .. }) => assert_eq!(nearest[0], "fsn1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_malformed_override_stops_the_load_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("local.toml"), "source = 1\n").unwrap();
        let err = Catalog::load(Some(dir.path())).unwrap_err();
        assert!(err.to_string().contains("local.toml"), "{err}");
        std::fs::write(
            dir.path().join("local.toml"),
            "source = \"x\"\nas_of = \"2026-01-01\"\nregions = [\"local\"]\n\
             [[instance_types]]\nname = \"process\"\nvcpus = 1\nmemory_gb = 1.0\nhourly_usd = -1.0\n",
        )
        .unwrap();
        assert!(Catalog::load(Some(dir.path())).is_err());
    }

    #[test]
    fn a_month_is_730_hours() {
        let cost = CostEstimate::of(0.01, 3);
        assert!((cost.hourly_usd - 0.03).abs() < 1e-9);
        assert!((cost.monthly_usd - 21.9).abs() < 1e-9);
    }
}
