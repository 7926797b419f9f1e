"""The hash-locked requirements cover what pyproject.toml asks for, so a dependency added there
cannot be left out of the virtualenv or the images silently: `make lock` regenerates them.

requirements-test.lock feeds the virtualenv, requirements.lock the container images; both are
installed with `pip install --require-hashes`, then the project with `--no-deps
--no-build-isolation` (so its build backend must be locked too)."""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = REPO / "requirements.lock"
TEST_LOCK = REPO / "requirements-test.lock"
BUILD_IN = REPO / "requirements-build.in"

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]*))?\\?\s*$")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
RELOCK = "run `make lock` and commit requirements.lock and requirements-test.lock"


@dataclass
class Pin:
    name: str
    version: str
    marker: str
    hashes: list[str] = field(default_factory=list)


def _pins(path: Path) -> dict[str, list[Pin]]:
    """Each canonical package name of a pip requirements file with hashes -> its pins (a universal
    lock may pin one name more than once, under different markers)."""
    pins: dict[str, list[Pin]] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            current = Pin(canonicalize_name(m["name"]), m["version"], (m["marker"] or "").strip())
            pins.setdefault(current.name, []).append(current)
        elif current and line.startswith(" ") and (h := HASH.search(line)):
            current.hashes.append(h.group())
        elif not line.startswith(" "):
            current = None
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(specs: list[str]) -> list[Requirement]:
    return [Requirement(s) for s in specs]


def _runtime() -> list[Requirement]:
    return _requirements(_pyproject()["project"]["dependencies"])


def _test_extra() -> list[Requirement]:
    return _requirements(_pyproject()["project"]["optional-dependencies"]["test"])


def _build() -> list[Requirement]:
    return _requirements(_pyproject()["build-system"]["requires"])


def _missing(reqs: list[Requirement], lock: Path) -> list[str]:
    pins = _pins(lock)
    return sorted(str(r) for r in reqs if canonicalize_name(r.name) not in pins)


def test_every_runtime_dependency_in_pyproject_is_pinned_in_both_locks():
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        assert not _missing(_runtime(), lock), f"{lock.name} lacks {_missing(_runtime(), lock)}: {RELOCK}"


def test_every_test_extra_is_pinned_in_the_test_lock():
    assert not _missing(_test_extra(), TEST_LOCK), f"{TEST_LOCK.name} lacks {_missing(_test_extra(), TEST_LOCK)}: {RELOCK}"


def test_the_build_backend_is_pinned_so_the_project_installs_without_build_isolation():
    build_in = [Requirement(line) for line in BUILD_IN.read_text().splitlines() if line and not line.startswith("#")]
    names_in = {canonicalize_name(r.name) for r in build_in}
    for req in _build():
        assert canonicalize_name(req.name) in names_in, f"{BUILD_IN.name} lacks {req} from [build-system].requires"
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        assert not _missing(_build() + build_in, lock), f"{lock.name} lacks {_missing(_build() + build_in, lock)}: {RELOCK}"


def test_pins_satisfy_the_version_ranges_in_pyproject():
    checks = [(RUNTIME_LOCK, _runtime() + _build()), (TEST_LOCK, _runtime() + _test_extra() + _build())]
    for lock, reqs in checks:
        pins = _pins(lock)
        for req in reqs:
            for pin in pins.get(canonicalize_name(req.name), []):
                assert req.specifier.contains(pin.version, prereleases=True), \
                    f"{lock.name} pins {pin.name}=={pin.version}, outside {req}: {RELOCK}"


def test_every_pin_carries_a_hash_for_require_hashes_mode():
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        pins = [p for ps in _pins(lock).values() for p in ps]
        assert pins, f"{lock.name} pins nothing"
        unhashed = [f"{p.name}=={p.version}" for p in pins if not p.hashes]
        assert not unhashed, f"{lock.name}: no --hash for {unhashed}"


def test_the_images_pin_the_same_versions_as_the_tests():
    test_pins = _pins(TEST_LOCK)
    for name, pins in _pins(RUNTIME_LOCK).items():
        assert name in test_pins, f"{RUNTIME_LOCK.name} pins {name}, which {TEST_LOCK.name} lacks: {RELOCK}"
        assert {(p.version, p.marker) for p in pins} <= {(p.version, p.marker) for p in test_pins[name]}, \
            f"{name}: {RUNTIME_LOCK.name} and {TEST_LOCK.name} disagree: {RELOCK}"
