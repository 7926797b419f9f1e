#!/usr/bin/env bash
# Builds the test control plane and the test cluster's node parts (kube-apiserver, kubectl,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kine, helm, kwok, CoreDNS, Traefik)
# from the Go module proxy into a cache outside the repository, keyed by version.
# A binary that is already in the cache is never rebuilt. Prints the cache's bin directory.
#
#   hack/testbin.sh [component...]      components: kube kine helm kwok coredns traefik (default: all)
#
# Honoured: MIKROM_TESTBIN_CACHE (default ~/.cache/mikrom/testbin), KUBE_VERSION, KINE_VERSION,
# HELM_VERSION, KWOK_VERSION, COREDNS_VERSION, TRAEFIK_VERSION. Users who already have envtest binaries can point
# TEST_ASSET_KUBE_APISERVER / TEST_ASSET_KUBECTL / TEST_ASSET_ETCD or KUBEBUILDER_ASSETS at them;
# the test layer then skips what this script would build.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.34.4}
KINE_VERSION=${KINE_VERSION:-v0.17.5}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
TRAEFIK_VERSION=${TRAEFIK_VERSION:-v3.5.3}
CACHE=${MIKROM_TESTBIN_CACHE:-$HOME/.cache/mikrom/testbin}
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { echo "testbin: $*" >&2; }

have() { [ -x "$1" ] && log "cached: $1"; }

build_kube() {
  local out="$CACHE/kube-$KUBE_VERSION" missing=()
  for b in kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy; do
    have "$out/$b" || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local mod="$CACHE/src/kube-$KUBE_VERSION"
  mkdir -p "$mod" "$out"
  if [ ! -f "$mod/go.sum.done" ]; then
    log "resolving k8s.io/kubernetes@$KUBE_VERSION"
    local kgomod minor=${KUBE_VERSION#v1.}
    kgomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module mikrom.io/testbin/kube"
      echo
      echo "go 1.24"
      echo
      grep -E '^godebug ' "$kgomod" || true
      echo
      echo "require k8s.io/kubernetes $KUBE_VERSION"
      echo
      # every staging module k/k replaces with ./staging/... comes from the proxy at v0.<minor>
      grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$kgomod" | awk -v v="v0.$minor" '{print "replace " $1 " => " $1 " " v}'
    } >"$mod/go.mod"
    echo 'package tools' >"$mod/tools.go"
    sed -i '1i //go:build tools' "$mod/tools.go"
    cat >>"$mod/tools.go" <<'GO'

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubectl/pkg/cmd"
)
GO
    (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; cd "$mod" && go mod download)
    touch "$mod/go.sum.done"
  fi
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  for b in "${missing[@]}"; do
    log "building $b $KUBE_VERSION (slow on a cold cache)"
    local pkg="k8s.io/kubernetes/cmd/$b"
    (cd "$mod" && go build -tags selinux,notest -ldflags "$ld" -o "$out/$b.tmp" "$pkg")
    mv "$out/$b.tmp" "$out/$b"
  done
}

build_simple() { # name module version binary-package ldflags
  local name=$1 module=$2 version=$3 pkg=$4 ld=$5
  local out="$CACHE/$name-$version"
  have "$out/$name" && return 0
  mkdir -p "$out"
  log "building $name $version"
  GOBIN="$out/.gobin" go install -ldflags "$ld" "$pkg@$version"
  mv "$out/.gobin/$(basename "$pkg")" "$out/$name"
  rmdir "$out/.gobin"
}

build_kine() { build_simple kine github.com/k3s-io/kine "$KINE_VERSION" github.com/k3s-io/kine "-s -w"; }

build_helm() {
  local kminor=${KUBE_VERSION#v1.}; kminor=${kminor%%.*}
  build_simple helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kminor"
}

build_kwok() { build_simple kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok "-s -w"; }

build_coredns() { build_simple coredns github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns "-s -w"; }

# Traefik's go.mod has replace directives, which `go install pkg@version` refuses: a wrapper module
# requires it and carries the same replace lines, taken from the go.mod the proxy serves.
build_traefik() {
  local out="$CACHE/traefik-$TRAEFIK_VERSION"
  have "$out/traefik" && return 0
  local mod="$CACHE/src/traefik-$TRAEFIK_VERSION"
  mkdir -p "$mod" "$out"
  if [ ! -f "$mod/go.sum.done" ]; then
    log "resolving github.com/traefik/traefik/v3@$TRAEFIK_VERSION"
    local tgomod
    tgomod=$(cd "$mod" && go mod download -json "github.com/traefik/traefik/v3@$TRAEFIK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module mikrom.io/testbin/traefik"
      echo
      echo "go $(awk '$1=="go"{print $2; exit}' "$tgomod")"
      echo
      echo "require github.com/traefik/traefik/v3 $TRAEFIK_VERSION"
      echo
      awk '/^replace \(/{inblk=1; next} inblk && /^\)/{inblk=0; next} inblk{print "replace " $0; next} /^replace /{print}' "$tgomod"
    } >"$mod/go.mod"
    printf '//go:build tools\npackage tools\n\nimport _ "github.com/traefik/traefik/v3/cmd/traefik"\n' >"$mod/tools.go"
    (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; cd "$mod" && go mod download)
    touch "$mod/go.sum.done"
  fi
  log "building traefik $TRAEFIK_VERSION (slow on a cold cache)"
  (cd "$mod" && go build -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" -o "$out/traefik.tmp" github.com/traefik/traefik/v3/cmd/traefik)
  mv "$out/traefik.tmp" "$out/traefik"
}

link_bin() {
  mkdir -p "$CACHE/bin"
  rm -f "$CACHE"/bin/*
  local f
  for f in "$CACHE/kube-$KUBE_VERSION"/* "$CACHE/kine-$KINE_VERSION"/* "$CACHE/helm-$HELM_VERSION"/* "$CACHE/kwok-$KWOK_VERSION"/* \
    "$CACHE/coredns-$COREDNS_VERSION"/* "$CACHE/traefik-$TRAEFIK_VERSION"/*; do
    case $f in *.tmp|*'*') continue ;; esac
    [ -x "$f" ] && ln -sfn "$f" "$CACHE/bin/"
  done
  return 0
}

components=("$@")
[ ${#components[@]} -eq 0 ] && components=(kine helm kube kwok coredns traefik)
mkdir -p "$CACHE"
# one build at a time per cache, even if two test runs start together
exec 9>"$CACHE/.lock"
flock -w 7200 9
for c in "${components[@]}"; do
  "build_$c"
done
link_bin
echo "$CACHE/bin"
