-- Version 1: syncer's schema, its registry of pipelines, the queue and the dead letters.
-- Per-pipeline objects (text/hash functions, capture triggers) live in pipeline.sql.
-- (IF NOT EXISTS as it shipped, when this was all of schema.sql.)

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

-- Insert-only for producers: a user's write never waits on a worker's row lock.
-- No foreign key and few indexes: every captured row costs one insert here.
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
