-- The whole current schema of syncer's own objects (version 2). Idempotent: running it
-- over version 1 upgrades it.
-- Per-pipeline objects (text/hash functions, capture triggers) live in pipeline.sql.

CREATE SCHEMA IF NOT EXISTS syncer;

CREATE TABLE IF NOT EXISTS syncer.schema_version (
    version      integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS syncer.pipelines (
    name           text PRIMARY KEY,
    source_table   text NOT NULL,
    target         text NOT NULL,
    config_hash    text NOT NULL,
    fingerprint    text NOT NULL,
    -- what install created, so that uninstall removes exactly that and no user data
    created_column boolean NOT NULL DEFAULT false,
    created_table  boolean NOT NULL DEFAULT false,
    installed_at   timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Where the capture triggers put keys, inside the user's transaction. Built to make that
-- insert as cheap as an insert can be: no index, no identity, no defaults, no foreign key.
-- Workers move its rows to syncer.queue in bulk (inbox_move) and work from there.
CREATE TABLE IF NOT EXISTS syncer.inbox (
    pipeline text NOT NULL,
    key      jsonb NOT NULL
);
-- Every row is deleted soon after its insert, and each move scans the table: dead rows left
-- to pile up make every move slower. Workers VACUUM it as they go (capture.InboxMover);
-- autovacuum's thresholds are for a worker whose role may not.
ALTER TABLE syncer.inbox SET (autovacuum_vacuum_scale_factor = 0,
                              autovacuum_vacuum_threshold = 10000);

-- Until when (epoch seconds) some worker is awake and will look at the inbox again before
-- it sleeps; 0: none is. A sequence because setval is seen by every session at once,
-- outside transactions, and reading it takes no lock: the triggers read it to skip a
-- NOTIFY (and its commit-time lock) while a worker is draining anyway.
CREATE SEQUENCE IF NOT EXISTS syncer.awake_until MINVALUE 0 START 0;

-- Leases, retries and attempts: the worker's side. Users' writes never touch it.
CREATE TABLE IF NOT EXISTS syncer.queue (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline        text NOT NULL,
    key             jsonb NOT NULL,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    not_before      timestamptz NOT NULL DEFAULT '-infinity',
    leased_until    timestamptz,
    leased_by       text,
    first_failed_at timestamptz,
    last_error      text
);
CREATE INDEX IF NOT EXISTS queue_pipeline_id ON syncer.queue (pipeline, id);
-- An item is updated once (its claim), then deleted: room left on its page makes the claim
-- a HOT update, with no new index entries (about 2 µs less database CPU an item).
ALTER TABLE syncer.queue SET (fillfactor = 50);

CREATE TABLE IF NOT EXISTS syncer.dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline        text NOT NULL,
    key             jsonb NOT NULL,
    error_class     text NOT NULL,
    error           text NOT NULL,
    attempts        integer NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_pipeline ON syncer.dead_letters (pipeline, error_class);

INSERT INTO syncer.schema_version (version) VALUES (2) ON CONFLICT DO NOTHING;
