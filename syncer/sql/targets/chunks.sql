-- The chunks target: a chunk table keyed like the source plus chunk_index, one row per
-- chunk of each document, with the chunk's vector, its hash and the document's hash.
-- Placeholders as in pipeline.sql, plus the chunk table's ({target_table}, {copy_*}).
-- Blocks start with "-- name --".

-- chunks_create --
CREATE TABLE {target_table} ({key_defs_not_null}, chunk_index int NOT NULL, chunk text, start_char int NOT NULL, end_char int NOT NULL, {column} {vector_type}({dimensions}) NOT NULL, chunk_hash bytea NOT NULL, doc_hash bytea NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(){copy_defs}, PRIMARY KEY ({key_cols}, chunk_index));

-- chunks_hash_index --
-- dedupe = "global": a chunk looks for its text's vector among every document's.
CREATE INDEX IF NOT EXISTS {hash_index} ON {target_table} (chunk_hash);

-- chunks_drop --
DROP TABLE IF EXISTS {target_table};

-- chunks_stored --
-- The chunk hashes stored for these documents ($1) or, with global dedupe, which of the
-- hashes $2 any document has: what the dispatcher need not send to the API.
SELECT k.key::text, t.chunk_hash
FROM unnest($1::jsonb[]) AS k(key) CROSS JOIN LATERAL jsonb_to_record(k.key) AS r({key_defs})
JOIN {target_table} t ON {key_eq_t_r}
UNION ALL
SELECT NULL, t.chunk_hash FROM {target_table} t WHERE t.chunk_hash = ANY($2::bytea[]);

-- vectors_write_chunks --
-- One statement for a batch of whole documents. A document is written only if its row
-- still has the text its chunks were cut from ($7, the document hash: FOR SHARE makes a
-- concurrent edit wait for this commit, or this write see the edit and skip), and only
-- whole: a chunk without a new vector ($8 NULL) takes the stored one of the same text, and
-- a document missing one is left out (reported, it runs again). Chunks past the new last
-- index are deleted. Each row's statement sees the table as it was before it.
WITH incoming AS (
    SELECT d.*, r.*
    FROM unnest($1::jsonb[], $2::int[], $3::text[], $4::int[], $5::int[], $6::bytea[],
                $7::bytea[], $8::{vector_type}[]) AS d(_k, _i, _chunk, _s, _e, _ch, _dh, _v)
    CROSS JOIN LATERAL jsonb_to_record(d._k) AS r({key_defs})
), docs AS (
    SELECT d._k{copy_cols_s}
    FROM (SELECT DISTINCT _k, _dh FROM incoming) d
    CROSS JOIN LATERAL jsonb_to_record(d._k) AS r({key_defs})
    JOIN {src} s ON {key_eq_s_r}
    WHERE {hash_fn}(s) = d._dh
    FOR SHARE OF s
), resolved AS (
    SELECT i.*, coalesce(i._v, (
        SELECT c.{column} FROM {target_table} c WHERE {reuse_scope} c.chunk_hash = i._ch LIMIT 1
    )) AS _vec
    FROM incoming i WHERE i._k IN (SELECT _k FROM docs)
), ready AS (
    SELECT _k FROM resolved GROUP BY _k HAVING bool_and(_vec IS NOT NULL)
), written AS (
    INSERT INTO {target_table} AS t ({key_cols}, chunk_index, chunk, start_char, end_char,
                                     {column}, chunk_hash, doc_hash{copy_cols})
    SELECT {key_cols_x}, x._i, x._chunk, x._s, x._e, x._vec, x._ch, x._dh{copy_cols_d}
    FROM resolved x JOIN ready USING (_k) JOIN docs d USING (_k)
    ORDER BY x._k, x._i
    ON CONFLICT ({key_cols}, chunk_index) DO UPDATE
    SET chunk = EXCLUDED.chunk, start_char = EXCLUDED.start_char, end_char = EXCLUDED.end_char,
        {column} = EXCLUDED.{column}, chunk_hash = EXCLUDED.chunk_hash,
        doc_hash = EXCLUDED.doc_hash, embedded_at = now(){copy_set}
    WHERE (t.chunk_hash, t.doc_hash, t.start_char, t.end_char, t.chunk{copy_cols_t})
          IS DISTINCT FROM
          (EXCLUDED.chunk_hash, EXCLUDED.doc_hash, EXCLUDED.start_char, EXCLUDED.end_char,
           EXCLUDED.chunk{copy_cols_excluded})
    RETURNING 1
), trimmed AS (
    DELETE FROM {target_table} t
    USING (SELECT _k, max(_i) AS last FROM incoming WHERE _k IN (SELECT _k FROM ready)
           GROUP BY _k) n
    CROSS JOIN LATERAL jsonb_to_record(n._k) AS r({key_defs})
    WHERE {key_eq_t_r} AND t.chunk_index > n.last
)
SELECT (SELECT count(*) FROM written),
       (SELECT coalesce(array_agg(_k::text), '{{}}') FROM ready),
       (SELECT coalesce(array_agg(_k::text), '{{}}') FROM docs);

-- vectors_delete_chunks --
-- Every chunk of documents whose source row is gone or has no text any more.
DELETE FROM {target_table} t
USING unnest($1::jsonb[]) AS k(key) CROSS JOIN LATERAL jsonb_to_record(k.key) AS r({key_defs})
WHERE {key_eq_t_r}
  AND NOT EXISTS (SELECT FROM {src} s WHERE {key_eq_s_t} AND {text_fn}(s) IS NOT NULL);
