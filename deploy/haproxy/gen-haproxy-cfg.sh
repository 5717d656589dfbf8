#!/usr/bin/env bash
# Writes an HAProxy configuration for N chatmesh instances from haproxy.cfg.tmpl (beside this file).
#
#   gen-haproxy-cfg.sh [options] HOST:PORT...           one server line per address
#   gen-haproxy-cfg.sh [options] --instances N [--host H] [--first-port P]
#                                                        N instances on H:P, H:P+1, ... (default
#                                                        127.0.0.1:5001..)
# Options:
#   --bind ADDR:PORT        frontend address                (default 127.0.0.1:8080)
#   --stats ADDR:PORT       stats page (/stats, /stats;csv) and Prometheus /metrics
#                                                           (default 127.0.0.1:8404)
#   --stats-socket PATH     runtime API socket              (default /run/haproxy/chatmesh.sock)
#   --stats-auth USER:PASS  basic auth on the stats page    (default none: keep it on loopback)
#   --log TARGET            syslog target, or `stdout` when HAProxy runs in the foreground
#                                                           (default /dev/log)
#   --maxconn N             process-wide connection limit   (default 20000)
#   --server-maxconn N      connections per instance; more wait in the queue (default 10000)
#   --name-prefix P         server names and cookie values P1, P2, ... (default chatmesh-)
#   --internal-bind ADDR:PORT  a second frontend that serves only the instance-to-instance API
#                           (paths under /internal/, for the peer regions) and refuses the rest;
#                           implies --deny-internal           (default none)
#   --deny-internal         the public frontend refuses /internal paths (404) (default off)
#   --out FILE              write there (default stdout)
#   --check                 validate the result with `haproxy -c` (needs haproxy installed)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
template="$here/haproxy.cfg.tmpl"

bind=127.0.0.1:8080 stats=127.0.0.1:8404 socket=/run/haproxy/chatmesh.sock stats_auth=""
log_target=/dev/log maxconn=20000 server_maxconn=10000 prefix=chatmesh- out="" check=0
instances="" host=127.0.0.1 first_port=5001 internal_bind="" deny_internal=0
addrs=()

die() { echo "gen-haproxy-cfg: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) bind="${2:?}"; shift 2 ;;
    --stats) stats="${2:?}"; shift 2 ;;
    --stats-socket) socket="${2:?}"; shift 2 ;;
    --stats-auth) stats_auth="${2:?}"; shift 2 ;;
    --log) log_target="${2:?}"; shift 2 ;;
    --maxconn) maxconn="${2:?}"; shift 2 ;;
    --server-maxconn) server_maxconn="${2:?}"; shift 2 ;;
    --name-prefix) prefix="${2:?}"; shift 2 ;;
    --internal-bind) internal_bind="${2:?}"; deny_internal=1; shift 2 ;;
    --deny-internal) deny_internal=1; shift ;;
    --instances) instances="${2:?}"; shift 2 ;;
    --host) host="${2:?}"; shift 2 ;;
    --first-port) first_port="${2:?}"; shift 2 ;;
    --out) out="${2:?}"; shift 2 ;;
    --check) check=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (--help)" ;;
    *) addrs+=("$1"); shift ;;
  esac
done

if [ -n "$instances" ]; then
  [ ${#addrs[@]} -eq 0 ] || die "give either --instances or addresses, not both"
  [[ "$instances" =~ ^[1-9][0-9]*$ ]] || die "--instances must be a positive number"
  [[ "$first_port" =~ ^[0-9]+$ ]] || die "--first-port must be a number"
  for i in $(seq 0 $((instances - 1))); do addrs+=("$host:$((first_port + i))"); done
fi
[ ${#addrs[@]} -gt 0 ] || die "no instances (give HOST:PORT... or --instances N; --help)"
for a in "${addrs[@]}"; do [[ "$a" =~ ^[^[:space:]]+:[0-9]+$ ]] || die "not HOST:PORT: $a"; done
for v in "$maxconn" "$server_maxconn"; do [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "not a positive number: $v"; done

servers=""
for i in "${!addrs[@]}"; do
  name="$prefix$((i + 1))"
  # The cookie value is the server name: stable across reloads and reorderings of the list.
  servers+="    server $name ${addrs[$i]} cookie $name"$'\n'
done
global_extra=""
if [ "$log_target" = stdout ]; then
  global_extra="    # Logs go to stdout: run HAProxy in the foreground (-db) under a supervisor."
  log_target="stdout format raw"
fi
auth_line=""
[ -n "$stats_auth" ] && auth_line="    stats auth $stats_auth"
public_deny=""
if [ "$deny_internal" = 1 ]; then
  # Decoded, any case, any number of leading slashes: whatever spelling could reach the API.
  public_deny="    # The instance-to-instance API (/internal/v1) is not public: only the internal frontend
    # serves it. (chatmesh also checks the caller's address and token; HAProxy connects from an
    # allowed address, so this line is what keeps the public out.)
    http-request deny deny_status 404 if { path,url_dec -m reg -i ^/+internal(/|\$) }"
fi
internal_frontend=""
if [ -n "$internal_bind" ]; then
  [[ "$internal_bind" =~ ^[^[:space:]]+:[0-9]+$ ]] || die "--internal-bind: not ADDR:PORT: $internal_bind"
  internal_frontend="frontend chatmesh_internal
    # Peer regions call the instance-to-instance API here (private network only); nothing else.
    bind $internal_bind
    http-request del-header X-Forwarded-For
    http-request deny deny_status 404 unless { path -m beg /internal/ }
    # Replication streams its outbox as small chunks of one long response, and send lanes are
    # WebSockets: without this HAProxy sends body data with MSG_MORE and the kernel holds small
    # chunks back (measured: +45 ms per replicated message at the median).
    option http-no-delay
    default_backend chatmesh
"
fi

render() {
  # Placeholders are @@NAME@@, values taken literally from the environment (awk -v would
  # interpret backslashes); a line that is only a placeholder with an empty value is dropped.
  SERVERS="${servers%$'\n'}" GLOBAL_EXTRA="$global_extra" STATS_AUTH="$auth_line" \
    PUBLIC_INTERNAL_DENY="$public_deny" INTERNAL_FRONTEND="$internal_frontend" \
    FRONTEND_BIND="$bind" STATS_BIND="$stats" STATS_SOCKET="$socket" LOG_TARGET="$log_target" \
    MAXCONN="$maxconn" SERVER_MAXCONN="$server_maxconn" \
    awk '{
      if ($0 ~ /^@@[A-Z_]+@@$/ && ENVIRON[substr($0, 3, length($0) - 4)] == "") next
      while (match($0, /@@[A-Z_]+@@/)) {
        key = substr($0, RSTART + 2, RLENGTH - 4)
        $0 = substr($0, 1, RSTART - 1) ENVIRON[key] substr($0, RSTART + RLENGTH)
      }
      print
    }' "$template"
}

if [ -n "$out" ]; then
  tmp="$out.tmp.$$"
  render >"$tmp"
  mv "$tmp" "$out"
  target="$out"
else
  render
fi
if [ "$check" = 1 ]; then
  if [ -z "$out" ]; then
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    render >"$tmp"
    target="$tmp"
  fi
  haproxy -c -q -f "$target" >&2 || die "haproxy -c rejected the configuration"
fi
