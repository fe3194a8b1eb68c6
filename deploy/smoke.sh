#!/usr/bin/env bash
# The deployment files, run for real: builds the images (from a debootstrap base, since no
# registry can be pulled from), brings up docker-compose.yml with compose.override.smoke.yml
# under podman-compose, inserts, updates and deletes rows and checks every vector, checks
# /metrics and /readyz through the published port, the bad-input cases (no config, no API
# key, no database), SIGTERMs the syncer and checks it stops cleanly within its grace period,
# and tears everything down. Needs root and nothing installed beforehand; ~4-5 minutes.
#
#   sudo deploy/smoke.sh          (KEEP=1 leaves the stack up for a look)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
proj=syncer-smoke
port=${SYNCER_METRICS_PORT:-19187}
work=/var/tmp/syncer-smoke
grace_s=30   # docker-compose.yml: stop_grace_period of the syncer service
log() { printf '[smoke %3ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

# --- tools: podman, runc and debootstrap (deploy/podman.sh), podman-compose in a virtualenv
# of its own.
# shellcheck source=deploy/podman.sh
. deploy/podman.sh
mkdir -p "$work"
if [ ! -x "$work/venv/bin/podman-compose" ]; then
  log "installing podman-compose"
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q 'podman-compose==1.6.0'
fi
export CONTAINERS_CONF=$PWD/deploy/podman/containers.conf
compose() { "$work/venv/bin/podman-compose" -p "$proj" -f docker-compose.yml -f compose.override.smoke.yml "$@"; }
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

ticker=
teardown() {
  [ -n "$ticker" ] && kill "$ticker" 2> /dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then log "KEEP=1: the stack stays up ($proj)"; return; fi
  podman rm -f "$proj-nodb" > /dev/null 2>&1 || true
  compose down -v > /dev/null 2>&1 || true
  log "torn down"
}
trap teardown EXIT

# --- images
log "base image"
deploy/base-image.sh localhost/syncer-base:bookworm
build() {  # IMAGE CONTEXT [DOCKERFILE]
  podman build -q --format docker --build-arg BASE=localhost/syncer-base:bookworm \
    -v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt -t "$1" "$2" > /dev/null
}
log "building localhost/syncer:latest"
build localhost/syncer:latest .
log "building localhost/syncer-db:latest"
build localhost/syncer-db:latest deploy/db
size=$(podman image inspect localhost/syncer:latest --format '{{.Size}}')
log "syncer image: $(( size / 1000000 )) MB"

# --- bad input, before the stack: each is one line and a non-zero exit, no crash loop
log "bad input: no config, no API key"
out=$(podman run --rm --no-healthcheck localhost/syncer:latest 2>&1) && fail "ran without a config"
[ "$(echo "$out" | grep -c .)" = 1 ] && [[ $out == *"/etc/syncer/syncer.toml: file not found"* ]] \
  || fail "missing config: $out"
out=$(podman run --rm --no-healthcheck -v "$PWD/examples/syncer.toml:/etc/syncer/syncer.toml:ro" \
  localhost/syncer:latest 2>&1) && fail "ran without an API key"
[ "$(echo "$out" | grep -c .)" = 1 ] && [[ $out == *"EMBEDDER_API_KEY is not set"* ]] \
  || fail "unset API key: $out"

# podman runs HEALTHCHECKs from systemd timers; without systemd this does their job, so the
# compose file's depends_on conditions (service_healthy) see real health states.
( while sleep 2; do
    for c in $(podman ps -q --filter "label=io.podman.compose.project=$proj"); do
      podman healthcheck run "$c" > /dev/null 2>&1 || true
    done
  done ) &
ticker=$!

# --- the stack
log "compose up"
compose down -v > /dev/null 2>&1 || true
export EMBEDDER_API_KEY=smoke-key SYNCER_METRICS_PORT=$port
# podman 4.3 has no health conditions (podman-compose ignores depends_on's service_healthy
# and service_completed_successfully there), so the order the compose file states is kept
# here: db and embedder healthy, then install exited 0, then the syncer.
up() { compose up -d --no-deps "$@" >> "$work/up.log" 2>&1 || { cat "$work/up.log"; fail "compose up $*"; }; }
ctr() { podman ps -a --filter "label=io.podman.compose.project=$proj" \
  --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1; }
healthy() {  # SERVICE: wait until its HEALTHCHECK passes
  for _ in $(seq 90); do podman healthcheck run "$(ctr "$1")" > /dev/null 2>&1 && return 0; sleep 1; done
  compose logs "$1" | tail -20; fail "$1 never healthy"
}
: > "$work/up.log"
up db embedder
healthy db
healthy embedder
log "db and embedder healthy"
up syncer-install
[ "$(podman wait "$(ctr syncer-install)")" = 0 ] || { compose logs syncer-install | tail; fail "install did not exit 0"; }
log "syncer install exited 0"
up syncer
syncer_ctr=$(ctr syncer)
[ -n "$syncer_ctr" ] || fail "no syncer container"
check() { podman exec -i "$syncer_ctr" python3 - "$@" < deploy/smoke_check.py; }
http() {  # URL -> status code (000 when nothing answers)
  python3 - "$1" << 'PY'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("000")
PY
}
for _ in $(seq 120); do [ "$(http "http://127.0.0.1:$port/readyz")" = 200 ] && break; sleep 1; done
[ "$(http "http://127.0.0.1:$port/readyz")" = 200 ] || { compose logs syncer | tail -20; fail "/readyz never 200"; }
log "/readyz 200 through the published port"

log "rows: the sample, then inserts, updates and a delete"
check wait 4
check write
check wait 6
metrics=$(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$port/metrics').read().decode())")
for m in syncer_vectors_written_total syncer_queue_depth syncer_rows_total; do
  grep -q "^$m" <<< "$metrics" || fail "/metrics has no $m"
done
grep -q 'syncer_vectors_written_total{pipeline="docs"}' <<< "$metrics" || fail "no vectors counted"
log "/metrics has the syncer's metrics"
[ "$(podman inspect "$syncer_ctr" --format '{{.State.Health.Status}}')" = healthy ] \
  || fail "the image's HEALTHCHECK does not report healthy"
log "HEALTHCHECK: healthy"

# --- the database away at start: retried, logged, /readyz 503 while /healthz stays 200
log "bad input: the database unreachable"
podman run -d --no-healthcheck --name "$proj-nodb" -p "127.0.0.1:$((port + 1)):9187" -e EMBEDDER_API_KEY=x \
  -e SYNCER_DATABASE_URL=postgresql://app:app@127.0.0.1:1/app \
  -v "$PWD/examples/syncer.toml:/etc/syncer/syncer.toml:ro" localhost/syncer:latest > /dev/null
for _ in $(seq 30); do [ "$(http "http://127.0.0.1:$((port + 1))/readyz")" = 503 ] && break; sleep 1; done
[ "$(http "http://127.0.0.1:$((port + 1))/readyz")" = 503 ] || fail "/readyz is not 503 without a database"
[ "$(http "http://127.0.0.1:$((port + 1))/healthz")" = 200 ] || fail "/healthz is not 200 while waiting"
podman logs "$proj-nodb" 2>&1 | grep -qi "database" || fail "the wait for the database is not logged"
[ "$(podman inspect "$proj-nodb" --format '{{.State.Running}}')" = true ] || fail "it gave up"
podman rm -f "$proj-nodb" > /dev/null
log "unreachable database: waited, logged, /readyz 503, /healthz 200"

# --- SIGTERM: a soft stop, exit 0, well within the grace period
log "SIGTERM to the syncer"
t0=$(date +%s%N)
podman kill --signal TERM "$syncer_ctr" > /dev/null
for _ in $(seq $(( grace_s * 10 ))); do
  [ "$(podman inspect "$syncer_ctr" --format '{{.State.Running}}')" = false ] && break
  sleep 0.1
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ "$(podman inspect "$syncer_ctr" --format '{{.State.Running}}')" = false ] || fail "still running after ${grace_s}s"
code=$(podman inspect "$syncer_ctr" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs "$syncer_ctr" 2>&1 | tail -5; fail "exit status $code after SIGTERM"; }
log "stopped cleanly (exit 0) in ${ms} ms, grace period ${grace_s}s"

log "PASS in $(( $(date +%s) - start ))s"
