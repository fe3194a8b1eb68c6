-- Named queries on syncer's own tables. Blocks start with "-- name --".

-- queue_claim --
-- Claim ready items of pipeline $1 for worker $4, leased for $3 seconds: up to $2 in all,
-- live first, but up to $5 of them bulk first (the bulk lane's guaranteed share), and what
-- live leaves over bulk again. A key another worker holds a live lease on is skipped: its
-- text is being embedded now, and a second claim would pay for it again. A key this worker
-- holds is not: an edit of a row whose bulk item is in flight is claimed at once (the
-- worker's own in-flight table joins it to a running embedding of the same text).
-- The MATERIALIZED fences keep the planner from locking more rows than each LIMIT.
WITH bulk AS MATERIALIZED (
    SELECT id, key FROM syncer.queue q
    WHERE pipeline = $1 AND lane = 1
      AND not_before <= now() AND (leased_until IS NULL OR leased_until < now())
      AND NOT EXISTS (SELECT FROM syncer.queue o
                      WHERE o.pipeline = q.pipeline AND o.key = q.key AND o.leased_until > now()
                        AND o.leased_by <> $4)
    ORDER BY id
    LIMIT $5
    FOR UPDATE SKIP LOCKED
), live AS MATERIALIZED (
    SELECT id, key FROM syncer.queue q
    WHERE pipeline = $1 AND lane = 0
      AND not_before <= now() AND (leased_until IS NULL OR leased_until < now())
      AND NOT EXISTS (SELECT FROM syncer.queue o
                      WHERE o.pipeline = q.pipeline AND o.key = q.key AND o.leased_until > now()
                        AND o.leased_by <> $4)
    ORDER BY id
    LIMIT $2 - (SELECT count(*) FROM bulk)
    FOR UPDATE SKIP LOCKED
), more AS MATERIALIZED (
    SELECT id, key FROM syncer.queue q
    WHERE pipeline = $1 AND lane = 1 AND id > (SELECT coalesce(max(id), 0) FROM bulk)
      AND not_before <= now() AND (leased_until IS NULL OR leased_until < now())
      AND NOT EXISTS (SELECT FROM syncer.queue o
                      WHERE o.pipeline = q.pipeline AND o.key = q.key AND o.leased_until > now()
                        AND o.leased_by <> $4)
    ORDER BY id
    LIMIT $2 - (SELECT count(*) FROM bulk) - (SELECT count(*) FROM live)
    FOR UPDATE SKIP LOCKED
), picked AS MATERIALIZED (
    SELECT id, key FROM bulk UNION ALL SELECT id, key FROM live UNION ALL SELECT id, key FROM more
), others AS MATERIALIZED (
    -- The picked keys' other items, as this statement's snapshot sees them. The check above
    -- misses a claim that commits after that snapshot: both would embed the key's text.
    SELECT o.id, o.key FROM syncer.queue o
    WHERE o.pipeline = $1 AND o.key IN (SELECT key FROM picked)
      AND o.id NOT IN (SELECT id FROM picked)
), held AS MATERIALIZED (
    -- Locked on their newest version: a claim still running holds its item's lock, one
    -- committed since the snapshot shows its lease here; either leaves the key out.
    SELECT o.id FROM syncer.queue o
    WHERE o.id IN (SELECT id FROM others)
      AND (o.leased_until IS NULL OR o.leased_until < now() OR o.leased_by = $4)
    FOR UPDATE SKIP LOCKED
), claimable AS (
    SELECT p.id FROM picked p
    WHERE NOT EXISTS (SELECT FROM others s
                      WHERE s.key = p.key AND s.id NOT IN (SELECT id FROM held))
)
UPDATE syncer.queue q
SET leased_until = now() + make_interval(secs => $3),
    leased_by = $4,
    attempts = q.attempts + 1
FROM claimable c
WHERE q.id = c.id
RETURNING q.id, q.key::text, q.attempts, q.lane, extract(epoch FROM now() - q.enqueued_at)::float8;

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
    INSERT INTO syncer.queue AS q (pipeline, key)
    SELECT DISTINCT pipeline, key FROM moved
    ON CONFLICT (pipeline, key, lane) DO UPDATE SET dirty = true WHERE q.leased_by IS NOT NULL
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
-- Inside the write transaction. An item captured again while it was worked on (dirty) goes
-- back to the queue, fresh: its worker may have read the text before that change.
WITH done AS (
    DELETE FROM syncer.queue WHERE id = ANY($1::bigint[]) AND NOT dirty
)
UPDATE syncer.queue
SET dirty = false, leased_until = NULL, leased_by = NULL, attempts = 0,
    not_before = '-infinity', first_failed_at = NULL, last_error = NULL
WHERE id = ANY($1::bigint[]) AND dirty;

-- queue_mark_dirty --
-- Inside a write transaction, before queue_complete: these items run again, afresh.
UPDATE syncer.queue SET dirty = true WHERE id = ANY($1::bigint[]);

-- queue_release --
-- Soft stop: give unfinished items back at once, without counting the attempt.
UPDATE syncer.queue
SET leased_until = NULL, leased_by = NULL, attempts = greatest(attempts - 1, 0), dirty = false
WHERE id = ANY($1::bigint[]) AND leased_by = $2;

-- queue_extend --
UPDATE syncer.queue
SET leased_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND leased_by = $2;

-- queue_retry --
-- Back to the queue after a failure, each item with its delay. An item that failed
-- through no fault of its own (a paused provider) does not spend an attempt. One captured
-- again meanwhile (dirty) holds a new text: no delay for it.
UPDATE syncer.queue q
SET leased_until = NULL, leased_by = NULL, dirty = false,
    not_before = CASE WHEN q.dirty THEN now() ELSE now() + make_interval(secs => r.delay_s) END,
    attempts = q.attempts - CASE WHEN r.counts THEN 0 ELSE 1 END,
    first_failed_at = coalesce(q.first_failed_at, now()),
    last_error = r.error
FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::boolean[]) AS r(id, delay_s, error, counts)
WHERE q.id = r.id;

-- dead_letter_insert --
-- Move items to the dead-letter table in the statement that removes them from the queue;
-- one dead letter per key: a key that fails again updates its own. An item captured again
-- while it failed (dirty) holds a new text: it goes back to the queue, fresh, instead.
WITH failed AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, error_class, error)
), moved AS (
    DELETE FROM syncer.queue q USING failed f WHERE q.id = f.id AND NOT q.dirty
    RETURNING q.pipeline, q.key, q.attempts, q.first_failed_at, f.error_class, f.error
), fresh AS (
    UPDATE syncer.queue q
    SET dirty = false, leased_until = NULL, leased_by = NULL, attempts = 0,
        not_before = '-infinity', first_failed_at = NULL, last_error = NULL
    FROM failed f WHERE q.id = f.id AND q.dirty
)
INSERT INTO syncer.dead_letters AS d
    (pipeline, key, error_class, error, attempts, first_failed_at, last_failed_at)
SELECT pipeline, key, error_class, error, attempts, coalesce(first_failed_at, now()), now()
FROM moved
ON CONFLICT (pipeline, key) DO UPDATE
SET error_class = EXCLUDED.error_class, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
    first_failed_at = least(d.first_failed_at, EXCLUDED.first_failed_at),
    last_failed_at = EXCLUDED.last_failed_at, times_failed = d.times_failed + 1;

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
-- Move matching dead letters back to the queue, as fresh items of the bulk lane, in one
-- statement (a key already waiting there is not queued twice).
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
INSERT INTO syncer.queue (pipeline, key, lane)
SELECT pipeline, key, 1 FROM moved
ON CONFLICT (pipeline, key, lane) DO NOTHING
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
       (SELECT count(*) FROM syncer.dead_letters d WHERE d.pipeline = p.name) AS dead_letters,
       p.paused_at IS NOT NULL AS paused
FROM syncer.pipelines p LEFT JOIN syncer.queue q ON q.pipeline = p.name
GROUP BY p.name ORDER BY p.name;

-- runner_seen --
-- A process is alive ($1 its worker id, $2 its pipelines), and each of them ($3) last
-- committed a vector at $4 (NULL: not since the last time); runners gone an hour are dropped.
WITH seen AS (
    INSERT INTO syncer.runners (worker_id, pipelines) VALUES ($1, $2)
    ON CONFLICT (worker_id) DO UPDATE SET seen_at = now(), pipelines = EXCLUDED.pipelines
), gone AS (
    DELETE FROM syncer.runners WHERE seen_at < now() - interval '1 hour'
)
UPDATE syncer.pipelines p
SET last_write_at = greatest(p.last_write_at, w.at)
FROM unnest($3::text[], $4::timestamptz[]) AS w(name, at)
WHERE p.name = w.name AND w.at IS NOT NULL;

-- runner_gone --
DELETE FROM syncer.runners WHERE worker_id = $1;

-- status_pipelines --
-- `syncer status`: each pipeline's pause, last write and the runners seen in the last 30 s.
SELECT p.name, p.paused_at IS NOT NULL AS paused, p.paused_at, p.last_write_at,
       coalesce(array(SELECT r.worker_id FROM syncer.runners r
                      WHERE p.name = ANY (r.pipelines) AND r.seen_at > now() - interval '30 s'
                      ORDER BY r.worker_id), '{}') AS runners
FROM syncer.pipelines p ORDER BY p.name;

-- pipeline_pause --
-- `syncer pause`: $1 the pipelines, $2 who paused them. A pipeline already paused keeps its
-- first pause. The NOTIFY reaches every replica when the transaction commits (and their
-- poll reads the state in any case): capture goes on, claims stop.
WITH paused AS (
    UPDATE syncer.pipelines
    SET paused_at = coalesce(paused_at, now()), paused_by = coalesce(paused_by, $2)
    WHERE name = ANY($1::text[])
    RETURNING name
)
SELECT name, pg_notify('syncer_control', 'pause:' || name) FROM paused ORDER BY name;

-- pipeline_resume --
WITH resumed AS (
    UPDATE syncer.pipelines SET paused_at = NULL, paused_by = NULL
    WHERE name = ANY($1::text[])
    RETURNING name
)
SELECT name, pg_notify('syncer_control', 'resume:' || name) FROM resumed ORDER BY name;

-- pipelines_paused --
-- Read by every process on a control NOTIFY, on (re)connect and every second.
SELECT name FROM syncer.pipelines WHERE paused_at IS NOT NULL;
