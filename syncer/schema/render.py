"""Each pipeline's statements, rendered once from sql/pipeline.sql and its target's file.

The pipeline's identifiers come from the config and are always quoted (schema.names)
before they reach a statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from syncer import sqlfiles, targets
from syncer.config import PipelineConfig
from syncer.schema.catalog import Column
from syncer.schema.names import ident, key_eq, literal


@dataclass(frozen=True)
class PipelineSQL:
    """Every per-pipeline statement, rendered once with quoted identifiers."""

    name: str
    statements: dict[str, str]
    keys: tuple[str, ...]

    def __getitem__(self, name: str) -> str:
        return self.statements[name]


def render(p: PipelineConfig, key_columns: tuple[Column, ...]) -> PipelineSQL:
    keys = [c.name for c in key_columns]
    target = targets.for_pipeline(p)
    values = {**_values(p, key_columns), **target.values(keys)}
    after_next = (
        f"({_cols('s', keys)}) > (SELECT {_cols('r', keys)} FROM jsonb_to_record($1::jsonb) "
        f"AS r({values['key_defs']}))"
    )
    out: dict[str, str] = {}
    for name, template in sqlfiles.blocks("pipeline.sql").items():
        if name == "backfill_page":
            out["backfill_first"] = template.format(**values, after="$1::jsonb IS NULL")
            out["backfill_next"] = template.format(**values, after=after_next)
        else:
            out[name] = template.format(**values)
    own = sqlfiles.blocks(target.statements_file)
    for name in target.statements:
        out[name] = own[name].format(**values)
    return PipelineSQL(p.name, out, tuple(keys))


def _cols(alias: str, keys: Sequence[str]) -> str:
    return ", ".join(f"{alias}.{ident(k)}" for k in keys)


def _values(p: PipelineConfig, key_columns: tuple[Column, ...]) -> dict[str, str]:
    """The placeholders every pipeline's statements share (its target adds its own)."""
    keys = [c.name for c in key_columns]

    def key_json(alias: str) -> str:
        args = ", ".join(f"{literal(k)}, {alias}.{ident(k)}" for k in keys)
        return f"pg_catalog.jsonb_build_object({args})"

    def fn(suffix: str) -> str:
        return ident("syncer", f"{p.name}__{suffix}")

    def changed(columns: list[str], cast: str = "") -> list[str]:
        return [f"OLD.{ident(c)}{cast} IS DISTINCT FROM NEW.{ident(c)}{cast}" for c in columns]

    return {
        "src": ident(p.schema_name, p.table_name),
        "src_literal": literal(ident(p.schema_name, p.table_name)),
        "pipeline": literal(p.name),
        "fingerprint": literal(p.fingerprint() + ":"),
        "text_fn": fn("text"),
        "hash_fn": fn("hash"),
        "text_parts": ", ".join(f"NULLIF(s.{ident(c)}::text, '')" for c in p.text),
        "capture_insert_fn": fn("capture_insert"),
        "capture_update_fn": fn("capture_update"),
        "capture_delete_fn": fn("capture_delete"),
        "capture_truncate_fn": fn("capture_truncate"),
        "capture_insert_row_fn": fn("capture_insert_row"),
        "capture_delete_row_fn": fn("capture_delete_row"),
        "has_text_new": " OR ".join(f"NEW.{ident(c)}::text <> ''" for c in p.text),
        "insert_trigger": ident(f"syncer_{p.name}_insert"),
        "update_trigger": ident(f"syncer_{p.name}_update"),
        "delete_trigger": ident(f"syncer_{p.name}_delete"),
        "truncate_trigger": ident(f"syncer_{p.name}_truncate"),
        "key_json_n": key_json("n"),
        "key_json_o": key_json("o"),
        "key_json_p": key_json("p"),
        "key_json_r": key_json("r"),
        # The same as {text_fn}(n) IS NOT NULL (some column has non-empty text), without
        # composing the text: the insert trigger tests every inserted row.
        "has_text_n": " OR ".join(f"n.{ident(c)}::text <> ''" for c in p.text),
        "key_json_new": key_json("NEW"),
        "key_json_old": key_json("OLD"),
        "key_changed": " OR ".join(changed(keys)),
        # Compared as text: the composed text is made of the columns' text forms, and a
        # column type without an equality operator (json) compares all the same.
        "text_or_key_changed": " OR ".join(
            changed(list(p.watched_columns), "::text") + changed(keys)
        ),
        "hash_extra": "".join(
            f" || E'\\x1f' || coalesce(s.{ident(c)}::text, '')"
            for c in p.template_columns
            if c not in p.text
        ),
        "row_extra": (
            "pg_catalog.jsonb_build_object("
            + ", ".join(f"{literal(c)}, s.{ident(c)}::text" for c in p.template_columns)
            + ")::text"
            if p.template_columns
            else "NULL::text"
        ),
        "nobody_awake": (
            "coalesce(pg_sequence_last_value('syncer.awake_until'::regclass), 0)"
            " < date_part('epoch', now())"
        ),
        "key_eq_s_r": key_eq("s", "r", keys),
        "key_eq_s_i": key_eq("s", "i", keys),
        "key_eq_t_r": key_eq("t", "r", keys),
        "key_eq_s_t": key_eq("s", "t", keys),
        "key_defs": ", ".join(f"{ident(c.name)} {c.type}" for c in key_columns),
        "key_cols": ", ".join(ident(k) for k in keys),
        "key_cols_i": _cols("i", keys),
        "key_cols_s": _cols("s", keys),
        "key_cols_p_desc": ", ".join(f"p.{ident(k)} DESC" for k in keys),
        "column": ident(p.column),
        "vector_type": p.vector_type,
    }
