#!/usr/bin/env bash
# Regenerates the hash-locked requirements from pyproject.toml (`make lock`):
#   requirements-test.lock   runtime + test extras + requirements-build.in   (the virtualenv, `make venv`)
#   requirements.lock        runtime + requirements-build.in                  (the container images)
# The runtime lock is resolved under the test lock as constraints, so the images and the tests run
# the very same versions. Both are universal (markers instead of this machine's answers, so
# Debian's Python 3.11.2 in the images gets what it needs) and carry the hashes of every file of
# each pinned version for `pip install --require-hashes`.
#
# The resolver is uv's `uv pip compile`: it resolves without installing anything, targets a Python
# version other than the one running it, and writes pip's requirements format, so installing needs
# plain pip only. uv is installed, pinned, into a tool virtualenv in the cache.
#
# Existing pins are kept unless a new requirement forces a change; MIKROM_LOCK_UPGRADE=1 moves
# every pin to the newest version allowed.
#
# Honoured: MIKROM_TOOLS_CACHE (default ~/.cache/mikrom/tools), UV_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=${UV_VERSION:-0.13.8}
TOOLS=${MIKROM_TOOLS_CACHE:-$HOME/.cache/mikrom/tools}
uv_venv="$TOOLS/uv-$UV_VERSION"
if [ ! -x "$uv_venv/bin/uv" ]; then
  echo "lock: installing uv $UV_VERSION into $uv_venv" >&2
  rm -rf "$uv_venv"
  python3 -m venv "$uv_venv"
  "$uv_venv/bin/pip" install -q "uv==$UV_VERSION"
fi

compile=("$uv_venv/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes
         --custom-compile-command "make lock")
[ "${MIKROM_LOCK_UPGRADE:-}" = 1 ] && compile+=(--upgrade)

"${compile[@]}" --extra test pyproject.toml requirements-build.in -o requirements-test.lock
"${compile[@]}" pyproject.toml requirements-build.in -c requirements-test.lock -o requirements.lock
echo "lock: wrote requirements-test.lock and requirements.lock" >&2
