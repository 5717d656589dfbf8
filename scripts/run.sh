#!/usr/bin/env bash
# Sets up and runs chatmesh in embedded mode (SQLite in ./data, no Redis, no database server).
# Open http://127.0.0.1:5001 once it logs "listening". Settings: CHATMESH_* variables (README).
# The first build compiles all dependencies (a few minutes on 2 cores); later starts are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p chatmesh
exec target/release/chatmesh serve "$@"
