-- Branch federation: invites, peerings, JWT signing keys, remote inventory.

-- One-time invites this branch made (only the secret's hash is stored).
CREATE TABLE branch_invites (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT
);

-- Peer branches (id: the peer's branch id).
CREATE TABLE branch_peers (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    ca_cert_pem TEXT NOT NULL,
    client_chain TEXT NOT NULL,
    client_key_sealed TEXT NOT NULL,
    peer_keys TEXT NOT NULL,
    granted_scopes TEXT NOT NULL,
    remote_scopes TEXT NOT NULL,
    remote_organization_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('healthy', 'degraded', 'unreachable')),
    last_seen_at INTEGER,
    latency_ms INTEGER,
    server_count INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE INDEX branch_peers_organization ON branch_peers (organization_id, id);

-- This branch's ES256 keys signing inter-branch JWTs.
CREATE TABLE federation_keys (
    kid TEXT PRIMARY KEY,
    private_key_sealed TEXT NOT NULL,
    x TEXT NOT NULL,
    y TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);

-- The servers peers published, as last synced.
CREATE TABLE remote_servers (
    branch_id TEXT NOT NULL REFERENCES branch_peers (id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    last_seen_at INTEGER,
    agent_version TEXT,
    cpu_percent REAL,
    memory_used_bytes INTEGER,
    memory_total_bytes INTEGER,
    synced_at INTEGER NOT NULL,
    PRIMARY KEY (branch_id, id)
);
