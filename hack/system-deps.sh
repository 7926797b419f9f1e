#!/usr/bin/env bash
# Debian packages the project and its tests need; installs only what is missing.
# containerd, runc, the CNI plugins, buildah and debootstrap run the real test cluster and build its images.
# graphviz renders docs/architecture.svg (`make docs`) and its test.
# faketime (libfaketime) runs a worker with a wrong wall clock in the fencing e2e tests.
# chromium takes the headless screenshots of Flower's dashboard (tests/harness/screenshot.py).
set -euo pipefail
pkgs=(redis-server openssl iproute2 iptables nftables iputils-ping procps qemu-system-x86 busybox-static cpio e2fsprogs python3-venv
      containerd runc containernetworking-plugins buildah debootstrap graphviz
      faketime
      chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# the Debian package starts a system redis on 6379; the tests start their own on free ports
if command -v systemctl >/dev/null && systemctl is-active -q redis-server 2>/dev/null; then
  $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
