#!/usr/bin/env bash
# The production topology in miniature, on loopback: Redis primary + replica + 3 Sentinels
# (deploy/redis), a database on the machine's PostgreSQL server, N chatmesh release instances
# (ack level `replica`, behind a proxy) and HAProxy in front (deploy/haproxy).
#   scripts/local-cluster.sh up             start what is not running; returns once HAProxy sees
#                                           every instance UP, and prints the URLs
#   scripts/local-cluster.sh down           stop everything this state dir started (idempotent);
#                                           data (Redis AOF, database) is kept for the next `up`
#   scripts/local-cluster.sh down --purge   also drop the database and delete the state dir
#   scripts/local-cluster.sh status         what runs
#   scripts/local-cluster.sh urls           `REGION lb URL` and `REGION instance URL` lines (the
#                                           region is CHATMESH_REGION, default `local`, without
#                                           --regions); with regions also `REGION peer-PEER URL`:
#                                           PEER's internal frontend through the link
#
# Regions on one machine (issue 16): `up --regions N` (N = 1..3; regions a, b, c) puts each region
# in a network namespace of its own (named cm<hash>-<region>, <hash> from the state dir's path, so
# parallel state dirs do not collide) joined to the caller's namespace by a veth pair
# (10.X.Y.4r+1 caller side, 10.X.Y.4r+2 in the region; X.Y from the same hash). Each region has its
# own Redis primary + replica + 3 Sentinels, LOCAL_CLUSTER_INSTANCES instances (default 2) and
# HAProxy, on the same ports in every region; HAProxy has an internal frontend (B+2) that serves only
# /internal/ (the public one refuses it). The regions share one database, reached through a relay
# in the caller's namespace (pg-relay: each region's 10.X.Y.4r+1:B+45 -> the PostgreSQL server).
# The regions reach each other only through the link: one delaying relay (scripts/relay.py) in the
# caller's namespace, listening on region X's side (10.X.Y.4x+1:B+50+y) for each peer region Y and
# forwarding to Y's internal frontend; the namespaces have no route to anything else.
#   scripts/local-cluster.sh up --regions 2       regions a and b
#   scripts/local-cluster.sh link cut | heal      a partition of the link (connections hang, nothing
#                                                 is closed) and its end; pg-relay is not affected
#   scripts/local-cluster.sh link delay MS        one-way delay from now on (default 25 ms)
#   scripts/local-cluster.sh link status          ok state=up|cut delay=MS conns=N
#   scripts/local-cluster.sh region kill R        SIGKILL every process of region R (its Redis,
#                                                 Sentinels, instances, HAProxy): a lost region;
#                                                 `up` brings it back (Redis from its AOF)
#   scripts/local-cluster.sh region isolate R     cut region R off the store (established
#                                                 connections hang); with `link cut`, R is alone
#   scripts/local-cluster.sh region rejoin R      the end of `isolate`
#   scripts/local-cluster.sh region takeover R --by B
#                                                 `chatmesh region takeover` with the settings of
#                                                 B's instances, in B's namespace (R = B: give back)
# Instances get CHATMESH_REGION, CHATMESH_PEER_REGIONS (b=http://<link address for a->b>,...),
# CHATMESH_INTERNAL_ALLOW=127.0.0.0/8 and one CHATMESH_CLUSTER_SECRET; every CHATMESH_* variable of
# the caller's environment that the binary knows overrides the defaults for every instance (except
# the per-instance topology: CHATMESH_BIND, _INSTANCE_ID, _REGION, _PEER_REGIONS, _REDIS_URL).
# Needs root (network namespaces). Processes in a region run under `ip netns exec`.
# Settings (environment; fixed by the first `up` of a state dir and recorded in its cluster.env):
#   LOCAL_CLUSTER_DIR        state dir (default data/local-cluster in the repository)
#   LOCAL_CLUSTER_PORT_BASE  B (default 8080): HAProxy B, its stats page B+1, chatmesh B+10..,
#                            Redis B+20 (first primary) and B+21, Sentinels B+30..B+32
#   LOCAL_CLUSTER_INSTANCES  chatmesh instances, 1..9 (default 3)
#   LOCAL_CLUSTER_DB         database name (default chatmesh_local)
#   LOCAL_CLUSTER_PG         PostgreSQL server (default postgres://postgres@127.0.0.1:5432)
#   LOCAL_CLUSTER_REGIONS    as --regions N (default: none, the single-region stack on loopback)
#   LOCAL_CLUSTER_LINK_DELAY_MS  one-way delay of the link between regions (default 25)
# Per run:
#   LOCAL_CLUSTER_BIN        chatmesh binary to run (default: cargo build --release -p chatmesh,
#                            then target/release/chatmesh)
#   LOCAL_CLUSTER_UID_BASE   when set (as root), instance i runs as uid/gid BASE+i, so a firewall
#                            rule can match one instance's traffic (scripts/fault-suite.sh);
#                            in region r (0 for a, 1 for b, ...) BASE+10r+i
#   LOCAL_CLUSTER_NO_PEERS=1 regions without CHATMESH_PEER_REGIONS (a binary that does not know it)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
caller_dir="$PWD"
cd "$repo"
# Paths given in the environment are relative to where the script was called from.
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac; }

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1; }

apt_updated=0
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- settings and state dir --------------------------------------------------------------------

cmd="${1:-}"
[ $# -gt 0 ] && shift
purge=0
regions_opt="${LOCAL_CLUSTER_REGIONS:-}"
link_cmd=()
region_cmd=()
usage="usage: $0 up [--regions N] | down [--purge] | status | urls | link cut|heal|delay MS|status | region kill|isolate|rejoin R | region takeover R --by B"
case "$cmd" in
  up)
    while [ $# -gt 0 ]; do
      case "$1" in
        --regions) [ $# -ge 2 ] || die "$usage"; regions_opt=$2; shift 2 ;;
        *) die "$usage" ;;
      esac
    done
    ;;
  down) case "$*" in "") ;; --purge) purge=1 ;; *) die "$usage" ;; esac ;;
  status | urls) [ $# -eq 0 ] || die "$usage" ;;
  link)
    case "$*" in cut | heal | status) ;; *) [[ "$*" =~ ^delay\ [0-9]+$ ]] || die "$usage" ;; esac
    link_cmd=("$@")
    ;;
  region)
    case "$*" in
      kill\ [abc] | isolate\ [abc] | rejoin\ [abc]) ;;
      *) [[ "$*" =~ ^takeover\ [abc]\ --by\ [abc]$ ]] || die "$usage" ;;
    esac
    region_cmd=("$@")
    ;;
  *) die "$usage" ;;
esac
if [ -n "$regions_opt" ]; then
  [[ "$regions_opt" =~ ^[0-3]$ ]] || die "--regions must be 1..3 (0: the single-region stack)"
fi

dir_setting="$repo/data/local-cluster"
[ -n "${LOCAL_CLUSTER_DIR:-}" ] && dir_setting="$(from_caller "$LOCAL_CLUSTER_DIR")"
if [ "$cmd" = up ]; then
  mkdir -p "$dir_setting"
elif [ ! -d "$dir_setting" ]; then
  [ "$cmd" = down ] && { say "nothing to stop ($dir_setting does not exist)"; exit 0; }
  [ "$cmd" = link ] && die "not set up ($dir_setting does not exist)"
  echo "local-cluster: not set up ($dir_setting does not exist)"
  exit 0
fi
dir="$(cd "$dir_setting" && pwd -P)"
state="$dir/cluster.env"

default_instances=3
[ "${regions_opt:-0}" != 0 ] && default_instances=2
declare -A want=(
  [port_base]="${LOCAL_CLUSTER_PORT_BASE:-8080}"
  [instances]="${LOCAL_CLUSTER_INSTANCES:-$default_instances}"
  [db]="${LOCAL_CLUSTER_DB:-chatmesh_local}"
  [pg]="${LOCAL_CLUSTER_PG:-postgres://postgres@127.0.0.1:5432}"
)
if [ -f "$state" ]; then
  # The state dir owns its settings: its Redis data, Sentinel state and database belong together.
  # shellcheck disable=SC1090
  . "$state"
  # Written before regions existed (or without them): the single-region stack.
  regions=${regions:-0}
  link_delay_ms=${link_delay_ms:-25}
  for k in port_base instances db pg link_delay_ms; do
    env_name="LOCAL_CLUSTER_${k^^}"
    if [ -n "${!env_name:-}" ] && [ "${!env_name}" != "${!k}" ]; then
      say "note: $dir was set up with $env_name=${!k}; ignoring ${!env_name} (down --purge to start over)"
    fi
  done
  if [ "$cmd" = up ] && [ -n "$regions_opt" ] && [ "$regions_opt" != "$regions" ]; then
    say "note: $dir was set up with --regions $regions; ignoring --regions $regions_opt (down --purge to start over)"
  fi
elif [ "$cmd" = up ]; then
  port_base="${want[port_base]}" instances="${want[instances]}" db="${want[db]}" pg="${want[pg]}"
  regions="${regions_opt:-0}" link_delay_ms="${LOCAL_CLUSTER_LINK_DELAY_MS:-25}"
  [[ "$port_base" =~ ^[0-9]+$ ]] && [ "$port_base" -ge 1024 ] && [ "$port_base" -le 65500 ] ||
    die "LOCAL_CLUSTER_PORT_BASE must be a port number in 1024..65500"
  [[ "$instances" =~ ^[1-9]$ ]] || die "LOCAL_CLUSTER_INSTANCES must be 1..9"
  [[ "$db" =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "LOCAL_CLUSTER_DB must match [a-z_][a-z0-9_]*"
  [[ "$pg" =~ ^postgres(ql)?://[^/?]+$ ]] || die "LOCAL_CLUSTER_PG must be postgres://user@host:port (no database)"
  [[ "$link_delay_ms" =~ ^[0-9]+$ ]] || die "LOCAL_CLUSTER_LINK_DELAY_MS must be a number of milliseconds"
  if [ "$regions" != 0 ]; then
    [ "$(id -u)" = 0 ] || die "--regions needs root (network namespaces)"
    [ "$port_base" -le 65400 ] || die "LOCAL_CLUSTER_PORT_BASE must be at most 65400 with --regions"
  fi
  printf 'port_base=%s\ninstances=%s\ndb=%s\npg=%s\n' "$port_base" "$instances" "$db" "$pg" >"$state"
  [ "$regions" = 0 ] || printf 'regions=%s\nlink_delay_ms=%s\n' "$regions" "$link_delay_ms" >>"$state"
else
  [ "$cmd" = down ] && { say "nothing to stop ($dir has no cluster.env)"; exit 0; }
  [ "$cmd" = link ] && die "not set up ($dir has no cluster.env)"
  echo "local-cluster: not set up ($dir has no cluster.env)"
  exit 0
fi

http_port=$port_base
stats_port=$((port_base + 1))
instance_port() { echo $((port_base + 9 + $1)); } # instance 1..N
redis_ports=($((port_base + 20)) $((port_base + 21)))
sentinel_ports=($((port_base + 30)) $((port_base + 31)) $((port_base + 32)))
master_name=chatmesh
sentinel_url="redis+sentinel://127.0.0.1:${sentinel_ports[0]},127.0.0.1:${sentinel_ports[1]},127.0.0.1:${sentinel_ports[2]}/$master_name"
store_url="$pg/$db"
names=(haproxy)
for i in $(seq 1 "$instances"); do names+=("chatmesh-$i"); done
names+=(sentinel-1 sentinel-2 sentinel-3 redis-2 redis-1) # stop order: front to back

# ---- regions -------------------------------------------------------------------------------------
# The single-region stack is the context ("" region) everything below runs in by default; with
# --regions, use_region switches the functions below to one region: its state subdir, its pid
# file prefix, its namespace (every command that talks to a process there runs under nsx).
all_regions=(a b c)
region_list=()
if [ "$regions" != 0 ]; then
  region_list=("${all_regions[@]:0:$regions}")
  hash=$(printf '%s' "$dir" | sha256sum | cut -c1-4)
  tag="cm$hash"
  net="10.$((16#${hash:0:2})).$((16#${hash:2:2}))"
fi
internal_port=$((port_base + 2))
pg_relay_port=$((port_base + 45))
region_index() { case "$1" in a) echo 0 ;; b) echo 1 ;; c) echo 2 ;; *) die "no region $1" ;; esac; }
root_ip() { echo "$net.$((4 * $(region_index "$1") + 1))"; } # the caller's side of the region's veth
ns_ip() { echo "$net.$((4 * $(region_index "$1") + 2))"; }   # the region's side
ns_of() { echo "$tag-$1"; }
link_port() { echo $((port_base + 50 + $(region_index "$1"))); } # on X's side, towards region $1
use_root() { region="" pfx="" rdir="$dir" nsx=() host=127.0.0.1; }
use_region() { region=$1 pfx="$1-" rdir="$dir/$1" nsx=(ip netns exec "$(ns_of "$1")") host=$(ns_ip "$1"); }
use_root

# ---- processes ---------------------------------------------------------------------------------
# Every process runs with its working directory inside the state dir (Redis chdirs to its `dir`,
# the others are started there): that is how this script and its test tell their processes from
# anyone else's, even without the pid files.

ours() {
  local cwd
  cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 1
  [ "$cwd" = "$dir" ] || [[ "$cwd" == "$dir/"* ]]
}
pid_of() { # name -> pid of the running process, or nothing
  local f="$dir/pids/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid"; then echo "$pid"; fi
}
# Processes of ours that the pid files do not name (a lost pid file, an interrupted `up`).
strays() {
  local p comm
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    case "$comm" in redis-server | redis-sentinel | haproxy | chatmesh | python3 | python3.*) ours "$p" && echo "$p" ;; esac
  done
  return 0
}
# Every process in one of this state dir's namespaces is ours, whatever its cwd.
ns_pids() {
  local r
  for r in "${region_list[@]}"; do
    [ -e "/run/netns/$(ns_of "$r")" ] && ip netns pids "$(ns_of "$r")" 2>/dev/null
  done
  return 0
}
launch() { # name cwd command... : detached (own session), stdio to <cwd>/<name>.out
  local name=$1 cwd=$2
  shift 2
  mkdir -p "$dir/pids"
  (cd "$cwd" && exec "${nsx[@]}" setsid "$@" </dev/null >>"$cwd/$name.out" 2>&1) &
  echo $! >"$dir/pids/$name.pid"
}
port_busy() {
  if [ ${#nsx[@]} -eq 0 ]; then
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  else
    "${nsx[@]}" bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
  fi
}
wait_until() { # seconds what command... : poll every 0.2 s
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}
stop_pids() { # seconds pids... : SIGTERM, wait, then SIGKILL what is left
  local secs=$1 p left deadline
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + secs))
  while :; do
    left=()
    for p in "$@"; do ours "$p" && left+=("$p"); done
    [ ${#left[@]} -gt 0 ] || return 0
    if [ $SECONDS -ge $deadline ]; then
      say "still running after ${secs}s, killing: ${left[*]}"
      kill -KILL "${left[@]}" 2>/dev/null || true
      sleep 0.2
      return 0
    fi
    sleep 0.1
  done
}

# ---- Redis -------------------------------------------------------------------------------------

rcli() { "${nsx[@]}" redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>/dev/null; }
# A deploy/redis line naming a production address or path that the seds above did not replace:
# refuse rather than start a local node that talks to 10.0.0.x or writes to /var.
unlocalised() { # generated-file source-file
  local bad
  bad=$(grep -v '^[[:space:]]*#' "$1" | grep -E '10\.0\.0\.|/var/|/etc/' | head -1) || true
  [ -z "$bad" ] || die "$2 has a line this script does not localise: $bad"
}
redis_conf() { # node index (0|1) -> writes the node's config once (Sentinel rewrites it later)
  local i=$1 d="$rdir/redis-$(($1 + 1))" src
  mkdir -p "$d"
  [ -f "$d/redis.conf" ] && return 0
  # The local stack is plaintext without ACL users (loopback only, no certificates to make):
  # deploy/redis's TLS and ACL lines are dropped here; tests/cluster/tls.rs runs them for real.
  sed -E -e '/^(tls-|aclfile|masteruser|masterauth)/d' deploy/redis/redis-common.conf >"$rdir/redis-common.conf"
  src=deploy/redis/redis-primary.conf
  [ "$i" = 1 ] && src=deploy/redis/redis-replica.conf
  sed -E \
    -e "s|^include .*|include $rdir/redis-common.conf|" \
    -e "s|^port .*|port ${redis_ports[$i]}|" \
    -e "s|^bind .*|bind 127.0.0.1|" \
    -e "s|^dir .*|dir $d|" \
    -e "s|^logfile .*|logfile $d/redis.log|" \
    -e "s|^supervised .*|supervised no|" \
    -e "s|^replicaof .*|replicaof 127.0.0.1 ${redis_ports[0]}|" \
    -e '/^tls-/d' \
    "$src" >"$d/redis.conf.tmp"
  # The process title names the config file: `ps` shows which state dir a Redis belongs to.
  echo 'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"' >>"$d/redis.conf.tmp"
  unlocalised "$d/redis.conf.tmp" "$src"
  mv "$d/redis.conf.tmp" "$d/redis.conf"
}
sentinel_conf() { # sentinel index (0..2)
  local i=$1 d="$rdir/sentinel-$(($1 + 1))"
  mkdir -p "$d"
  [ -f "$d/sentinel.conf" ] && return 0
  sed -E \
    -e "s|^port .*|port ${sentinel_ports[$i]}|" \
    -e "s|^bind .*|bind 127.0.0.1|" \
    -e "s|^dir .*|dir $d|" \
    -e "s|^logfile .*|logfile $d/sentinel.log|" \
    -e "s|^sentinel monitor $master_name .*|sentinel monitor $master_name 127.0.0.1 ${redis_ports[0]} 2|" \
    -e '/^(tls-|user |sentinel (auth-user|auth-pass|sentinel-user|sentinel-pass) )/d' \
    deploy/redis/sentinel.conf >"$d/sentinel.conf.tmp"
  echo 'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"' >>"$d/sentinel.conf.tmp"
  unlocalised "$d/sentinel.conf.tmp" deploy/redis/sentinel.conf
  mv "$d/sentinel.conf.tmp" "$d/sentinel.conf"
}
redis_up_or_gone() { [ "$(rcli "$1" ping)" = PONG ] || [ -z "$(pid_of "$pfx$2")" ]; }
replica_in_sync() {
  local p
  for p in "${redis_ports[@]}"; do
    rcli "$p" info replication | grep -q '^master_link_status:up' && return 0
  done
  return 1
}
sentinels_settled() { # every Sentinel knows the primary, one replica and the two other Sentinels
  local p info
  for p in "${sentinel_ports[@]}"; do
    info=$(rcli "$p" sentinel master "$master_name" | paste -sd' ') || return 1
    [[ " $info " == *" num-slaves 1 "* && " $info " == *" num-other-sentinels 2 "* ]] || return 1
  done
}

# ---- HAProxy -----------------------------------------------------------------------------------

stats_csv() { "${nsx[@]}" curl -fsS --max-time 2 "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null; }
# "name status check" per chatmesh server, from the stats CSV (columns found by header name).
backend_states() {
  stats_csv | awk -F, '
    NR == 1 { sub(/^# /, ""); for (i = 1; i <= NF; i++) col[$i] = i; next }
    $1 == "chatmesh" && $2 != "FRONTEND" && $2 != "BACKEND" { print $2, $col["status"], $col["check_status"] }'
}
all_backends_up() {
  local states
  states=$(backend_states) || return 1
  [ "$(echo "$states" | awk '$2 == "UP" && $3 == "L7OK"' | wc -l)" -eq "$instances" ]
}

# ---- commands ----------------------------------------------------------------------------------

ready() { [ "$("${nsx[@]}" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/health/ready")" = 200 ]; }

fail_with_log() { # message log-file
  say "$1"
  [ -f "$2" ] && { say "last lines of $2:"; tail -n 20 "$2" >&2; }
  say "state dir: $dir (scripts/local-cluster.sh down stops what started)"
  exit 1
}

start_redis() {
  local i name pid
  for i in 0 1; do
    name="redis-$((i + 1))"
    [ -n "$(pid_of "$pfx$name")" ] && continue
    port_busy "${redis_ports[$i]}" && die "port ${redis_ports[$i]} ($pfx$name) is taken by another process"
    redis_conf "$i"
    launch "$pfx$name" "$rdir/$name" redis-server "$rdir/$name/redis.conf"
    pid=$(cat "$dir/pids/$pfx$name.pid")
    wait_until 10 "$name" redis_up_or_gone "${redis_ports[$i]}" "$name" ||
      fail_with_log "$pfx$name (pid $pid) did not answer on ${redis_ports[$i]}" "$rdir/$name/redis.log"
    [ -n "$(pid_of "$pfx$name")" ] || fail_with_log "$pfx$name exited" "$rdir/$name/redis.log"
  done
}
start_sentinels() {
  local i name
  wait_until 30 replication replica_in_sync ||
    fail_with_log "${region:+region $region: }no replica in sync after 30 s" "$rdir/redis-2/redis.log"
  for i in 0 1 2; do
    name="sentinel-$((i + 1))"
    [ -n "$(pid_of "$pfx$name")" ] && continue
    port_busy "${sentinel_ports[$i]}" && die "port ${sentinel_ports[$i]} ($pfx$name) is taken by another process"
    sentinel_conf "$i"
    launch "$pfx$name" "$rdir/$name" redis-server "$rdir/$name/sentinel.conf" --sentinel
  done
}
wait_sentinels() {
  # Sentinels find the replica and each other through the primary (hello messages every 2 s).
  wait_until 30 sentinels sentinels_settled ||
    fail_with_log "${region:+region $region: }the Sentinels did not all see the replica and each other in 30 s" "$rdir/sentinel-1/sentinel.log"
}

ensure_database() {
  need psql || die "psql is missing (scripts/setup.sh --test installs PostgreSQL)"
  psql "$pg/postgres" -qAtc 'SELECT 1' >/dev/null 2>&1 ||
    die "PostgreSQL at $pg is not reachable (scripts/setup.sh --test installs and starts it)"
  if ! psql "$pg/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    say "CREATE DATABASE $db"
    psql "$pg/postgres" -qc "CREATE DATABASE $db" >/dev/null
  fi
}

secret() { # file -> 64 hex characters, generated once
  local f="$dir/secrets/$1"
  if [ ! -s "$f" ]; then
    (umask 077 && mkdir -p "$dir/secrets" && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$f.tmp" && mv "$f.tmp" "$f")
  fi
  cat "$f"
}

start_instance() { # index
  local i=$1 name="chatmesh-$1" port d
  port=$(instance_port "$i")
  d="$rdir/$name"
  [ -n "$(pid_of "$pfx$name")" ] && return 0
  port_busy "$port" && die "port $port ($pfx$name) is taken by another process"
  mkdir -p "$d"
  # A clean environment: chatmesh refuses unknown CHATMESH_* variables, and the caller's settings
  # must not leak in (with --regions: only the settings the binary knows, see caller_settings).
  # LOCAL_CLUSTER_DIR marks the process as this state dir's.
  local as=()
  if [ -n "${LOCAL_CLUSTER_UID_BASE:-}" ]; then
    local uid=$((LOCAL_CLUSTER_UID_BASE + i))
    [ -n "$region" ] && uid=$((uid + 10 * $(region_index "$region")))
    as=(setpriv --reuid="$uid" --regid="$uid" --clear-groups)
  fi
  local bind=127.0.0.1 url=$store_url extra=()
  if [ -n "$region" ]; then
    # Bound on every address of the namespace: HAProxy connects over its loopback, the caller
    # (tests, benchmarks) over the veth.
    bind=0.0.0.0
    url=$(region_store_url "$region")
    extra=(CHATMESH_REGION="$region" CHATMESH_INTERNAL_ALLOW=127.0.0.0/8)
    [ "$with_peers" = 1 ] && [ -n "$(peers_of "$region")" ] && extra+=(CHATMESH_PEER_REGIONS="$(peers_of "$region")")
    extra+=("${caller_env[@]}")
  fi
  launch "$pfx$name" "$d" "${as[@]}" env -i PATH="$PATH" HOME="${HOME:-/root}" RUST_LOG="${RUST_LOG:-info}" \
    LOCAL_CLUSTER_DIR="$dir" \
    CHATMESH_BIND="$bind:$port" \
    CHATMESH_INSTANCE_ID="$pfx$name" \
    CHATMESH_REDIS_URL="$sentinel_url" \
    CHATMESH_STORE_URL="$url" \
    CHATMESH_JWT_SECRET="$jwt_secret" \
    CHATMESH_CLUSTER_SECRET="$cluster_secret" \
    CHATMESH_ADMIN_TOKEN="$admin_token" \
    CHATMESH_ACK_LEVEL=replica \
    CHATMESH_TRUST_PROXY=true \
    CHATMESH_LOG_FORMAT=json \
    CHATMESH_DRAIN_DELAY_MS=4000 \
    "${extra[@]}" \
    "$bin" serve
}
instance_ready_or_gone() { ready "$(instance_port "$1")" || [ -z "$(pid_of "${pfx}chatmesh-$1")" ]; }
wait_instance() {
  local i=$1 port log="$rdir/chatmesh-$1/${pfx}chatmesh-$1.out"
  port=$(instance_port "$i")
  wait_until 60 "chatmesh-$i" instance_ready_or_gone "$i" ||
    fail_with_log "${pfx}chatmesh-$i is not ready on $port after 60 s" "$log"
  [ -n "$(pid_of "${pfx}chatmesh-$i")" ] || fail_with_log "${pfx}chatmesh-$i exited" "$log"
}

start_haproxy() {
  local d="$rdir/haproxy" bind=127.0.0.1 ports=("$http_port" "$stats_port") extra=()
  [ -n "$(pid_of "${pfx}haproxy")" ] && return 0
  if [ -n "$region" ]; then
    # Public frontend and stats on every address of the namespace (the caller reaches them over
    # the veth); the internal frontend only on the veth, where the link delivers the peers' calls.
    bind=0.0.0.0
    ports+=("$internal_port")
    extra=(--internal-bind "$(ns_ip "$region"):$internal_port")
  fi
  for p in "${ports[@]}"; do port_busy "$p" && die "port $p (${pfx}haproxy) is taken by another process"; done
  mkdir -p "$d"
  deploy/haproxy/gen-haproxy-cfg.sh --instances "$instances" --host 127.0.0.1 --first-port "$(instance_port 1)" \
    --bind "$bind:$http_port" --stats "$bind:$stats_port" --stats-socket "$d/haproxy.sock" \
    --log stdout --maxconn 4000 --server-maxconn 1000 "${extra[@]}" --out "$d/haproxy.cfg"
  haproxy -c -q -f "$d/haproxy.cfg" || die "haproxy -c rejected $d/haproxy.cfg"
  launch "${pfx}haproxy" "$d" haproxy -db -f "$d/haproxy.cfg"
}

# ---- regions: namespaces, relays, settings -------------------------------------------------------

peers_of() { # region -> CHATMESH_PEER_REGIONS: each other region's internal frontend, through the link
  local r=$1 p out=""
  for p in "${region_list[@]}"; do
    [ "$p" = "$r" ] && continue
    out+="${out:+,}$p=http://$(root_ip "$r"):$(link_port "$p")"
  done
  echo "$out"
}
pg_target() { # host:port of the PostgreSQL server in $pg
  local hp=${pg#*://}
  hp=${hp##*@}
  case "$hp" in *:[0-9]*) echo "$hp" ;; *) echo "$hp:5432" ;; esac
}
region_store_url() { # region -> the database through pg-relay, on the region's side of its veth
  local auth="" rest=${pg#*://}
  case "$rest" in *@*) auth="${rest%@*}@" ;; esac
  echo "${pg%%://*}://$auth$(root_ip "$1"):$pg_relay_port/$db"
}

# The caller's CHATMESH_* settings for every instance (NAME=VALUE words): only names this binary
# knows (`serve --help` lists them), so that e.g. CHATMESH_BIN (the tests' binary path) is not
# passed to a server that refuses unknown names; the per-instance topology is the script's.
caller_env=()
caller_settings() {
  local known name
  known=" $("$bin" serve --help 2>/dev/null | grep -o 'CHATMESH_[A-Z0-9_]*' | sort -u | paste -sd' ') "
  for name in $(compgen -e); do
    [[ "$name" == CHATMESH_* ]] || continue
    case "$name" in
      CHATMESH_BIND | CHATMESH_INSTANCE_ID | CHATMESH_REGION | CHATMESH_PEER_REGIONS | CHATMESH_REDIS_URL)
        say "note: ignoring $name from the environment (set per instance by this script)"
        continue
        ;;
    esac
    if [ "$known" = "  " ]; then
      [ "$name" = CHATMESH_BIN ] && continue
    elif [[ "$known" != *" $name "* ]]; then
      say "note: ignoring $name from the environment (not a setting of $bin)"
      continue
    fi
    caller_env+=("$name=${!name}")
  done
}

net_up() { # namespace, veth and addresses per region (idempotent)
  local r ns veth other
  need ip || apt_install iproute2
  for r in "${region_list[@]}"; do
    ns=$(ns_of "$r") veth=$(ns_of "$r")
    # Another interface (not this state dir's) with an address in our /28: refuse, do not break it.
    other=$(ip -4 -o addr show | awk -v net="$net." -v tag="$tag-" 'index($4, net) == 1 && index($2, tag) != 1 { print $2 " " $4 }' | head -1)
    [ -z "$other" ] || die "the address range $net.0/28 (from the state dir's hash) is in use: $other"
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link show "$veth" >/dev/null 2>&1 || ip link add "$veth" type veth peer name veth0 netns "$ns"
    ip addr replace "$(root_ip "$r")/30" dev "$veth"
    ip link set "$veth" up
    ip -n "$ns" addr replace "$(ns_ip "$r")/30" dev veth0
    ip -n "$ns" link set veth0 up
    # No default route in the namespace: it reaches its own /30 (the relays on the caller's side)
    # and nothing else, so another region is reachable only through the link.
  done
}
# With IP forwarding on in the caller's namespace, also drop whatever would be forwarded from or to
# our veths (there is no route for it in the namespaces anyway). The global sysctl is left alone.
guard_comment() { echo "chatmesh-local-cluster-$tag"; }
forward_guard_up() {
  [ "$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo 0)" = 1 ] || return 0
  need iptables || apt_install iptables
  local dirn
  for dirn in -i -o; do
    iptables -C FORWARD "$dirn" "$tag-+" -m comment --comment "$(guard_comment)" -j DROP 2>/dev/null ||
      iptables -I FORWARD "$dirn" "$tag-+" -m comment --comment "$(guard_comment)" -j DROP
  done
}
forward_guard_down() {
  need iptables || return 0
  local rule
  { iptables -S FORWARD 2>/dev/null || true; } | { grep -F -- "$(guard_comment)" || true; } | sed 's/^-A /-D /' | while read -r rule; do
    # shellcheck disable=SC2086
    iptables $rule && say "removed iptables rule: $rule"
  done
  return 0
}
net_down() {
  local r ns
  for r in "${region_list[@]}"; do
    ns=$(ns_of "$r")
    if [ -e "/run/netns/$ns" ]; then
      ip netns del "$ns" && say "deleted network namespace $ns"
    fi
    # Deleting the namespace deletes the veth pair; a leftover caller side goes explicitly.
    if ip link show "$ns" >/dev/null 2>&1; then ip link del "$ns" 2>/dev/null || true; fi
  done
}

relay_ready_or_gone() { [ -s "$dir/$1/ready.json" ] || [ -z "$(pid_of "$1")" ]; }
start_relay() { # name one-way-delay-ms routes... (in the caller's namespace)
  local name=$1 delay=$2 d="$dir/$1" r args=()
  shift 2
  [ -n "$(pid_of "$name")" ] && return 0
  for r in "$@"; do args+=(--route "$r"); done
  mkdir -p "$d"
  rm -f "$d/ready.json"
  launch "$name" "$d" "$py" "$repo/scripts/relay.py" --delay-ms "$delay" --control 127.0.0.1:0 \
    --ready-file "$d/ready.json" "${args[@]}"
  wait_until 10 "$name" relay_ready_or_gone "$name" || fail_with_log "$name did not start in 10 s" "$d/$name.out"
  [ -n "$(pid_of "$name")" ] || fail_with_log "$name exited" "$d/$name.out"
}
relay_control() { # name -> host:port of its control port
  sed -n 's/.*"control": *"\([^"]*\)".*/\1/p' "$dir/$1/ready.json" 2>/dev/null
}
start_relays() {
  local r p pg_routes=() link_routes=()
  for r in "${region_list[@]}"; do
    pg_routes+=("$(root_ip "$r"):$pg_relay_port=$(pg_target)")
    for p in "${region_list[@]}"; do
      [ "$p" = "$r" ] || link_routes+=("$(root_ip "$r"):$(link_port "$p")=$(ns_ip "$p"):$internal_port")
    done
  done
  # The database is not behind the link: `link cut` does not touch it.
  start_relay pg-relay 0 "${pg_routes[@]}"
  [ ${#link_routes[@]} -eq 0 ] || start_relay link "$link_delay_ms" "${link_routes[@]}"
}

# ---- commands (continued) ------------------------------------------------------------------------

print_urls() {
  if [ "$regions" != 0 ]; then
    print_region_urls
    return 0
  fi
  cat <<EOF2
chatmesh (through HAProxy): http://127.0.0.1:$http_port
HAProxy stats:              http://127.0.0.1:$stats_port/stats   (CSV: /stats;csv, Prometheus: /metrics)
instances:                  $(for i in $(seq 1 "$instances"); do printf 'http://127.0.0.1:%s ' "$(instance_port "$i")"; done)
Redis:                      $sentinel_url (data nodes 127.0.0.1:${redis_ports[0]}, 127.0.0.1:${redis_ports[1]})
store:                      $store_url
state dir:                  $dir
admin token (/admin, /api/v1/cluster): $dir/secrets/admin_token
EOF2
}
print_region_urls() {
  local r ip
  for r in "${region_list[@]}"; do
    ip=$(ns_ip "$r")
    cat <<EOF2
region $r (network namespace $(ns_of "$r"), address $ip; the caller's side $(root_ip "$r")):
  chatmesh (through HAProxy): http://$ip:$http_port
  internal frontend:          http://$ip:$internal_port (/internal/ only; peers reach it through the link)
  HAProxy stats:              http://$ip:$stats_port/stats
  instances:                  $(for i in $(seq 1 "$instances"); do printf 'http://%s:%s ' "$ip" "$(instance_port "$i")"; done)
  Redis (in the namespace):   $sentinel_url
  store (through pg-relay):   $(region_store_url "$r")
  peers (through the link):   $(peers_of "$r")
EOF2
  done
  cat <<EOF2
link:                       one-way delay ${link_delay_ms} ms at start; control $(relay_control link) ($0 link cut|heal|delay MS|status)
store:                      $store_url
state dir:                  $dir
admin token (/admin, /api/v1/cluster): $dir/secrets/admin_token
EOF2
}

cmd_urls() {
  local r i
  if [ "$regions" = 0 ]; then
    r=${CHATMESH_REGION:-local}
    echo "$r lb http://127.0.0.1:$http_port"
    for i in $(seq 1 "$instances"); do echo "$r instance http://127.0.0.1:$(instance_port "$i")"; done
    return 0
  fi
  for r in "${region_list[@]}"; do
    echo "$r lb http://$(ns_ip "$r"):$http_port"
    for i in $(seq 1 "$instances"); do echo "$r instance http://$(ns_ip "$r"):$(instance_port "$i")"; done
    # Where region r reaches each peer's internal frontend through the link (also reachable from
    # the caller's namespace, e.g. to time the link itself).
    for p in "${region_list[@]}"; do
      [ "$p" = "$r" ] || echo "$r peer-$p http://$(root_ip "$r"):$(link_port "$p")"
    done
  done
}

cmd_link() {
  [ "$regions" != 0 ] || die "no link: $dir is a single-region stack (up --regions N)"
  [ -n "$(pid_of link)" ] || die "the link relay is not running (up)"
  local ctl
  ctl=$(relay_control link)
  [ -n "$ctl" ] || die "no control address in $dir/link/ready.json"
  python3 "$repo/scripts/relay.py" ctl "$ctl" "${link_cmd[@]}"
}

isolation_rule() { # region -> the iptables rule (in the region's namespace) that cuts it off the store
  echo "OUTPUT -p tcp -d $(root_ip "$1") --dport $pg_relay_port -j DROP -m comment --comment $(guard_comment)"
}

cmd_region() {
  [ "$regions" != 0 ] || die "no regions: $dir is a single-region stack (up --regions N)"
  local what=${region_cmd[0]} r=${region_cmd[1]} pids
  [[ " ${region_list[*]} " == *" $r "* ]] || die "no region $r in this stack (regions: ${region_list[*]})"
  case "$what" in
    kill)
      pids=$(ip netns pids "$(ns_of "$r")" 2>/dev/null | paste -sd' ')
      [ -n "$pids" ] || die "region $r runs nothing"
      say "region $r: kill -9 $pids"
      # shellcheck disable=SC2086
      kill -KILL $pids
      ;;
    isolate)
      # shellcheck disable=SC2046
      ip netns exec "$(ns_of "$r")" iptables -C $(isolation_rule "$r") 2>/dev/null ||
        ip netns exec "$(ns_of "$r")" iptables -I $(isolation_rule "$r")
      say "region $r: cut off the store"
      ;;
    rejoin)
      # shellcheck disable=SC2046
      while ip netns exec "$(ns_of "$r")" iptables -D $(isolation_rule "$r") 2>/dev/null; do :; done
      say "region $r: reaches the store again"
      ;;
    takeover)
      local by=${region_cmd[3]}
      resolve_bin
      caller_settings
      use_region "$by"
      local env_args=(PATH="$PATH" HOME="${HOME:-/root}" RUST_LOG="${RUST_LOG:-warn}"
        CHATMESH_REDIS_URL="$sentinel_url" CHATMESH_STORE_URL="$(region_store_url "$by")"
        CHATMESH_JWT_SECRET="$(secret jwt_secret)" CHATMESH_CLUSTER_SECRET="$(secret cluster_secret)"
        CHATMESH_REGION="$by" CHATMESH_PEER_REGIONS="$(peers_of "$by")" "${caller_env[@]}")
      "${nsx[@]}" env -i "${env_args[@]}" "$bin" region takeover --region "$r" --by "$by"
      ;;
  esac
}

resolve_bin() {
  if [ -n "${LOCAL_CLUSTER_BIN:-}" ]; then
    bin="$(from_caller "$LOCAL_CLUSTER_BIN")"
  else
    say "cargo build --release -p chatmesh"
    cargo build --release --quiet -p chatmesh
    bin="$repo/target/release/chatmesh"
  fi
  [ -x "$bin" ] || die "chatmesh binary not found at $bin"
  bin="$(cd "$(dirname "$bin")" && pwd -P)/$(basename "$bin")"
}

cmd_up() {
  need redis-server && need redis-cli || apt_install redis-server redis-tools
  need haproxy || apt_install haproxy
  need curl || apt_install curl
  resolve_bin
  [ "$regions" = 0 ] || { regions_up; return 0; }

  ensure_database
  start_redis
  start_sentinels
  wait_sentinels
  jwt_secret=$(secret jwt_secret)
  cluster_secret=$(secret cluster_secret)
  admin_token=$(secret admin_token)
  # The first instance applies the migrations to an empty database; the others start together.
  local i
  if [ -z "$(pid_of chatmesh-1)" ]; then
    start_instance 1
    wait_instance 1
  fi
  for i in $(seq 2 "$instances"); do start_instance "$i"; done
  for i in $(seq 1 "$instances"); do wait_instance "$i"; done
  start_haproxy
  wait_until 30 haproxy all_backends_up || {
    say "HAProxy does not report every instance UP after 30 s:"
    backend_states >&2 || true
    fail_with_log "haproxy not ready" "$dir/haproxy/haproxy.out"
  }
  print_urls
}

with_peers=1
regions_up() {
  local r i
  need python3 || apt_install python3
  py=$(command -v python3)
  with_peers=1
  if [ "${LOCAL_CLUSTER_NO_PEERS:-0}" = 1 ]; then
    with_peers=0
    say "note: LOCAL_CLUSTER_NO_PEERS=1: the regions run without CHATMESH_PEER_REGIONS"
  elif ! grep -qa CHATMESH_PEER_REGIONS "$bin"; then
    die "$bin does not know CHATMESH_PEER_REGIONS (LOCAL_CLUSTER_NO_PEERS=1 runs the regions without peers)"
  fi
  caller_settings
  ensure_database
  net_up
  forward_guard_up
  start_relays
  # Redis in every region at once, then the Sentinels, then wait for them all.
  for r in "${region_list[@]}"; do use_region "$r"; mkdir -p "$rdir"; start_redis; done
  for r in "${region_list[@]}"; do use_region "$r"; start_sentinels; done
  for r in "${region_list[@]}"; do use_region "$r"; wait_sentinels; done
  jwt_secret=$(secret jwt_secret)
  cluster_secret=$(secret cluster_secret)
  admin_token=$(secret admin_token)
  # The first instance of the first region applies the migrations; then all the others at once.
  use_region "${region_list[0]}"
  if [ -z "$(pid_of "${pfx}chatmesh-1")" ]; then
    start_instance 1
    wait_instance 1
  fi
  for r in "${region_list[@]}"; do
    use_region "$r"
    for i in $(seq 1 "$instances"); do start_instance "$i"; done
  done
  for r in "${region_list[@]}"; do
    use_region "$r"
    for i in $(seq 1 "$instances"); do wait_instance "$i"; done
  done
  for r in "${region_list[@]}"; do use_region "$r"; start_haproxy; done
  for r in "${region_list[@]}"; do
    use_region "$r"
    wait_until 30 haproxy all_backends_up || {
      say "region $r: HAProxy does not report every instance UP after 30 s:"
      backend_states >&2 || true
      fail_with_log "region $r: haproxy not ready" "$rdir/haproxy/${pfx}haproxy.out"
    }
  done
  use_root
  print_urls
}

cmd_down() {
  local name pid pids=() left group prefix r contexts=("")
  [ "$regions" = 0 ] || contexts=("${region_list[@]}")
  # Front to back: HAProxy and the instances first (they drain: readiness 503, in-flight sends
  # finish, write-back flushes while Redis and the store are still there), then the Sentinels
  # (so that stopping the data nodes does not start a failover), then the data nodes (SIGTERM:
  # Redis fsyncs its AOF and exits). With regions: every region at once, then the relays.
  for group in "haproxy chatmesh-" "sentinel-" "redis-"; do
    pids=()
    for r in "${contexts[@]}"; do
      if [ -n "$r" ]; then use_region "$r"; else use_root; fi
      for name in "${names[@]}"; do
        for prefix in $group; do
          [[ "$name" == "$prefix"* ]] || continue
          pid=$(pid_of "$pfx$name")
          [ -n "$pid" ] && pids+=("$pid") && say "stopping $pfx$name (pid $pid)"
        done
      done
    done
    stop_pids 20 "${pids[@]}"
  done
  use_root
  if [ "$regions" != 0 ]; then
    pids=()
    for name in link pg-relay; do
      pid=$(pid_of "$name")
      [ -n "$pid" ] && pids+=("$pid") && say "stopping $name (pid $pid)"
    done
    stop_pids 10 "${pids[@]}"
  fi
  left=$(strays | paste -sd' ')
  if [ -n "$left" ]; then
    say "stopping processes of this state dir without a pid file: $left"
    # shellcheck disable=SC2086
    stop_pids 10 $left
  fi
  if [ "$regions" != 0 ]; then
    # Anything else still inside our namespaces (whatever its working directory) is ours too.
    left=$(ns_pids | paste -sd' ')
    if [ -n "$left" ]; then
      say "stopping the processes left in this state dir's namespaces: $left"
      # shellcheck disable=SC2086
      kill -TERM $left 2>/dev/null || true
      sleep 1
      left=$(ns_pids | paste -sd' ')
      # shellcheck disable=SC2086
      [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
    fi
    net_down
    forward_guard_down
  fi
  rm -rf "$dir/pids"
  if [ "$purge" = 1 ]; then
    if need psql && psql "$pg/postgres" -qAtc 'SELECT 1' >/dev/null 2>&1; then
      say "DROP DATABASE $db"
      psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
    else
      say "PostgreSQL at $pg not reachable: database $db not dropped"
    fi
    rm -rf "$dir"
    say "purged $dir"
  fi
  say "down"
}

status_table() { # the components of the current context (the single stack, or one region)
  local name pid port role any=0
  printf '%-12s %-8s %-7s %s\n' component pid port state
  for name in "${names[@]}"; do
    pid=$(pid_of "$pfx$name")
    case "$name" in
      haproxy) port=$http_port ;;
      chatmesh-*) port=$(instance_port "${name#chatmesh-}") ;;
      sentinel-*) port=${sentinel_ports[$((${name#sentinel-} - 1))]} ;;
      redis-*) port=${redis_ports[$((${name#redis-} - 1))]} ;;
    esac
    if [ -z "$pid" ]; then
      printf '%-12s %-8s %-7s %s\n' "$name" - "$port" stopped
      continue
    fi
    any=1
    case "$name" in
      redis-*) role="running, $(rcli "$port" role | head -1 | sed 's/^slave$/replica/; s/^master$/primary/')" ;;
      chatmesh-*) if ready "$port"; then role="running, ready"; else role="running, not ready"; fi ;;
      haproxy) role="running, backends: $(backend_states | awk '{printf "%s=%s ", $1, $2}')" ;;
      *) role=running ;;
    esac
    printf '%-12s %-8s %-7s %s\n' "$name" "$pid" "$port" "$role"
  done
  [ "$any" = 1 ]
}

cmd_status() {
  local any=0 r name pid ctl
  if [ "$regions" = 0 ]; then
    status_table && any=1
  else
    for r in "${region_list[@]}"; do
      use_region "$r"
      if [ -e "/run/netns/$(ns_of "$r")" ]; then
        echo "region $r (network namespace $(ns_of "$r"), $(ns_ip "$r")):"
      else
        echo "region $r (network namespace $(ns_of "$r") does not exist):"
      fi
      status_table && any=1
      echo
    done
    use_root
    for name in pg-relay link; do
      pid=$(pid_of "$name")
      if [ -z "$pid" ]; then
        printf '%-12s %-8s %s\n' "$name" - stopped
        continue
      fi
      any=1
      ctl=$(relay_control "$name")
      printf '%-12s %-8s %s\n' "$name" "$pid" "running, control $ctl: $(python3 "$repo/scripts/relay.py" ctl "$ctl" status 2>&1)"
    done
  fi
  left=$(strays | while read -r p; do
    grep -qx "$p" "$dir"/pids/*.pid 2>/dev/null || echo "$p"
  done | paste -sd' ')
  [ -z "$left" ] || echo "processes of this state dir without a pid file: $left"
  [ "$any" = 0 ] || { echo; print_urls; }
}

"cmd_$cmd"
