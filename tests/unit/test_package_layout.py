"""The package layout: one distribution, the operator and worker inside `mikrom`, and nothing that
shadows the standard library's `operator` module, whatever the current directory."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.mark.parametrize("cwd", [REPO, REPO / "operator", REPO / "tests", Path("/")])
@pytest.mark.parametrize("flags", [[], ["-S"], ["-I"]])
def test_stdlib_operator_is_never_shadowed(cwd, flags):
    code = "import operator, sys; print(operator.__file__); assert operator.itemgetter(1)([0, 7]) == 7"
    res = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(STDLIB), res.stdout


@pytest.mark.parametrize("cwd", [REPO, Path("/")])
def test_operator_and_worker_import_under_mikrom(cwd):
    code = "import mikrom.operator, mikrom.worker, mikrom.celery_app; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_operator_and_worker_folders_are_namespace_packages():
    # an __init__.py here would make `import operator` find this folder first under `python -S`
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "worker" / "__init__.py").exists()


def test_operator_and_worker_never_import_each_other():
    for side, other in (("operator", "worker"), ("worker", "operator")):
        for path in (REPO / side).rglob("*.py"):
            text = path.read_text()
            assert f"mikrom.{other}" not in text, f"{path} imports mikrom.{other}"
