#!/usr/bin/env bash
# Fault suite: brings up the local HAProxy stack once (scripts/local-cluster.sh, in its own state
# dir, ports and database), runs each scenario — `chatmesh-loadgen soak` through HAProxy while a
# fault is injected — and tears everything down (database dropped, state dir deleted).
#   scripts/fault-suite.sh [scenario...]     default: every scenario, in this order:
#     kill9-instance rolling-restart redis-primary-kill pg-stop redis-link-cut region-partition
#     region-loss give-back region-isolation
# region-partition runs on a stack of its own: two regions (local-cluster.sh up --regions 2, each
# region in a network namespace, joined by the delaying link relay) on the suite's PostgreSQL;
# Socket.IO clients in both regions (scripts/regions-client.mjs, stock socket.io-client from
# tests/node) send into a room homed in a and one homed in b while the link is cut for 5 s:
# sends across the cut must be refused `unavailable` within CHATMESH_REGION_TIMEOUT_MS (1500) + 1 s,
# never acknowledged, local sends must go on; after the heal nothing acknowledged is missing,
# duplicated or out of order in the store or at any receiver.
# region-loss, give-back and region-isolation share one more two-region stack (ack level `region`,
# automatic takeover on: CHATMESH_TAKEOVER_AFTER_MS=10000, default lease settings), driven by
# `scripts/regions-client.mjs takeover` in that order (see its header): region a killed and taken
# over by b (unavailability measured, target 20 s), a back and its rooms handed back under load,
# then a isolated (link cut and cut off the store) and taken over again; each adds
# split_brain_seqs= (a seq seen with two different messages anywhere) to its verdict line.
# The whole stack, its own PostgreSQL server included, runs inside a network namespace made for
# the run (loopback only), so its ports cannot clash with anything and the firewall rule that
# cuts one instance off Redis touches nothing outside it. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
# Prints one line per scenario:
#   scenario=<name> sent=N acked=N stored=N delivered_per_client_min=N lost=0 duplicated=0 reordered=0 max_gap_ms=N
# and exits non-zero if any scenario lost, duplicated or reordered anything (or failed to run).
# Details (JSON, reconnects, timeouts) and every log go to the work dir, kept on failure.
# Settings (environment):
#   FAULT_PORT_BASE   port base of the stack (default 18400: HAProxy 18400, instances 18410..)
#   FAULT_CLIENTS     soak clients (default 20)     FAULT_RATE  sends/s per client (default 5)
#   FAULT_KEEP=1      keep the work dir even on success
#   FAULT_NO_BUILD=1  skip `cargo build --release -p chatmesh -p chatmesh-loadgen`
#   FAULT_BIN_DIR     where chatmesh and chatmesh-loadgen are (default target/release); with another
#                     dir nothing is built (scripts/test.sh passes the debug build it already has)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$repo"

say() { echo "fault-suite: $*" >&2; }
all_scenarios=(kill9-instance rolling-restart redis-primary-kill pg-stop redis-link-cut region-partition
  region-loss give-back region-isolation)
takeover_scenarios=" region-loss give-back region-isolation "
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all_scenarios[@]}")
single_region=0 # a scenario on the single-region stack (the soak with chatmesh-loadgen)
for s in "${scenarios[@]}"; do
  [[ " ${all_scenarios[*]} " == *" $s "* ]] || { say "unknown scenario $s (known: ${all_scenarios[*]})"; exit 2; }
  [ "$s" = region-partition ] || [[ "$takeover_scenarios" == *" $s "* ]] || single_region=1
done

if [ "${FAULT_IN_NETNS:-0}" != 1 ]; then
  if [ "${FAULT_NO_BUILD:-0}" != 1 ] && [ -z "${FAULT_BIN_DIR:-}" ]; then
    say "cargo build --release -p chatmesh -p chatmesh-loadgen"
    cargo build --release --quiet -p chatmesh -p chatmesh-loadgen
  fi
  command -v iptables >/dev/null || { say "iptables is missing (scripts/setup.sh --test installs it)"; exit 1; }
  ns="chatmesh-fault-$$"
  ip netns add "$ns" || { say "cannot create network namespace $ns (the suite needs root)"; exit 1; }
  trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
  ip netns exec "$ns" ip link set lo up
  rc=0
  FAULT_IN_NETNS=1 ip netns exec "$ns" "$0" "${scenarios[@]}" || rc=$?
  exit "$rc"
fi

port_base="${FAULT_PORT_BASE:-18400}"
clients="${FAULT_CLIENTS:-20}"
rate="${FAULT_RATE:-5}"
work="$(mktemp -d "${TMPDIR:-/tmp}/chatmesh-fault.XXXXXX")"
export LOCAL_CLUSTER_DIR="$work/cluster"
export LOCAL_CLUSTER_PORT_BASE="$port_base"
export LOCAL_CLUSTER_DB="chatmesh_fault_$$"
export LOCAL_CLUSTER_INSTANCES=3
bin_dir="${FAULT_BIN_DIR:-target/release}"
[[ "$bin_dir" = /* ]] || bin_dir="$repo/$bin_dir"
if [ "$single_region" = 1 ]; then
  [ -x "$bin_dir/chatmesh" ] && [ -x "$bin_dir/chatmesh-loadgen" ] || { say "no chatmesh and chatmesh-loadgen in $bin_dir"; exit 1; }
else
  [ -x "$bin_dir/chatmesh" ] || { say "no chatmesh in $bin_dir"; exit 1; }
fi
export LOCAL_CLUSTER_BIN="$bin_dir/chatmesh"
# Instance i runs as uid uid_base+i: the redis-link-cut rule matches one instance's packets by uid.
uid_base=64000
export LOCAL_CLUSTER_UID_BASE=$uid_base
pg_port=$((port_base + 40))
export LOCAL_CLUSTER_PG="postgres://postgres@127.0.0.1:$pg_port"
loadgen="$bin_dir/chatmesh-loadgen"
url="http://127.0.0.1:$port_base"
lc() { scripts/local-cluster.sh "$@"; }
pg_dir="$work/pg"
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
pg_ctl_() { runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -w -t 60 "$@"; }
pg_start() { pg_ctl_ -l "$pg_dir/postgres.log" -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1" start; }
pg_is_up() { runuser -u postgres -- "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; }

failed=0
soak_pid=""
regions_dir="$work/regions"
takeover_dir="$work/takeover"
cleanup() {
  local rc=$?
  if [ -n "$soak_pid" ] && kill -0 "$soak_pid" 2>/dev/null; then kill "$soak_pid" 2>/dev/null || true; fi
  say "tearing down"
  iptables -F OUTPUT 2>/dev/null || true
  for d in "$regions_dir" "$takeover_dir"; do
    if [ -f "$d/cluster.env" ]; then
      LOCAL_CLUSTER_DIR="$d" lc down --purge >>"$work/regions.log" 2>&1 ||
        say "local-cluster down ($d) failed (see $work/regions.log)"
    fi
  done
  [ -f "$pg_dir/data/postmaster.pid" ] && ! pg_is_up && pg_start >>"$work/cluster.log" 2>&1 # to drop the database
  lc down --purge >>"$work/cluster.log" 2>&1 || say "local-cluster down failed (see $work/cluster.log)"
  pg_ctl_ -m immediate stop >>"$work/cluster.log" 2>&1 || true
  if [ "$rc" = 0 ] && [ "$failed" = 0 ] && [ "${FAULT_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
  else
    say "logs kept in $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the suite's own PostgreSQL server (so that it can be stopped) -------------------------------
[ -x "$pg_bin/initdb" ] || { say "PostgreSQL server binaries not found under /usr/lib/postgresql (scripts/setup.sh --test)"; exit 1; }
chmod 755 "$work"
mkdir -p "$pg_dir"
chown postgres: "$pg_dir"
say "initdb + start PostgreSQL on 127.0.0.1:$pg_port"
runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
  >>"$work/cluster.log" 2>&1 || { say "initdb failed (see $work/cluster.log)"; exit 1; }
pg_start >>"$work/cluster.log" 2>&1 || { say "PostgreSQL did not start:"; tail -n 20 "$pg_dir/postgres.log" >&2; exit 1; }

if [ "$single_region" = 1 ]; then
  say "bringing the stack up on $url (state $LOCAL_CLUSTER_DIR, database $LOCAL_CLUSTER_DB)"
  lc up >>"$work/cluster.log" 2>&1 || { say "local-cluster up failed:"; tail -n 30 "$work/cluster.log" >&2; exit 1; }
fi

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

scenario_pg_stop() {
  start_soak 50
  at 8
  log "stopping PostgreSQL (fast shutdown)"
  pg_ctl_ -m fast stop >>"$work/cluster.log" 2>&1 || { log "pg_ctl stop failed"; failed=1; }
  local down_at=$SECONDS
  # Sends go on through Redis meanwhile; the write-back backlog grows and every instance stays ready.
  at 20
  check_all_ready "while PostgreSQL is down"
  at 38
  log "write-back backlog $(sync_backlog) entries; starting PostgreSQL after $((SECONDS - down_at)) s"
  pg_start >>"$work/cluster.log" 2>&1 || { log "PostgreSQL did not restart"; failed=1; }
  wait_for 60 "write-back caught up (backlog under 1 s of load)" sync_caught_up || true
  finish_soak
  wait_sync_drained
}

# Drops every packet chatmesh-3 sends to Redis and the Sentinels (a firewall rule on its uid):
# established connections hang, new ones time out, exactly like a cut link.
redis_ports_csv() { echo "$((port_base + 20)),$((port_base + 21)),$((port_base + 30)),$((port_base + 31)),$((port_base + 32))"; }
cut_rule() { echo "OUTPUT -p tcp -m owner --uid-owner $((uid_base + 3)) -m multiport --dports $(redis_ports_csv) -j DROP"; }
instance_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$((port_base + 9 + $1))/health/ready")" = 200 ]; }
haproxy_state() { # instance -> UP / DOWN / ... (as local-cluster.sh status reads HAProxy's stats)
  lc status 2>/dev/null | grep -o "chatmesh-$1=[A-Z]*" | cut -d= -f2
}
check_all_ready() {
  local i
  for i in 1 2 3; do
    instance_ready "$i" || { log "chatmesh-$i is not ready $1"; failed=1; }
  done
}
wait_for() { # seconds description command... -> prints the seconds it took
  local deadline=$((SECONDS + $1)) start=$SECONDS what=$2
  shift 2
  until "$@"; do
    [ $SECONDS -lt $deadline ] || { log "$what: not within $(( SECONDS - start )) s"; failed=1; return 1; }
    sleep 0.2
  done
  log "$what after $((SECONDS - start)) s"
}
not_ready_3() { ! instance_ready 3; }
haproxy_down_3() { [ "$(haproxy_state 3)" = DOWN ]; }
haproxy_up_3() { [ "$(haproxy_state 3)" = UP ]; }
sync_backlog() { # entries waiting in the write-back streams
  redis-cli -h 127.0.0.1 -p "$(redis_port_of "$(redis_primary)")" --raw eval \
    "local n=0 for _,k in ipairs(redis.call('keys', ARGV[1])) do n=n+redis.call('xlen', k) end return n" 0 \
    'cm:{s*}:sync' 2>/dev/null
}
sync_drained() { [ "$(sync_backlog)" = 0 ]; }
# Under 1 s of the soak's load: what stays in flight while the worker keeps up.
sync_caught_up() { local b; b=$(sync_backlog) && [ "$b" -lt $((clients * rate)) ]; }
wait_sync_drained() { wait_for 60 "write-back backlog drained into PostgreSQL" sync_drained || true; }

scenario_redis_link_cut() {
  start_soak 50
  at 8
  log "cutting chatmesh-3 off Redis and the Sentinels (iptables -A $(cut_rule))"
  # shellcheck disable=SC2046
  iptables -A $(cut_rule)
  wait_for 30 "chatmesh-3 not ready" not_ready_3 || true
  wait_for 30 "HAProxy marked chatmesh-3 DOWN" haproxy_down_3 || true
  at 30
  log "restoring the link"
  # shellcheck disable=SC2046
  iptables -D $(cut_rule)
  wait_for 60 "chatmesh-3 ready again by itself" instance_ready 3 || true
  wait_for 30 "HAProxy marked chatmesh-3 UP" haproxy_up_3 || true
  finish_soak
}

# Two regions on a stack of their own (own state dir, ports and database, the same PostgreSQL server);
# the client (scripts/regions-client.mjs) drives the link itself and prints the verdict line.
scenario_region_partition() {
  local db="chatmesh_fault_regions_$$" rc=0 line
  if [ ! -d tests/node/node_modules/socket.io-client ] || ! command -v node >/dev/null; then
    echo "scenario=$scenario error=no-socket.io-client"
    say "$scenario needs node and tests/node/node_modules (scripts/setup.sh --test)"
    failed=1
    return 0
  fi
  say "bringing two regions up (state $regions_dir, database $db)"
  # The bound on refusals is set short; the clients' limits are raised (one IP for every user).
  if ! LOCAL_CLUSTER_DIR="$regions_dir" LOCAL_CLUSTER_PORT_BASE=$((port_base + 100)) LOCAL_CLUSTER_DB="$db" \
    LOCAL_CLUSTER_INSTANCES=2 LOCAL_CLUSTER_UID_BASE="" \
    CHATMESH_REGION_TIMEOUT_MS=1500 CHATMESH_AUTH_RATE_PER_MIN=100000 CHATMESH_SEND_RATE_PER_SEC=100000 \
    CHATMESH_READ_RATE_PER_SEC=100000 CHATMESH_ROOM_CHANGE_RATE_PER_MIN=100000 \
    lc up --regions 2 >>"$work/regions.log" 2>&1; then
    echo "scenario=$scenario error=regions-not-up"
    say "local-cluster up --regions 2 failed:"
    tail -n 30 "$work/regions.log" >&2
    failed=1
    return 0
  fi
  LOCAL_CLUSTER_DIR="$regions_dir" timeout 240 node scripts/regions-client.mjs partition --rate "$rate" \
    --before 5 --cut 5 --after 5 --timeout-ms 1500 --store-url "$LOCAL_CLUSTER_PG/$db" \
    --details "$work/$scenario.details.json" >"$work/$scenario.out" 2>"$work/$scenario.err" || rc=$?
  line=$(grep '^scenario=' "$work/$scenario.out" || true)
  if [ -z "$line" ]; then
    echo "scenario=$scenario error=no-verdict"
    tail -n 20 "$work/$scenario.err" >&2
    failed=1
  else
    echo "$line"
    tail -n 1 "$work/$scenario.err" >"$work/$scenario.json"
    if [ "$rc" != 0 ] || ! [[ "$line" == *" lost=0 duplicated=0 reordered=0 "* ]]; then
      say "$scenario FAILED (details: $work/$scenario.json, every send: $work/$scenario.details.json)"
      grep 'PROBLEM' "$work/$scenario.err" | head -n 20 >&2 || true
      failed=1
    fi
  fi
  LOCAL_CLUSTER_DIR="$regions_dir" lc down --purge >>"$work/regions.log" 2>&1 ||
    { say "local-cluster down --purge (regions) failed (see $work/regions.log)"; failed=1; }
}

# The three takeover scenarios run as phases of one client on one stack: the first one asked for
# runs them all (those asked for, in order) and each prints its own verdict line.
takeover_ran=0
takeover_phases() {
  local s phases=()
  for s in "${scenarios[@]}"; do
    case "$s" in region-loss) phases+=(loss) ;; give-back) phases+=(give-back) ;; region-isolation) phases+=(isolation) ;; esac
  done
  (IFS=,; echo "${phases[*]}")
}
run_takeover_stack() {
  local db="chatmesh_fault_takeover_$$" rc=0
  takeover_ran=1
  if [ ! -d tests/node/node_modules/socket.io-client ] || ! command -v node >/dev/null; then
    say "the takeover scenarios need node and tests/node/node_modules (scripts/setup.sh --test)"
    return 1
  fi
  say "bringing two regions up for the takeover scenarios (state $takeover_dir, database $db)"
  # The same settings for the `up` that brings region a back (give-back) as for the first.
  export CHATMESH_ACK_LEVEL=region CHATMESH_TAKEOVER_AFTER_MS=10000 CHATMESH_REGION_TIMEOUT_MS=1500 \
    CHATMESH_AUTH_RATE_PER_MIN=100000 CHATMESH_SEND_RATE_PER_SEC=100000 CHATMESH_READ_RATE_PER_SEC=100000 \
    CHATMESH_ROOM_CHANGE_RATE_PER_MIN=100000
  if ! LOCAL_CLUSTER_DIR="$takeover_dir" LOCAL_CLUSTER_PORT_BASE=$((port_base + 200)) LOCAL_CLUSTER_DB="$db" \
    LOCAL_CLUSTER_INSTANCES=2 LOCAL_CLUSTER_UID_BASE="" lc up --regions 2 >>"$work/takeover.log" 2>&1; then
    say "local-cluster up --regions 2 failed:"
    tail -n 30 "$work/takeover.log" >&2
    return 1
  fi
  LOCAL_CLUSTER_DIR="$takeover_dir" LOCAL_CLUSTER_UID_BASE="" timeout 600 node scripts/regions-client.mjs takeover \
    --phases "$(takeover_phases)" --rate "$rate" --store-url "$LOCAL_CLUSTER_PG/$db" \
    --details "$work/takeover.details.json" >"$work/takeover.out" 2>"$work/takeover.err" || rc=$?
  unset CHATMESH_ACK_LEVEL CHATMESH_TAKEOVER_AFTER_MS CHATMESH_REGION_TIMEOUT_MS CHATMESH_AUTH_RATE_PER_MIN \
    CHATMESH_SEND_RATE_PER_SEC CHATMESH_READ_RATE_PER_SEC CHATMESH_ROOM_CHANGE_RATE_PER_MIN
  LOCAL_CLUSTER_DIR="$takeover_dir" lc down --purge >>"$work/takeover.log" 2>&1 ||
    { say "local-cluster down --purge (takeover) failed (see $work/takeover.log)"; rc=1; }
  if [ "$rc" != 0 ]; then
    say "the takeover client exited $rc (details: $work/takeover.details.json, log: $work/takeover.err)"
    grep 'PROBLEM' "$work/takeover.err" | head -n 20 >&2 || true
    tail -n 5 "$work/takeover.err" >&2
  fi
  return "$rc"
}
scenario_takeover_phase() { # scenario name
  local line
  if [ "$takeover_ran" = 0 ]; then run_takeover_stack || failed=1; fi
  line=$(grep "^scenario=$1 " "$work/takeover.out" 2>/dev/null || true)
  if [ -z "$line" ]; then
    echo "scenario=$1 error=no-verdict"
    failed=1
    return 0
  fi
  echo "$line"
  [[ "$line" == *" lost=0 duplicated=0 reordered=0 split_brain_seqs=0 "* ]] || { say "$1 FAILED"; failed=1; }
}
scenario_region_loss() { scenario_takeover_phase region-loss; }
scenario_give_back() { scenario_takeover_phase give-back; }
scenario_region_isolation() { scenario_takeover_phase region-isolation; }

for scenario in "${scenarios[@]}"; do
  say "scenario $scenario"
  "scenario_${scenario//-/_}"
done
exit "$failed"
