#!/usr/bin/env bash
# Benchmarks chatmesh against the Node stack it replaces (bench/baseline-node), on this machine,
# with the same load generator, A B A B; prints a table and writes bench/results/SCENARIO.json.
#   bench/run.sh ingest|fanout|idle|sync|all [--quick]
#   bench/run.sh regions [--quick]   cross-region latency on two local regions (bench/regions.sh)
# --quick: one round, small shapes (each scenario well under 2 minutes).
# Needs: redis-server + redis-benchmark, PostgreSQL on 127.0.0.1:5432 (trust), Node + npm
# (scripts/setup.sh --test installs them); builds the release binaries and the baseline first.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  ingest | fanout | idle | sync | all) ;;
  regions)
    # Two regions on this machine (bench/regions.sh): chatmesh only, no baseline. BENCH_BIN names
    # a binary to use instead of building the release one.
    if [ -z "${BENCH_BIN:-}" ]; then
      echo "bench: cargo build --release -p chatmesh" >&2
      cargo build --release --quiet -p chatmesh
    fi
    shift
    exec bench/regions.sh "$@"
    ;;
  *) echo "usage: bench/run.sh ingest|fanout|idle|sync|all|regions [--quick]" >&2; exit 2 ;;
esac
need() { command -v "$1" >/dev/null 2>&1 || { echo "bench: $1 is missing (scripts/setup.sh --test)" >&2; exit 1; }; }
for c in redis-server redis-benchmark redis-cli psql node npm python3; do need "$c"; done
echo "bench: cargo build --release -p chatmesh -p chatmesh-loadgen" >&2
cargo build --release --quiet -p chatmesh -p chatmesh-loadgen
bench/baseline-node/setup.sh
exec python3 bench/harness.py "$@"
