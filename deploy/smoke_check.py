"""The smoke test's checks inside the syncer container (deploy/smoke.sh pipes this file into
`python3 -` there): it has psycopg, SYNCER_DATABASE_URL and the fake embedder's vectors.

    write          insert three rows, update two (text), delete one
    wait N         until exactly N rows exist and every one has the vector of its text
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import psycopg

from syncer.testing.fake_embedder import fake_vector

DIM = 384
DEADLINE_S = 120


def write(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        "INSERT INTO docs (title, body) VALUES ('Smoke', 'a new row'), ('Second', NULL), (NULL, 'third')"
    )
    conn.execute("UPDATE docs SET body = 'Oolong is rolled and oxidised.' WHERE title = 'Tea'")
    conn.execute("UPDATE docs SET title = 'Night trains' WHERE title = 'Trains'")
    conn.execute("DELETE FROM docs WHERE title = 'Bicycles'")


def problems(conn: psycopg.Connection[tuple[object, ...]], n: int) -> list[str]:
    rows = conn.execute(
        "SELECT id, concat_ws(E'\\n\\n', nullif(title, ''), nullif(body, '')), embedding::text FROM docs"
    ).fetchall()
    found = [f"{len(rows)} rows, expected {n}"] if len(rows) != n else []
    for key, text, emb in rows:
        if emb is None:
            found.append(f"row {key}: no vector yet")
            continue
        got = np.array([float(x) for x in str(emb).strip("[]").split(",")])
        if not np.allclose(got, fake_vector(str(text), DIM), rtol=1e-5, atol=1e-6):
            found.append(f"row {key}: the vector is not that of its text")
    return found


def wait(conn: psycopg.Connection[tuple[object, ...]], n: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while found := problems(conn, n):
        if time.monotonic() > deadline:
            sys.exit(f"not synced after {DEADLINE_S}s: {'; '.join(found)}")
        time.sleep(0.2)
    print(f"all {n} rows have the vectors of their text")


def main() -> None:
    with psycopg.connect(os.environ["SYNCER_DATABASE_URL"], autocommit=True) as conn:
        if sys.argv[1] == "write":
            write(conn)
        else:
            wait(conn, int(sys.argv[2]))


if __name__ == "__main__":
    main()
