"""Names in SQL text: qualified table names parsed, identifiers and literals quoted.

Every identifier that comes from the config reaches a statement through `ident`
(psycopg.sql.Identifier), never formatted in raw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psycopg import sql


def ident(*parts: str) -> str:
    return sql.Identifier(*parts).as_string(None)


def literal(value: str) -> str:
    return sql.Literal(value).as_string(None)


def key_eq(a: str, b: str, keys: Sequence[str]) -> str:
    """`a.k1 = b.k1 AND a.k2 = b.k2 ...` over the key columns, for aliases a and b."""
    return " AND ".join(f"{a}.{ident(k)} = {b}.{ident(k)}" for k in keys)


def split_table(qualified: str) -> tuple[str, str]:
    """'public.docs' -> ('public', 'docs'); a bare name means schema public.

    A name that itself holds a dot can be written with double quotes: '"my.schema"."t"'.
    """
    m = re.fullmatch(r'(?:("(?:[^"]|"")+"|[^."]+)\.)?("(?:[^"]|"")+"|[^."]+)', qualified.strip())
    if not m:
        raise ValueError(f"{qualified!r} is not a table name (write schema.table)")
    schema, table = m.group(1) or "public", m.group(2)
    return _unquote(schema), _unquote(table)


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part
