-- Terraform state versions (issue 20): every state terraform writes (and
-- every restore) is kept as a version, the last 10 per deployment, sealed
-- under the master key with its own context (terraform-state-version/<id>),
-- with the SHA-256 of the plaintext, its size and terraform's serial.

CREATE TABLE terraform_state_versions (
    id uuid PRIMARY KEY,
    deployment_id uuid NOT NULL REFERENCES deployments (id),
    version bigint NOT NULL,
    state_sealed text NOT NULL,
    sha256 text NOT NULL,
    size_bytes bigint NOT NULL,
    serial bigint,
    -- The version this one restored, when it was made by a restore.
    restored_from bigint,
    created_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX terraform_state_versions_deployment ON terraform_state_versions (deployment_id, version);
