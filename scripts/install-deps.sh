#!/usr/bin/env bash
# Installs the Debian packages the test suite uses that a fresh machine may lack:
# git (git daemon, git http-backend), openssh-server (the SSH private-repository
# test), docker-registry (the CNCF distribution server: contents by OCI
# registry), prometheus (the metrics test's scraper) and chromium with
# chromium-driver (the web UI test's browser). Needs root for apt-get; without it, prints what is missing and goes
# on (the SSH test then skips itself with a note; the registry test fails).
set -euo pipefail
need=()
command -v git >/dev/null || need+=(git)
[[ -x /usr/lib/git-core/git-http-backend ]] || need+=(git)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
# The OCI registry the registry-transport test pushes to and fetches from.
[[ -x /usr/bin/docker-registry ]] || need+=(docker-registry)
# The Prometheus the metrics test scrapes the hub with.
[[ -x /usr/bin/prometheus ]] || need+=(prometheus)
# The headless browser the web UI test drives (WebDriver).
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
if (( ${#need[@]} == 0 )); then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing ${need[*]} (not root: not installing)" >&2
  exit 0
fi
echo "install-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
