//! The providers deployments can target and the credential fields each one
//! needs: which fields a credential must carry, how they are checked, and
//! the environment variables they become for the terraform process (the
//! only way a credential ever leaves the control plane).
//!
//! It also holds the one rule of which stored credential a deployment may
//! use ([`credential_for_deployment`]): only one of the deployment's own
//! organization, never an ancestor's or a descendant's. The API checks it
//! when a deployment is requested and the job checks it again before every
//! terraform run, with the same error.

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::{CloudCredential, Store, StoreError};

/// Why a deployment may not use a stored credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialUseError {
    /// No live credential with that id where the looker may look (never
    /// stored, deleted, or outside what the caller sees).
    #[error("the cloud credential {id} does not exist or was deleted")]
    Missing { id: Uuid },
    /// The credential exists, in another organization.
    #[error(
        "the cloud credential {id} belongs to organization {owner}, not to the deployment's \
         organization {organization}: a deployment uses only a credential of its own organization"
    )]
    OtherOrganization {
        id: Uuid,
        owner: Uuid,
        organization: Uuid,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The credential `id` for a deployment of `organization_id`: it must be a
/// live credential of exactly that organization. When it is not, the
/// credential is looked for in `diagnose_in` (the organizations the asker may
/// learn about) to say whether it belongs elsewhere or is gone.
pub async fn credential_for_deployment(
    store: &dyn Store,
    organization_id: Uuid,
    id: Uuid,
    diagnose_in: &[Uuid],
) -> Result<CloudCredential, CredentialUseError> {
    if let Some(credential) = store.cloud_credential(&[organization_id], id).await? {
        return Ok(credential);
    }
    match store.cloud_credential(diagnose_in, id).await? {
        Some(elsewhere) => Err(CredentialUseError::OtherOrganization {
            id,
            owner: elsewhere.organization_id,
            organization: organization_id,
        }),
        None => Err(CredentialUseError::Missing { id }),
    }
}

/// A provisioning target (a folder of `terraform-templates/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Aws,
    DigitalOcean,
    Hetzner,
    Gcp,
    Azure,
    /// A local agent process started by `terraform_data` + `local-exec`.
    Local,
    /// A container on the local Docker engine, with its own address on a
    /// bridge network (`terraform_data` + `local-exec` + the docker CLI).
    Docker,
}

/// Why a credential or provider is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not one of the known targets.
    #[error(
        "unknown provider {0:?}: use one of aws, digitalocean, hetzner, gcp, azure, local, docker"
    )]
    UnknownProvider(String),
    /// A required field is absent or empty.
    #[error("credentials for {provider} need a non-empty string field {field:?}")]
    MissingField {
        provider: &'static str,
        field: &'static str,
    },
    /// A field the provider does not know (a typo would otherwise be ignored).
    #[error("credentials for {provider} have no field {field:?}")]
    UnknownField {
        provider: &'static str,
        field: String,
    },
    /// A field has the wrong shape.
    #[error("credentials for {provider}: {field} {problem}")]
    Malformed {
        provider: &'static str,
        field: &'static str,
        problem: &'static str,
    },
}

/// One credential field: its JSON name, the environment variable terraform's
/// provider reads it from, and whether it is required.
struct Field {
    name: &'static str,
    env: &'static str,
    required: bool,
}

const fn required(name: &'static str, env: &'static str) -> Field {
    Field {
        name,
        env,
        required: true,
    }
}

const fn optional(name: &'static str, env: &'static str) -> Field {
    Field {
        name,
        env,
        required: false,
    }
}

impl Provider {
    pub const ALL: [Self; 7] = [
        Self::Aws,
        Self::DigitalOcean,
        Self::Hetzner,
        Self::Gcp,
        Self::Azure,
        Self::Local,
        Self::Docker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::DigitalOcean => "digitalocean",
            Self::Hetzner => "hetzner",
            Self::Gcp => "gcp",
            Self::Azure => "azure",
            Self::Local => "local",
            Self::Docker => "docker",
        }
    }

    pub fn parse(name: &str) -> Result<Self, CredentialError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| CredentialError::UnknownProvider(name.chars().take(64).collect()))
    }

    /// Whether deployments on this target need a stored credential.
    pub fn needs_credential(self) -> bool {
        !self.runs_on_this_machine()
    }

    /// Whether the target "boots" its servers on this machine (no cloud).
    pub fn runs_on_this_machine(self) -> bool {
        matches!(self, Self::Local | Self::Docker)
    }

    fn fields(self) -> &'static [Field] {
        const AWS: &[Field] = &[
            required("access_key_id", "AWS_ACCESS_KEY_ID"),
            required("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            optional("session_token", "AWS_SESSION_TOKEN"),
        ];
        const DIGITALOCEAN: &[Field] = &[required("token", "DIGITALOCEAN_TOKEN")];
        const HETZNER: &[Field] = &[required("token", "HCLOUD_TOKEN")];
        const GCP: &[Field] = &[
            required("credentials_json", "GOOGLE_CREDENTIALS"),
            required("project", "GOOGLE_PROJECT"),
        ];
        const AZURE: &[Field] = &[
            required("client_id", "ARM_CLIENT_ID"),
            required("client_secret", "ARM_CLIENT_SECRET"),
            required("tenant_id", "ARM_TENANT_ID"),
            required("subscription_id", "ARM_SUBSCRIPTION_ID"),
        ];
        match self {
            Self::Aws => AWS,
            Self::DigitalOcean => DIGITALOCEAN,
            Self::Hetzner => HETZNER,
            Self::Gcp => GCP,
            Self::Azure => AZURE,
            Self::Local | Self::Docker => &[],
        }
    }

    /// Checks the fields of a credential: every required one present, no
    /// unknown one, the shapes providers document (offline: no call to the
    /// cloud is possible from every control plane).
    pub fn check(self, fields: &Map<String, Value>) -> Result<(), CredentialError> {
        let provider = self.as_str();
        for name in fields.keys() {
            if !self.fields().iter().any(|f| f.name == name) {
                return Err(CredentialError::UnknownField {
                    provider,
                    field: name.chars().take(64).collect(),
                });
            }
        }
        for field in self.fields() {
            match fields.get(field.name) {
                Some(Value::String(v)) if !v.trim().is_empty() => {
                    if v.chars().any(|c| c == '\0') {
                        return Err(CredentialError::Malformed {
                            provider,
                            field: field.name,
                            problem: "contains a NUL character",
                        });
                    }
                }
                None if !field.required => {}
                _ => {
                    return Err(CredentialError::MissingField {
                        provider,
                        field: field.name,
                    })
                }
            }
        }
        let text = |name: &str| fields.get(name).and_then(Value::as_str).unwrap_or_default();
        match self {
            Self::Aws => {
                let key = text("access_key_id");
                let well_formed = key.len() == 20
                    && (key.starts_with("AKIA") || key.starts_with("ASIA"))
                    && key.chars().all(|c| c.is_ascii_alphanumeric());
                if !well_formed {
                    return Err(CredentialError::Malformed {
                        provider,
                        field: "access_key_id",
                        problem: "is not an AWS access key id (20 characters, AKIA... or ASIA...)",
                    });
                }
            }
            Self::Gcp => {
                let parsed: Result<Map<String, Value>, _> =
                    serde_json::from_str(text("credentials_json"));
                let is_key = parsed.is_ok_and(|key| {
                    key.get("type").and_then(Value::as_str) == Some("service_account")
                        && key.contains_key("private_key")
                        && key.contains_key("client_email")
                });
                if !is_key {
                    return Err(CredentialError::Malformed {
                        provider,
                        field: "credentials_json",
                        problem: "is not a service-account key (JSON with type, private_key, client_email)",
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The environment of the terraform process for these credentials.
    pub fn environment(
        self,
        fields: &Map<String, Value>,
    ) -> Result<Vec<(&'static str, String)>, CredentialError> {
        self.check(fields)?;
        Ok(self
            .fields()
            .iter()
            .filter_map(|field| {
                fields
                    .get(field.name)
                    .and_then(Value::as_str)
                    .map(|v| (field.env, v.to_string()))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn credentials_become_the_provider_environment_variables() {
        let env = Provider::Hetzner
            .environment(&map(json!({ "token": "abc" })))
            .unwrap();
        assert_eq!(env, vec![("HCLOUD_TOKEN", "abc".to_string())]);
        let env = Provider::Aws
            .environment(&map(json!({
                "access_key_id": "AKIAABCDEFGHIJKLMNOP",
                "secret_access_key": "s3cr3t"
            })))
            .unwrap();
        assert_eq!(env.len(), 2);
        assert!(env.contains(&("AWS_SECRET_ACCESS_KEY", "s3cr3t".to_string())));
    }

    #[test]
    fn missing_unknown_and_malformed_fields_are_refused() {
        assert!(matches!(
            Provider::Azure.check(&map(json!({ "client_id": "x" }))),
            Err(CredentialError::MissingField { .. })
        ));
        assert!(matches!(
            Provider::Hetzner.check(&map(json!({ "token": "x", "tokn": "y" }))),
            Err(CredentialError::UnknownField { .. })
        ));
        assert!(matches!(
            Provider::Aws.check(&map(
                json!({ "access_key_id": "nope", "secret_access_key": "s" })
            )),
            Err(CredentialError::Malformed { .. })
        ));
        assert!(matches!(
            Provider::Gcp.check(&map(json!({ "credentials_json": "{}", "project": "p" }))),
            Err(CredentialError::Malformed { .. })
        ));
        assert!(Provider::Local.check(&Map::new()).is_ok());
        assert!(matches!(
            Provider::parse("openstack"),
            Err(CredentialError::UnknownProvider(_))
        ));
    }

    #[test]
    fn errors_never_repeat_a_credential_value() {
        let err = Provider::Aws
            .check(&map(
                json!({ "access_key_id": "AKIA-SECRET-VALUE", "secret_access_key": "hunter2" }),
            ))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains("SECRET-VALUE") && !text.contains("hunter2"),
            "{text}"
        );
    }
}
