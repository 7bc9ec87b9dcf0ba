-- Raw points in arrival order (issue 4, store cost per report).
--
-- `metrics` was a WITHOUT ROWID table clustered on (server_id, seq): every
-- report inserted a ~1 KB row in the middle of the table, on the page of its
-- server, so a transaction of N reports from N servers dirtied (and wrote to
-- the WAL) about N table pages, and split them as they filled. As a rowid
-- table the rows are appended at its end; the unique (server_id, seq) index
-- keeps a replay stored once and its entries are small, so many fit a page.
CREATE TABLE metrics_append (
    id INTEGER PRIMARY KEY,
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
    dropped_batches INTEGER NOT NULL DEFAULT 0
);
INSERT INTO metrics_append (server_id, seq, ts, received_at, cpu_percent, load_1, load_5, load_15,
    memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core, disks, networks,
    uptime_seconds, process_count, dropped_batches)
SELECT server_id, seq, ts, received_at, cpu_percent, load_1, load_5, load_15,
    memory_used_bytes, memory_total_bytes, swap_used_bytes, swap_total_bytes, cpu_per_core, disks, networks,
    uptime_seconds, process_count, dropped_batches
FROM metrics ORDER BY received_at, server_id, seq;
DROP TABLE metrics;
ALTER TABLE metrics_append RENAME TO metrics;
CREATE UNIQUE INDEX metrics_server_seq ON metrics (server_id, seq);
CREATE INDEX metrics_server_ts ON metrics (server_id, ts);
CREATE INDEX metrics_received ON metrics (received_at);
CREATE INDEX metrics_ts ON metrics (ts);

-- One B-tree per server's latest container report instead of a rowid table
-- and its primary-key index.
CREATE TABLE container_reports_by_server (
    server_id TEXT PRIMARY KEY REFERENCES servers (id),
    seq INTEGER NOT NULL,
    docker_version TEXT,
    error TEXT,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO container_reports_by_server (server_id, seq, docker_version, error, updated_at)
SELECT server_id, seq, docker_version, error, updated_at FROM container_reports;
DROP TABLE container_reports;
ALTER TABLE container_reports_by_server RENAME TO container_reports;
