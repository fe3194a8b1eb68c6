# syncer: the sidecar image. `syncer run` reads /etc/syncer/syncer.toml (mount it) and the
# environment (SYNCER_DATABASE_URL, the provider's API key variable). No PostgreSQL inside.
#
#   docker build -t syncer .
#   docker build --build-arg BASE=localhost/debian-python:bookworm -t syncer .   # any base with python3 >= 3.11 and venv
ARG BASE=python:3.11-slim-bookworm

# Build stage: a virtualenv with syncer and its runtime dependencies. Every dependency
# ships a manylinux wheel, so no compiler is needed here either.
FROM ${BASE} AS build
# A build behind a TLS-inspecting proxy passes the CA bundle it mounted (PIP_CERT=path).
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/sh", "-eu", "-c"]
# binutils, for strip, in this stage only: the wheels' extension modules carry symbols that
# make up ~20 MB of the final image. Not the vendored libraries in *.libs/: auditwheel
# patched those, and bookworm's strip leaves them unloadable (numpy's OpenBLAS: "ELF load
# command address/offset not page-aligned"). BASE is Debian-based, as python:*-slim is.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends binutils > /dev/null \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncer ./syncer
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi; \
    python3 -m venv /opt/syncer; \
    /opt/syncer/bin/pip install --no-compile .; \
    /opt/syncer/bin/pip uninstall -y pip setuptools; \
    find /opt/syncer -name '__pycache__' -prune -exec rm -rf {} +; \
    find /opt/syncer -path '*/numpy/*/tests' -prune -exec rm -rf {} +; \
    find /opt/syncer -name '*.so' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} +; \
    /opt/syncer/bin/python -m compileall -q -j 0 /opt/syncer/lib

# Final stage: the virtualenv and a non-root user; no compiler, no pip, no caches.
FROM ${BASE}
COPY --from=build /opt/syncer /opt/syncer
RUN useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin syncer \
    && mkdir -p /etc/syncer
ENV PATH=/opt/syncer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:0
# /metrics, /healthz and /readyz.
EXPOSE 9187
# No curl in the image: the virtualenv's Python asks /healthz (200 while the event loop
# turns and the tasks are alive).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:9187/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["syncer", "-c", "/etc/syncer/syncer.toml"]
CMD ["run", "--listen", "0.0.0.0:9187"]
