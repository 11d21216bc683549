#!/usr/bin/env bash
# Flotilla demo: two local Kubernetes test clusters, a hub, two agents with
# different labels, and an example Git repository served by `git daemon`.
# A commit reaches the clusters; a removed file is pruned from them.
#
#   make demo        # start (everything keeps running in the background)
#   make demo-stop   # stop everything the demo started (by PID)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEMO=${FLOTILLA_DEMO_DIR:-$ROOT/.demo}
BIN=${FLOTILLA_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
TESTENV=${FLOTILLA_TESTENV_BIN:-$ROOT/target/testenv/bin}
PIDS=$DEMO/pids

# Ports below the ephemeral range, away from the test suite's (20000-32000).
EAST_PORT=17443 WEST_PORT=17444 GIT_PORT=17418 HUB_AGENT_PORT=17543 HUB_API_PORT=17080

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

stop() {
  if [[ -f $PIDS ]]; then
    while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        echo "stopped $name ($pid)"
      fi
    done < "$PIDS"
    rm -f "$PIDS"
  fi
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS > end )); then echo "timed out waiting for $what" >&2; return 1; fi
    sleep 0.3
  done
}

start() { # start NAME LOG CMD...
  local name=$1 log=$2; shift 2
  nohup "$@" >"$log" 2>&1 < /dev/null &
  echo "$! $name" >> "$PIDS"
}

if [[ ${1:-} == stop ]]; then stop; exit 0; fi

stop
rm -rf "$DEMO"
mkdir -p "$DEMO"
export PATH=$BIN:$TESTENV:$PATH

say "Starting two Kubernetes test clusters (east, west)"
start cluster-east "$DEMO/east.log" kube-testcluster --data-dir "$DEMO/east" --port $EAST_PORT --name east
start cluster-west "$DEMO/west.log" kube-testcluster --data-dir "$DEMO/west" --port $WEST_PORT --name west
for c in east west; do
  wait_for "cluster $c" 180 kubectl --kubeconfig "$DEMO/$c/kubeconfig" get --raw /readyz
  echo "cluster $c ready"
done

say "Creating an example Git repository, served by git daemon on 127.0.0.1:$GIT_PORT"
REPO=$DEMO/git/fleet-demo
mkdir -p "$REPO"
git -C "$REPO" init -q -b main
git -C "$REPO" config user.email demo@flotilla.test
git -C "$REPO" config user.name "Flotilla demo"
mkdir -p "$REPO/common" "$REPO/prod"
cat > "$REPO/common/namespace.yaml" <<'YAML'
apiVersion: v1
kind: Namespace
metadata:
  name: demo
YAML
cat > "$REPO/common/web.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
YAML
cat > "$REPO/common/service.yaml" <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 80
YAML
cat > "$REPO/common/settings.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: demo
data:
  greeting: hello
YAML
cat > "$REPO/prod/fleet.yaml" <<'YAML'
defaultNamespace: demo-prod
YAML
cat > "$REPO/prod/alerts.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: alerts
data:
  pager: on-call@example.com
YAML
git -C "$REPO" add -A && git -C "$REPO" commit -q -m "Initial fleet"
start git-daemon "$DEMO/git-daemon.log" git daemon --reuseaddr --base-path="$DEMO/git" --export-all \
  --listen=127.0.0.1 --port=$GIT_PORT "$DEMO/git"
wait_for "git daemon" 20 git ls-remote "git://127.0.0.1:$GIT_PORT/fleet-demo"

say "Starting the hub (agents on :$HUB_AGENT_PORT, API on :$HUB_API_PORT)"
start hub "$DEMO/hub.log" flotilla-hub --data-dir "$DEMO/hub" \
  --agent-listen 127.0.0.1:$HUB_AGENT_PORT --api-listen 127.0.0.1:$HUB_API_PORT
wait_for "hub admin token" 30 test -s "$DEMO/hub/admin-token"
export FLOTILLA_HUB=http://127.0.0.1:$HUB_API_PORT
FLOTILLA_TOKEN=$(cat "$DEMO/hub/admin-token"); export FLOTILLA_TOKEN
wait_for "hub API" 30 flotilla cluster list

say "Adding Git sources: 'common' for every cluster, 'prod' for env=prod only"
flotilla source add common --repo "git://127.0.0.1:$GIT_PORT/fleet-demo" --path common --poll 2s
flotilla source add prod --repo "git://127.0.0.1:$GIT_PORT/fleet-demo" --path prod --target env=prod --poll 2s

say "Starting two agents: east (env=prod, region=eu) and west (env=dev, region=us)"
for c in east west; do
  labels=env=prod,region=eu; [[ $c == west ]] && labels=env=dev,region=us
  # Bound to the name and labels: the token's holder cannot choose others.
  token=$(flotilla token create --ttl 10m --cluster-name "$c" --labels "$labels")
  start "agent-$c" "$DEMO/agent-$c.log" flotilla-agent --hub "https://127.0.0.1:$HUB_AGENT_PORT" \
    --token "$token" --cluster-name "$c" \
    --kubeconfig "$DEMO/$c/kubeconfig" --state-dir "$DEMO/agent-$c"
done

bundle_ready() { # bundle_ready BUNDLE CLUSTER
  flotilla bundle get "$1" -o json | python3 -c '
import json, sys
b = json.load(sys.stdin)
sys.exit(0 if any(c["cluster"] == sys.argv[1] and c["state"] == "Ready" for c in b["clusters"]) else 1)' "$2"
}
wait_for "common on east" 120 bundle_ready common-common east
wait_for "common on west" 120 bundle_ready common-common west
wait_for "prod on east" 120 bundle_ready prod-prod east
flotilla cluster list
flotilla bundle list

say "What the clusters run"
for c in east west; do
  echo "--- $c"
  kubectl --kubeconfig "$DEMO/$c/kubeconfig" get deploy,svc,cm -n demo 2>&1 | grep -v kube-root-ca || true
  kubectl --kubeconfig "$DEMO/$c/kubeconfig" get cm -n demo-prod 2>&1 | grep -v kube-root-ca || true
done

say "Pushing a change: greeting hello -> bonjour"
sed -i 's/greeting: hello/greeting: bonjour/' "$REPO/common/settings.yaml"
git -C "$REPO" commit -q -am "Say bonjour"
start_t=$SECONDS
greeting_is() { [[ $(kubectl --kubeconfig "$DEMO/$1/kubeconfig" get cm settings -n demo -o jsonpath='{.data.greeting}') == "$2" ]]; }
wait_for "change on east" 120 greeting_is east bonjour
wait_for "change on west" 120 greeting_is west bonjour
echo "the commit reached both clusters in about $((SECONDS - start_t)) s (polling every 2 s)"

say "Removing a file from Git: the Service goes away"
git -C "$REPO" rm -q common/service.yaml
git -C "$REPO" commit -q -m "Drop the web Service"
svc_gone() { ! kubectl --kubeconfig "$DEMO/$1/kubeconfig" get svc web -n demo >/dev/null 2>&1; }
wait_for "service pruned on east" 120 svc_gone east
wait_for "service pruned on west" 120 svc_gone west
echo "service web pruned from both clusters"

say "The demo keeps running. Look around:"
cat <<EOT
  export PATH=$BIN:$TESTENV:\$PATH
  export FLOTILLA_HUB=$FLOTILLA_HUB FLOTILLA_TOKEN=\$(cat $DEMO/hub/admin-token)
  flotilla cluster list
  flotilla bundle get common-common
  flotilla cluster label west env=prod        # west gets the 'prod' bundle too
  kubectl --kubeconfig $DEMO/east/kubeconfig get all -n demo
  # edit $REPO and commit: changes arrive within a poll interval (2 s)
  make demo-stop                               # stops everything (PIDs in $PIDS)
Logs: $DEMO/*.log
EOT
