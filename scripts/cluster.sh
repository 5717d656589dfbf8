#!/usr/bin/env bash
# Runs a local cluster on loopback: one Redis (its own port and dir), a PostgreSQL database on the
# machine's server, and N chatmesh instances (default 3) on ports 5001.. . Ctrl-C stops everything.
#   scripts/cluster.sh [N]
# Settings: CHATMESH_PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#           CLUSTER_REDIS_PORT (default 6390), CLUSTER_DB (default chatmesh_cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-3}"
redis_port="${CLUSTER_REDIS_PORT:-6390}"
db="${CLUSTER_DB:-chatmesh_cluster}"
pg_admin="${CHATMESH_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
pg_base="${pg_admin%/*}"
scripts/setup.sh
command -v redis-server >/dev/null || { echo "cluster: installing redis-server" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
cargo build --release --quiet -p chatmesh

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no --daemonize yes \
  --logfile "$dir/redis.log"
psql "$pg_admin" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
  psql "$pg_admin" -qc "CREATE DATABASE $db"

secret_file=data/cluster-secret
mkdir -p data
[ -f "$secret_file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file"
secret=$(cat "$secret_file")

for i in $(seq 1 "$n"); do
  port=$((5000 + i))
  CHATMESH_BIND="127.0.0.1:$port" CHATMESH_INSTANCE_ID="local-$i" \
    CHATMESH_REDIS_URL="redis://127.0.0.1:$redis_port" CHATMESH_STORE_URL="$pg_base/$db" \
    CHATMESH_JWT_SECRET="$secret" CHATMESH_CLUSTER_SECRET="$secret" CHATMESH_ADMIN_TOKEN="$secret" \
    CHATMESH_LOG_FORMAT=json \
    target/release/chatmesh serve >"$dir/instance-$i.log" 2>&1 &
  pids+=("$!")
  echo "instance local-$i: http://127.0.0.1:$port (log $dir/instance-$i.log)"
done
echo "redis: 127.0.0.1:$redis_port   store: $pg_base/$db   admin token: $secret_file   Ctrl-C stops the cluster"
wait
