#!/usr/bin/env bash
# Two router binaries measured in turns, for changes smaller than this machine's noise.
#
# Wall-clock figures on a shared VM move by ±30% from one minute to the next, so a before/after
# comparison of two separate benchmark runs says little. Here each round starts each binary
# fresh (its own SQLite file) and measures it right after the other, on the benchmark's mock and
# pinning (mock and load generator on CPU 0, router on CPU 1): sequential latency (wrk, one
# connection, p50/p90/p99) and streaming time to first byte added over direct (median of 200
# curls). Nothing is asserted. BENCH_LIMITS='{"rpm":...,"tpm":...}' sets limits on the user, as in
# benches/run.sh.
# Usage: benches/compare.sh BINARY_A BINARY_B [rounds, default 3] [seconds per run, default 6]
# (build B with `cargo build --release`, A from a worktree of the commit to compare with).
set -euo pipefail

A="${1:?usage: benches/compare.sh BINARY_A BINARY_B [rounds] [seconds]}"
B="${2:?usage: benches/compare.sh BINARY_A BINARY_B [rounds] [seconds]}"
ROUNDS="${3:-3}" SECONDS_PER_RUN="${4:-6}"
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }; done
A="$(realpath "$A")" B="$(realpath "$B")"
for tool in nginx wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (benches/run.sh installs it)" >&2; exit 1; }
done

WORK="$(mktemp -d)"
MOCK_PORT=18191 SY_PORT=18193
SY_PID=""
cleanup() {
  [ -n "$SY_PID" ] && kill "$SY_PID" 2>/dev/null || true
  [ -f "$WORK/mock.pid" ] && kill "$(cat "$WORK/mock.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cd "$(dirname "$0")/.."
# shellcheck source=benches/common.sh
. benches/common.sh
mock_conf "$MOCK_PORT"
taskset -c 0 nginx -c "$WORK/mock.conf" -p "$WORK"

measure() { # label binary: one fresh router, measured; prints a table row
  local label=$1 bin=$2 token="compare-$RANDOM$RANDOM" dir="$WORK/$RANDOM"
  mkdir -p "$dir"
  (cd "$dir" && SWITCHYARD_LISTEN="127.0.0.1:$SY_PORT" SWITCHYARD_ADMIN_TOKEN="$token" \
    SWITCHYARD_DATABASE_URL="sqlite://$dir/router.db" SWITCHYARD_SERVER__WORKERS=1 \
    SWITCHYARD_LOG__LEVEL=info exec taskset -c 1 "$bin" serve > "$dir/router.log" 2>&1) &
  SY_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SY_PORT/healthz" >/dev/null && break; sleep 0.1; done
  local key
  key=$(bench_user "$SY_PORT" "$token" "$MOCK_PORT" "${BENCH_LIMITS:-}")
  write_wrk_script "$dir/post.lua" "$key"
  taskset -c 0 wrk -t1 -c8 -d2s -s "$dir/post.lua" "http://127.0.0.1:$SY_PORT/v1/chat/completions" >/dev/null
  local latency direct routed
  latency=$(taskset -c 0 wrk -t1 -c1 -d"${SECONDS_PER_RUN}s" --latency -s "$dir/post.lua" \
    "http://127.0.0.1:$SY_PORT/v1/chat/completions" | awk '$1 ~ /^(50|90|99)%$/ {printf "%s | ", $2}')
  direct=$(ttfb "$MOCK_PORT" "x-none: 1")
  routed=$(ttfb "$SY_PORT" "Authorization: Bearer $key")
  echo "| $label | $latency$((routed - direct)) |"
  kill "$SY_PID" 2>/dev/null || true
  wait "$SY_PID" 2>/dev/null || true
  SY_PID=""
}

echo "A = $A"
echo "B = $B"
echo
echo "| binary | p50 | p90 | p99 | streaming TTFB added µs |"
echo "| --- | --- | --- | --- | --- |"
for _ in $(seq 1 "$ROUNDS"); do
  measure A "$A"
  measure B "$B"
done
