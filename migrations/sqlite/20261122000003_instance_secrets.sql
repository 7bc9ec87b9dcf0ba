-- Random secrets of the instance (API token signing key, QUIC reset key),
-- sealed under the master key so that rotating the master key keeps them.
CREATE TABLE instance_secrets (
    name TEXT PRIMARY KEY,
    sealed TEXT NOT NULL
);
