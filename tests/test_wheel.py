"""The wheel works outside the source tree: only `kvmesh` is installed, services included.

Built from a copy of the checkout (so no build/ litter here), installed with --no-deps into a
fresh virtualenv outside the checkout whose third-party packages come from this venv through
a plain path line in a .pth file: fast and needs no package index. Such a line only adds the
directory to sys.path; the .pth files inside it (the editable install's finder) are not run,
which the test checks by where `kvmesh` is imported from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INPUT"] = "1"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built without build isolation (this venv's setuptools): no index needed."""
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")  # the wheel compiles its own C parts
    for name in ("kvmesh", "services"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    assert (src / "kvmesh" / "services").is_symlink()
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)], cwd=out, timeout=240)
    (built,) = out.glob("kvmesh-*.whl")
    return built


def test_the_wheel_holds_kvmesh_only_with_services_as_real_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
    names = {i.filename for i in infos}
    assert {n.split("/")[0] for n in names} == {"kvmesh", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}"
                                                + ".dist-info"}
    is_link = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
    assert is_link == []
    services = {str(p.relative_to(ROOT)).replace("services/", "kvmesh/services/", 1)
                for p in (ROOT / "services").rglob("*.py") if "__pycache__" not in p.parts}
    assert services and services <= names
    assert "kvmesh/services/metadata/stores/redis_store.py" in names
    assert "kvmesh/py.typed" in names
    generated = {p.name for p in (ROOT / "kvmesh" / "v1").glob("*_pb2*.py*")}
    assert any(n.endswith(".pyi") for n in generated)
    assert {f"kvmesh/v1/{n}" for n in generated} <= names
    native = {n.split(".")[0] for n in names if n.endswith(".so")}
    assert native == {"kvmesh/_blocks", "kvmesh/services/router/_node", "kvmesh/services/router/_shards",
                      "kvmesh/services/router/kv_events/_decode"}


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, third-party packages borrowed from this venv."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=env_dir.parent, timeout=60)
    python = env_dir / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=env_dir.parent, timeout=30).stdout.strip())
    (purelib / "borrowed-deps.pth").write_text(f"{SITE_PACKAGES}\n")
    # pip itself comes from the borrowed path; --ignore-installed: the dev venv's kvmesh
    # metadata is visible there too, and must neither block nor be uninstalled.
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
         "--disable-pip-version-check", str(wheel)], cwd=env_dir.parent, timeout=120)
    return env_dir


def test_installed_kvmesh_imports_from_the_venv_and_services_stays_inside_it(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    code = (
        "import kvmesh, kvmesh.services.cachenode.service, kvmesh.services.metadata.stores.redis_store, sys\n"
        "import kvmesh.services.router.kv_events.ingest  # the compiled parts load\n"
        "print(kvmesh.__file__)\n"
        "print(kvmesh.services.cachenode.service.__file__)\n"
        "print(any(type(f).__name__ == '_EditableFinder' for f in sys.meta_path))\n"
        "try:\n    import services\nexcept ImportError:\n    print('no services')\nelse:\n"
        "    print('services from', services.__file__)\n"
    )
    out = run([python, "-c", code], cwd=tmp_path, timeout=60).stdout.splitlines()
    venv_root = venv.resolve()
    assert Path(out[0]).resolve().is_relative_to(venv_root), out
    assert Path(out[1]).resolve().is_relative_to(venv_root), out
    assert not Path(out[1]).resolve().is_relative_to(ROOT), out
    assert out[2:] == ["False", "no services"], out


def test_kvmesh_up_demo_runs_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    """The console script starts every member as a child of the installed package, ports free."""
    proc = run([str(venv / "bin" / "kvmesh"), "up", "--demo", "--base-port", "0", "--cachenodes", "1",
                "--engines", "1", "--demo-conversations", "2", "--pool-blocks", "200", "--start-timeout", "60",
                "--state-dir", str(tmp_path / "pki")],
               cwd=tmp_path, timeout=150)
    assert "KVMESH_READY service=mesh" in proc.stdout
    assert "kvmesh demo" in proc.stdout and "kvmesh served" in proc.stdout, proc.stdout[-3000:]
    assert "all members stopped" in proc.stdout
    assert "mutual TLS on, policy enforced" in proc.stdout  # secure by default from the wheel too
