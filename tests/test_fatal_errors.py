"""A command that fails, for any reason, ours or not, ends with one line on stderr and the
exit status of errors.EXIT_CODES; the traceback shows only at --log-level debug."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from syncer.errors import (
    EXIT_ERROR,
    EXIT_PROVIDER,
    EXIT_USAGE,
    ConfigError,
    DatabaseError,
    ProviderError,
    SlotError,
    exit_code,
)
from tests.conftest import cli_env, syncer

# Linux capabilities that let root read any file, and prctl's call to drop one for good.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
PR_CAPBSET_DROP = 24


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed (and checks that it is all it printed)."""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def not_above_file_modes() -> None:
    """In the child before exec, as root: drop what lets root read a file its mode forbids
    (the tests may run as root, in a container)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


def with_url(make_config: Any, url: str) -> Path:
    config: Path = make_config()
    text = config.read_text().splitlines()
    config.write_text("\n".join(f'url = "{url}"' if x.startswith("url = ") else x for x in text))
    return config


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (ConfigError("x"), EXIT_USAGE),
        (ProviderError("x"), EXIT_PROVIDER),
        (DatabaseError("x"), EXIT_ERROR),
        (SlotError("x"), EXIT_ERROR),  # no entry of its own: SyncerError's
        (PermissionError(13, "x"), EXIT_ERROR),
        (RuntimeError("a bug"), EXIT_ERROR),
    ],
)
def test_exit_codes(err: BaseException, code: int) -> None:
    assert exit_code(err) == code


def test_a_directory_as_config(tmp_path: Path) -> None:
    r = syncer(tmp_path, "install")
    assert r.returncode == EXIT_USAGE
    assert one_line(r) == f"error: {tmp_path}: cannot read: Is a directory"


def test_an_unreadable_config_file(tmp_path: Path) -> None:
    config = tmp_path / "syncer.toml"
    config.write_text("[database]\n")
    config.chmod(0)
    r = subprocess.run(
        [sys.executable, "-m", "syncer.cli", "-c", str(config), "install"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        preexec_fn=not_above_file_modes if os.geteuid() == 0 else None,
    )
    assert r.returncode == EXIT_USAGE
    assert one_line(r) == f"error: {config}: cannot read: Permission denied"


def test_a_closed_port(make_config: Any) -> None:
    config = with_url(make_config, f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres")
    r = syncer(config, "install")
    assert r.returncode == EXIT_ERROR
    assert one_line(r).startswith("error: cannot connect to the database (")


def test_an_error_that_is_not_ours_is_one_line_too(make_config: Any) -> None:
    # asyncpg refuses the URL with its own exception class, which nothing of ours wraps.
    config = with_url(make_config, "mysql://root@127.0.0.1/db")
    r = syncer(config, "install")
    assert r.returncode == EXIT_ERROR
    assert one_line(r).startswith("error: ClientConfigurationError: invalid DSN")


@pytest.mark.parametrize("command", ["install", "run"])
def test_debug_shows_the_traceback_before_the_line(make_config: Any, command: str) -> None:
    # Not a closed port: `run` waits for a database that is down (tests/test_outage.py).
    config = with_url(make_config, "mysql://root@127.0.0.1/db")
    r = syncer(config, "--log-level", "debug", command)
    assert r.returncode == EXIT_ERROR
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: ClientConfigurationError: invalid DSN")
