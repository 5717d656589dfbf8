#!/usr/bin/env bash
# Installs the baseline's npm dependencies exactly as package-lock.json pins them. Idempotent:
# `npm ci` runs only when node_modules is missing or was installed from another package-lock.json
# (a hash of the lock is kept in node_modules/.lock.sha256 after each install).
set -euo pipefail
cd "$(dirname "$0")"
command -v node >/dev/null || { echo "setup.sh: node (>= 20) is required" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "setup.sh: node >= 20 is required (found $(node --version))" >&2
  exit 1
fi
want=$(sha256sum package-lock.json | cut -d' ' -f1)
have=$(cat node_modules/.lock.sha256 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > node_modules/.lock.sha256
else
  echo "setup.sh: node_modules matches package-lock.json"
fi
