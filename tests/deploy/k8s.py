"""Helpers for Kubernetes manifest tests: render with `kubectl kustomize`, validate with kubernetes-validate.

kubernetes-validate ships the OpenAPI schemas of each Kubernetes release, so `--strict`
validation (unknown fields rejected) works offline. Manifests are checked against the oldest
and the newest release we support.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSIONS = ("1.30.0", "1.37.0")
VALIDATE_CLI = Path(sys.executable).parent / "kubernetes-validate"


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl is needed to render the kustomizations (Debian: kubernetes-client)"
    return path


def render(kustomization: Path) -> str:
    """`kubectl kustomize DIR` output (a multi-document YAML stream)."""
    done = subprocess.run([kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def documents(stream: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(stream) if d]


def validate_cli(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict -k VERSION FILE` (rc 0 when every document validates)."""
    return subprocess.run(
        [str(VALIDATE_CLI), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def validate_objects(objects: Iterable[dict[str, Any]], versions: Iterable[str] = KUBE_VERSIONS) -> None:
    """Strict validation through the library (fast for many generated objects); raises on the first error."""
    import kubernetes_validate

    for version in versions:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def by_kind(objs: Iterable[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"])


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """matchLabels semantics (the only form these manifests use)."""
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())
