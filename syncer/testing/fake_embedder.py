"""A local OpenAI-compatible embeddings server for the tests, the benchmark and `syncer demo`.

Vectors are a pure function of (text, dimensions), so a test can recompute what the server
sent. Faults, latency and rate limits are switched on at run time through `POST /_control`;
every request lands in an in-memory log that `GET /_requests` and `GET /_stats` expose.
Run it with `python -m syncer.testing.fake_embedder --port 0`, or from Python with
`FakeEmbedderProcess`, which drives a real subprocess so the client under test sees real
sockets (resets, hangs) and the server's CPU does not count as the caller's.

Endpoints: POST /v1/embeddings; POST /_control (JSON knobs: latency_ms, latency_jitter_ms,
fail_next, fail_rate, fail_kinds, seed, rpm, tpm, api_key, models, max_tokens_per_input);
POST /_reset; GET /_requests; GET /_stats. Fault kinds for fail_next: status, hang, reset,
malformed, wrong_count, wrong_dim, nan, bad_base64, missing_index.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, cast

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

MAX_INPUTS_PER_REQUEST = 2048
MAX_DIMENSIONS = 16384
DEFAULT_MAX_TOKENS_PER_INPUT = 8191
RATE_WINDOW_S = 60.0
BAD_INPUT_MARKER = "__FAKE_BAD_INPUT__"  # a request holding it is answered 400, naming it
# A request holding it is answered 500, naming nothing: some providers fail so on one input.
ALWAYS_500_MARKER = "__FAKE_ALWAYS_500__"
FAULT_KINDS = frozenset(
    {"status", "hang", "reset", "malformed", "wrong_count", "wrong_dim", "nan", "bad_base64"}
    | {"missing_index"}
)
_FAULT_KEYS = frozenset({"kind", "repeat", "status", "retry_after", "headers", "body", "hang_s"})
_STATUS_ERRORS = {
    429: ("Rate limit reached. Please try again later.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}

# Fields are replaced, never mutated, so the shared empty list is safe.
_BLANK_ENTRY: dict[str, Any] = {"status": 0, "n_inputs": 0, "tokens": 0, "inputs": []}
_BLANK_ENTRY |= {"model": None, "dimensions": None, "encoding_format": "float", "fault": None}

Vector = npt.NDArray[np.float32]
_Check = Callable[[Any], Any]


@functools.lru_cache(maxsize=50_000)
def fake_vector(text: str, dimensions: int) -> Vector:
    """The unit vector the server returns for `text`: derived from SHAKE-256 of the text, so every process
    agrees. Read-only, because the cache hands the same array to every caller."""
    # SHAKE-256 stretches the text's hash to the dimensions: twice as fast as seeding a
    # generator, which matters when the fake must not be the benchmark's bottleneck.
    digest = hashlib.shake_256(text.encode("utf-8")).digest(dimensions * 2)
    result = np.frombuffer(digest, dtype="<i2").astype("<f4")
    result /= np.linalg.norm(result) or 1.0
    result.flags.writeable = False
    return result


def estimate_tokens(text: str) -> int:
    """About four UTF-8 bytes per token, as OpenAI's rule of thumb; never zero, so every
    input costs something against a TPM limit."""
    return max(1, len(text.encode("utf-8")) // 4)


@dataclasses.dataclass(frozen=True)
class FakeSettings:
    """Start-up settings; `POST /_reset` returns to these."""

    api_key: str | None = None
    default_dimensions: int = 1536
    models: list[str] | None = None  # None accepts any model name
    latency_ms: float = 0.0


@dataclasses.dataclass
class _Knobs:
    """What `POST /_control` may change."""

    api_key: str | None
    models: list[str] | None
    latency_ms: float
    latency_jitter_ms: float = 0.0
    fail_rate: float = 0.0
    fail_kinds: list[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: [{"kind": "status", "status": 500}, {"kind": "reset"}]
    )
    rpm: int | None = None
    tpm: int | None = None
    max_tokens_per_input: int = DEFAULT_MAX_TOKENS_PER_INPUT


@dataclasses.dataclass(frozen=True)
class _EmbedRequest:
    inputs: list[str]
    model: str
    dimensions: int
    encoding_format: str
    tokens: int


class _ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def response(self) -> web.Response:
        return _json(self.body, status=self.status, headers=self.headers)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def _b64(vector: Vector) -> str:
    return base64.b64encode(vector.tobytes()).decode("ascii")


def _duration(seconds: float) -> str:
    return f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".") + "s"


class _FakeServer:
    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        s = self.settings
        self.knobs = _Knobs(api_key=s.api_key, models=s.models, latency_ms=s.latency_ms)
        self.faults: deque[dict[str, Any]] = deque()
        self.rng = random.Random()
        self.window: deque[tuple[float, int]] = deque()  # (accepted at, tokens)
        self.window_tokens = 0
        self.log: list[dict[str, Any]] = []
        self.counts = {"ok": 0, "inputs": 0, "tokens": 0}
        self.by_status: Counter[str] = Counter()

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        entry = {"t": time.monotonic(), "wall": time.time(), **_BLANK_ENTRY}
        self.log.append(entry)
        try:
            response = await self._answer(request, entry)
        except _ApiError as error:
            entry["status"] = error.status
            response = error.response()
        finally:  # also when the handler is cancelled or the connection was dropped
            self._count(entry)
        response.headers["x-request-id"] = f"req_{os.getpid():x}{next(self._ids):08x}"
        return response

    def _count(self, entry: dict[str, Any]) -> None:
        self.by_status[str(entry["status"])] += 1
        if entry["status"] == 200 and entry["fault"] is None:
            self.counts["ok"] += 1
            self.counts["inputs"] += entry["n_inputs"]
            self.counts["tokens"] += entry["tokens"]

    async def _answer(self, request: web.Request, entry: dict[str, Any]) -> web.StreamResponse:
        self._check_auth(request)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        embed = self._validate(body, entry)
        fault = self._next_fault()
        if fault is not None:
            entry["fault"] = fault["kind"]
            early = await self._early_fault(request, fault, entry)
            if early is not None:
                return early
        headers = self._admit(embed)
        started = time.monotonic()
        delay_ms = self.knobs.latency_ms
        if self.knobs.latency_jitter_ms:
            delay_ms += self.rng.uniform(0.0, self.knobs.latency_jitter_ms)
        payload = _embeddings_body(embed, fault["kind"] if fault else None)
        # The latency includes the work, as at a real provider: concurrent requests that
        # arrive together do not queue behind each other's vector generation.
        wait_s = delay_ms / 1000 - (time.monotonic() - started)
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        entry["status"] = 200
        return web.Response(body=payload, headers=headers, content_type="application/json")

    def _check_auth(self, request: web.Request) -> None:
        key = self.knobs.api_key
        if key is None or request.headers.get("Authorization") == f"Bearer {key}":
            return
        # Like OpenAI, say a key is wrong without echoing either key.
        raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _validate(self, body: Any, entry: dict[str, Any]) -> _EmbedRequest:
        if not isinstance(body, dict):
            raise _ApiError(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "You must provide a model parameter.", param="model")
        entry["model"] = model
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs:
            raise _ApiError(400, "'input' must be a non-empty string or list.", param="input")
        if len(inputs) > MAX_INPUTS_PER_REQUEST:
            message = f"'input' has {len(inputs)} items; the maximum is {MAX_INPUTS_PER_REQUEST}."
            raise _ApiError(400, message, param="input")
        entry["inputs"], entry["n_inputs"] = inputs, len(inputs)
        tokens = self._input_tokens(inputs)
        entry["tokens"] = tokens
        dimensions = body.get("dimensions", self.settings.default_dimensions)
        if type(dimensions) is not int or not 1 <= dimensions <= MAX_DIMENSIONS:
            message = f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}."
            raise _ApiError(400, message, param="dimensions")
        entry["dimensions"] = dimensions
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _ApiError(
                400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        entry["encoding_format"] = encoding
        models = self.knobs.models
        if models is not None and model not in models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise _ApiError(404, message, param="model", code="model_not_found")
        return _EmbedRequest(inputs, model, dimensions, encoding, tokens)

    def _input_tokens(self, inputs: list[Any]) -> int:
        limit, total = self.knobs.max_tokens_per_input, 0
        for index, text in enumerate(inputs):
            param = f"input[{index}]"
            if not isinstance(text, str):
                raise _ApiError(400, f"Input at index {index} is not a string.", param=param)
            if not text:
                raise _ApiError(400, f"Input at index {index} is an empty string.", param=param)
            tokens = estimate_tokens(text)
            if tokens > limit:
                message = (
                    f"This model's maximum context length is {limit} tokens, but input at "
                    f"index {index} has {tokens} tokens."
                )
                raise _ApiError(400, message, param=param)
            if BAD_INPUT_MARKER in text:
                raise _ApiError(400, f"Input at index {index} is invalid.", param=param)
            if ALWAYS_500_MARKER in text:
                message, kind, _ = _STATUS_ERRORS[500]
                raise _ApiError(500, message, kind=kind)
            total += tokens
        return total

    def _next_fault(self) -> dict[str, Any] | None:
        if self.faults:
            return self.faults.popleft()
        if self.knobs.fail_rate and self.rng.random() < self.knobs.fail_rate:
            return self.rng.choice(self.knobs.fail_kinds)
        return None

    async def _early_fault(
        self, request: web.Request, fault: dict[str, Any], entry: dict[str, Any]
    ) -> web.Response | None:
        """Answer a fault that replaces the whole response; None for faults that bend it."""
        kind = fault["kind"]
        if kind == "status":
            entry["status"] = fault["status"]
            return _status_response(fault)
        if kind == "malformed":
            entry["status"] = 200
            return web.Response(
                body=b'{"object": "list", "data": [{"obj', content_type="application/json"
            )
        if kind == "hang":
            await asyncio.sleep(fault.get("hang_s", 3600.0))
            _drop(request)
        if kind == "reset":
            _drop(request)
        return None

    def _admit(self, embed: _EmbedRequest) -> dict[str, str]:
        """Enforce RPM/TPM over a sliding window of accepted requests; return the headers."""
        rpm, tpm = self.knobs.rpm, self.knobs.tpm
        if rpm is None and tpm is None:
            return {}
        now, window = time.monotonic(), self.window
        while window and window[0][0] <= now - RATE_WINDOW_S:
            self.window_tokens -= window.popleft()[1]
        wait_s, scope = 0.0, "requests"
        if rpm is not None and len(window) >= rpm:
            # The request fits once enough of the oldest entries have left the window.
            wait_s = window[len(window) - rpm][0] + RATE_WINDOW_S - now
        if tpm is not None and self.window_tokens + embed.tokens > tpm:
            excess, free_at = self.window_tokens + embed.tokens - tpm, now + RATE_WINDOW_S
            for accepted_at, tokens in window:
                excess -= tokens
                if excess <= 0:
                    free_at = accepted_at + RATE_WINDOW_S
                    break
            if free_at - now > wait_s:
                wait_s, scope = free_at - now, "tokens"
        if wait_s > 0:
            headers = self._limit_headers(now)
            headers["Retry-After"] = str(math.ceil(wait_s))
            message = (
                f"Rate limit reached for {embed.model} on {scope} per min. "
                f"Please try again in {_duration(wait_s)}."
            )
            raise _ApiError(429, message, kind=scope, code="rate_limit_exceeded", headers=headers)
        window.append((now, embed.tokens))
        self.window_tokens += embed.tokens
        return self._limit_headers(now)

    def _limit_headers(self, now: float) -> dict[str, str]:
        # OpenAI's "reset" is the time until the limit is back to its initial state.
        reset = _duration(self.window[-1][0] + RATE_WINDOW_S - now) if self.window else "0s"
        headers = {}
        for scope, limit, used in (
            ("requests", self.knobs.rpm, len(self.window)),
            ("tokens", self.knobs.tpm, self.window_tokens),
        ):
            if limit is not None:
                headers[f"x-ratelimit-limit-{scope}"] = str(limit)
                headers[f"x-ratelimit-remaining-{scope}"] = str(max(0, limit - used))
                headers[f"x-ratelimit-reset-{scope}"] = reset
        return headers

    async def control(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                fields = orjson.loads(await request.read() or b"{}")
                self._apply_control(fields)
            except ValueError as error:  # orjson.JSONDecodeError is one too
                return _ApiError(400, f"Bad control request: {error}").response()
        return _json({**dataclasses.asdict(self.knobs), "pending_faults": len(self.faults)})

    def _apply_control(self, fields: Any) -> None:
        if not isinstance(fields, dict):
            raise ValueError("the body must be a JSON object")
        parsed = {}
        for name, value in fields.items():
            if name not in _CONTROL_FIELDS:
                raise ValueError(f"unknown field {name!r}")
            try:
                parsed[name] = _CONTROL_FIELDS[name](value)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        # Validate everything before changing anything, so a bad request changes nothing.
        for name, value in parsed.items():
            if name == "fail_next":
                self.faults = deque(value)
            elif name == "seed":
                self.rng.seed(value)
            else:
                setattr(self.knobs, name, value)

    async def reset_handler(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"ok": True})

    async def requests_handler(self, request: web.Request) -> web.Response:
        return _json(self.log)

    async def stats_handler(self, request: web.Request) -> web.Response:
        stats = {"requests": len(self.log), **self.counts, "by_status": self.by_status}
        return _json({**stats, "cpu_s": time.process_time()})


def _drop(request: web.Request) -> NoReturn:
    """Close the connection with a TCP reset, so the client sees a connection error."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # No answer can be sent: end the handler the way a client disconnect does, which
    # aiohttp handles quietly instead of logging a 500.
    raise asyncio.CancelledError


def _status_response(fault: dict[str, Any]) -> web.Response:
    status = fault["status"]
    headers = {str(k): str(v) for k, v in (fault.get("headers") or {}).items()}
    if fault.get("retry_after") is not None:
        headers["Retry-After"] = str(fault["retry_after"])
    body = fault.get("body")
    if isinstance(body, str):
        return web.Response(text=body, status=status, headers=headers)
    if body is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        message, kind, code = _STATUS_ERRORS.get(status, ("Injected failure.", kind, None))
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _json(body, status=status, headers=headers)


def _embeddings_body(embed: _EmbedRequest, fault: str | None) -> bytes:
    vectors = [fake_vector(text, embed.dimensions) for text in embed.inputs]
    if fault == "wrong_dim":
        vectors = [vector[:-1] for vector in vectors]
    elif fault == "nan":
        vectors[0] = vectors[0].copy()
        vectors[0][0] = np.nan
    embeddings: list[Any] = (
        [_b64(v) for v in vectors] if embed.encoding_format == "base64" else vectors
    )
    if fault == "bad_base64":
        embeddings[0] = _b64(vectors[0])[:-3]  # 1 more than a multiple of 4: never decodes
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    if fault == "wrong_count":
        data.pop()
    elif fault == "missing_index":
        data[-1]["index"] = 0 if len(data) > 1 else 1
    usage = {"prompt_tokens": embed.tokens, "total_tokens": embed.tokens}
    payload = {"object": "list", "data": data, "model": embed.model, "usage": usage}
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if fault == "nan" and embed.encoding_format == "float":
        # orjson writes NaN as null; a careless server writes the NaN literal Python accepts.
        body = body.replace(b"null", b"NaN", 1)
    return body


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value >= 0


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 1


def _checked(ok: Callable[[Any], bool], need: str, nullable: bool = False) -> _Check:
    def check(value: Any) -> Any:
        if (nullable and value is None) or ok(value):
            return value
        raise ValueError(f"must be {need}{' or null' if nullable else ''}")

    return check


def _fault(spec: Any) -> dict[str, Any]:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(kind, str) or kind not in FAULT_KINDS:
        raise ValueError(f"fault {spec!r} needs a kind among {sorted(FAULT_KINDS)}")
    if unknown := set(spec) - _FAULT_KEYS:
        raise ValueError(f"fault {spec!r} has unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("headers", {}), dict):
        raise ValueError(f"fault {spec!r}: headers must be an object")
    if spec["kind"] == "status" and (
        type(spec.get("status")) is not int or not 100 <= spec["status"] <= 599
    ):
        raise ValueError(f"fault {spec!r} needs an HTTP status")
    if not _is_number(spec.get("hang_s", 0)) or not _is_count(spec.get("repeat", 1)):
        raise ValueError(f"fault {spec!r}: hang_s must be >= 0 and repeat >= 1")
    return spec


def _fault_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError("must be a list of fault specs")
    return [fault for spec in value for fault in [_fault(spec)] * spec.get("repeat", 1)]


def _fault_kinds(value: Any) -> list[dict[str, Any]]:
    """Names like "status503", "reset" or "nan", or fault specs as `GET /_control` shows
    them ({"kind": "status", "status": 500}), so its answer can be posted back."""
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of fault names or specs")
    kinds = []
    for name in value:
        if isinstance(name, dict):
            kinds.append(_fault(name))
        elif isinstance(name, str) and name.startswith("status") and name[6:].isdigit():
            kinds.append(_fault({"kind": "status", "status": int(name[6:])}))
        else:
            kinds.append(_fault({"kind": name}))
    return kinds


_CONTROL_FIELDS: dict[str, _Check] = {
    "latency_ms": _checked(_is_number, "a number >= 0"),
    "latency_jitter_ms": _checked(_is_number, "a number >= 0"),
    "fail_next": _fault_list,
    "fail_rate": _checked(lambda v: _is_number(v) and v <= 1, "a number from 0 to 1"),
    "fail_kinds": _fault_kinds,
    "seed": _checked(lambda v: type(v) in (int, str), "an integer or a string", nullable=True),
    "rpm": _checked(_is_count, "an integer >= 1", nullable=True),
    "tpm": _checked(_is_count, "an integer >= 1", nullable=True),
    "api_key": _checked(lambda v: isinstance(v, str), "a string", nullable=True),
    "models": _checked(
        lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
        "a list of strings",
        nullable=True,
    ),
    "max_tokens_per_input": _checked(_is_count, "an integer >= 1"),
}


def build_app(settings: FakeSettings) -> web.Application:
    server = _FakeServer(settings)
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v1/embeddings", server.embeddings)
    app.router.add_post("/embeddings", server.embeddings)  # clients configured without /v1
    app.router.add_route("*", "/_control", server.control)
    app.router.add_post("/_reset", server.reset_handler)
    app.router.add_get("/_requests", server.requests_handler)
    app.router.add_get("/_stats", server.stats_handler)
    return app


async def _serve(settings: FakeSettings, host: str, port: int) -> None:
    # Handler cancellation ends a "hang" when its client gives up; the short shutdown
    # timeout keeps SIGTERM quick while such a request is still pending.
    runner = web.AppRunner(
        build_app(settings), access_log=None, handler_cancellation=True, shutdown_timeout=0.5
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"LISTENING http://{shown_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m syncer.testing.fake_embedder", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--default-dimensions", type=int, default=1536)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    if not 1 <= args.default_dimensions <= MAX_DIMENSIONS:
        parser.error(f"--default-dimensions must be from 1 to {MAX_DIMENSIONS}")
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    settings = FakeSettings(
        api_key=args.api_key, default_dimensions=args.default_dimensions, latency_ms=args.latency_ms
    )
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(settings, args.host, args.port))


class FakeEmbedderError(RuntimeError):
    """The fake server did not start, or rejected a control call."""


class FakeEmbedderProcess:
    """Runs the fake server in a subprocess; `url` is the OpenAI base_url (with /v1)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        default_dimensions: int = 1536,
        latency_ms: float = 0.0,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 20.0,
    ) -> None:
        self.api_key, self.default_dimensions = api_key, default_dimensions
        self.latency_ms, self.env = latency_ms, env or {}
        self.host, self.start_timeout_s = host, start_timeout_s
        self.root_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        # The server is local: never send its traffic through an HTTP proxy from the env.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise FakeEmbedderError("not started")
        return self._process.pid

    def start(self) -> FakeEmbedderProcess:
        options = f"--host {self.host} --port 0 --default-dimensions {self.default_dimensions}"
        command = [sys.executable, "-m", "syncer.testing.fake_embedder", *options.split()]
        command += ["--latency-ms", str(self.latency_ms)]
        if self.api_key is not None:
            command += ["--api-key", self.api_key]
        # A file, not a pipe, so a chatty server can never block on a full stderr pipe.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._stderr, env={**os.environ, **self.env}
        )
        line = self._first_line(time.monotonic() + self.start_timeout_s)
        if not line.startswith("LISTENING "):
            errors = self._errors()
            self.stop()
            raise FakeEmbedderError(f"fake embedder did not start: {line!r}\n{errors}")
        self.root_url = line.removeprefix("LISTENING ")
        return self

    def _first_line(self, deadline: float) -> str:
        assert self._process is not None and self._process.stdout is not None
        fd, line = self._process.stdout.fileno(), b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return line.decode() + "(timed out)"
            chunk = os.read(fd, 4096)
            if not chunk:
                return line.decode() + "(exited)"
            line += chunk
        return line.decode().strip()

    def _errors(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return str(self._stderr.read().decode(errors="replace"))

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return process.returncode

    def __enter__(self) -> FakeEmbedderProcess:
        return self.start() if self._process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        request = urllib.request.Request(self.root_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=10) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            raise FakeEmbedderError(f"{method} {path}: {error.code} {error.read()!r}") from None

    def control(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the server's knobs; returns them all."""
        return cast(dict[str, Any], self._call("POST", "/_control", fields))

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def requests(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/_requests"))

    def stats(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", "/_stats"))

    def inputs(self) -> list[str]:
        """Inputs of the requests that got a correct answer, in arrival order."""
        return [
            text
            for entry in self.requests()
            if entry["status"] == 200 and entry["fault"] is None
            for text in entry["inputs"]
        ]


if __name__ == "__main__":
    main()
