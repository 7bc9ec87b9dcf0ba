-- Provisioning: cloud credentials (sealed), deployments (each one a
-- persisted job with a lease), their event log (SSE), and the Terraform
-- state behind the HTTP backend (sealed, with its lock).

CREATE TABLE cloud_credentials (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    provider text NOT NULL,
    default_region text,
    credentials_sealed text NOT NULL,
    is_validated boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    last_used_at timestamptz,
    deleted_at timestamptz
);
CREATE INDEX cloud_credentials_organization ON cloud_credentials (organization_id, id);

CREATE TABLE deployments (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    provider text NOT NULL,
    credential_id uuid REFERENCES cloud_credentials (id),
    status text NOT NULL,
    server_id uuid,
    -- What the job knows (request, steps, outputs, errors).
    record jsonb NOT NULL,
    -- The bootstrap token, sealed, while the deployment may still need to
    -- render its user-data again (resume after a restart); cleared after.
    bootstrap_token_sealed text,
    claimed_by text,
    lease_until timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    completed_at timestamptz,
    deleted_at timestamptz
);
CREATE INDEX deployments_organization ON deployments (organization_id, id);
CREATE INDEX deployments_status ON deployments (status, lease_until);

CREATE TABLE deployment_events (
    seq bigserial PRIMARY KEY,
    deployment_id uuid NOT NULL REFERENCES deployments (id),
    at timestamptz NOT NULL,
    kind text NOT NULL,
    body jsonb NOT NULL
);
CREATE INDEX deployment_events_deployment ON deployment_events (deployment_id, seq);

CREATE TABLE terraform_states (
    deployment_id uuid PRIMARY KEY REFERENCES deployments (id),
    state_sealed text,
    lock_id text,
    lock_info jsonb,
    updated_at timestamptz NOT NULL
);
