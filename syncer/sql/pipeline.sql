-- Per-pipeline SQL. Placeholders in braces are filled by syncer/schema/render.py with quoted
-- identifiers and literals (psycopg.sql), never with raw strings from the config; each
-- target fills its own ({target_join}, {stored_hash}) and has its statements in targets/.
-- The text of a row is composed and hashed here, in one place: the capture triggers,
-- the worker's reads, the hash guard on writes and the backfill all call these functions.

-- text_function --
CREATE OR REPLACE FUNCTION {text_fn}(s {src}) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN NULLIF(pg_catalog.concat_ws(E'\n\n', {text_parts}), '');

-- hash_function --
-- The fingerprint (model, dimensions, vector type, text columns) is part of the hash,
-- so a change of model makes every stored vector stale. {hash_extra}: the columns a chunk
-- template names beside the text (empty for other targets).
CREATE OR REPLACE FUNCTION {hash_fn}(s {src}) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
RETURN pg_catalog.sha256(pg_catalog.convert_to({fingerprint} || {text_fn}(s){hash_extra}, 'UTF8'));

-- capture_insert_function --
-- Statement-level: one INSERT … SELECT into the inbox for the whole statement, however
-- many rows it wrote. The NOTIFY is skipped while a worker is awake (see syncer.awake_until).
CREATE OR REPLACE FUNCTION {capture_insert_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    INSERT INTO syncer.inbox (pipeline, key)
    SELECT {pipeline}, {key_json_n} FROM syncer_new n WHERE {has_text_n};
    IF FOUND AND {nobody_awake} THEN
        PERFORM pg_notify('syncer_inbox', {pipeline});
    END IF;
    RETURN NULL;
END
$syncer$;

-- capture_update_function --
-- Row-level, behind the trigger's WHEN: an UPDATE that leaves the text columns and the key
-- alone (an unrelated column, syncer's own vector writes) never calls it and captures
-- nothing, not even a transition table. A key change queues the old key too (its vector
-- must go). syncer.writing guards against a user's BEFORE trigger that rewrites the text
-- on every update, which would otherwise make each vector write queue the row again.
CREATE OR REPLACE FUNCTION {capture_update_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    IF current_setting('syncer.writing', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO syncer.inbox (pipeline, key) VALUES ({pipeline}, {key_json_new});
    IF {key_changed} THEN
        INSERT INTO syncer.inbox (pipeline, key) VALUES ({pipeline}, {key_json_old});
    END IF;
    IF {nobody_awake} THEN
        PERFORM pg_notify('syncer_inbox', {pipeline});
    END IF;
    RETURN NULL;
END
$syncer$;

-- capture_delete_function --
CREATE OR REPLACE FUNCTION {capture_delete_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    INSERT INTO syncer.inbox (pipeline, key) SELECT {pipeline}, {key_json_o} FROM syncer_old o;
    IF FOUND AND {nobody_awake} THEN
        PERFORM pg_notify('syncer_inbox', {pipeline});
    END IF;
    RETURN NULL;
END
$syncer$;

-- capture_insert_row_function --
-- Partitioned tables: an UPDATE that moves a row to another partition fires neither the
-- UPDATE row triggers nor the statement-level INSERT and DELETE ones, only the row-level
-- INSERT (on the new partition) and DELETE (on the old): so there, those are row-level.
CREATE OR REPLACE FUNCTION {capture_insert_row_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    IF {has_text_new} THEN
        INSERT INTO syncer.inbox (pipeline, key) VALUES ({pipeline}, {key_json_new});
        IF {nobody_awake} THEN
            PERFORM pg_notify('syncer_inbox', {pipeline});
        END IF;
    END IF;
    RETURN NULL;
END
$syncer$;

-- capture_delete_row_function --
CREATE OR REPLACE FUNCTION {capture_delete_row_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    INSERT INTO syncer.inbox (pipeline, key) VALUES ({pipeline}, {key_json_old});
    IF {nobody_awake} THEN
        PERFORM pg_notify('syncer_inbox', {pipeline});
    END IF;
    RETURN NULL;
END
$syncer$;

-- capture_insert_row_trigger --
DROP TRIGGER IF EXISTS {insert_trigger} ON {src};
CREATE TRIGGER {insert_trigger} AFTER INSERT ON {src}
FOR EACH ROW EXECUTE FUNCTION {capture_insert_row_fn}();

-- capture_delete_row_trigger --
DROP TRIGGER IF EXISTS {delete_trigger} ON {src};
CREATE TRIGGER {delete_trigger} AFTER DELETE ON {src}
FOR EACH ROW EXECUTE FUNCTION {capture_delete_row_fn}();

-- capture_insert_trigger --
CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON {src}
REFERENCING NEW TABLE AS syncer_new
FOR EACH STATEMENT EXECUTE FUNCTION {capture_insert_fn}();

-- capture_update_trigger --
-- Dropped first: version 1 made this a statement-level trigger.
DROP TRIGGER IF EXISTS {update_trigger} ON {src};
CREATE TRIGGER {update_trigger} AFTER UPDATE ON {src}
FOR EACH ROW WHEN ({text_or_key_changed}) EXECUTE FUNCTION {capture_update_fn}();

-- capture_delete_trigger --
CREATE OR REPLACE TRIGGER {delete_trigger} AFTER DELETE ON {src}
REFERENCING OLD TABLE AS syncer_old
FOR EACH STATEMENT EXECUTE FUNCTION {capture_delete_fn}();

-- capture_truncate_function --
-- TRUNCATE of the source: its queued work is moot, and a side table is emptied with it, in
-- the user's transaction (inbox rows are deleted too: the keys are gone).
CREATE OR REPLACE FUNCTION {capture_truncate_fn}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $syncer$
BEGIN
    {target_truncate}
    DELETE FROM syncer.inbox WHERE pipeline = {pipeline};
    DELETE FROM syncer.queue WHERE pipeline = {pipeline};
    RETURN NULL;
END
$syncer$;

-- capture_truncate_trigger --
CREATE OR REPLACE TRIGGER {truncate_trigger} AFTER TRUNCATE ON {src}
FOR EACH STATEMENT EXECUTE FUNCTION {capture_truncate_fn}();

-- pipeline_truncate --
-- Logical mode: the slot said the source was truncated (before the keys read after it).
{target_truncate}
DELETE FROM syncer.queue WHERE pipeline = {pipeline};

-- logical_enqueue --
-- Logical mode: keys read from the slot, each column in its text form, typed and built
-- exactly as the triggers build them (the same row is the same key in either mode).
INSERT INTO syncer.queue AS q (pipeline, key)
SELECT DISTINCT {pipeline}, {key_json_r}
FROM unnest($1::jsonb[]) AS k(key) CROSS JOIN LATERAL jsonb_to_record(k.key) AS r({key_defs})
ON CONFLICT (pipeline, key, lane) DO UPDATE SET dirty = true WHERE q.leased_by IS NOT NULL;

-- rows_fetch --
-- For each key: does the row exist, its current text and hash, and the stored hash.
-- The LATERAL subquery (OFFSET 0 keeps the planner from flattening it) probes the key
-- index once per key: a join the planner may choose instead reads the whole table for a
-- batch of a few hundred keys once the table has some thousand rows.
-- {row_extra}: a chunk template's columns (NULL for other targets).
SELECT k.key::text, f.present IS NOT NULL, f.text, f.hash, f.stored, f.extra
FROM unnest($1::jsonb[]) AS k(key)
CROSS JOIN LATERAL jsonb_to_record(k.key) AS r({key_defs})
LEFT JOIN LATERAL (
    SELECT true AS present, {text_fn}(s) AS text, {hash_fn}(s) AS hash, {stored_hash} AS stored,
           {row_extra} AS extra
    FROM {src} s {target_join}
    WHERE {key_eq_s_r}
    OFFSET 0
) f ON true;

-- backfill_page --
-- One keyset page: enqueue the rows whose vector is missing or stale (all with $3), in the
-- bulk lane; a key already there is not queued twice.
WITH page AS (
    SELECT {key_cols_s}, {stored_hash} IS DISTINCT FROM {hash_fn}(s) AS stale
    FROM {src} s {target_join}
    WHERE {after}
    ORDER BY {key_cols_s}
    LIMIT $2
), enqueued AS (
    INSERT INTO syncer.queue (pipeline, key, lane)
    SELECT {pipeline}, {key_json_p}, 1 FROM page p WHERE $3 OR p.stale
    ON CONFLICT (pipeline, key, lane) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM enqueued),
       (SELECT count(*) FROM page),
       (SELECT {key_json_p} FROM page p ORDER BY {key_cols_p_desc} LIMIT 1)::text;

-- coverage --
-- For `syncer status`: rows, rows with text, and of those the current (stored hash = the
-- text's), the missing (no vector) and, by difference, the stale. $1: the percentage of
-- the table's pages read (TABLESAMPLE SYSTEM; 100 reads all): a plain MVCC read, no lock
-- beyond ACCESS SHARE, and a bounded cost on a large table (see syncer/status.py).
SELECT count(*) AS rows,
       count(*) FILTER (WHERE {text_fn}(s) IS NOT NULL) AS with_text,
       count(*) FILTER (WHERE {text_fn}(s) IS NOT NULL
                          AND {stored_hash} = {hash_fn}(s)) AS current,
       count(*) FILTER (WHERE {text_fn}(s) IS NOT NULL AND {stored_hash} IS NULL) AS missing
FROM {src} s TABLESAMPLE SYSTEM ($1) {target_join};

-- coverage_estimate --
-- The planner's row estimate of the source table (kept by ANALYZE and autovacuum).
SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c WHERE c.oid = {src_literal}::regclass;
