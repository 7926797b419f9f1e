"""The import contracts in pyproject.toml hold, and `lint-imports` really fails when one is broken.

The contracts: the operator and the worker never import each other, the shared package imports
neither, and the operator's modules form layers (entry points, effects, the decision, pure models)
with no import circles. A broken contract is shown by running the linter on a scratch copy of the
packages with one bad import added; the working tree is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _scratch(tmp_path: Path) -> Path:
    """mikrom/, with operator/ and worker/ inside it as mikrom.operator and mikrom.worker."""
    root = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "mikrom", root / "mikrom", ignore=ignore)
    shutil.copytree(REPO / "operator", root / "mikrom" / "operator", ignore=ignore)
    shutil.copytree(REPO / "worker", root / "mikrom" / "worker", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_operator_module_sits_in_a_layer():
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    named = {m.strip() for layer in layers["layers"] for m in layer.split("|")}
    modules = {f"mikrom.operator.{p.stem}" for p in (REPO / "operator").glob("*.py")}
    assert modules == named


def test_every_shared_module_is_bound_by_the_shared_contract():
    (shared,) = [c for c in _contracts() if c["name"].startswith("the shared package")]
    modules = {f"mikrom.{p.stem}" for p in (REPO / "mikrom").glob("*.py") if p.stem != "__init__"}
    assert modules == set(shared["source_modules"])


@pytest.mark.parametrize("module,line,broken", [
    ("operator/decide.py", "from mikrom.worker import reconcile", "the operator never imports the worker"),
    ("worker/messages.py", "from mikrom.operator import lifecycle", "the worker never imports the operator"),
    ("names.py", "from mikrom.operator import lifecycle", "the shared package imports neither"),
    ("operator/decide.py", "from mikrom.operator import vms", "operator layers"),
    ("operator/lifecycle.py", "from mikrom.operator import placement", "operator layers"),
])
def test_a_bad_import_breaks_its_contract(tmp_path, module, line, broken):
    root = _scratch(tmp_path)
    assert _lint(root).returncode == 0  # the copy itself is clean
    target = root / "mikrom" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa: E402,F401\n")
    result = _lint(root)
    assert result.returncode != 0
    assert any(broken in ln and "BROKEN" in ln for ln in result.stdout.splitlines()), result.stdout
