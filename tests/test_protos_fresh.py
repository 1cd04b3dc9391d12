"""The committed stubs under kvmesh/v1 match what `make protos` generates from protos/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    (copy / "kvmesh" / "v1").mkdir(parents=True)
    subprocess.run([sys.executable, "scripts/gen_protos.py"], cwd=copy, check=True, capture_output=True)
    generated = sorted(p.name for p in (copy / "kvmesh" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "kvmesh" / "v1").iterdir() if p.is_file())
    assert generated == committed, "kvmesh/v1 has files protoc does not make (or misses some): run make protos"
    stale = [
        name for name in generated
        if (copy / "kvmesh" / "v1" / name).read_bytes() != (ROOT / "kvmesh" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale generated stubs, run `make protos`: {stale}"


def test_contract_names_present() -> None:
    checker = ROOT.parent / "shared" / "checks" / "contract_check.py"
    if not checker.exists():  # the contract checker lives beside the checkout in CI and development
        import pytest

        pytest.skip("shared/checks/contract_check.py is not beside this checkout")
    out = subprocess.run([sys.executable, str(checker), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
