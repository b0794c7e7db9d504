# Shared by run.sh and compare.sh (sourced): the mock provider's answers, the request, nginx's
# configuration, the router's benchmark user, and the streaming time-to-first-byte probe.
# Callers set WORK (a scratch directory) before using these.

COMPLETION='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
# The stream ends with the usage chunk OpenAI sends when asked (the router always asks): a
# stream without one is metered by counting its tokens, which loads a tokenizer (about 30 MiB).
STREAM='data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\ndata: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}\n\ndata: [DONE]\n\n'

nginx_conf() { # name port body...
  cat > "$WORK/$1.conf" <<EOF
user root;
worker_processes 1;
daemon on;
pid $WORK/$1.pid;
error_log $WORK/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1.body;
  proxy_temp_path $WORK/$1.proxy;
  fastcgi_temp_path $WORK/$1.fcgi;
  uwsgi_temp_path $WORK/$1.uwsgi;
  scgi_temp_path $WORK/$1.scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$2;
    $3
  }
  $4
}
EOF
}

mock_conf() { # port: the mock provider, a fixed chat completion (streamed when asked)
  nginx_conf mock "$1" "
    location = /v1/chat/completions {
      if (\$http_accept = 'text/event-stream') { rewrite ^ /stream last; }
      default_type application/json;
      return 200 '$COMPLETION';
    }
    location = /stream { default_type text/event-stream; return 200 '$(printf '%s' "$STREAM")'; }" ""
}

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

write_wrk_script() { # file user-key: wrk posts BODY with the key
  cat > "$1" <<EOF
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
EOF
}

bench_user() { # router-port admin-token mock-port [user JSON patch]: creates a user with the
  # patch applied and the mock as the one upstream key; prints the user's key
  local base="http://127.0.0.1:$1" token=$2 user
  admin() { curl -sf -X "$1" "$base$2" -H "Authorization: Bearer $token" \
    -H 'content-type: application/json' ${3:+-d "$3"}; }
  admin POST /admin/users '{"name":"bench"}' >/dev/null
  user=$(admin GET /admin/users | grep -o '"id":"usr_[0-9a-f]*"' | head -1 | cut -d'"' -f4)
  admin POST /admin/upstream-keys "{\"provider\":\"openai\",\"base_url\":\"http://127.0.0.1:$3/v1\",\"secret\":\"bench-upstream-secret\"}" >/dev/null
  [ -z "${4:-}" ] || admin PATCH "/admin/users/$user" "$4" >/dev/null
  admin POST "/admin/users/$user/keys" '{}' | grep -o '"key":"[^"]*"' | cut -d'"' -f4
}

ttfb() { # port header: median time to first byte of a streamed completion, in microseconds
  for _ in $(seq 1 200); do
    taskset -c 0 curl -s -o /dev/null -w '%{time_starttransfer}\n' "http://127.0.0.1:$1/v1/chat/completions" \
      -H "$2" -H 'content-type: application/json' -H 'accept: text/event-stream' \
      -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  done | sort -n | awk '{ a[NR] = $1 } END { printf "%.0f", a[int(NR/2)] * 1e6 }'
}
