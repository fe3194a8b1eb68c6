"""The TOML configuration, validated once into frozen typed objects.

Every error names the file, the key and what is wrong. Secrets never live in the
file: a provider names the environment variable that holds its API key.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from syncer import targets
from syncer.errors import ConfigError
from syncer.schema.names import split_table

DEFAULT_PATH = Path("syncer.toml")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatabaseConfig(_Model):
    url: str = "postgresql:///postgres"
    min_size: int = Field(default=2, ge=1, le=100)
    max_size: int = Field(default=6, ge=2, le=200)
    max_queries: int = Field(default=50_000, ge=1)
    max_inactive_connection_lifetime_s: float = Field(default=300.0, ge=0)
    # For the worker's own statements, so that a held lock or a stuck server never hangs a
    # worker for good: the statement is cancelled, and run again later.
    statement_timeout_s: float = Field(default=60.0, gt=0)
    lock_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> DatabaseConfig:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


class BaseProviderConfig(_Model):
    """What every provider kind has: the guarded client's limits, breaker and timeout."""

    api_key_env: str | None  # each kind names its usual variable as the default
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=30.0, gt=0)
    rpm: int | None = Field(default=None, ge=1)  # requests per minute; None: no limit
    tpm: int | None = Field(default=None, ge=1)  # estimated tokens per minute; None: no limit
    max_inputs_per_request: int = Field(default=2048, ge=1)
    max_tokens_per_input: int = Field(default=8191, ge=1)
    max_tokens_per_request: int = Field(default=300_000, ge=1)
    breaker_failures: int = Field(default=5, ge=1)  # consecutive failures that open it
    breaker_reset_s: float = Field(default=30.0, gt=0)  # cool-down before a probe


class OpenAIProviderConfig(BaseProviderConfig):
    """An OpenAI-compatible embeddings API (OpenAI itself, vLLM, Ollama, LiteLLM, TEI...)."""

    kind: Literal["openai"] = "openai"
    api_key_env: str | None = "OPENAI_API_KEY"
    base_url: str = "https://api.openai.com/v1"

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


DEFAULT_PROVIDER_KIND = "openai"  # what a provider table without `kind` means


def _provider_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("kind", DEFAULT_PROVIDER_KIND))
    return getattr(value, "kind", None)


# A new kind: its model here, tagged with its `kind`, and its protocol in syncer.providers.
ProviderConfig = Annotated[
    Annotated[OpenAIProviderConfig, Tag("openai")],
    Discriminator(_provider_kind),
]


class WorkerConfig(_Model):
    poll_interval_s: float = Field(default=5.0, gt=0)
    lease_s: float = Field(default=60.0, ge=1)
    max_attempts: int = Field(default=5, ge=1)
    max_retries: int = Field(default=4, ge=0)  # in-process retries of one request
    item_deadline_s: float = Field(default=120.0, gt=0)  # for one batch, across its retries
    retry_base_s: float = Field(default=0.25, gt=0)  # first retry within 0-0.25 s, doubling
    retry_max_s: float = Field(default=300.0, gt=0)
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    in_flight_batches: int = Field(default=4, ge=1, le=64)
    # The share of each claim kept for bulk work (backfill, replay) while live edits keep
    # coming: live edits go first, but never stop a backfill.
    bulk_share: float = Field(default=0.25, ge=0, le=1)
    # Chunk pipelines: the threads that split documents off the event loop.
    split_workers: int = Field(default=2, ge=1, le=64)


class CaptureConfig(_Model):
    """How changes reach the queue: capture triggers, or a logical replication slot."""

    mode: Literal["trigger", "logical"] = "trigger"
    # logical mode: the slot and publication install creates (and uninstall drops)
    slot: str = "syncer"
    publication: str = "syncer"

    @field_validator("slot", "publication")
    @classmethod
    def _object_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be lower-case letters, digits and '_' (at most 41)")
        return v


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, like 0.0.0.0:9187 (got {value!r})")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the port must be a number from 1 to 65535 (got {port!r})")
    host = host.removeprefix("[").removesuffix("]")
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"the host must be a name or an address (got {host!r})")
    return host, int(port)


class OtelConfig(_Model):
    """OpenTelemetry export (the `syncer[otel]` extra); unset endpoint: off."""

    endpoint: str | None = None  # e.g. http://collector:4317 (gRPC) or :4318 (HTTP)
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    service_name: str = "syncer"
    export_interval_s: float = Field(default=10.0, gt=0)  # metrics

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {v!r}")
        return v


class ObserveConfig(_Model):
    """What an operator sees: the HTTP endpoints, the logs, the event loop's diagnostics."""

    listen: str | None = None  # HOST:PORT of /metrics, /healthz and /readyz; None: no server
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    slow_callback_s: float = Field(default=0.1, gt=0)  # loop.slow_callback_duration
    loop_lag_warn_s: float = Field(default=0.05, gt=0)  # above it for 10 s: /healthz fails
    otel: OtelConfig = OtelConfig()

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class ChunkingConfig(_Model):
    """How a chunk pipeline cuts a document (`[pipelines.chunking]`)."""

    splitter: Literal["recursive", "markdown", "none"] = "recursive"
    unit: Literal["tokens", "characters"] = "tokens"
    size: int = Field(default=512, ge=1)
    overlap: int = Field(default=64, ge=0)

    @model_validator(mode="after")
    def _sizes(self) -> ChunkingConfig:
        if self.unit == "tokens" and self.size < MIN_CHUNK_TOKENS:
            raise _KeyError("size", f"must be at least {MIN_CHUNK_TOKENS} tokens, got {self.size}")
        if self.overlap >= self.size:
            raise _KeyError("overlap", f"must be less than size ({self.size}), got {self.overlap}")
        return self


MIN_CHUNK_TOKENS = 16


def template_fields(template: str) -> tuple[str, ...]:
    """The names a chunk template uses ({chunk} and source columns); ValueError if malformed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"not a valid template: {err}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion or not name.isidentifier():
            raise ValueError(
                f"{{{name}}}: fields are plain column names, like {{title}} or {{chunk}}"
            )
        if name not in names:
            names.append(name)
    if "chunk" not in names:
        raise ValueError("must contain {chunk} (where each chunk's text goes)")
    return tuple(names)


_CHUNK_KEYS = ("chunking", "template", "copy_columns", "store_text", "dedupe")


class PipelineConfig(_Model):
    name: str
    table: str
    key: tuple[str, ...] | None = None
    text: tuple[str, ...]
    target: Literal["column", "table", "chunks"] = "column"
    column: str = "embedding"
    target_table: str | None = None
    provider: str
    model: str
    dimensions: int = Field(gt=0, le=16_000)
    send_dimensions: bool = True
    vector_type: Literal["vector", "halfvec"] = "vector"
    batch_size: int = Field(default=64, ge=1, le=2048)
    on_too_long: Literal["truncate", "dead_letter"] = "truncate"
    # target = "chunks" only (syncer.targets.chunks):
    chunking: ChunkingConfig | None = None
    template: str | None = None  # what is embedded per chunk: {chunk} and source columns
    copy_columns: tuple[str, ...] = ()  # kept beside each chunk, refreshed with no API call
    store_text: bool = True  # keep each chunk's text in the chunk table
    dedupe: Literal["document", "global"] = "document"  # whose stored vectors a chunk reuses

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be lower-case letters, digits and '_' (at most 41), like 'docs'")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must name at least one column")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError("must name at least one column (or leave it out for the primary key)")
        return v

    @model_validator(mode="after")
    def _target(self) -> PipelineConfig:
        if self.target != "chunks":
            for key in _CHUNK_KEYS:
                if key in self.model_fields_set:
                    raise _KeyError(key, "is only for target = 'chunks'")
        targets.for_pipeline(self).check_config()  # which keys the kind needs or refuses
        return self

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The source columns a chunk template names ({chunk} aside)."""
        if self.template is None:
            return ()
        return tuple(n for n in template_fields(self.template) if n != "chunk")

    @property
    def watched_columns(self) -> tuple[str, ...]:
        """The columns whose change makes work: the text, and a chunk pipeline's template
        and copied columns."""
        out = list(self.text)
        out += [c for c in (*self.template_columns, *self.copy_columns) if c not in out]
        return tuple(out)

    def model_fingerprint(self) -> str:
        """What makes two vectors of one text interchangeable (model, size, type)."""
        return f"{self.model}\x1f{self.dimensions}\x1f{self.vector_type}"

    @property
    def schema_name(self) -> str:
        return split_table(self.table)[0]

    @property
    def table_name(self) -> str:
        return split_table(self.table)[1]

    @property
    def hash_column(self) -> str:
        return targets.for_pipeline(self).hash_column

    def fingerprint(self) -> str:
        """What makes a stored vector comparable: a change here makes every vector stale."""
        parts = [self.model, str(self.dimensions), self.vector_type, "\x1f".join(self.text)]
        if self.target == "chunks":  # a new way of cutting or composing: every document anew
            c = self.chunking
            parts += [self.template or "", repr(c and c.model_dump()), *self.template_columns]
        return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()[:16]

    def config_hash(self) -> str:
        return hashlib.sha256(
            orjson.dumps(self.model_dump(), option=orjson.OPT_SORT_KEYS)
        ).hexdigest()


class Config(_Model):
    database: DatabaseConfig = DatabaseConfig()
    worker: WorkerConfig = WorkerConfig()
    capture: CaptureConfig = CaptureConfig()
    observe: ObserveConfig = ObserveConfig()
    providers: dict[str, ProviderConfig]
    pipelines: tuple[PipelineConfig, ...]

    @model_validator(mode="after")
    def _refs(self) -> Config:
        seen: set[str] = set()
        for i, p in enumerate(self.pipelines):
            if p.name in seen:
                raise _RefError(f"pipelines[{i}].name", f"duplicate pipeline name {p.name!r}")
            seen.add(p.name)
            if p.provider not in self.providers:
                known = ", ".join(sorted(self.providers)) or "none"
                raise _RefError(
                    f"pipelines[{i}].provider",
                    f"provider {p.provider!r} is not defined under [providers] (defined: {known})",
                )
        return self

    def pipeline(self, name: str) -> PipelineConfig:
        for p in self.pipelines:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pipelines)
        raise ConfigError(f"no pipeline named {name!r} (configured: {known})")


class _KeyError(ValueError):
    """An error of one key of the table being validated (its location is the table's)."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(msg)
        self.key = key
        self.msg = msg


class _RefError(ValueError):
    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for item in loc:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def _untagged(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """providers.NAME.TAG.key -> providers.NAME.key: the union's tag is no key of the file."""
    if len(loc) >= 3 and loc[0] == "providers":
        return loc[:2] + loc[3:]
    return loc


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = _loc(_untagged(tuple(e["loc"])))
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _RefError):
            lines.append(f"{path}: {ctx_err.loc}: {ctx_err.msg}")
        elif isinstance(ctx_err, _KeyError):
            lines.append(f"{path}: {loc}.{ctx_err.key}: {ctx_err.msg}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{path}: {loc}: unknown key (check the spelling)")
        elif e["type"] == "union_tag_invalid":
            known = (e.get("ctx") or {}).get("expected_tags")
            tag = (e.get("ctx") or {}).get("tag")
            lines.append(f"{path}: {loc}.kind: unknown provider kind {tag!r} (known: {known})")
        elif e["type"] == "union_tag_not_found":
            lines.append(f"{path}: {loc}: must be a table (got {e.get('input')!r:.60})")
        elif e["type"] == "missing":
            lines.append(f"{path}: {loc}: required key is missing")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{path}: {loc or '(top level)'}: {msg} (got {e.get('input')!r:.60})")
    return "\n".join(lines)


def parse(data: dict[str, Any], path: Path) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(path, err)) from None


def load(path: Path | str = DEFAULT_PATH, env: dict[str, str] | None = None) -> Config:
    """Read the file, apply SYNCER_DATABASE_URL, validate."""
    path = Path(path)
    env = dict(os.environ) if env is None else env
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (give one with -c FILE)") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, not UTF-8
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason})"
        raise ConfigError(f"{path}: cannot read: {reason}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    if url := env.get("SYNCER_DATABASE_URL"):
        data.setdefault("database", {})
        if isinstance(data["database"], dict):
            data["database"]["url"] = url
    cfg = parse(data, path)
    for i, p in enumerate(cfg.pipelines):
        try:
            split_table(p.table)
            if p.target_table:
                split_table(p.target_table)
        except ValueError as err:
            raise ConfigError(f"{path}: pipelines[{i}]: {err}") from None
    return cfg


def api_key(cfg: Config, provider: str, path: Path | str, env: dict[str, str] | None = None) -> str:
    """The provider's key from the environment; a clear error when the variable is unset."""
    env = dict(os.environ) if env is None else env
    var = cfg.providers[provider].api_key_env
    if var is None:
        return ""
    value = env.get(var)
    if not value:
        raise ConfigError(
            f"{path}: providers.{provider}.api_key_env: environment variable {var} is not set"
        )
    return value
