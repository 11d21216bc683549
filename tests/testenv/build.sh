#!/usr/bin/env bash
# Builds the test control plane (kube-testcluster) and a matching kubectl
# from the official Kubernetes Go modules, into target/testenv/bin/ (or
# $FLOTILLA_TESTENV_BIN). Built binaries are cached per source hash in
# ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla/testenv/<key>/, so a second run,
# or a fresh clone on the same machine, only links them into place.
#
# Needs: go (>= 1.24) and access to the Go module proxy. Idempotent.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mod="$here/kube-testcluster"
out="${FLOTILLA_TESTENV_BIN:-$root/target/testenv/bin}"
bins=(kube-testcluster kubectl)

say() { printf 'testenv: %s\n' "$*" >&2; }

command -v go >/dev/null 2>&1 || { say "error: go is not installed (need Go >= 1.24)"; exit 1; }

# The Kubernetes version comes from go.mod, so version stamps can't drift.
kube_version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$mod/go.mod")"
[[ "$kube_version" =~ ^v1\.([0-9]+)\. ]] || { say "error: cannot find k8s.io/kubernetes in $mod/go.mod"; exit 1; }
kube_minor="${BASH_REMATCH[1]}"

# Cache key: everything that affects the binaries.
# shellcheck source=cache.sh
source "$here/cache.sh"
key="$(cd "$mod" && cache_key "$here/build.sh" "$here/cache.sh" go.mod go.sum $(find . -name '*.go' -type f | LC_ALL=C sort))"
cache_init "$key" "binaries in $out (Kubernetes $kube_version)"
cache_reuse_or_lock

say "building kube-testcluster and kubectl $kube_version (cold builds take 10+ minutes on 2 cores)"
start=$SECONDS
cd "$mod"
say "downloading Go modules"
GOFLAGS=-mod=readonly go mod download

tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$tmp"; [[ -n "${ticker:-}" ]] && kill "$ticker" 2>/dev/null || true' EXIT

ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version"
  ldflags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$kube_minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

( while sleep 60; do say "still compiling... $(( (SECONDS - start) / 60 )) min"; done ) &
ticker=$!

GOFLAGS=-mod=readonly go build -trimpath -buildvcs=false -ldflags="$ldflags" -o "$tmp/" . ./cmd/kubectl

kill "$ticker" 2>/dev/null || true
ticker=""
for b in "${bins[@]}"; do [[ -x "$tmp/$b" ]] || { say "error: $b was not built"; exit 1; }; done
"$tmp/kube-testcluster" --version >/dev/null
rm -rf "$cache"
mv "$tmp" "$cache"
say "built in $(( SECONDS - start ))s"
# Keep the three most recent builds (each ~200 MB) and anything younger than
# an hour (another checkout may be installing it); installed copies are hard
# links or copies, so they survive pruning.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' |
  sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do
    if [[ -n "$(find "$old" -maxdepth 0 -mmin +60)" ]]; then rm -rf "$old"; fi
  done || true
install_bins
