"""Bad configuration: one clear message naming the file and the key, a non-zero exit,
and nothing changed in the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from syncer import config as config_mod
from syncer.errors import ConfigError
from tests.conftest import DEFAULT_PIPELINE, cli_env, syncer
from tests.test_pipeline import create_docs


def installed(db: psycopg.Connection[Any]) -> bool:
    return bool(db.execute("SELECT to_regnamespace('syncer') IS NOT NULL").fetchone()[0])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tabel": "public.docs"}, "pipelines[0].tabel: unknown key"),
        ({"model": None}, "pipelines[0].model: required key is missing"),
        ({"dimensions": "many"}, "pipelines[0].dimensions"),
        ({"target": "colum"}, "pipelines[0].target"),
        ({"provider": "nope"}, "pipelines[0].provider: provider 'nope' is not defined"),
        ({"target": "table"}, "target = 'table' needs target_table"),
        ({"name": "Bad Name"}, "pipelines[0].name: must be lower-case"),
        ({"batch_size": 0}, "pipelines[0].batch_size"),
    ],
)
def test_invalid_values(
    db: psycopg.Connection[Any], make_config: Any, change: dict[str, Any], expected: str
) -> None:
    create_docs(db)
    fields = {k: v for k, v in {**DEFAULT_PIPELINE, **change}.items() if v is not None}
    config = make_config(fields)
    r = syncer(config, "install")
    assert r.returncode == 2
    assert str(config) in r.stderr and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not installed(db)


@pytest.mark.parametrize(
    ("setup", "change", "expected"),
    [
        ("", {"table": "public.nope"}, "table 'public.nope' does not exist"),
        ("", {"text": ["title", "bdy"]}, "column 'bdy' does not exist in 'public.docs'"),
        ("", {"key": ["tag"]}, "columns ['tag'] are not unique"),
        (
            "ALTER TABLE docs ADD COLUMN embedding vector(3)",
            {},
            "docs.embedding is vector(3), but the config says vector(8)",
        ),
        (
            "ALTER TABLE docs ADD COLUMN embedding halfvec(8)",
            {},
            "is halfvec(8), but the config says vector(8)",
        ),
        ("ALTER TABLE docs ADD COLUMN embedding text", {}, "docs.embedding is text"),
        (
            "CREATE TABLE side (id bigint PRIMARY KEY, embedding vector(8))",
            {"target": "table", "target_table": "side"},
            "has no content_hash column",
        ),
    ],
)
def test_database_disagrees(
    db: psycopg.Connection[Any], make_config: Any, setup: str, change: dict[str, Any], expected: str
) -> None:
    create_docs(db)
    if setup:
        db.execute(setup)
    config = make_config({**DEFAULT_PIPELINE, **change})
    r = syncer(config, "install")
    assert r.returncode != 0
    assert "pipeline 'docs'" in r.stderr and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not installed(db)


def test_missing_api_key_variable(db: psycopg.Connection[Any], make_config: Any) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    env = cli_env()
    env.pop("FAKE_API_KEY")
    r = syncer(config, "run", "--exit-when-idle", env=env)
    assert r.returncode == 2
    assert "providers.fake.api_key_env: environment variable FAKE_API_KEY is not set" in r.stderr


def test_file_problems(tmp_path: Path) -> None:
    r = syncer(tmp_path / "absent.toml", "install")
    assert r.returncode == 2 and "absent.toml: file not found" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\nurl = 1")
    r = syncer(bad, "install")
    assert r.returncode == 2 and "bad.toml: not valid TOML" in r.stderr


def test_run_before_install_says_so(db: psycopg.Connection[Any], make_config: Any) -> None:
    create_docs(db)
    r = syncer(make_config(), "run", "--exit-when-idle")
    assert r.returncode == 1 and "run `syncer install` first" in r.stderr


def test_unreachable_database(tmp_path: Path, make_config: Any) -> None:
    config = make_config()
    text = config.read_text().replace(
        "postgresql://postgres@/", "postgresql://postgres@127.0.0.1:1/", 1
    )
    config.write_text(text)
    r = syncer(config, "install")
    assert r.returncode == 1 and "cannot connect to the database" in r.stderr


def test_unknown_provider_kind(db: psycopg.Connection[Any], make_config: Any) -> None:
    create_docs(db)
    config = make_config()
    config.write_text(config.read_text().replace('kind = "openai"', 'kind = "cohere"', 1))
    r = syncer(config, "install")
    assert r.returncode == 2
    expected = f"{config}: providers.fake.kind: unknown provider kind 'cohere' (known: 'openai')"
    lines = [line for line in r.stderr.splitlines() if line]
    assert len(lines) == 1 and lines[0].endswith(expected), r.stderr
    assert not installed(db)


def test_a_provider_without_kind_is_openai_compatible(tmp_path: Path) -> None:
    data = {"providers": {"p": {"base_url": "http://h/v1/"}}, "pipelines": []}
    p = config_mod.parse(data, tmp_path / "f.toml").providers["p"]
    assert isinstance(p, config_mod.OpenAIProviderConfig)
    assert (p.kind, p.base_url, p.api_key_env) == ("openai", "http://h/v1", "OPENAI_API_KEY")


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ({"kind": "openai", "base_url": "ftp://h"}, "providers.p.base_url: must start with http"),
        ({"base_url": "http://h", "colour": 1}, "providers.p.colour: unknown key"),
        ({"rpm": 0}, "providers.p.rpm: Input should be greater than or equal to 1"),
        (3, "providers.p: must be a table"),
    ],
)
def test_provider_errors_name_the_key_without_the_kind_s_tag(
    tmp_path: Path, provider: Any, expected: str
) -> None:
    path = tmp_path / "f.toml"
    with pytest.raises(ConfigError) as caught:
        config_mod.parse({"providers": {"p": provider}, "pipelines": []}, path)
    assert str(caught.value).startswith(f"{path}: {expected}"), caught.value
