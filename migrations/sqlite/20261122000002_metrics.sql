-- Telemetry: raw metrics points (one per agent batch), rollups, latest containers.

CREATE TABLE metrics (
    server_id TEXT NOT NULL REFERENCES servers (id),
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    cpu_percent REAL NOT NULL,
    load_1 REAL NOT NULL,
    load_5 REAL NOT NULL,
    load_15 REAL NOT NULL,
    memory_used_bytes INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    swap_used_bytes INTEGER NOT NULL,
    swap_total_bytes INTEGER NOT NULL,
    cpu_per_core TEXT NOT NULL DEFAULT '[]',
    disks TEXT NOT NULL DEFAULT '[]',
    networks TEXT NOT NULL DEFAULT '[]',
    uptime_seconds INTEGER NOT NULL,
    process_count INTEGER NOT NULL,
    dropped_batches INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (server_id, seq)
) WITHOUT ROWID;
CREATE INDEX metrics_server_ts ON metrics (server_id, ts);
CREATE INDEX metrics_received ON metrics (received_at);
CREATE INDEX metrics_ts ON metrics (ts);

CREATE TABLE metric_rollups (
    server_id TEXT NOT NULL REFERENCES servers (id),
    step_seconds INTEGER NOT NULL,
    bucket_start INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    cpu_percent_avg REAL NOT NULL,
    cpu_percent_max REAL NOT NULL,
    load_1_avg REAL NOT NULL,
    memory_used_bytes_avg REAL NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    swap_used_bytes_avg REAL NOT NULL,
    PRIMARY KEY (server_id, step_seconds, bucket_start)
) WITHOUT ROWID;
CREATE INDEX metric_rollups_bucket ON metric_rollups (step_seconds, bucket_start);

CREATE TABLE container_reports (
    server_id TEXT PRIMARY KEY REFERENCES servers (id),
    seq INTEGER NOT NULL,
    docker_version TEXT,
    error TEXT,
    updated_at INTEGER NOT NULL
);

CREATE TABLE containers (
    server_id TEXT NOT NULL REFERENCES servers (id),
    container_id TEXT NOT NULL,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    health TEXT,
    restart_count INTEGER NOT NULL,
    started_at TEXT,
    cpu_percent REAL NOT NULL,
    memory_usage_bytes INTEGER NOT NULL,
    memory_limit_bytes INTEGER NOT NULL,
    net_rx_bytes INTEGER NOT NULL,
    net_tx_bytes INTEGER NOT NULL,
    block_read_bytes INTEGER NOT NULL,
    block_write_bytes INTEGER NOT NULL,
    PRIMARY KEY (server_id, container_id)
) WITHOUT ROWID;

-- Progress of background jobs (e.g. the rollup watermark).
CREATE TABLE job_state (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
