"""The Helm chart's offline checks; deploy/check.sh runs them with the `deploy` extra's python.

helm-python-sdk binds Helm's own Go SDK (no `helm` binary, no cluster): the chart is linted,
rendered with its defaults and with the optional objects on, and every render is validated
with kubernetes-validate --strict against the Kubernetes version check.sh pins. The schema
must reject a wrongly typed and an unknown value. Last, the default render is compared with
`kubectl kustomize deploy/kubernetes/base` on what must not drift between the two (probes,
security contexts, resources, grace period, commands, env, mounts, PDB, ports, the config),
and the optional objects with deploy/kubernetes/overlays/example. One line a check; the first
failure exits 1 with both sides.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/syncer"
K8S_VERSION = "1.31.0"  # deploy/check.sh gives its k8s_version as the argument
BIN = Path(sys.executable).parent  # the tools come with the same extra
# The optional objects on, and every value that adds to a template, so strict validation
# sees those parts too.
OPTIONAL: dict[str, Any] = {
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "keda": {"enabled": True},
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    "imagePullSecrets": [{"name": "registry"}],
    "podAnnotations": {"example.com/team": "search"},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync"}],
    "affinity": {"nodeAffinity": {}},
    "serviceAccount": {"annotations": {"example.com/role": "none"}},
    "podDisruptionBudget": {"minAvailable": "50%"},
}

Obj = dict[str, Any]


class CheckError(Exception):
    """A check failed; the message says which and how."""


def ok(line: str) -> None:
    print(f"helm: {line}")


def lint(k8s_version: str) -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{k8s_version}")
    if report["errors"]:
        raise CheckError("helm lint: " + "; ".join(e.strip() for e in report["errors"]))
    notes = [m["error"] for m in report["messages"]]
    ok(f"lint --strict (Kubernetes {k8s_version}) passes; notes: {'; '.join(notes) or 'none'}")


@dataclass(frozen=True)
class Render:
    text: str  # the manifests as Helm wrote them, one YAML stream
    docs: list[Obj]


def render(values: Obj, name: str = "syncer", namespace: str = "syncer") -> Render:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    text = "\n---\n".join(t for p, t in sorted(manifests.items()) if not p.endswith("NOTES.txt"))
    return Render(text, [d for d in yaml.safe_load_all(text) if d])


def validate(rendered: Render, what: str, out: Path, k8s_version: str) -> None:
    f = out / f"{what}.yaml"
    f.write_text(rendered.text)
    # The CRDs' kinds (ServiceMonitor, ScaledObject) have no schema there: a warning only.
    run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", k8s_version, str(f)])
    kinds = ", ".join(sorted(d["kind"] for d in rendered.docs))
    ok(f"{what} render and validate against {k8s_version} ({kinds})")


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise CheckError(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


def rejects(values: Obj, expected: str, what: str) -> None:
    try:
        render(values)
    except helm.HelmError as err:
        message = " ".join(str(err).split())
        if expected not in message:
            raise CheckError(f"{what}: rejected, but not with {expected!r}: {message}") from None
        ok(f"{what} is rejected: {message.split('syncer: - ')[-1]}")
        return
    raise CheckError(f"{what}: rendered, the chart should have refused {values}")


def one(docs: list[Obj], kind: str) -> Obj:
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        raise CheckError(f"expected one {kind}, found {len(found)}")
    return found[0]


def pod(docs: list[Obj], kind: str) -> Obj:
    spec: Obj = one(docs, kind)["spec"]["template"]["spec"]
    return spec


def container(docs: list[Obj], kind: str) -> Obj:
    containers: list[Obj] = pod(docs, kind)["containers"]
    return containers[0]


def same(what: str, chart: object, kustomize: object) -> None:
    if chart == kustomize:
        ok(f"{what} as in kustomize")
        return
    if isinstance(chart, str) and isinstance(kustomize, str):
        lines = difflib.unified_diff(
            kustomize.splitlines(), chart.splitlines(), "kustomize", "chart", lineterm=""
        )
        raise CheckError(f"{what} differs:\n" + "\n".join(lines))
    raise CheckError(f"{what} differs:\n  chart:     {chart!r}\n  kustomize: {kustomize!r}")


# What must be the same in both: a name and how to read it from a render.
Field = tuple[str, Callable[[list[Obj]], object]]
CONTAINER_FIELDS = [
    "startupProbe",
    "livenessProbe",
    "readinessProbe",
    "securityContext",
    "resources",
    "args",
    "command",
    "env",
    "volumeMounts",
]


def fields() -> list[Field]:
    def field(kind: str, key: str) -> Field:
        return f"{kind} container {key}", lambda d: container(d, kind).get(key)

    def config(docs: list[Obj]) -> object:
        # The chart's install hook has its own copy: the distinct contents, one in both.
        contents = sorted({d["data"]["syncer.toml"] for d in docs if d["kind"] == "ConfigMap"})
        return contents[0] if len(contents) == 1 else contents

    return [
        *(field("Deployment", key) for key in CONTAINER_FIELDS),
        *(field("Job", key) for key in ("args", "command", "env", "volumeMounts")),
        (
            "Deployment grace period",
            lambda d: pod(d, "Deployment")["terminationGracePeriodSeconds"],
        ),
        ("Deployment pod securityContext", lambda d: pod(d, "Deployment")["securityContext"]),
        ("Job pod securityContext", lambda d: pod(d, "Job")["securityContext"]),
        (
            "PodDisruptionBudget minAvailable",
            lambda d: one(d, "PodDisruptionBudget")["spec"]["minAvailable"],
        ),
        ("Service ports", lambda d: one(d, "Service")["spec"]["ports"]),
        ("syncer.toml", config),
    ]


def optional_fields() -> list[Field]:
    def trigger(docs: list[Obj]) -> object:
        return one(docs, "ScaledObject")["spec"]["triggers"]

    def bounds(docs: list[Obj]) -> object:
        spec = one(docs, "ScaledObject")["spec"]
        keys = (
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "advanced",
        )
        return {k: spec.get(k) for k in keys}

    return [
        ("ScaledObject trigger (query, threshold)", trigger),
        ("ScaledObject bounds and scale-down", bounds),
        ("ServiceMonitor endpoints", lambda d: one(d, "ServiceMonitor")["spec"]["endpoints"]),
    ]


def install_hook(docs: list[Obj]) -> None:
    job = one(docs, "Job")["metadata"]["annotations"]
    hook = (job.get("helm.sh/hook"), job.get("helm.sh/hook-delete-policy"))
    if hook != ("pre-install,pre-upgrade", "before-hook-creation"):
        raise CheckError(f"the install Job's hook annotations: {hook}")
    ok("install Job is a pre-install,pre-upgrade hook (before-hook-creation)")


def kustomize(path: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(run([str(BIN / "kubectl"), "kustomize", path])) if d]


def main(k8s_version: str) -> None:
    lint(k8s_version)
    defaults, optional = render({}), render(OPTIONAL, name="demo", namespace="prod")
    with tempfile.TemporaryDirectory() as out:
        validate(defaults, "defaults", Path(out), k8s_version)
        validate(optional, "all-options", Path(out), k8s_version)
    rejects(
        {"replicaCount": "two"}, "at '/replicaCount': got string, want integer", "replicaCount: two"
    )
    rejects({"replicas": 3}, "additional properties 'replicas' not allowed", "unknown key replicas")
    rejects(
        {"terminationGracePeriodSeconds": 30},
        "must be above the config's [worker] shutdown_timeout_s (30)",
        "a grace period of 30 s",
    )
    install_hook(defaults.docs)
    base = kustomize("deploy/kubernetes/base")
    for what, get in fields():
        same(what, get(defaults.docs), get(base))
    example = kustomize("deploy/kubernetes/overlays/example")
    for what, get in optional_fields():
        same(what, get(optional.docs), get(example))


if __name__ == "__main__":
    try:
        main(sys.argv[1] if len(sys.argv) > 1 else K8S_VERSION)
    except CheckError as err:
        sys.exit(f"helm: FAILED: {err}")
