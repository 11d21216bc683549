#!/usr/bin/env bash
# Smoke test of the test control plane: starts two clusters side by side,
# exercises nodes, Deployments, Jobs, namespaces, server-side apply and
# ServiceAccount tokens with the bundled kubectl, then stops both with SIGTERM.
# Usage: bash tests/testenv/smoke.sh   (builds first via build.sh)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bash "$here/build.sh" || exit 1
bin="${FLOTILLA_TESTENV_BIN:-$root/target/testenv/bin}"
work="$(mktemp -d "${TMPDIR:-/tmp}/kube-testcluster-smoke.XXXXXX")"
ports=(${SMOKE_PORTS:-16443 16444})
pids=()
passed=0 failed=0

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

check() { # name, command...
  local name="$1"; shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    failed=$((failed + 1)); echo "FAIL $name"; sed 's/^/     /' "$work/out" | tail -20
  fi
}

start=$SECONDS
for i in "${!ports[@]}"; do
  "$bin/kube-testcluster" --data-dir "$work/c$i" --port "${ports[$i]}" --log-file "$work/c$i.log" &
  pids+=($!)
done
ready() { curl -sfk --max-time 2 "https://127.0.0.1:$1/readyz" | grep -qx ok; }
for p in "${ports[@]}"; do
  for _ in $(seq 1 300); do ready "$p" && break; sleep 0.2; done
  check "cluster on :$p ready" ready "$p"
done
echo "both ready after $((SECONDS - start))s"

k() { "$bin/kubectl" --kubeconfig "$work/c0/kubeconfig" "$@"; }
k2() { "$bin/kubectl" --kubeconfig "$work/c1/kubeconfig" "$@"; }

two_ready_nodes() { [ "$("$@" get nodes --no-headers | grep -c ' Ready ')" = 2 ]; }
check "2 Ready nodes (cluster 1)" two_ready_nodes k
check "2 Ready nodes (cluster 2)" two_ready_nodes k2

k apply -f - >/dev/null <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: unready}
spec:
  replicas: 1
  selector: {matchLabels: {app: unready}}
  template:
    metadata:
      labels: {app: unready}
      annotations: {sim.flotilla.io/ready: "false"}
    spec:
      containers: [{name: app, image: busybox}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: succeeds}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: fails}
spec:
  backoffLimit: 0
  template:
    metadata:
      annotations: {sim.flotilla.io/exit-code: "1"}
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox}]
YAML

check "deployment available" k wait --for=condition=available deploy/web --timeout=30s
running2() { [ "$(k get pods -l app=web --field-selector=status.phase=Running --no-headers | wc -l)" = 2 ]; }
check "2 pods running" running2
check "job succeeds" k wait --for=condition=complete job/succeeds --timeout=30s
check "job fails" k wait --for=condition=failed job/fails --timeout=30s
never_available() {
  sleep 3
  [ "$(k get deploy unready -o 'jsonpath={.status.conditions[?(@.type=="Available")].status}')" = False ] &&
    [ "$(k get pods -l app=unready -o 'jsonpath={.items[0].status.phase}')" = Running ]
}
check "ready=false deployment never available" never_available

ns_lifecycle() {
  k create namespace scratch &&
    k -n scratch create deployment inner --image=busybox --replicas=3 &&
    k -n scratch wait --for=condition=available deploy/inner --timeout=30s &&
    k delete namespace scratch --timeout=60s &&
    ! k get namespace scratch
}
check "namespace with deployment is deleted" ns_lifecycle

ssa() {
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {a: "1"}\n' | k apply --server-side -f - &&
    [ "$(k get cm ssa -o jsonpath='{.data.a}')" = 1 ]
}
check "server-side apply" ssa

token() {
  local t
  t="$(k create token default)" && [ -n "$t" ] &&
    [ "$(k auth whoami --kubeconfig=/dev/null --server="https://127.0.0.1:${ports[0]}" \
      --certificate-authority="$work/c0/pki/ca.crt" --token="$t" -o jsonpath='{.status.userInfo.username}')" = system:serviceaccount:default:default ]
}
check "service account token" token

rss=$(ps -o rss= -p "${pids[0]}")
echo "cluster 1 RSS: $((rss / 1024)) MiB"

stop_all() {
  local t0=$SECONDS rc=0 p code wd
  for p in "${pids[@]}"; do kill -TERM "$p"; done
  ( sleep 15; kill -KILL "${pids[@]}" 2>/dev/null ) &
  wd=$!
  for p in "${pids[@]}"; do
    wait "$p"; code=$?
    [ "$code" = 0 ] || { echo "pid $p exited with $code"; rc=1; }
  done
  kill "$wd" 2>/dev/null
  echo "stopped in $((SECONDS - t0))s"
  return $rc
}
check "SIGTERM: both exit 0" stop_all
gone() { for p in "${pids[@]}"; do ! kill -0 "$p" 2>/dev/null || return 1; done; }
check "processes gone" gone
pids=()

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
