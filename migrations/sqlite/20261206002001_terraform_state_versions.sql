-- Terraform state versions (issue 20): every state terraform writes (and
-- every restore) is kept as a version, the last 10 per deployment, sealed
-- under the master key with its own context (terraform-state-version/<id>),
-- with the SHA-256 of the plaintext, its size and terraform's serial.

CREATE TABLE terraform_state_versions (
    id TEXT PRIMARY KEY,
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    version INTEGER NOT NULL,
    state_sealed TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    serial INTEGER,
    -- The version this one restored, when it was made by a restore.
    restored_from INTEGER,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX terraform_state_versions_deployment ON terraform_state_versions (deployment_id, version);
