-- Branch federation: invites, peerings, JWT signing keys, remote inventory.

-- One-time invites this branch made (only the secret's hash is stored).
CREATE TABLE branch_invites (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    secret_hash text NOT NULL,
    scopes text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    used_by text
);

-- Peer branches (id: the peer's branch id).
CREATE TABLE branch_peers (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name text NOT NULL,
    address text NOT NULL,
    ca_cert_pem text NOT NULL,
    client_chain text NOT NULL,
    client_key_sealed text NOT NULL,
    peer_keys text NOT NULL,
    granted_scopes text NOT NULL,
    remote_scopes text NOT NULL,
    remote_organization_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('healthy', 'degraded', 'unreachable')),
    last_seen_at timestamptz,
    latency_ms bigint,
    server_count bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL
);
CREATE INDEX branch_peers_organization ON branch_peers (organization_id, id);

-- This branch's ES256 keys signing inter-branch JWTs.
CREATE TABLE federation_keys (
    kid uuid PRIMARY KEY,
    private_key_sealed text NOT NULL,
    x text NOT NULL,
    y text NOT NULL,
    created_at timestamptz NOT NULL,
    retired_at timestamptz
);

-- The servers peers published, as last synced.
CREATE TABLE remote_servers (
    branch_id uuid NOT NULL REFERENCES branch_peers (id) ON DELETE CASCADE,
    id uuid NOT NULL,
    name text NOT NULL,
    hostname text NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL,
    last_seen_at timestamptz,
    agent_version text,
    cpu_percent double precision,
    memory_used_bytes bigint,
    memory_total_bytes bigint,
    synced_at timestamptz NOT NULL,
    PRIMARY KEY (branch_id, id)
);
