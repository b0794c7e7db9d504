#!/usr/bin/env bash
# The load benchmark: what Switchyard adds to a call, against calling a fast mock provider
# directly and against nginx as a plain keep-alive reverse proxy, measured in one run.
#
#   CPU 0: the mock provider (nginx returning a fixed chat completion) and the load generator (wrk)
#   CPU 1: the proxy under test: nginx proxy_pass, the stack's floor (actix-web and awc alone,
#          benches/floor_proxy.rs), then Switchyard with one worker
#
# Reports sequential latency (1 connection, p50/p99 added over direct), closed-loop throughput
# (64 connections), CPU time per request of the proxy process, streaming time to first byte,
# and resident memory after 1,000,000 calls. Nothing here is asserted: it is a measurement.
# Usage: benches/run.sh [seconds per run, default 10]
#
# BENCH_INSTRUCTIONS=1 counts instead the router's user-space instructions per call under
# valgrind's callgrind, split between the HTTP worker (the request path) and the threads behind
# it (metering, SQLite writes). Slow, but exact and repeatable: what a change saves, whatever
# else the machine is doing. Kernel time (sockets) is not counted. BENCH_CALLGRIND_DIR=dir keeps
# the per-thread profiles for callgrind_annotate. BENCH_SYSCALLS=1 prints the system calls and
# context switches per request of nginx and of the router during the closed-loop runs.
# BENCH_PERF=file records a profile of the router (and file.nginx of nginx) over the closed-loop
# runs; BENCH_PERF_GRAPH=dwarf unwinds call graphs through code without frame pointers.
# BENCH_SCHED=file records the scheduler during the router's sequential run and counts the HTTP
# worker's waits for its CPU (behind the router's own threads, or anything else); BENCH_KEEP=1 keeps
# the work directory (the router's database and log). BENCH_BINARY=path measures that build of
# the router instead of building this checkout (to compare two builds in turns).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
TOTAL_CALLS="${BENCH_TOTAL_CALLS:-1000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard-target}"
WORK="$(mktemp -d)"
MOCK_PORT=18181 NGINX_PORT=18182 SY_PORT=18183 FLOOR_PORT=18184
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/mock.pid" ] && kill "$(cat "$WORK/mock.pid")" 2>/dev/null || true
  [ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $WORK (database, logs)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

need() {
  command -v "$1" >/dev/null && return
  [ "$(id -u)" -eq 0 ] || { echo "install $2 first" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need nginx nginx
need wrk wrk
need taskset util-linux
need curl curl
INSTRUCTIONS="${BENCH_INSTRUCTIONS:-}"
[ -z "$INSTRUCTIONS" ] || need callgrind_control valgrind
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs" >&2; exit 1; }

# The stack's floor (benches/floor_proxy.rs: actix-web and awc with nothing else) is measured
# beside nginx: what Switchyard spends over it is its own work, what it spends over nginx the
# stack's.
FLOOR="$CARGO_TARGET_DIR/release/examples/floor_proxy"
if [ -n "${BENCH_BINARY:-}" ]; then
  BIN="$(realpath "$BENCH_BINARY")"
  [ -x "$FLOOR" ] || { echo "building the floor proxy..."; cargo build --release --quiet --example floor_proxy; }
else
  echo "building the release binaries..."
  cargo build --release --quiet --bin switchyard --example floor_proxy
  BIN="$CARGO_TARGET_DIR/release/switchyard"
fi

# shellcheck source=benches/common.sh
. benches/common.sh
mock_conf "$MOCK_PORT"
nginx_conf proxy "$NGINX_PORT" "
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }" "upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 128; }"

taskset -c 0 nginx -c "$WORK/mock.conf" -p "$WORK"
taskset -c 1 nginx -c "$WORK/proxy.conf" -p "$WORK"
if [ -z "$INSTRUCTIONS" ]; then
  taskset -c 1 "$FLOOR" "127.0.0.1:$FLOOR_PORT" "http://127.0.0.1:$MOCK_PORT" > "$WORK/floor.log" 2>&1 &
  FLOOR_PID=$!
  PIDS+=("$FLOOR_PID")
fi

# Switchyard: one worker on CPU 1, SQLite, logging at info to a file, a user key, one upstream.
ADMIN_TOKEN="bench-admin-$RANDOM$RANDOM"
(cd "$WORK" && SWITCHYARD_LISTEN="127.0.0.1:$SY_PORT" SWITCHYARD_ADMIN_TOKEN="$ADMIN_TOKEN" \
  SWITCHYARD_DATABASE_URL="${BENCH_DATABASE_URL:-sqlite://$WORK/bench.db}" SWITCHYARD_SERVER__WORKERS=1 \
  SWITCHYARD_MASTER_KEY="${BENCH_MASTER_KEY:-}" \
  SWITCHYARD_LOG__LEVEL="${BENCH_LOG_LEVEL:-info}" SWITCHYARD_REDIS_URL="${BENCH_REDIS_URL:-}" \
  SWITCHYARD_REDIS__KEY_PREFIX="switchyard-bench-$RANDOM:" \
  taskset -c 1 ${INSTRUCTIONS:+valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$WORK/callgrind.out"} "$BIN" serve > "$WORK/switchyard.log" 2>&1) &
sleep 0.2
if [ -n "$INSTRUCTIONS" ]; then pattern="valgrind.*$BIN serve"; else pattern="^$BIN serve"; fi
SY_PID=$(pgrep -f "$pattern" | head -1)
PIDS+=("$SY_PID")
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$SY_PORT/healthz" >/dev/null && break; sleep 0.1; done

USER_KEY=$(bench_user "$SY_PORT" "$ADMIN_TOKEN" "$MOCK_PORT" "${BENCH_LIMITS:-}")

write_wrk_script "$WORK/post.lua" "$USER_KEY"

# Warm up every path (connection pools, caches, argon2 on the first key check).
for port in $MOCK_PORT $NGINX_PORT ${FLOOR_PID:+$FLOOR_PORT} $SY_PORT; do
  taskset -c 0 wrk -t1 -c8 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done
curl -sf "http://127.0.0.1:$SY_PORT/v1/chat/completions" -H "Authorization: Bearer $USER_KEY" \
  -H 'content-type: application/json' -d "$BODY" | grep -q chatcmpl-bench || { echo "router not proxying" >&2; cat "$WORK/switchyard.log" >&2; exit 1; }

if [ -n "$INSTRUCTIONS" ]; then
  callgrind_control -z "$SY_PID" >/dev/null 2>&1
  CALLS=$(taskset -c 0 wrk -t1 -c4 -d"${DURATION}s" -s "$WORK/post.lua" "http://127.0.0.1:$SY_PORT/v1/chat/completions" | awk '/requests in/ {print $1}')
  sleep 1.5 # metering writes what it holds within a second
  callgrind_control -d "$SY_PID" >/dev/null 2>&1
  # One file per thread; the HTTP worker is the actix thread that ran the handlers.
  worker=0 rest=0
  for f in "$WORK"/callgrind.out*; do
    ir=$(awk '/^summary:/ {print $2}' "$f")
    if grep -q "handler_service" "$f" 2>/dev/null; then worker=$((worker + ${ir:-0})); else rest=$((rest + ${ir:-0})); fi
  done
  echo "instructions per call over $CALLS calls (user space, callgrind):"
  echo "  HTTP worker (request path): $((worker / CALLS))"
  echo "  other threads (metering, SQLite writes, logs): $((rest / CALLS))"
  echo "  total: $(((worker + rest) / CALLS))"
  if [ -n "${BENCH_CALLGRIND_DIR:-}" ]; then
    mkdir -p "$BENCH_CALLGRIND_DIR" && cp "$WORK"/callgrind.out* "$BENCH_CALLGRIND_DIR/"
    echo "callgrind profiles (one per thread) kept in $BENCH_CALLGRIND_DIR (callgrind_annotate)"
  fi
  exit 0
fi

to_us() { # wrk time (e.g. 85.00us, 1.20ms, 2.00s) -> microseconds
  awk -v t="$1" 'BEGIN { v=t+0; if (t ~ /us$/) print v; else if (t ~ /ms$/) print v*1000; else if (t ~ /s$/) print v*1000000; else print v }'
}
cpu_ticks() { # "utime stime" of the given processes, in clock ticks
  local user=0 sys=0
  for pid in "$@"; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat")
    user=$((user + u)) sys=$((sys + s))
  done
  echo "$user $sys"
}
nginx_pids() { local master; master=$(cat "$WORK/$1.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')"; }

declare -A P50 P99 RPS CPU SYS
run() { # name port pids...
  local name=$1 port=$2; shift 2
  local out
  # BENCH_SCHED=FILE records the scheduler (both CPUs) during the router's sequential run
  # (perf sched timehist -i FILE shows who held the CPU while the worker waited).
  if [ -n "${BENCH_SCHED:-}" ] && [ "$name" = switchyard ]; then
    perf sched record -q -a -o "$BENCH_SCHED" -- sleep "$DURATION" >/dev/null 2>&1 &
  fi
  out=$(taskset -c 0 wrk -t1 -c1 -d"${DURATION}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  P50[$name]=$(to_us "$(echo "$out" | awk '$1 == "50%" {print $2}')")
  P99[$name]=$(to_us "$(echo "$out" | awk '$1 == "99%" {print $2}')")
  local before after
  [ $# -gt 0 ] && before=$(cpu_ticks "$@")
  # BENCH_PERF=FILE profiles the router during its closed-loop run (perf record, call graphs;
  # BENCH_PERF_GRAPH=dwarf unwinds them from the stack, through code without frame pointers).
  # nginx's own profile goes beside it, in FILE.nginx, to compare the two hops' kernel work.
  if [ -n "${BENCH_PERF:-}" ] && [ $# -gt 0 ]; then
    local profile="$BENCH_PERF"; [ "$name" = switchyard ] || profile="$BENCH_PERF.$name"
    perf record -q -F 1999 --call-graph="${BENCH_PERF_GRAPH:-fp}" -p "$(echo "$@" | tr ' ' ',')" \
      -o "$profile" -- sleep "$DURATION" 2>/dev/null &
  fi
  # BENCH_SYSCALLS=1 counts the proxy's system calls and context switches over the same run.
  if [ -n "${BENCH_SYSCALLS:-}" ] && [ $# -gt 0 ]; then
    perf stat -x, -e 'raw_syscalls:sys_enter,context-switches,page-faults,syscalls:sys_enter_*' \
      -p "$(echo "$@" | tr ' ' ',')" -o "$WORK/$name.stat" -- sleep "$DURATION" 2>/dev/null &
    STAT_PID=$!
  fi
  out=$(taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  [ $# -gt 0 ] && after=$(cpu_ticks "$@")
  RPS[$name]=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local requests; requests=$(echo "$out" | awk '/requests in/ {print $1}')
  if [ $# -gt 0 ]; then
    local ticks hz; read -ra ticks <<< "$before $after"; hz=$(getconf CLK_TCK)
    local user=$((ticks[2] - ticks[0])) sys=$((ticks[3] - ticks[1]))
    CPU[$name]=$(awk -v t=$((user + sys)) -v n="$requests" -v hz="$hz" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
    SYS[$name]=$(awk -v t="$sys" -v n="$requests" -v hz="$hz" 'BEGIN { printf "%.1f", t / hz / n * 1e6 }')
    if [ -n "${BENCH_SYSCALLS:-}" ]; then
      wait "$STAT_PID"
      # The totals, then each system call made at least once in a hundred requests.
      awk -F, -v n="$requests" -v who="$name" '
        $3 ~ /^(raw_syscalls:sys_enter|context-switches|page-faults)$/ { printf "%s: %.2f %s per request\n", who, $1 / n, $3 }
        $3 ~ /^syscalls:sys_enter_/ && $1 / n >= 0.01 { sub(/^syscalls:sys_enter_/, "", $3); calls = calls sprintf(" %s %.3f", $3, $1 / n) }
        END { if (calls != "") printf "%s: per request:%s\n", who, calls }' "$WORK/$name.stat" >&2
    fi
  else
    CPU[$name]="-" SYS[$name]="-"
  fi
}

# BENCH_ROUNDS=N measures every path N times in turn and reports each figure's median: on a
# shared VM two runs of the same build differ by up to a third, and paths measured in turns
# share whatever the machine was doing.
ROUNDS="${BENCH_ROUNDS:-1}"
declare -A ALL_P50 ALL_P99 ALL_RPS ALL_CPU ALL_SYS
median() { tr ' ' '\n' <<< "$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { if (a[1] == "-") print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
PATHS="direct nginx floor switchyard"
CPU_RATIOS=""
echo "measuring (${DURATION}s per run, ${ROUNDS} round(s))..."
for round in $(seq 1 "$ROUNDS"); do
  run direct "$MOCK_PORT"
  run nginx "$NGINX_PORT" $(nginx_pids proxy)
  run floor "$FLOOR_PORT" "$FLOOR_PID"
  run switchyard "$SY_PORT" "$SY_PID"
  for name in $PATHS; do
    ALL_P50[$name]+="${P50[$name]} " ALL_P99[$name]+="${P99[$name]} " ALL_RPS[$name]+="${RPS[$name]} "
    ALL_CPU[$name]+="${CPU[$name]} " ALL_SYS[$name]+="${SYS[$name]} "
  done
  CPU_RATIOS+="$(awk -v a="${CPU[switchyard]}" -v b="${CPU[nginx]}" 'BEGIN { printf "%.2f", a / b }') "
done
for name in $PATHS; do
  P50[$name]=$(median "${ALL_P50[$name]}") P99[$name]=$(median "${ALL_P99[$name]}")
  RPS[$name]=$(median "${ALL_RPS[$name]}") CPU[$name]=$(median "${ALL_CPU[$name]}")
  SYS[$name]=$(median "${ALL_SYS[$name]}")
done

TTFB_DIRECT=$(ttfb "$MOCK_PORT" "x-none: 1")
TTFB_SY=$(ttfb "$SY_PORT" "Authorization: Bearer $USER_KEY")

# Memory after a million calls (the runs above already made some).
SECS=$(awk -v n="$TOTAL_CALLS" -v r="${RPS[switchyard]}" 'BEGIN { printf "%d", n / r + 1 }')
MORE=$(taskset -c 0 wrk -t1 -c64 -d"${SECS}s" -s "$WORK/post.lua" "http://127.0.0.1:$SY_PORT/v1/chat/completions" | awk '/requests in/ {print $1}')
RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SY_PID/status")
HWM_KB=$(awk '/VmHWM/ {print $2}' "/proc/$SY_PID/status")
# What metering still held when the load stopped (records not yet written), and the resident
# memory once it has written them: the held records are the bounded buffer at work, not growth.
waiting() { curl -sf "http://127.0.0.1:$SY_PORT/metrics" | awk '/^switchyard_queue_depth/ {n += $2} END {print n + 0}'; }
WAITING=$(waiting)
for _ in $(seq 1 60); do [ "$(waiting)" = 0 ] && break; sleep 0.5; done
sleep 1
SETTLED_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SY_PID/status")

# Metering keeps up or drops and counts: the records it had to drop (0 means every call metered).
DROPPED=$(curl -sf "http://127.0.0.1:$SY_PORT/metrics" | awk '/^switchyard_dropped_records_total/ {n += $2} END {print n + 0}')

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", a - b }'; }
echo
echo "| path | p50 µs | p99 µs | added p50 µs | added p99 µs | req/s (64 conn) | CPU µs/req | of it in the kernel |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for name in $PATHS; do
  printf '| %s | %.0f | %.0f | %s | %s | %.0f | %s | %s |\n' "$name" "${P50[$name]}" "${P99[$name]}" \
    "$(added "${P50[$name]}" "${P50[direct]}")" "$(added "${P99[$name]}" "${P99[direct]}")" "${RPS[$name]}" "${CPU[$name]}" "${SYS[$name]}"
done
echo
if [ "$ROUNDS" -gt 1 ]; then
  echo "(medians of $ROUNDS rounds; switchyard / nginx CPU per request in each round: $CPU_RATIOS)"
fi
echo "switchyard / nginx: throughput $(ratio "${RPS[switchyard]}" "${RPS[nginx]}")x (target >= 0.70), CPU per request $(ratio "${CPU[switchyard]}" "${CPU[nginx]}")x (target <= 2)"
echo "the stack's floor (actix-web + awc alone) / nginx: throughput $(ratio "${RPS[floor]}" "${RPS[nginx]}")x, CPU per request $(ratio "${CPU[floor]}" "${CPU[nginx]}")x; switchyard / floor: CPU per request $(ratio "${CPU[switchyard]}" "${CPU[floor]}")x"
echo "added latency: p50 $(added "${P50[switchyard]}" "${P50[direct]}") µs (target <= 100), p99 $(added "${P99[switchyard]}" "${P99[direct]}") µs (target <= 300)"
echo "streaming time to first byte (median of 200): direct ${TTFB_DIRECT} µs, switchyard ${TTFB_SY} µs, added $((TTFB_SY - TTFB_DIRECT)) µs (target <= 500)"
echo "resident memory after ${MORE} more calls (over 1,000,000 in all): $((RSS_KB / 1024)) MiB now, $((HWM_KB / 1024)) MiB peak (target < 100); $WAITING records were waiting to be written, and once written: $((SETTLED_KB / 1024)) MiB"
echo "metering: ${DROPPED} records dropped (0 = every call metered)"

# The router's HTTP worker waiting for its CPU during the sequential run, by who held the CPU.
if [ -n "${BENCH_SCHED:-}" ]; then
  perf sched timehist -i "$BENCH_SCHED" 2>/dev/null | awk -v pid="$SY_PID" '
    $2 == "[0001]" && NF >= 6 {
      # time cpu task... wait delay run: the task name may hold spaces.
      task = $3; for (i = 4; i <= NF - 3; i++) task = task " " $i
      n++; who[n] = task; delay[n] = $(NF - 1); ran[task] += $NF
    }
    END {
      for (t in ran) if (t ~ ("/" pid "]$") && ran[t] > most) { most = ran[t]; worker = t }
      for (i = 2; i <= n; i++) {
        if (who[i] != worker) continue
        wakes++
        if (delay[i] <= 0.1) continue
        late++
        if (who[i - 1] ~ ("/" pid "]$")) { own++; own_ms += delay[i] } else { other++; other_ms += delay[i] }
      }
      printf "worker waits for its CPU over 100 µs (sequential run): %d of %d runs; %d (%.1f ms in all) behind the router'"'"'s own background threads, %d (%.1f ms) behind other tasks or an idle vCPU\n", late, wakes, own, own_ms, other, other_ms
    }'
fi
