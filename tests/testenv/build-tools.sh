#!/usr/bin/env bash
# Builds helm and kustomize (the hub renders Helm and Kustomize bundles with
# them) from their official Go modules, pinned by the `tool` lines of
# tools/go.mod, into target/testenv/bin/ (or $FLOTILLA_TESTENV_BIN). Same
# cache scheme as build.sh: binaries are cached per source hash in
# ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla/testenv/<key>/. A separate script
# so that the control plane's cache key (which hashes build.sh) is unchanged.
#
# Needs: go (>= 1.26) and access to the Go module proxy. Idempotent.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mod="$here/tools"
out="${FLOTILLA_TESTENV_BIN:-$root/target/testenv/bin}"
bins=(helm kustomize)

say() { printf 'testenv: %s\n' "$*" >&2; }

command -v go >/dev/null 2>&1 || { say "error: go is not installed (need Go >= 1.26)"; exit 1; }

helm_version="$(awk '$1 == "helm.sh/helm/v3" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
kustomize_version="$(awk '$1 == "sigs.k8s.io/kustomize/kustomize/v5" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
# Helm's default .Capabilities.KubeVersion is the client-go minor it is built with.
client_version="$(awk '$1 == "k8s.io/client-go" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")"
[[ -n "$helm_version" && -n "$kustomize_version" ]] || { say "error: cannot find helm/kustomize in $mod/go.mod"; exit 1; }
[[ "$client_version" =~ ^v0\.([0-9]+)\. ]] || { say "error: cannot find k8s.io/client-go in $mod/go.mod"; exit 1; }
kube_minor="${BASH_REMATCH[1]}"

# Cache key: everything that affects the binaries.
# shellcheck source=cache.sh
source "$here/cache.sh"
key="$(cd "$mod" && cache_key "$here/build-tools.sh" "$here/cache.sh" go.mod go.sum)"
cache_init "$key" "helm $helm_version and kustomize $kustomize_version in $out"
cache_reuse_or_lock

say "building helm $helm_version and kustomize $kustomize_version (cold builds take several minutes on 2 cores)"
start=$SECONDS
cd "$mod"
say "downloading Go modules"
GOFLAGS=-mod=readonly go mod download

tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$tmp"; [[ -n "${ticker:-}" ]] && kill "$ticker" 2>/dev/null || true' EXIT

# As helm's Makefile stamps them.
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kube_minor"
done

( while sleep 60; do say "still compiling... $(( (SECONDS - start) / 60 )) min"; done ) &
ticker=$!

GOFLAGS=-mod=readonly go build -trimpath -buildvcs=false -ldflags="$ldflags" -o "$tmp/" \
  helm.sh/helm/v3/cmd/helm sigs.k8s.io/kustomize/kustomize/v5

kill "$ticker" 2>/dev/null || true
ticker=""
for b in "${bins[@]}"; do [[ -x "$tmp/$b" ]] || { say "error: $b was not built"; exit 1; }; done
"$tmp/helm" version --short >/dev/null
"$tmp/kustomize" version >/dev/null
rm -rf "$cache"
mv "$tmp" "$cache"
say "built in $(( SECONDS - start ))s"
install_bins
