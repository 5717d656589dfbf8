#!/usr/bin/env bash
# Fault suite: brings up the local HAProxy stack once (scripts/local-cluster.sh, in its own state
# dir, ports and database), runs each scenario — `chatmesh-loadgen soak` through HAProxy while a
# fault is injected — and tears everything down (database dropped, state dir deleted).
#   scripts/fault-suite.sh [scenario...]     default: kill9-instance rolling-restart redis-primary-kill
# Prints one line per scenario:
#   scenario=<name> sent=N acked=N stored=N delivered_per_client_min=N lost=0 duplicated=0 reordered=0 max_gap_ms=N
# and exits non-zero if any scenario lost, duplicated or reordered anything (or failed to run).
# Details (JSON, reconnects, timeouts) and every log go to the work dir, kept on failure.
# Settings (environment):
#   FAULT_PORT_BASE   port base of the stack (default 18400: HAProxy 18400, instances 18410..)
#   FAULT_CLIENTS     soak clients (default 20)     FAULT_RATE  sends/s per client (default 5)
#   FAULT_KEEP=1      keep the work dir even on success
#   FAULT_NO_BUILD=1  skip `cargo build --release -p chatmesh -p chatmesh-loadgen`
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$repo"

say() { echo "fault-suite: $*" >&2; }
all_scenarios=(kill9-instance rolling-restart redis-primary-kill)
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all_scenarios[@]}")
for s in "${scenarios[@]}"; do
  [[ " ${all_scenarios[*]} " == *" $s "* ]] || { say "unknown scenario $s (known: ${all_scenarios[*]})"; exit 2; }
done

port_base="${FAULT_PORT_BASE:-18400}"
clients="${FAULT_CLIENTS:-20}"
rate="${FAULT_RATE:-5}"
work="$(mktemp -d "${TMPDIR:-/tmp}/chatmesh-fault.XXXXXX")"
export LOCAL_CLUSTER_DIR="$work/cluster"
export LOCAL_CLUSTER_PORT_BASE="$port_base"
export LOCAL_CLUSTER_DB="chatmesh_fault_$$"
export LOCAL_CLUSTER_INSTANCES=3
export LOCAL_CLUSTER_BIN="$repo/target/release/chatmesh"
loadgen="$repo/target/release/chatmesh-loadgen"
url="http://127.0.0.1:$port_base"
lc() { scripts/local-cluster.sh "$@"; }

failed=0
soak_pid=""
cleanup() {
  local rc=$?
  if [ -n "$soak_pid" ] && kill -0 "$soak_pid" 2>/dev/null; then kill "$soak_pid" 2>/dev/null || true; fi
  say "tearing down"
  lc down --purge >>"$work/cluster.log" 2>&1 || say "local-cluster down failed (see $work/cluster.log)"
  if [ "$rc" = 0 ] && [ "$failed" = 0 ] && [ "${FAULT_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
  else
    say "logs kept in $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${FAULT_NO_BUILD:-0}" != 1 ]; then
  say "cargo build --release -p chatmesh -p chatmesh-loadgen"
  cargo build --release --quiet -p chatmesh -p chatmesh-loadgen
fi
say "bringing the stack up on $url (state $LOCAL_CLUSTER_DIR, database $LOCAL_CLUSTER_DB)"
lc up >>"$work/cluster.log" 2>&1 || { say "local-cluster up failed:"; tail -n 30 "$work/cluster.log" >&2; exit 1; }

# ---- helpers -------------------------------------------------------------------------------------

pid_of() { # component name (chatmesh-2, redis-1, ...) -> pid or nothing
  local f="$LOCAL_CLUSTER_DIR/pids/$1.pid" p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  [ -d "/proc/$p" ] && echo "$p"
  return 0
}
wait_gone() { # pid seconds
  local deadline=$((SECONDS + $2))
  while [ -d "/proc/$1" ]; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}
t0=0
elapsed() { echo $((SECONDS - t0)); }
at() { # wait until second N of the soak
  while [ "$(elapsed)" -lt "$1" ]; do sleep 0.2; done
}
log() { say "[$scenario t=$(elapsed)s] $*"; }
# Starts whatever is not running and waits until HAProxy sees every instance UP (local-cluster up
# is idempotent: it starts only what is missing).
restart_missing() {
  lc up >>"$work/cluster.log" 2>&1 || { log "local-cluster up failed"; tail -n 20 "$work/cluster.log" >&2; return 1; }
}
redis_port_of() { echo $((port_base + 19 + ${1#redis-})); }
redis_primary() { # -> redis-1 | redis-2 (the node that reports role master)
  local n
  for n in redis-1 redis-2; do
    [ "$(redis-cli -h 127.0.0.1 -p "$(redis_port_of "$n")" role 2>/dev/null | head -1)" = master ] && { echo "$n"; return 0; }
  done
  return 1
}

# Starts the soak in the background; waits until every client is connected (t=0 of the scenario).
start_soak() { # seconds
  local ready="$work/$scenario.ready"
  rm -f "$ready"
  # The soak bounds itself (sending + ≤ 10 s settle + catch-up); the timeout is the backstop.
  timeout 115 "$loadgen" soak --url "$url" --clients "$clients" --rate "$rate" --seconds "$1" --scenario "$scenario" \
    --ready-file "$ready" >"$work/$scenario.out" 2>"$work/$scenario.err" &
  soak_pid=$!
  local deadline=$((SECONDS + 90))
  until [ -f "$ready" ]; do
    if ! kill -0 "$soak_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      say "$scenario: soak did not start:"
      tail -n 20 "$work/$scenario.err" >&2
      return 1
    fi
    sleep 0.1
  done
  t0=$SECONDS
}
finish_soak() {
  local rc=0
  wait "$soak_pid" || rc=$?
  soak_pid=""
  local line
  line=$(grep '^scenario=' "$work/$scenario.out" || true)
  if [ -z "$line" ]; then
    echo "scenario=$scenario error=no-verdict"
    tail -n 20 "$work/$scenario.err" >&2
    failed=1
    return 0
  fi
  echo "$line"
  tail -n 1 "$work/$scenario.err" >"$work/$scenario.json"
  if [ "$rc" != 0 ] || ! [[ "$line" == *" lost=0 duplicated=0 reordered=0 "* ]]; then
    say "$scenario FAILED (details: $work/$scenario.json)"
    cat "$work/$scenario.json" >&2
    failed=1
  fi
}

# ---- scenarios -------------------------------------------------------------------------------------

scenario_kill9_instance() {
  start_soak 40
  at 10
  local pid
  pid=$(pid_of chatmesh-2)
  log "kill -9 chatmesh-2 (pid $pid)"
  kill -KILL "$pid"
  wait_gone "$pid" 10
  at 25
  log "starting chatmesh-2"
  restart_missing
  log "chatmesh-2 UP in HAProxy"
  finish_soak
}

scenario_rolling_restart() {
  start_soak 45
  at 3
  local i pid
  for i in 1 2 3; do
    pid=$(pid_of "chatmesh-$i")
    log "SIGTERM chatmesh-$i (pid $pid)"
    kill -TERM "$pid"
    wait_gone "$pid" 30 || { log "chatmesh-$i did not exit in 30 s; kill -9"; kill -KILL "$pid"; wait_gone "$pid" 5; }
    log "chatmesh-$i exited; starting it"
    restart_missing
    log "chatmesh-$i UP in HAProxy"
    [ "$i" = 3 ] || sleep "${FAULT_ROLLING_GAP:-8}"
  done
  finish_soak
}

scenario_redis_primary_kill() {
  start_soak 40
  at 10
  local node pid
  node=$(redis_primary) || { log "no Redis primary found: no fault injected"; failed=1; finish_soak; return 0; }
  pid=$(pid_of "$node")
  log "kill -9 Redis primary $node (pid $pid)"
  kill -KILL "$pid"
  wait_gone "$pid" 10
  local deadline=$((SECONDS + 40)) now
  while :; do
    now=$(redis_primary || true)
    [ -n "$now" ] && [ "$now" != "$node" ] && break
    [ $SECONDS -lt $deadline ] || { log "Sentinel promoted nothing in 40 s"; break; }
    sleep 0.2
  done
  log "Sentinel promoted ${now:-nothing}; restarting $node in 5 s"
  sleep 5
  log "restarting $node (rejoins as a replica)"
  restart_missing
  log "stack whole again (primary now $(redis_primary || echo '?'))"
  finish_soak
}

for scenario in "${scenarios[@]}"; do
  say "scenario $scenario"
  "scenario_${scenario//-/_}"
done
exit "$failed"
