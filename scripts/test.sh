#!/usr/bin/env bash
# Sets up and runs the whole test suite: lint, Rust unit + integration tests against the real
# binary, the fault suite through HAProxy, then the independent-client suites (socket.io-client,
# Chromium) in Node.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Monitoring: promtool checks and unit tests of the alert rules, the dashboard's metric names.
scripts/check-monitoring.sh
cargo build --quiet --workspace --bins
cargo nextest run --workspace --no-fail-fast
# The one store case SecantusDB cannot serve (snapshot reads) is ignored unless a real mongod is named.
if [ -n "${CHATMESH_TEST_MONGODB_URL:-}" ]; then
  cargo nextest run --test store_contract --run-ignored only
fi

# The cargo-fuzz targets (an unoptimized instrumented build, then 25 s each: scripts/fuzz.sh) run
# beside the fault scenarios, which mostly wait on restarts and failovers. (The network fuzzer,
# tests/api/netfuzz.rs, ran with the Rust tests above.)
mkdir -p target/test-artifacts
scripts/fuzz.sh >target/test-artifacts/fuzz.log 2>&1 &
fuzz_pid=$!
trap 'kill "$fuzz_pid" 2>/dev/null || true' EXIT

# Fault scenarios through HAProxy (kill -9, rolling restart, Redis primary loss, PostgreSQL
# stopped, one instance cut off Redis), ~7 min. On the debug build (dependencies optimized): what
# the suite checks is loss, duplication and order at 100 sends/s, which does not need the release
# build's whole-program optimization (that build took 18 min of a 42-minute CI run, beside the
# fuzz targets' release build).
# `scripts/fault-suite.sh` on its own builds and runs the release binaries.
FAULT_BIN_DIR=target/debug scripts/fault-suite.sh

fuzz_ok=0
wait "$fuzz_pid" && fuzz_ok=1
trap - EXIT
cat target/test-artifacts/fuzz.log
[ "$fuzz_ok" = 1 ] || { echo "test: fuzzing failed (above)" >&2; exit 1; }

cd tests/node
CHATMESH_BIN="$(pwd)/../../target/debug/chatmesh" node --test --test-concurrency=2 --test-reporter=spec .
