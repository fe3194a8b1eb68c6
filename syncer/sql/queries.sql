-- Named queries on syncer's own tables. Blocks start with "-- name --".

-- queue_claim --
-- Claim up to $2 ready items of pipeline $1 for worker $4, leased for $3 seconds.
-- The MATERIALIZED fence keeps the planner from locking more rows than the LIMIT.
WITH claimable AS MATERIALIZED (
    SELECT id FROM syncer.queue
    WHERE pipeline = $1
      AND not_before <= now()
      AND (leased_until IS NULL OR leased_until < now())
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE syncer.queue q
SET leased_until = now() + make_interval(secs => $3),
    leased_by = $4,
    attempts = q.attempts + 1
FROM claimable c
WHERE q.id = c.id
RETURNING q.id, q.key::text, q.attempts, extract(epoch FROM now() - q.enqueued_at)::float8;

-- inbox_move --
-- Up to $1 captured keys from the inbox to the queue in one statement, duplicates folded
-- (a row updated ten times since the last move is one item). SKIP LOCKED: workers move side
-- by side. Returns the items each pipeline got; the NOTIFY wakes claimers in other
-- processes once this commits. No row: the inbox was empty; taken < $1: it is now.
WITH moved AS (
    DELETE FROM syncer.inbox
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM syncer.inbox LIMIT $1 FOR UPDATE SKIP LOCKED))
    RETURNING pipeline, key
), queued AS (
    INSERT INTO syncer.queue (pipeline, key)
    SELECT DISTINCT pipeline, key FROM moved
    RETURNING pipeline
), counted AS (
    SELECT pipeline, count(*)::int AS queued FROM queued GROUP BY pipeline
)
SELECT c.pipeline, c.queued, (SELECT count(*) FROM moved)::int AS taken,
       (SELECT 1 FROM pg_notify('syncer', c.pipeline)) AS notified
FROM counted c;

-- inbox_may_vacuum --
-- Can this role VACUUM syncer.inbox (its owner, or MAINTAIN from PostgreSQL 17 on)?
SELECT CASE WHEN current_setting('server_version_num')::int >= 170000
            THEN has_table_privilege('syncer.inbox', 'MAINTAIN')
            ELSE pg_has_role((SELECT relowner FROM pg_class
                              WHERE oid = 'syncer.inbox'::regclass), 'USAGE') END;

-- awake_set --
-- Tell the capture triggers a worker is awake for $1 more seconds (0: asleep), on the
-- database's clock.
SELECT setval('syncer.awake_until',
              CASE WHEN $1::float8 > 0
                   THEN ceil(extract(epoch FROM clock_timestamp()) + $1::float8)::bigint
                   ELSE 0 END);

-- snapshot_now --
SELECT pg_current_snapshot()::text;

-- snapshot_passed --
-- Has every transaction in progress at snapshot $1 ended?
SELECT NOT EXISTS (
    SELECT FROM pg_snapshot_xip($1::text::pg_snapshot) AS x
    WHERE NOT pg_visible_in_snapshot(x, pg_current_snapshot())
);

-- queue_complete --
DELETE FROM syncer.queue WHERE id = ANY($1::bigint[]);

-- queue_release --
-- Soft stop: give unfinished items back at once, without counting the attempt.
UPDATE syncer.queue
SET leased_until = NULL, leased_by = NULL, attempts = greatest(attempts - 1, 0)
WHERE id = ANY($1::bigint[]) AND leased_by = $2;

-- queue_extend --
UPDATE syncer.queue
SET leased_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND leased_by = $2;

-- queue_retry --
-- Back to the queue after a failure, each item with its delay. An item that failed
-- through no fault of its own (a paused provider) does not spend an attempt.
UPDATE syncer.queue q
SET leased_until = NULL, leased_by = NULL,
    not_before = now() + make_interval(secs => r.delay_s),
    attempts = q.attempts - CASE WHEN r.counts THEN 0 ELSE 1 END,
    first_failed_at = coalesce(q.first_failed_at, now()),
    last_error = r.error
FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::boolean[]) AS r(id, delay_s, error, counts)
WHERE q.id = r.id;

-- dead_letter_insert --
-- Move items to the dead-letter table in the statement that removes them from the queue.
WITH failed AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, error_class, error)
), moved AS (
    DELETE FROM syncer.queue q USING failed f WHERE q.id = f.id
    RETURNING q.pipeline, q.key, q.attempts, q.first_failed_at, f.error_class, f.error
)
INSERT INTO syncer.dead_letters
    (pipeline, key, error_class, error, attempts, first_failed_at, last_failed_at)
SELECT pipeline, key, error_class, error, attempts, coalesce(first_failed_at, now()), now()
FROM moved;

-- queue_pending --
-- How many items of these pipelines are still captured, queued, leased or waiting for a retry.
SELECT (SELECT count(*) FROM syncer.queue WHERE pipeline = ANY($1::text[]))
     + (SELECT count(*) FROM syncer.inbox WHERE pipeline = ANY($1::text[]));

-- queue_next_ready --
-- Seconds until the next item of these pipelines can be claimed (NULL: none queued).
SELECT extract(epoch FROM min(greatest(not_before, coalesce(leased_until, not_before))) - now())
FROM syncer.queue WHERE pipeline = ANY($1::text[]);

-- pipeline_register --
INSERT INTO syncer.pipelines
    (name, source_table, target, config_hash, fingerprint, created_column, created_table)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET
    source_table = EXCLUDED.source_table,
    target = EXCLUDED.target,
    config_hash = EXCLUDED.config_hash,
    fingerprint = EXCLUDED.fingerprint,
    created_column = syncer.pipelines.created_column OR EXCLUDED.created_column,
    created_table = syncer.pipelines.created_table OR EXCLUDED.created_table,
    updated_at = CASE WHEN syncer.pipelines.config_hash = EXCLUDED.config_hash
                      THEN syncer.pipelines.updated_at ELSE now() END;

-- pipeline_get --
SELECT name, source_table, target, config_hash, fingerprint, created_column, created_table
FROM syncer.pipelines WHERE name = $1;

-- pipeline_delete --
DELETE FROM syncer.pipelines WHERE name = $1;

-- dead_letter_select --
-- The dead letters matching the filters (NULL: any), oldest first.
SELECT id, pipeline, key::text, error_class, error, attempts, first_failed_at, last_failed_at
FROM syncer.dead_letters
WHERE ($1::text IS NULL OR pipeline = $1)
  AND ($2::text IS NULL OR error_class = $2)
  AND ($3::timestamptz IS NULL OR last_failed_at >= $3)
ORDER BY id
LIMIT $4;

-- dead_letter_replay --
-- Move matching dead letters back to the queue, as fresh items, in one statement.
WITH picked AS (
    SELECT id FROM syncer.dead_letters
    WHERE ($1::text IS NULL OR pipeline = $1)
      AND ($2::text IS NULL OR error_class = $2)
      AND ($3::timestamptz IS NULL OR last_failed_at >= $3)
    ORDER BY id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM syncer.dead_letters d USING picked p WHERE d.id = p.id
    RETURNING d.pipeline, d.key
)
INSERT INTO syncer.queue (pipeline, key)
SELECT pipeline, key FROM moved
RETURNING pipeline;

-- dead_letter_counts --
SELECT pipeline, error_class, count(*) AS n, max(last_failed_at) AS newest
FROM syncer.dead_letters
GROUP BY pipeline, error_class
ORDER BY pipeline, error_class;

-- dead_letter_newest --
SELECT pipeline, key::text, error_class, error, attempts, last_failed_at
FROM syncer.dead_letters
WHERE ($1::text IS NULL OR pipeline = $1)
ORDER BY id DESC
LIMIT $2;

-- queue_gauges --
-- One pipeline a row: its queue by state, the age of its oldest ready item and its dead
-- letters, for /metrics and /readyz; run every few seconds by each process (monitor.Sampler),
-- never per scrape. Captured keys still in the inbox count as ready.
SELECT p.name,
       count(q.id) FILTER (WHERE q.not_before <= now()
                             AND (q.leased_until IS NULL OR q.leased_until < now()))
         + (SELECT count(*) FROM syncer.inbox i WHERE i.pipeline = p.name) AS ready,
       count(q.id) FILTER (WHERE q.leased_until >= now()) AS leased,
       count(q.id) FILTER (WHERE q.not_before > now()
                             AND (q.leased_until IS NULL OR q.leased_until < now())) AS delayed,
       coalesce(extract(epoch FROM now() - min(q.enqueued_at) FILTER (
           WHERE q.not_before <= now() AND (q.leased_until IS NULL OR q.leased_until < now())
       )), 0)::float8 AS oldest_s,
       (SELECT count(*) FROM syncer.dead_letters d WHERE d.pipeline = p.name) AS dead_letters
FROM syncer.pipelines p LEFT JOIN syncer.queue q ON q.pipeline = p.name
GROUP BY p.name ORDER BY p.name;
