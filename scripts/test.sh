#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the integration suite against real
# PostgreSQL and Redis (SQLite is embedded). Works on a fresh machine: finds the services,
# starts them if installed but stopped, installs them (Debian/Ubuntu, as root) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/switchyard-target}"
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG_PASSWORD=postgres
REDIS_URL="${SWITCHYARD_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
REDIS_PORT=$(echo "$REDIS_URL" | sed -E 's#^redis://([^/]*@)?[^:/]*:?([0-9]*).*#\2#')
REDIS_PORT=${REDIS_PORT:-6379}

log() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || { echo "no apt-get: install $* by hand" >&2; exit 1; }
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

INSTALLED_POSTGRES=0

# A developer's own server is used as SWITCHYARD_TEST_PG_URL names it.
pg_url() { echo "${SWITCHYARD_TEST_PG_URL:-postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/postgres}"; }

pg_ok() { psql "$(pg_url)" -Atqc 'SELECT 1' >/dev/null 2>&1; }

ensure_postgres() {
  command -v psql >/dev/null || apt_install postgresql-client
  if ! pg_isready -h "$PG_HOST" -p "$PG_PORT" -q 2>/dev/null; then
    if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
      apt_install postgresql postgresql-client
      INSTALLED_POSTGRES=1
    fi
    log "starting PostgreSQL"
    for version in $(ls /etc/postgresql 2>/dev/null); do
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_isready -h "$PG_HOST" -p "$PG_PORT" -q && break; sleep 1; done
  fi
  if ! pg_ok && { [ "$INSTALLED_POSTGRES" = 1 ] || [ "${CI:-}" = true ]; }; then
    # A freshly packaged server asks for a password over TCP: give the postgres role a known
    # one. Only on a server this script installed, or in CI; never on a developer's own.
    log "setting a password for the postgres role"
    as_root runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD '$PG_PASSWORD'" >/dev/null
  fi
  pg_ok || {
    echo "PostgreSQL at $(pg_url | sed 's/:[^:@]*@/:***@/') is running but refuses the test" \
      "login: set SWITCHYARD_TEST_PG_URL to a superuser URL of yours" >&2
    exit 1
  }
}

redis_ok() { redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  command -v redis-cli >/dev/null || apt_install redis-tools
  # The Redis-over-TLS test makes its own certificate.
  command -v openssl >/dev/null || apt_install openssl
  if ! redis_ok; then
    log "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      >/dev/null || { echo "cannot start redis-server on port $REDIS_PORT" >&2; exit 1; }
    for _ in $(seq 1 30); do redis_ok && break; sleep 0.5; done
  fi
  redis_ok || { echo "Redis is not reachable at $REDIS_URL" >&2; exit 1; }
}

# The official OpenAI, Anthropic and Google GenAI Python SDKs, for the tests that drive Switchyard
# through them.
ensure_python_sdks() {
  command -v python3 >/dev/null || apt_install python3
  # Debian's python3 comes without pip.
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  PYLIB="$HOME/.cache/switchyard-pylib"
  if ! PYTHONPATH="$PYLIB" python3 -c 'import openai, anthropic, google.genai' 2>/dev/null; then
    log "installing the openai, anthropic and google-genai Python SDKs into $PYLIB"
    python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$PYLIB" \
      'openai>=1.40,<3' 'anthropic>=0.40,<1' 'google-genai>=1,<2'
  fi
  export SWITCHYARD_TEST_PYTHONPATH="$PYLIB"
}

# nginx, the load balancer in front of the multi-replica (fleet) test.
ensure_nginx() {
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx
}

# The Rust toolchain comes from rustup (Debian's cargo is too old); crates that build C
# (SQLite, ring, mimalloc) and the linker need a C compiler.
ensure_toolchain() {
  command -v cargo >/dev/null || {
    echo "cargo not found: install Rust (1.85 or later) with rustup, https://rustup.rs" >&2
    exit 1
  }
  command -v cc >/dev/null || apt_install build-essential
}

ensure_toolchain
ensure_postgres
ensure_redis
ensure_python_sdks
ensure_nginx

# Each integration test creates its own database named sy_test_*; drop what earlier runs left.
log "dropping stale test databases"
psql "$(pg_url)" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'sy\_test\_%'" |
  while read -r db; do psql "$(pg_url)" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null; done

export SWITCHYARD_TEST_PG_URL="$(pg_url)"
export SWITCHYARD_TEST_REDIS_URL="$REDIS_URL"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
log "deploy/: Kubernetes manifests"
bash scripts/validate-deploy.sh
log "cargo test"
# Bounded, so a test that hangs fails the run instead of using up CI's time.
timeout 60m cargo test --all-targets --quiet -- --skip fleet:: 2>&1 | tee "${TMPDIR:-/tmp}/switchyard-test.log"
# Three real binaries behind nginx on one PostgreSQL and one Redis; shown with its figures.
log "fleet: three replicas behind nginx"
timeout 20m cargo test --quiet --test api -- fleet:: --nocapture 2>&1 | tee -a "${TMPDIR:-/tmp}/switchyard-test.log"
