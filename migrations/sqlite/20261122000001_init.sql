-- Tether control plane schema, SQLite flavour.
-- Ids are UUID text; times are INTEGER unix milliseconds (UTC); JSON is TEXT.

CREATE TABLE instance (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    branch_id TEXT NOT NULL,
    branch_name TEXT NOT NULL,
    root_organization_id TEXT NOT NULL,
    ca_cert_pem TEXT NOT NULL,
    ca_key_sealed TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    parent_id TEXT REFERENCES organizations (id),
    max_servers INTEGER,
    max_cpu_cores INTEGER,
    max_memory_gb INTEGER,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX organizations_parent ON organizations (parent_id);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    server_name TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    deployment_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    server_id TEXT
);

CREATE TABLE servers (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('connecting', 'online', 'offline', 'timeout')),
    status_reason TEXT,
    agent_version TEXT,
    facts TEXT NOT NULL DEFAULT '{}',
    deployment_id TEXT,
    created_at INTEGER NOT NULL,
    last_seen_at INTEGER,
    deleted_at INTEGER
);
CREATE INDEX servers_organization ON servers (organization_id, id);
CREATE INDEX servers_status ON servers (status, last_seen_at);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    server_id TEXT NOT NULL REFERENCES servers (id),
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX certificates_server ON certificates (server_id);

CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    organization_id TEXT,
    action TEXT NOT NULL,
    target TEXT,
    source_ip TEXT,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
