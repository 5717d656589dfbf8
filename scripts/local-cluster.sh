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
# Settings (environment; fixed by the first `up` of a state dir and recorded in its cluster.env):
#   LOCAL_CLUSTER_DIR        state dir (default data/local-cluster in the repository)
#   LOCAL_CLUSTER_PORT_BASE  B (default 8080): HAProxy B, its stats page B+1, chatmesh B+10..,
#                            Redis B+20 (first primary) and B+21, Sentinels B+30..B+32
#   LOCAL_CLUSTER_INSTANCES  chatmesh instances, 1..9 (default 3)
#   LOCAL_CLUSTER_DB         database name (default chatmesh_local)
#   LOCAL_CLUSTER_PG         PostgreSQL server (default postgres://postgres@127.0.0.1:5432)
# Per run:
#   LOCAL_CLUSTER_BIN        chatmesh binary to run (default: cargo build --release -p chatmesh,
#                            then target/release/chatmesh)
#   LOCAL_CLUSTER_UID_BASE   when set (as root), instance i runs as uid/gid BASE+i, so a firewall
#                            rule can match one instance's traffic (scripts/fault-suite.sh)
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
purge=0
[ "${2:-}" = "--purge" ] && purge=1
usage="usage: $0 up | down [--purge] | status"
case "$cmd:$#:$purge" in
  up:1:0 | status:1:0 | down:1:0 | down:2:1) ;;
  *) die "$usage" ;;
esac

dir_setting="$repo/data/local-cluster"
[ -n "${LOCAL_CLUSTER_DIR:-}" ] && dir_setting="$(from_caller "$LOCAL_CLUSTER_DIR")"
if [ "$cmd" = up ]; then
  mkdir -p "$dir_setting"
elif [ ! -d "$dir_setting" ]; then
  [ "$cmd" = down ] && { say "nothing to stop ($dir_setting does not exist)"; exit 0; }
  echo "local-cluster: not set up ($dir_setting does not exist)"
  exit 0
fi
dir="$(cd "$dir_setting" && pwd -P)"
state="$dir/cluster.env"

declare -A want=(
  [port_base]="${LOCAL_CLUSTER_PORT_BASE:-8080}"
  [instances]="${LOCAL_CLUSTER_INSTANCES:-3}"
  [db]="${LOCAL_CLUSTER_DB:-chatmesh_local}"
  [pg]="${LOCAL_CLUSTER_PG:-postgres://postgres@127.0.0.1:5432}"
)
if [ -f "$state" ]; then
  # The state dir owns its settings: its Redis data, Sentinel state and database belong together.
  # shellcheck disable=SC1090
  . "$state"
  for k in port_base instances db pg; do
    env_name="LOCAL_CLUSTER_${k^^}"
    if [ -n "${!env_name:-}" ] && [ "${!env_name}" != "${!k}" ]; then
      say "note: $dir was set up with $env_name=${!k}; ignoring ${!env_name} (down --purge to start over)"
    fi
  done
elif [ "$cmd" = up ]; then
  port_base="${want[port_base]}" instances="${want[instances]}" db="${want[db]}" pg="${want[pg]}"
  [[ "$port_base" =~ ^[0-9]+$ ]] && [ "$port_base" -ge 1024 ] && [ "$port_base" -le 65500 ] ||
    die "LOCAL_CLUSTER_PORT_BASE must be a port number in 1024..65500"
  [[ "$instances" =~ ^[1-9]$ ]] || die "LOCAL_CLUSTER_INSTANCES must be 1..9"
  [[ "$db" =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "LOCAL_CLUSTER_DB must match [a-z_][a-z0-9_]*"
  [[ "$pg" =~ ^postgres(ql)?://[^/?]+$ ]] || die "LOCAL_CLUSTER_PG must be postgres://user@host:port (no database)"
  printf 'port_base=%s\ninstances=%s\ndb=%s\npg=%s\n' "$port_base" "$instances" "$db" "$pg" >"$state"
else
  [ "$cmd" = down ] && { say "nothing to stop ($dir has no cluster.env)"; exit 0; }
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
    case "$comm" in redis-server | redis-sentinel | haproxy | chatmesh) ours "$p" && echo "$p" ;; esac
  done
  return 0
}
launch() { # name cwd command... : detached (own session), stdio to <cwd>/<name>.out
  local name=$1 cwd=$2
  shift 2
  mkdir -p "$dir/pids"
  (cd "$cwd" && exec setsid "$@" </dev/null >>"$cwd/$name.out" 2>&1) &
  echo $! >"$dir/pids/$name.pid"
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
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

rcli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>/dev/null; }
# A deploy/redis line naming a production address or path that the seds above did not replace:
# refuse rather than start a local node that talks to 10.0.0.x or writes to /var.
unlocalised() { # generated-file source-file
  local bad
  bad=$(grep -v '^[[:space:]]*#' "$1" | grep -E '10\.0\.0\.|/var/|/etc/' | head -1) || true
  [ -z "$bad" ] || die "$2 has a line this script does not localise: $bad"
}
redis_conf() { # node index (0|1) -> writes the node's config once (Sentinel rewrites it later)
  local i=$1 d="$dir/redis-$(($1 + 1))" src
  mkdir -p "$d"
  [ -f "$d/redis.conf" ] && return 0
  # The local stack is plaintext without ACL users (loopback only, no certificates to make):
  # deploy/redis's TLS and ACL lines are dropped here; tests/cluster/tls.rs runs them for real.
  sed -E -e '/^(tls-|aclfile|masteruser|masterauth)/d' deploy/redis/redis-common.conf >"$dir/redis-common.conf"
  src=deploy/redis/redis-primary.conf
  [ "$i" = 1 ] && src=deploy/redis/redis-replica.conf
  sed -E \
    -e "s|^include .*|include $dir/redis-common.conf|" \
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
  local i=$1 d="$dir/sentinel-$(($1 + 1))"
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
redis_up_or_gone() { [ "$(rcli "$1" ping)" = PONG ] || [ -z "$(pid_of "$2")" ]; }
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

stats_csv() { curl -fsS --max-time 2 "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null; }
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

ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/health/ready")" = 200 ]; }

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
    [ -n "$(pid_of "$name")" ] && continue
    port_busy "${redis_ports[$i]}" && die "port ${redis_ports[$i]} ($name) is taken by another process"
    redis_conf "$i"
    launch "$name" "$dir/$name" redis-server "$dir/$name/redis.conf"
    pid=$(cat "$dir/pids/$name.pid")
    wait_until 10 "$name" redis_up_or_gone "${redis_ports[$i]}" "$name" ||
      fail_with_log "$name (pid $pid) did not answer on ${redis_ports[$i]}" "$dir/$name/redis.log"
    [ -n "$(pid_of "$name")" ] || fail_with_log "$name exited" "$dir/$name/redis.log"
  done
  wait_until 30 replication replica_in_sync ||
    fail_with_log "no replica in sync after 30 s" "$dir/redis-2/redis.log"
  for i in 0 1 2; do
    name="sentinel-$((i + 1))"
    [ -n "$(pid_of "$name")" ] && continue
    port_busy "${sentinel_ports[$i]}" && die "port ${sentinel_ports[$i]} ($name) is taken by another process"
    sentinel_conf "$i"
    launch "$name" "$dir/$name" redis-server "$dir/$name/sentinel.conf" --sentinel
  done
  # Sentinels find the replica and each other through the primary (hello messages every 2 s).
  wait_until 30 sentinels sentinels_settled ||
    fail_with_log "the Sentinels did not all see the replica and each other in 30 s" "$dir/sentinel-1/sentinel.log"
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
  d="$dir/$name"
  [ -n "$(pid_of "$name")" ] && return 0
  port_busy "$port" && die "port $port ($name) is taken by another process"
  mkdir -p "$d"
  # A clean environment: chatmesh refuses unknown CHATMESH_* variables, and the caller's settings
  # must not leak in. LOCAL_CLUSTER_DIR marks the process as this state dir's.
  local as=()
  if [ -n "${LOCAL_CLUSTER_UID_BASE:-}" ]; then
    local uid=$((LOCAL_CLUSTER_UID_BASE + i))
    as=(setpriv --reuid="$uid" --regid="$uid" --clear-groups)
  fi
  launch "$name" "$d" "${as[@]}" env -i PATH="$PATH" HOME="${HOME:-/root}" RUST_LOG="${RUST_LOG:-info}" \
    LOCAL_CLUSTER_DIR="$dir" \
    CHATMESH_BIND="127.0.0.1:$port" \
    CHATMESH_INSTANCE_ID="$name" \
    CHATMESH_REDIS_URL="$sentinel_url" \
    CHATMESH_STORE_URL="$store_url" \
    CHATMESH_JWT_SECRET="$jwt_secret" \
    CHATMESH_CLUSTER_SECRET="$cluster_secret" \
    CHATMESH_ADMIN_TOKEN="$admin_token" \
    CHATMESH_ACK_LEVEL=replica \
    CHATMESH_TRUST_PROXY=true \
    CHATMESH_LOG_FORMAT=json \
    CHATMESH_DRAIN_DELAY_MS=4000 \
    "$bin" serve
}
instance_ready_or_gone() { ready "$(instance_port "$1")" || [ -z "$(pid_of "chatmesh-$1")" ]; }
wait_instance() {
  local i=$1 port log="$dir/chatmesh-$1/chatmesh-$1.out"
  port=$(instance_port "$i")
  wait_until 60 "chatmesh-$i" instance_ready_or_gone "$i" ||
    fail_with_log "chatmesh-$i is not ready on $port after 60 s" "$log"
  [ -n "$(pid_of "chatmesh-$i")" ] || fail_with_log "chatmesh-$i exited" "$log"
}

start_haproxy() {
  local d="$dir/haproxy"
  [ -n "$(pid_of haproxy)" ] && return 0
  for p in "$http_port" "$stats_port"; do port_busy "$p" && die "port $p (haproxy) is taken by another process"; done
  mkdir -p "$d"
  deploy/haproxy/gen-haproxy-cfg.sh --instances "$instances" --host 127.0.0.1 --first-port "$(instance_port 1)" \
    --bind "127.0.0.1:$http_port" --stats "127.0.0.1:$stats_port" --stats-socket "$d/haproxy.sock" \
    --log stdout --maxconn 4000 --server-maxconn 1000 --out "$d/haproxy.cfg"
  haproxy -c -q -f "$d/haproxy.cfg" || die "haproxy -c rejected $d/haproxy.cfg"
  launch haproxy "$d" haproxy -db -f "$d/haproxy.cfg"
}

print_urls() {
  cat <<EOF
chatmesh (through HAProxy): http://127.0.0.1:$http_port
HAProxy stats:              http://127.0.0.1:$stats_port/stats   (CSV: /stats;csv, Prometheus: /metrics)
instances:                  $(for i in $(seq 1 "$instances"); do printf 'http://127.0.0.1:%s ' "$(instance_port "$i")"; done)
Redis:                      $sentinel_url (data nodes 127.0.0.1:${redis_ports[0]}, 127.0.0.1:${redis_ports[1]})
store:                      $store_url
state dir:                  $dir
admin token (/admin, /api/v1/cluster): $dir/secrets/admin_token
EOF
}

cmd_up() {
  need redis-server && need redis-cli || apt_install redis-server redis-tools
  need haproxy || apt_install haproxy
  need curl || apt_install curl
  if [ -n "${LOCAL_CLUSTER_BIN:-}" ]; then
    bin="$(from_caller "$LOCAL_CLUSTER_BIN")"
  else
    say "cargo build --release -p chatmesh"
    cargo build --release --quiet -p chatmesh
    bin="$repo/target/release/chatmesh"
  fi
  [ -x "$bin" ] || die "chatmesh binary not found at $bin"
  bin="$(cd "$(dirname "$bin")" && pwd -P)/$(basename "$bin")"

  ensure_database
  start_redis
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

cmd_down() {
  local name pid pids=() left
  # Front to back: HAProxy and the instances first (they drain: readiness 503, in-flight sends
  # finish, write-back flushes while Redis and the store are still there), then the Sentinels
  # (so that stopping the data nodes does not start a failover), then the data nodes (SIGTERM:
  # Redis fsyncs its AOF and exits).
  for group in "haproxy chatmesh-" "sentinel-" "redis-"; do
    pids=()
    for name in "${names[@]}"; do
      for prefix in $group; do
        [[ "$name" == "$prefix"* ]] || continue
        pid=$(pid_of "$name")
        [ -n "$pid" ] && pids+=("$pid") && say "stopping $name (pid $pid)"
      done
    done
    stop_pids 20 "${pids[@]}"
  done
  left=$(strays | paste -sd' ')
  if [ -n "$left" ]; then
    say "stopping processes of this state dir without a pid file: $left"
    # shellcheck disable=SC2086
    stop_pids 10 $left
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

cmd_status() {
  local name pid port role any=0
  printf '%-12s %-8s %-7s %s\n' component pid port state
  for name in "${names[@]}"; do
    pid=$(pid_of "$name")
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
  left=$(strays | while read -r p; do
    grep -qx "$p" "$dir"/pids/*.pid 2>/dev/null || echo "$p"
  done | paste -sd' ')
  [ -z "$left" ] || echo "processes of this state dir without a pid file: $left"
  [ "$any" = 0 ] || { echo; print_urls; }
}

"cmd_$cmd"
