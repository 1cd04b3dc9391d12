"""The image installs `.[EXTRAS]`: every third-party module the code imports must come with it.

A module missing from the image fails only at run time in a container (a disk tier that cannot
import its store, a bench job that cannot plot), which no local test would notice because the
dev virtualenv has everything. This walks every import in kvmesh/ and services/ and checks its
distribution against the closure of the core dependencies plus the extras the Dockerfile
bakes in. Modules of the optional engines may import their own extra's packages.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
# Import name → the extra that provides it, allowed only in modules that exist for that extra.
OPTIONAL_IMPORTS = {"torch": "gpu", "mooncake": "rdma", "vineyard": "vineyard"}
# The test harness, generated stubs, and the plug-ins that run inside a third-party product's own
# environment (vLLM, LMCache, aibrix-kvcache), which provides what they import from it.
NOT_IN_IMAGE = ("kvmesh/tools/testing/", "kvmesh/v1/", "kvmesh/integrations/")


def _closure(requirements: list[str], extras: set[str] | None = None) -> set[str]:
    """Distribution names reachable from the requirements (installed metadata, markers honoured)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(sub_req.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub_req)
    return seen


def _image_extras() -> set[str]:
    match = re.search(r"^ARG EXTRAS=(\S+)", DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile declares ARG EXTRAS"
    return set(match.group(1).split(","))


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in [*ROOT.glob("kvmesh/**/*.py"), *ROOT.glob("services/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_IN_IMAGE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("kvmesh", "services"):
                    found.setdefault(top, set()).add(rel)
    return found


def test_image_extras_exist() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert _image_extras() <= extras - {"dev"}


def test_everything_imported_is_installed_in_the_image() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    image = _closure([*project["dependencies"], *(r for e in _image_extras() for r in optional[e])])
    owners = md.packages_distributions()
    missing = []
    for top, files in sorted(_imports().items()):
        dists = {canonicalize_name(d) for d in owners.get(top, [])}
        assert dists, f"{top} (imported by {sorted(files)}) is not installed at all"
        if dists & image:
            continue
        extra = OPTIONAL_IMPORTS.get(top)
        if extra and dists & _closure(optional[extra]):
            continue
        missing.append(f"{top} ({', '.join(sorted(dists))}) imported by {sorted(files)}")
    assert not missing, "not installed by the image's `pip install .[EXTRAS]`:\n" + "\n".join(missing)


def test_the_check_notices_a_dev_only_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    image = _closure(project["dependencies"])
    assert "grpcio" in image and "protobuf" in image
    assert "hypothesis" not in image and "pytest" not in image
