-- The table target: a side table keyed like the source, with the vector and its hash.
-- Placeholders as in pipeline.sql, plus {dimensions} and {key_defs_not_null}. Blocks start
-- with "-- name --".

-- table_create --
CREATE TABLE {target_table} ({key_defs_not_null}, {column} {vector_type}({dimensions}) NOT NULL, content_hash bytea NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY ({key_cols}));

-- table_drop --
DROP TABLE IF EXISTS {target_table};

-- vectors_write_table --
-- FOR SHARE makes a concurrent text update wait for this write (or this write see the
-- update and skip), so an older vector can never land after a newer one.
WITH incoming AS (
    SELECT r.*, d.v, d.h
    FROM unnest($1::jsonb[], $2::{vector_type}[], $3::bytea[]) AS d(key, v, h)
    CROSS JOIN LATERAL jsonb_to_record(d.key) AS r({key_defs})
), current_rows AS (
    SELECT {key_cols_i}, i.v, i.h
    FROM incoming i JOIN {src} s ON {key_eq_s_i}
    WHERE {hash_fn}(s) = i.h
    FOR SHARE OF s
)
INSERT INTO {target_table} AS t ({key_cols}, {column}, content_hash)
SELECT {key_cols}, v, h FROM current_rows
ON CONFLICT ({key_cols}) DO UPDATE
SET {column} = EXCLUDED.{column}, content_hash = EXCLUDED.content_hash, embedded_at = now()
WHERE t.content_hash IS DISTINCT FROM EXCLUDED.content_hash;

-- vectors_delete_table --
-- Side-table rows whose source row is gone or has no text any more.
DELETE FROM {target_table} t
USING unnest($1::jsonb[]) AS k(key) CROSS JOIN LATERAL jsonb_to_record(k.key) AS r({key_defs})
WHERE {key_eq_t_r}
  AND NOT EXISTS (SELECT FROM {src} s WHERE {key_eq_s_t} AND {text_fn}(s) IS NOT NULL);
