#!/usr/bin/env bash
# Sets up and runs chatmesh in embedded mode (SQLite in ./data, no Redis, no database server).
# Open http://127.0.0.1:5001 once it logs "listening". Settings: CHATMESH_* variables (README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --quiet -- serve "$@"
