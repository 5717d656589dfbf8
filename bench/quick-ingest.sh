#!/usr/bin/env bash
# Quick embedded-mode ingest figures: one release server (SQLite in a temp dir), the Rust load
# generator on the same machine, 1 room and 100 rooms. Prints one JSON line per run.
#   bench/quick-ingest.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
cargo build --release --quiet -p chatmesh -p chatmesh-loadgen
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
CHATMESH_BIND="127.0.0.1:$port" CHATMESH_STORE_URL="sqlite://$dir/chatmesh.db" CHATMESH_LOG_FORMAT=json \
  CHATMESH_AUTH_RATE_PER_MIN=100000 CHATMESH_SEND_RATE_PER_SEC=100000 CHATMESH_READ_RATE_PER_SEC=100000 \
    CHATMESH_ROOM_CHANGE_RATE_PER_MIN=100000 RUST_LOG=warn \
  target/release/chatmesh serve >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break; sleep 0.1; done
lg() { target/release/chatmesh-loadgen ingest --url "http://127.0.0.1:$port" --seconds "$secs" --server-pid "$pid" "$@"; }
lg --senders 50 --rooms 1 --window 8
lg --senders 10 --rooms 10 --window 1
lg --senders 100 --rooms 100 --window 8
