#!/usr/bin/env bash
# The torture suite at full scale (`make torture`): two groups run side by side,
# each with at most one test control plane at a time (agent kill -9, then hub
# kill -9 with simulated agents; partitions, then the API server), then
# RELIABILITY.md is written from the results, also when a part failed.
set -u
: "${CARGO:=cargo}"
: "${FLOTILLA_TORTURE_OUT:=$CARGO_TARGET_DIR/torture-full}"
export FLOTILLA_TORTURE=full FLOTILLA_TORTURE_OUT FLOTILLA_REQUIRE_E2E=1
# A thousand simulated agents each hold a connection, and so does the hub.
ulimit -n "$(ulimit -Hn)"
rm -rf "$FLOTILLA_TORTURE_OUT"
mkdir -p "$FLOTILLA_TORTURE_OUT"
log_a="$FLOTILLA_TORTURE_OUT/group-a.log"
log_b="$FLOTILLA_TORTURE_OUT/group-b.log"
run() { "$CARGO" test -q -p flotilla-tests "$@" -- --test-threads=2 --nocapture; }
start=$(date +%s)
( run --test torture_agent && run --test torture_hub ) >"$log_a" 2>&1 &
a=$!
( run --test torture_partition && run --test torture_apiserver ) >"$log_b" 2>&1 &
b=$!
wait "$a"; sa=$?
wait "$b"; sb=$?
echo "torture: done in $(( $(date +%s) - start )) s (group a exit $sa, group b exit $sb); logs: $log_a $log_b"
"$CARGO" run -q -p flotilla-tests --bin flotilla-reliability -- "$FLOTILLA_TORTURE_OUT" RELIABILITY.md
grep -h "torture FAILURE" "$log_a" "$log_b" || true
[ "$sa" -eq 0 ] && [ "$sb" -eq 0 ]
