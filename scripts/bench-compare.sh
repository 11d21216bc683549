#!/usr/bin/env bash
# Two builds side by side in one session: builds BASE and NEW (default HEAD) in
# release mode, each in its own checkout and target directory, then runs the
# chosen benchmark parts alternating between them (base, new, base, new, ...),
# one repetition at a time, and writes the `compare` block of BENCHMARKS.md.
# Run it on an otherwise idle machine: both sides share it, so neither gets a
# quieter moment than the other.
#
#   scripts/bench-compare.sh BASE [NEW]
#   FLOTILLA_BENCH_COMPARE_PARTS="hub fleet wire git agent"  parts to run
#   FLOTILLA_BENCH_COMPARE_RUNS=3                              rounds
#   FLOTILLA_BENCH_COMPARE_BUILD_ONLY=1                        build both, run nothing
#   FLOTILLA_BENCH_HUB_AGENTS=100,1000,5000                    hub part's agent counts
#   FLOTILLA_BENCH_FLEET_AGENTS=1000                           fleet part's agent counts
#   FLOTILLA_BENCH_RECONNECT_AGENTS=10000                      reconnect part's agent counts
#   FLOTILLA_BENCH_COMPARE_HARNESS=new                         drive both sides' hubs with NEW's
#                                                              bench (a part BASE's bench lacks;
#                                                              the simulated agents speak v1)
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/bench-compare.sh BASE [NEW]}
new=${2:-HEAD}
work=${FLOTILLA_BENCH_COMPARE_DIR:-$HOME/.cache/flotilla/bench-compare}
parts=${FLOTILLA_BENCH_COMPARE_PARTS:-hub fleet wire git agent}
rounds=${FLOTILLA_BENCH_COMPARE_RUNS:-3}
testenv=${FLOTILLA_TESTENV_BIN:-$PWD/target/testenv/bin}
cargo=${CARGO:-cargo}
base_rev=$(git rev-parse --short "$base")
new_rev=$(git rev-parse --short "$new")

checkout() { # side rev (kept when it already holds rev: its build stays fresh)
  local dir=$work/$1-src
  [ "$(cat "$dir/.bench-rev" 2>/dev/null)" = "$2" ] && return 0
  rm -rf "$dir"
  mkdir -p "$dir"
  git archive "$2" | tar -x -C "$dir"
  echo "$2" > "$dir/.bench-rev"
}

mkdir -p "$work"
for side in base new; do
  rev=$base_rev
  [ "$side" = new ] && rev=$new_rev
  checkout "$side" "$rev"
  echo "bench-compare: building $side ($rev) in release mode"
  (cd "$work/$side-src" && CARGO_TARGET_DIR=$work/$side-target \
    $cargo build --release -p flotilla-hub -p flotilla-agent -p flotilla-bench --bins)
  rm -rf "$work/results-$side"
  mkdir -p "$work/results-$side"
done
[ -n "${FLOTILLA_BENCH_COMPARE_BUILD_ONLY:-}" ] && exit 0

ulimit -n "$(ulimit -Hn)"
for round in $(seq 1 "$rounds"); do
  for part in $parts; do
    for side in base new; do
      echo "bench-compare: round $round/$rounds, $part, $side"
      agents=${FLOTILLA_BENCH_HUB_AGENTS:-100,1000,5000}
      [ "$part" = fleet ] && agents=${FLOTILLA_BENCH_FLEET_AGENTS:-1000}
      [ "$part" = reconnect ] && agents=${FLOTILLA_BENCH_RECONNECT_AGENTS:-10000}
      bench=$work/$side-target/release/flotilla-bench
      [ "${FLOTILLA_BENCH_COMPARE_HARNESS:-}" = new ] && bench=$work/new-target/release/flotilla-bench
      (cd "$work/$side-src" && \
        FLOTILLA_BENCH_RUNS=1 \
        FLOTILLA_BENCH_AGENTS=$agents \
        FLOTILLA_BENCH_BIN_DIR=$work/$side-target/release \
        FLOTILLA_TESTENV_BIN=$testenv \
        "$bench" --results "$work/results-$side/round-$round" "$part")
    done
  done
done

# The table comes from this tree's bench (NEW may predate `compare`).
$cargo run -q -p flotilla-bench -- compare \
  --base "$work/results-base" --new "$work/results-new" \
  --base-label "base $base_rev" --new-label "new $new_rev" --out BENCHMARKS.md
echo "bench-compare: BENCHMARKS.md (compare block) written; raw results in $work/results-{base,new}"
