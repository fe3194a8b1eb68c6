#!/usr/bin/env bash
# The monitoring files: promtool check config / check rules / test rules, and, if a /metrics
# body is given (METRICS_FILE, tests/test_dashboards.py writes one from a real run),
# promtool check metrics on it. promtool comes from Debian's prometheus package, installed
# here if missing (as smoke.sh installs podman).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool > /dev/null; then
  echo "installing promtool (Debian package prometheus)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus > /dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# prometheus.yml names its rules by their path in the container: check a copy that names them here.
sed "s|/etc/prometheus/alerts.yml|$PWD/deploy/prometheus/alerts.yml|" deploy/prometheus/prometheus.yml > "$work/prometheus.yml"
promtool check config "$work/prometheus.yml"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
if [ -n "${METRICS_FILE:-}" ]; then
  promtool check metrics < "$METRICS_FILE"
  echo "promtool: $METRICS_FILE is valid exposition"
fi
