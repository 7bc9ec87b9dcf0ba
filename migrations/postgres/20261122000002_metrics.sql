-- Telemetry: raw metrics points (one per agent batch), rollups, latest
-- containers. Same tables and semantics as migrations/sqlite; times are
-- timestamptz, per-core/disk/network lists jsonb, gauges double precision.

CREATE TABLE metrics (
    server_id uuid NOT NULL REFERENCES servers (id),
    seq bigint NOT NULL,
    ts timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    cpu_percent double precision NOT NULL,
    load_1 double precision NOT NULL,
    load_5 double precision NOT NULL,
    load_15 double precision NOT NULL,
    memory_used_bytes bigint NOT NULL,
    memory_total_bytes bigint NOT NULL,
    swap_used_bytes bigint NOT NULL,
    swap_total_bytes bigint NOT NULL,
    cpu_per_core jsonb NOT NULL DEFAULT '[]',
    disks jsonb NOT NULL DEFAULT '[]',
    networks jsonb NOT NULL DEFAULT '[]',
    uptime_seconds bigint NOT NULL,
    process_count bigint NOT NULL,
    dropped_batches bigint NOT NULL DEFAULT 0,
    -- A replayed batch conflicts here and is skipped.
    PRIMARY KEY (server_id, seq)
);
-- Points of a server in a time range.
CREATE INDEX metrics_server_ts ON metrics (server_id, ts);
-- Points received since the rollup watermark.
CREATE INDEX metrics_received ON metrics (received_at);
-- Retention.
CREATE INDEX metrics_ts ON metrics (ts);

CREATE TABLE metric_rollups (
    server_id uuid NOT NULL REFERENCES servers (id),
    step_seconds bigint NOT NULL CHECK (step_seconds > 0),
    bucket_start timestamptz NOT NULL,
    samples bigint NOT NULL,
    cpu_percent_avg double precision NOT NULL,
    cpu_percent_max double precision NOT NULL,
    load_1_avg double precision NOT NULL,
    memory_used_bytes_avg double precision NOT NULL,
    memory_total_bytes bigint NOT NULL,
    swap_used_bytes_avg double precision NOT NULL,
    PRIMARY KEY (server_id, step_seconds, bucket_start)
);
-- Retention.
CREATE INDEX metric_rollups_bucket ON metric_rollups (step_seconds, bucket_start);

-- A server's latest container report; `seq` is the batch it came from.
CREATE TABLE container_reports (
    server_id uuid PRIMARY KEY REFERENCES servers (id),
    seq bigint NOT NULL,
    docker_version text,
    error text,
    updated_at timestamptz NOT NULL
);

-- The containers of each server's latest report.
CREATE TABLE containers (
    server_id uuid NOT NULL REFERENCES servers (id),
    container_id text NOT NULL,
    name text NOT NULL,
    image text NOT NULL,
    state text NOT NULL,
    health text,
    restart_count bigint NOT NULL,
    started_at text,
    cpu_percent double precision NOT NULL,
    memory_usage_bytes bigint NOT NULL,
    memory_limit_bytes bigint NOT NULL,
    net_rx_bytes bigint NOT NULL,
    net_tx_bytes bigint NOT NULL,
    block_read_bytes bigint NOT NULL,
    block_write_bytes bigint NOT NULL,
    PRIMARY KEY (server_id, container_id)
);

-- Progress of background jobs: `rollup:<step_seconds>` holds the
-- `received_at` up to which points have been rolled up.
CREATE TABLE job_state (
    name text PRIMARY KEY,
    watermark timestamptz NOT NULL
);
