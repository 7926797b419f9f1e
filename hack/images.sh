#!/usr/bin/env bash
# Builds the container images without a registry and exports them as OCI archives for
# `ctr -n k8s.io images import`:
#
#   base      Debian bookworm from `debootstrap --variant=minbase`, made an image with
#             `buildah from scratch` + `buildah copy` + `buildah commit`: the stand-in for
#             docker.io/library/debian:bookworm-slim, which the Dockerfiles name by default
#   operator  Dockerfile.operator  \  `buildah bud --pull=false --build-arg BASE_IMAGE=<base>`;
#   worker    Dockerfile.worker    /  Python 3.11 and the hash-locked requirements.lock inside
#   pause     the pod sandbox: busybox-static and hack/images/pause, which exits on TERM or INT
#   redis     Debian's redis-server and redis-tools on the base, uid 999: the stand-in for
#             docker.io/library/redis, the chart's default (Redis and Sentinel pods)
#
# Each image is tagged localhost/mikrom/NAME:<hash of its inputs> (Dockerfile, the package
# sources, requirements.lock, the base image's ID, build arguments, the build steps below) and
# built only when no archive for that hash exists. A built image must pass a smoke run (imports,
# `celery --version`, the worker's binaries, pause's exit on TERM) before it is exported.
# Writes $CACHE/images.json, {"pause": {"ref": ..., "archive": ..., "id": ...}, "operator": ...,
# "worker": ..., "redis": ...}, and prints its path. Logs go to stderr.
#
# Honoured: MIKROM_OCI_CACHE (default ~/.cache/mikrom/oci), MIKROM_DEBIAN_MIRROR and
# MIKROM_DEBIAN_SECURITY_MIRROR (default: what this machine's apt uses), MIKROM_FIRECRACKER_VERSION
# with MIKROM_FIRECRACKER_SHA256 (and optionally MIKROM_FIRECRACKER_URL) to add Firecracker and
# its jailer to the worker, STORAGE_DRIVER (buildah's; see below).
#
# Readers of images.json take a shared lock on $CACHE/.lock (`flock -s`) while they import: a
# rebuild holds it exclusively and removes the archives it replaces.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HERE="$REPO/hack/images"
CACHE=${MIKROM_OCI_CACHE:-$HOME/.cache/mikrom/oci}
WORK="$CACHE/work"
SUITE=bookworm
FIRECRACKER_VERSION=${MIKROM_FIRECRACKER_VERSION:-}
FIRECRACKER_SHA256=${MIKROM_FIRECRACKER_SHA256:-}
FIRECRACKER_URL=${MIKROM_FIRECRACKER_URL:-}
# buildah's storage driver: the default (overlay) works as root on these machines. Where the
# kernel or the filesystem under /var/lib/containers refuses overlay mounts (e.g. inside another
# container), STORAGE_DRIVER=vfs works everywhere, at the cost of a full copy per layer.
export STORAGE_DRIVER=${STORAGE_DRIVER:-}
[ -n "$STORAGE_DRIVER" ] || unset STORAGE_DRIVER
# builds take both cores for minutes; let tests and editors go first
NICE=(nice -n 10)

log() { echo "images: $*" >&2; }

# The first URI this machine's apt uses for `suite` (deb822 .sources, then one-line .list).
apt_uri() {
  local suite=$1 f
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
        { uri = ""; ok = 0; deb = 0
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
            if ($i ~ /^Suites:/) { n = split($i, a, /[ \t]+/); for (j = 2; j <= n; j++) if (a[j] == s) ok = 1 }
            if ($i ~ /^Types:/) { n = split($i, a, /[ \t]+/); for (j = 2; j <= n; j++) if (a[j] == "deb") deb = 1 }
          }
          if (ok && deb && uri != "") print uri }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      awk -v s="$suite" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == s) print $i }' "$f"
    done
  } | head -n 1
}

MIRROR=${MIKROM_DEBIAN_MIRROR:-$(apt_uri "$SUITE")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${MIKROM_DEBIAN_SECURITY_MIRROR:-$(apt_uri "$SUITE-security")}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

short() { sha256sum | cut -c1-16; }

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }

# Exports `ref` to $CACHE/NAME-HASH.tar (written beside, then renamed: a reader never sees half
# an archive) and drops the archives and tags of NAME that it replaces.
export_image() {
  local name=$1 ref=$2 archive=$3 old
  rm -f "$archive.tmp"
  buildah push -q "$ref" "oci-archive:$archive.tmp:$ref" >/dev/null
  image_id "$ref" >"$archive.id"
  mv "$archive.tmp" "$archive"
  for old in "$CACHE/$name"-*.tar; do
    [ "$old" = "$archive" ] || rm -f "$old" "$old.id"
  done
  buildah images --noheading --format '{{.Name}}:{{.Tag}}' --filter "reference=localhost/mikrom/$name" 2>/dev/null |
    while read -r old; do
      [ "$old" = "$ref" ] || buildah rmi "$old" >/dev/null 2>&1 || true
    done
}

# Puts `ref` back into buildah's storage from its archive when the storage lost it (a pruned
# storage, a fresh /var/lib/containers) so that the images built on it need not change.
restore_image() {
  local ref=$1 archive=$2 want id
  want=$(cat "$archive.id")
  [ "$(image_id "$ref" || true)" = "$want" ] && return 0
  log "restoring $ref from $archive"
  id=$(buildah pull -q "oci-archive:$archive") || return 1
  buildah tag "$id" "$ref"
  [ "$(image_id "$ref")" = "$want" ]
}

# ---- base: debootstrap -------------------------------------------------------------------

build_base() { # ref
  local ref=$1 rootfs="$WORK/base-rootfs" c
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  log "debootstrap --variant=minbase $SUITE from $MIRROR (about a minute)"
  if ! "${NICE[@]}" debootstrap --variant=minbase --components=main "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    return 1
  fi
  # apt in the image reads the same archive, with updates and security like the slim image
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  install -m 0644 "$HERE/dpkg-slim.cfg" "$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  install -m 0644 "$HERE/apt-slim.conf" "$rootfs/etc/apt/apt.conf.d/slim"
  # what dpkg-slim.cfg would have left out, had it been there during debootstrap
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  # the host's leftovers and what every container runtime provides itself
  rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/dev/* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
  : >"$rootfs/etc/machine-id"
  # `buildah add` of a tarball, not `buildah copy` of the directory: copy makes every file
  # root:root (e.g. /etc/shadow would lose its group `shadow`); a tarball keeps owners and modes.
  tar -C "$rootfs" --numeric-owner --xattrs -cf "$WORK/base-rootfs.tar" .
  rm -rf "$rootfs"
  c=$(buildah from scratch)
  buildah add -q "$c" "$WORK/base-rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd '["bash"]' --label "org.opencontainers.image.description=Debian $SUITE (debootstrap minbase)" "$c"
  buildah commit -q --rm "$c" "$ref" >/dev/null
  rm -f "$WORK/base-rootfs.tar"
}

ensure_base() {
  local h ref archive
  h=$( { echo "$SUITE $MIRROR $SECURITY_MIRROR"; declare -f build_base; cat "$HERE/dpkg-slim.cfg" "$HERE/apt-slim.conf"; } | short)
  ref="localhost/mikrom/base:$SUITE-$h"
  archive="$CACHE/base-$h.tar"
  if [ -f "$archive" ] && [ -f "$archive.id" ] && restore_image "$ref" "$archive"; then
    log "cached: $ref"
  else
    build_base "$ref"
    export_image base "$ref" "$archive"
  fi
  # the ID this archive holds, checked by restore_image: a run with another cache may move the tag
  BASE_ID=$(cat "$archive.id")
}

# ---- pause: busybox-static ---------------------------------------------------------------

build_pause() { # ref busybox
  local ref=$1 busybox=$2 c
  c=$(buildah from scratch)
  buildah copy -q --chmod 0755 "$c" "$busybox" /bin/busybox >/dev/null
  buildah copy -q --chmod 0755 "$c" "$HERE/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --cmd '[]' --stop-signal TERM \
    --label "org.opencontainers.image.description=Mikrom pod sandbox: sleeps until TERM or INT" "$c"
  buildah commit -q --rm "$c" "$ref" >/dev/null
}

# PID 1 of a fresh PID namespace ignores every signal it has no handler for, as in a pod: the
# image's /pause must exit 0 on TERM, promptly. TERM is sent once /pause has its handler (SigCgt
# in /proc/PID/status); before that any PID 1 would ignore it.
smoke_pause() { # ref
  local ref=$1 c mnt outer pid1="" caught rc=0 i
  c=$(buildah from --pull=false "$ref")
  mnt=$(buildah mount "$c")
  mkdir -p "$mnt/dev" && touch "$mnt/dev/null" && mount --bind /dev/null "$mnt/dev/null"
  unshare --pid --fork chroot "$mnt" /pause &
  outer=$!
  for i in $(seq 100); do
    pid1=$(tr -d ' \n' <"/proc/$outer/task/$outer/children" 2>/dev/null || true)
    caught=$(awk '/^SigCgt:/ { print $2 }' "/proc/${pid1:-0}/status" 2>/dev/null || true)
    [ -n "$caught" ] && (( 0x$caught & 0x4000 )) && break
    sleep 0.05
  done
  if [ -n "$pid1" ] && kill -TERM "$pid1" 2>/dev/null; then
    for i in $(seq 100); do
      [ -e "/proc/$pid1" ] || break
      sleep 0.1
    done
  fi
  if [ -z "$pid1" ] || [ -e "/proc/$pid1" ]; then
    rc=1
    kill -KILL ${pid1:+"$pid1"} "$outer" 2>/dev/null || true
  fi
  wait "$outer" || rc=1
  umount "$mnt/dev/null"
  buildah rm "$c" >/dev/null
  [ "$rc" = 0 ] || { log "smoke: $ref did not exit 0 on SIGTERM as PID 1"; return 1; }
}

ensure_pause() {
  local busybox=/bin/busybox h ref archive
  # Debian's busybox-static owns /bin/busybox (the dynamic `busybox` package would too, and
  # would not run alone in an image)
  [ "$(dpkg-query -S "$busybox" 2>/dev/null | cut -d: -f1)" = busybox-static ] ||
    { log "$busybox is not from busybox-static (hack/system-deps.sh installs it)"; return 1; }
  h=$( { sha256sum <"$busybox"; cat "$HERE/pause"; declare -f build_pause; } | short)
  ref="localhost/mikrom/pause:$h"
  archive="$CACHE/pause-$h.tar"
  if [ -f "$archive" ] && [ -f "$archive.id" ]; then
    log "cached: $ref"
  else
    log "building $ref"
    build_pause "$ref" "$busybox"
    smoke_pause "$ref"
    log "smoke: $ref exits 0 on SIGTERM as PID 1"
    export_image pause "$ref" "$archive"
  fi
  record pause "$ref" "$archive"
}

# ---- redis: Debian's redis-server on the base ---------------------------------------------

# The stand-in for docker.io/library/redis, the chart's default: Debian's redis-server and
# redis-tools (redis-cli, and `redis-server --sentinel`) on the base image, the `redis` account
# made uid/gid 999 first (the official image's, which the chart's securityContext runs as) so the
# package's postinst adopts it. No entrypoint: the chart names the command. A policy-rc.d keeps
# the postinst from starting a server during the build.
build_redis() { # ref
  local ref=$1 c
  c=$(buildah from --pull=false "$BASE_ID")
  "${NICE[@]}" buildah run --network host "$c" -- sh -euc '
    groupadd --system --gid 999 redis
    useradd --system --uid 999 --gid 999 --home-dir /var/lib/redis --no-create-home --shell /usr/sbin/nologin redis
    printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
    rm -rf /usr/sbin/policy-rc.d /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
    install -d -o redis -g redis -m 0750 /data' >"$WORK/redis.log" 2>&1 ||
    { tail -n 40 "$WORK/redis.log" >&2; buildah rm "$c" >/dev/null; return 1; }
  # the base's CMD goes first: with it set, an empty entrypoint makes buildah warn
  buildah config --cmd '["redis-server"]' "$c"
  buildah config --user 999:999 --workingdir /data --entrypoint '[]' --stop-signal TERM \
    --label "org.opencontainers.image.description=Redis (Debian $SUITE's redis-server and redis-tools), uid 999" "$c"
  buildah commit -q --rm "$c" "$ref" >/dev/null
}

# As the chart runs it: uid 999, a server that answers PING, and a Sentinel (the same binary
# with --sentinel) that answers too; both on loopback, in a container with no network.
smoke_redis() { # ref
  in_image "$1" sh -euc '
    [ "$(id -u):$(id -g)" = 999:999 ]
    ping() { i=0; until [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; do
      i=$((i + 1)); [ "$i" -lt 100 ] || { echo "no PONG on port $1" >&2; return 1; }; sleep 0.1; done; }
    redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp --daemonize yes
    ping 6379
    printf "port 26379\nbind 127.0.0.1\ndir /tmp\nsentinel monitor m 127.0.0.1 6379 1\n" >/tmp/sentinel.conf
    redis-server /tmp/sentinel.conf --sentinel --daemonize yes
    ping 26379
    redis-cli -p 26379 shutdown nosave >/dev/null 2>&1 || true
    redis-cli -p 6379 shutdown nosave >/dev/null 2>&1 || true'
}

ensure_redis() {
  local h ref archive t0=$SECONDS
  h=$( { echo "$BASE_ID"; declare -f build_redis smoke_redis; } | short)
  ref="localhost/mikrom/redis:$h"
  archive="$CACHE/redis-$h.tar"
  if [ -f "$archive" ] && [ -f "$archive.id" ]; then
    log "cached: $ref"
  else
    log "building $ref (Debian's redis-server on the base)"
    build_redis "$ref"
    smoke_redis "$ref" || { log "smoke: $ref failed"; return 1; }
    log "smoke: $ref passed"
    export_image redis "$ref" "$archive"
    log "built $ref in $((SECONDS - t0)) s"
  fi
  record redis "$ref" "$archive"
}

# ---- operator and worker: the Dockerfiles ------------------------------------------------

# The build context holds exactly what the Dockerfiles copy, staged from the working tree (no
# caches, virtualenvs or editor files), so the hash covers exactly what goes into the image.
stage_context() { # dir dockerfile
  local ctx=$1 dockerfile=$2
  rm -rf "$ctx"
  mkdir -p "$ctx"
  (cd "$REPO" && tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    pyproject.toml README.md requirements.lock mikrom operator worker) | tar -x -C "$ctx"
  cp "$REPO/$dockerfile" "$ctx/Dockerfile"
}

# Where this machine's TLS to PyPI needs a CA bundle of its own (pip's `cert`, e.g. behind an
# intercepting proxy), the RUN steps get it as a read-only mount and a pip.conf naming it: the
# Dockerfiles stay as a registry user has them and nothing of it lands in an image.
build_ca_mounts() {
  local ca=${MIKROM_BUILD_CA_BUNDLE:-${PIP_CERT:-}}
  [ -n "$ca" ] || ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
  [ -n "$ca" ] && [ -f "$ca" ] || return 0
  mkdir -p "$WORK/pip"
  cp "$ca" "$WORK/pip/ca.crt"
  printf '[global]\ncert = /run/mikrom-build/ca.crt\n' >"$WORK/pip/pip.conf"
  CA_MOUNTS=(--volume "$WORK/pip/ca.crt:/run/mikrom-build/ca.crt:ro" --volume "$WORK/pip/pip.conf:/etc/pip.conf:ro")
}

build_app() { # ref ctx build-args...
  local ref=$1 ctx=$2
  shift 2
  CA_MOUNTS=()
  build_ca_mounts
  # BASE_IMAGE by ID, not by tag (see ensure_base).
  # --network host: RUN steps reach Debian's archive and PyPI the way this machine does, without
  # depending on a CNI configuration for buildah (the test cluster brings its own).
  "${NICE[@]}" buildah bud -q --pull=false --layers --network host --format oci "${CA_MOUNTS[@]}" \
    --build-arg "BASE_IMAGE=$BASE_ID" "$@" -f "$ctx/Dockerfile" -t "$ref" "$ctx" >"$WORK/$(basename "$ctx").log" 2>&1 ||
    { tail -n 40 "$WORK/$(basename "$ctx").log" >&2; return 1; }
}

# Runs `argv` in a container of `ref` with no network: what the image needs at run time is in it.
in_image() { # ref argv...
  local ref=$1 c rc=0
  shift
  c=$(buildah from --pull=false "$ref")
  buildah run --network none "$c" -- "$@" || rc=$?
  buildah rm "$c" >/dev/null
  return "$rc"
}

smoke_operator() { # ref
  in_image "$1" python -c 'import os, mikrom.operator.main, mikrom.worker.tasks; assert os.getuid() == 65532, os.getuid()' &&
    in_image "$1" mikrom version >/dev/null
}

smoke_worker() { # ref
  in_image "$1" python -c 'import mikrom.worker.tasks, mikrom.operator.main' &&
    in_image "$1" celery --version >/dev/null &&
    in_image "$1" qemu-system-x86_64 --version >/dev/null &&
    in_image "$1" sh -c 'ip -V && iptables --version && nft --version && cp --version' >/dev/null &&
    { [ -z "$FIRECRACKER_VERSION" ] || in_image "$1" sh -c 'firecracker --version && jailer --version' >/dev/null; }
}

ensure_app() { # name dockerfile build-args...
  local name=$1 dockerfile=$2 ctx="$WORK/ctx-$1" h ref archive
  shift 2
  stage_context "$ctx" "$dockerfile"
  h=$( {
    echo "$BASE_ID" "$@"
    declare -f stage_context build_app
    (cd "$ctx" && tar -c --sort=name --format=gnu --mtime=@0 --owner=0 --group=0 --numeric-owner .) | sha256sum
  } | short)
  ref="localhost/mikrom/$name:$h"
  archive="$CACHE/$name-$h.tar"
  if [ -f "$archive" ] && [ -f "$archive.id" ]; then
    log "cached: $ref"
  else
    log "building $ref from $dockerfile"
    build_app "$ref" "$ctx" "$@"
    "smoke_$name" "$ref" || { log "smoke: $ref failed"; return 1; }
    log "smoke: $ref passed"
    export_image "$name" "$ref" "$archive"
  fi
  rm -rf "$ctx"
  record "$name" "$ref" "$archive"
}

# ---- manifest ----------------------------------------------------------------------------

declare -a RECORDS=()
record() { RECORDS+=("$1" "$2" "$3" "$(cat "$3.id")"); }

write_manifest() {
  python3 - "$CACHE/images.json" "${RECORDS[@]}" <<'PY'
import json, os, sys
path, rest = sys.argv[1], sys.argv[2:]
images = {rest[i]: {"ref": rest[i + 1], "archive": rest[i + 2], "id": rest[i + 3]} for i in range(0, len(rest), 4)}
with open(path + ".tmp", "w") as f:
    json.dump(images, f, indent=2, sort_keys=True)
    f.write("\n")
os.replace(path + ".tmp", path)
PY
}

# ---- main --------------------------------------------------------------------------------

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  bash "$REPO/hack/system-deps.sh"
fi
mkdir -p "$CACHE" "$WORK"
# one build at a time per cache, even if two test runs start together
exec 9>"$CACHE/.lock"
flock -w 7200 9

fc_args=()
if [ -n "$FIRECRACKER_VERSION" ]; then
  [ -n "$FIRECRACKER_SHA256" ] || { log "MIKROM_FIRECRACKER_SHA256 is required with MIKROM_FIRECRACKER_VERSION"; exit 1; }
  fc_args=(--build-arg "FIRECRACKER_VERSION=$FIRECRACKER_VERSION" --build-arg "FIRECRACKER_SHA256=$FIRECRACKER_SHA256")
  [ -z "$FIRECRACKER_URL" ] || fc_args+=(--build-arg "FIRECRACKER_URL=$FIRECRACKER_URL")
fi

ensure_pause
ensure_base
ensure_app operator Dockerfile.operator
ensure_app worker Dockerfile.worker "${fc_args[@]}"
ensure_redis
write_manifest
echo "$CACHE/images.json"
