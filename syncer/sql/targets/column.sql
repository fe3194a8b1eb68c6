-- The column target: the vector and its hash are two columns of the source table.
-- Placeholders as in pipeline.sql, plus {dimensions}. Blocks start with "-- name --".

-- column_add --
ALTER TABLE {src} ADD COLUMN {column} {vector_type}({dimensions}), ADD COLUMN IF NOT EXISTS {hash_column} bytea;

-- hash_column_add --
ALTER TABLE {src} ADD COLUMN IF NOT EXISTS {hash_column} bytea;

-- column_drop --
ALTER TABLE {src} DROP COLUMN IF EXISTS {column}, DROP COLUMN IF EXISTS {hash_column};

-- vectors_write_column --
-- The hash guard: write only where the row's text still has the hash it was embedded
-- from, checked in this statement (the row lock re-checks it against a concurrent update).
UPDATE {src} s SET {column} = d.v, {hash_column} = d.h
FROM unnest($1::jsonb[], $2::{vector_type}[], $3::bytea[]) AS d(key, v, h)
CROSS JOIN LATERAL jsonb_to_record(d.key) AS r({key_defs})
WHERE {key_eq_s_r}
  AND {hash_fn}(s) IS NOT DISTINCT FROM d.h
  AND s.{hash_column} IS DISTINCT FROM d.h;
