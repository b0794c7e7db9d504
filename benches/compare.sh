#!/usr/bin/env bash
# Two router binaries measured in turns, for changes smaller than this machine's noise.
#
# Wall-clock figures on a shared VM move by ±30% from one minute to the next, so a before/after
# comparison of two separate benchmark runs says little. Here each round starts each binary
# fresh (its own SQLite file) and measures it right after the other, on the benchmark's mock and
# pinning (mock and load generator on CPU 0, router on CPU 1): sequential latency (wrk, one
# connection, p50/p90/p99) and streaming time to first byte added over direct (median of 200
# curls). Nothing is asserted.
# Usage: benches/compare.sh BINARY_A BINARY_B [rounds, default 3] [seconds per run, default 6]
# (build B with `cargo build --release`, A from a worktree of the commit to compare with).
set -euo pipefail

A="${1:?usage: benches/compare.sh BINARY_A BINARY_B [rounds] [seconds]}"
B="${2:?usage: benches/compare.sh BINARY_A BINARY_B [rounds] [seconds]}"
ROUNDS="${3:-3}" SECONDS_PER_RUN="${4:-6}"
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }; done
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

COMPLETION='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
STREAM='data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\ndata: [DONE]\n\n'
cat > "$WORK/mock.conf" <<EOF
user root;
worker_processes 1;
daemon on;
pid $WORK/mock.pid;
error_log $WORK/mock.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$MOCK_PORT;
    location = /v1/chat/completions {
      if (\$http_accept = 'text/event-stream') { rewrite ^ /stream last; }
      default_type application/json;
      return 200 '$COMPLETION';
    }
    location = /stream { default_type text/event-stream; return 200 '$(printf '%s' "$STREAM")'; }
  }
}
EOF
taskset -c 0 nginx -c "$WORK/mock.conf" -p "$WORK"

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

ttfb() { # port header: median time to first byte of a streamed completion, in microseconds
  for _ in $(seq 1 200); do
    taskset -c 0 curl -s -o /dev/null -w '%{time_starttransfer}\n' "http://127.0.0.1:$1/v1/chat/completions" \
      -H "$2" -H 'content-type: application/json' -H 'accept: text/event-stream' \
      -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  done | sort -n | awk '{ a[NR] = $1 } END { printf "%.0f", a[int(NR/2)] * 1e6 }'
}

measure() { # label binary: one fresh router, measured; prints a table row
  local label=$1 bin=$2 token="compare-$RANDOM$RANDOM" dir="$WORK/$RANDOM"
  mkdir -p "$dir"
  (cd "$dir" && SWITCHYARD_LISTEN="127.0.0.1:$SY_PORT" SWITCHYARD_ADMIN_TOKEN="$token" \
    SWITCHYARD_DATABASE_URL="sqlite://$dir/router.db" SWITCHYARD_SERVER__WORKERS=1 \
    SWITCHYARD_LOG__LEVEL=info exec taskset -c 1 "$bin" serve > "$dir/router.log" 2>&1) &
  SY_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$SY_PORT/healthz" >/dev/null && break; sleep 0.1; done
  admin() { curl -sf -X "$1" "http://127.0.0.1:$SY_PORT$2" -H "Authorization: Bearer $token" \
    -H 'content-type: application/json' ${3:+-d "$3"}; }
  admin POST /admin/users '{"name":"bench"}' >/dev/null
  local user key
  user=$(admin GET /admin/users | grep -o '"id":"usr_[0-9a-f]*"' | head -1 | cut -d'"' -f4)
  key=$(admin POST "/admin/users/$user/keys" '{}' | grep -o '"key":"[^"]*"' | cut -d'"' -f4)
  admin POST /admin/upstream-keys "{\"provider\":\"openai\",\"base_url\":\"http://127.0.0.1:$MOCK_PORT/v1\",\"secret\":\"compare-upstream-secret\"}" >/dev/null
  cat > "$dir/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
EOF
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
