#!/usr/bin/env bash
# Quick cluster-mode ingest figures: one Redis (own port), a fresh PostgreSQL database on the
# machine's server, N release instances (default 3); the Rust load generator spreads its senders
# over all instances and samples the write-back lag. Prints one JSON line.
#   bench/quick-cluster.sh [SECONDS] [INSTANCES]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
n="${2:-3}"
cargo build --release --quiet -p chatmesh -p chatmesh-loadgen
dir=$(mktemp -d)
redis_port=$((20000 + RANDOM % 10000))
db="chatmesh_bench_$RANDOM"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no --daemonize yes --logfile "$dir/redis.log"
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
urls=()
for i in $(seq 1 "$n"); do
  port=$((30000 + RANDOM % 10000))
  CHATMESH_BIND="127.0.0.1:$port" CHATMESH_INSTANCE_ID="bench-$i" CHATMESH_REDIS_URL="redis://127.0.0.1:$redis_port" \
    CHATMESH_STORE_URL="postgres://postgres@127.0.0.1:5432/$db" CHATMESH_JWT_SECRET=bench-secret-0123456789abcdef0123 \
    CHATMESH_CLUSTER_SECRET=bench-secret-0123456789abcdef0123 CHATMESH_LOG_FORMAT=json RUST_LOG=warn \
    CHATMESH_AUTH_RATE_PER_MIN=100000 CHATMESH_SEND_RATE_PER_SEC=100000 CHATMESH_READ_RATE_PER_SEC=100000 \
    CHATMESH_ROOM_CHANGE_RATE_PER_MIN=100000 \
    target/release/chatmesh serve >"$dir/i$i.log" 2>&1 &
  pids+=("$!")
  urls+=("http://127.0.0.1:$port")
done
for u in "${urls[@]}"; do
  for _ in $(seq 100); do curl -sf "$u/health/ready" >/dev/null && break; sleep 0.1; done
done
all_pids=$(IFS=,; echo "${pids[*]},$(pgrep -f "redis-server 127.0.0.1:$redis_port" | head -1)")
target/release/chatmesh-loadgen ingest --url "$(IFS=,; echo "${urls[*]}")" --senders "${SENDERS:-100}" --rooms "${ROOMS:-100}" --window "${WINDOW:-8}" \
  --seconds "$secs" --server-pid "$all_pids"
