-- What syncer reads of the catalog: tables, their columns and unique keys. Blocks start
-- with "-- name --".

-- table_columns --
-- The columns of table $2 in schema $1 (a plain or partitioned table), in order.
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p')
ORDER BY a.attnum;

-- table_unique_keys --
-- The column lists of the table's unique, non-partial, plain-column indexes (PK first).
SELECT array_agg(a.attname ORDER BY k.ord) AS cols
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique
  AND i.indpred IS NULL AND 0 <> ALL (i.indkey)
GROUP BY i.indexrelid, i.indisprimary
ORDER BY i.indisprimary DESC, i.indexrelid;

-- table_partitioned --
SELECT relkind = 'p' FROM pg_class WHERE oid = $1::regclass;

-- relation_exists --
-- $1: a quoted, qualified name.
SELECT to_regclass($1) IS NOT NULL;
