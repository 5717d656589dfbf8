#!/usr/bin/env bash
# Installs what chatmesh needs on a fresh machine of this kind. Idempotent: every step checks first.
#   scripts/setup.sh          what running the server needs (Rust toolchain, Node for the web assets)
#   scripts/setup.sh --test   plus what the test suite needs (Chromium, test clients from npm,
#                             SecantusDB in .tools/venv)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

need() { command -v "$1" >/dev/null 2>&1; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    echo "setup: apt-get update" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  echo "setup: apt-get install $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need cargo || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
need node && need npm || apt_install nodejs npm

# The browser build of socket.io-client that the binary serves (build.rs copies it in).
if [ ! -f web/node_modules/socket.io-client/dist/socket.io.min.js ]; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
fi

if [ "$want_test" = 1 ]; then
  need chromium || apt_install chromium
  # Cluster tests start their own Redis servers, Sentinels and Redis Clusters.
  need redis-server && need redis-cli || apt_install redis-server redis-tools
  # The backend TLS tests make their own CA and certificates with the openssl CLI.
  need openssl || apt_install openssl
  # The deployment test runs scripts/local-cluster.sh: HAProxy in front of the instances.
  need haproxy || apt_install haproxy
  # The TLS tests make their own CA and server certificates with the openssl CLI.
  need openssl || apt_install openssl
  # The fault suite cuts one instance off Redis with a firewall rule inside its own namespace.
  need iptables || apt_install iptables
  # scripts/check-monitoring.sh runs promtool on deploy/prometheus (Debian's prometheus ships it).
  # The package's maintainer scripts may fail to start its service in a container; only promtool
  # matters, so an install error counts only if promtool is still missing.
  need promtool || apt_install prometheus || need promtool
  # The store contract suite runs against a real PostgreSQL (one database per test); outage tests
  # and the fault suite run private servers from its binaries (initdb, pg_ctl).
  need pg_isready && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_install postgresql
  if ! pg_isready -h 127.0.0.1 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
  fi
  # The MongoDB tests (store contract, backup round trip, the Node cluster suite on MongoDB) start
  # private SecantusDB servers: a MongoDB-wire server from PyPI that advertises a one-member replica
  # set. It lives in a virtualenv in .tools/ (git-ignored); the tests look for
  # .tools/venv/bin/secantusd-py when secantusd-py is not on PATH.
  secantus=0.7.0b3
  if [ "$(.tools/venv/bin/python -c 'import importlib.metadata as m; print(m.version("secantusdb"))' 2>/dev/null)" != "$secantus" ]; then
    need python3 || apt_install python3
    # Debian's python3 has no venv/ensurepip without python3-venv.
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
    rm -rf .tools/venv
    python3 -m venv .tools/venv
    echo "setup: pip install secantusdb==$secantus into .tools/venv" >&2
    .tools/venv/bin/pip install --quiet --disable-pip-version-check "secantusdb==$secantus"
  fi
  need cargo-nextest || cargo install --locked cargo-nextest
  # scripts/fuzz.sh: cargo-fuzz, and a C++ compiler for libfuzzer-sys (it builds libFuzzer). No
  # nightly toolchain is installed (a fresh machine may not reach one); fuzz.sh falls back to
  # stable with RUSTC_BOOTSTRAP=1.
  need c++ || apt_install g++
  cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
  rustup component add clippy rustfmt >/dev/null 2>&1 || true
  # Installed exactly as the lock file says: reinstalled whenever the lock file changes.
  lock_sum="$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)"
  if [ "$(cat tests/node/node_modules/.chatmesh-lock 2>/dev/null)" != "$lock_sum" ]; then
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_sum" > tests/node/node_modules/.chatmesh-lock
  fi
fi
