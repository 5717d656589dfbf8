#!/usr/bin/env bash
# bench/run.sh regions [--quick]: cross-region latency on two regions on this machine
# (scripts/local-cluster.sh up --regions 2: each region in a network namespace, the link between
# them a relay that delays every byte by d each way). A room homed in a; one sender in b; receivers
# in a and b (stock socket.io-client, scripts/regions-client.mjs bench); a steady rate. Measured:
# the send ack latency at the sender, send -> deliver latency at the receiver in a and in b
# (p50/p99), order violations, and the replication lag b's instances report
# (chatmesh_replication_lag_seconds), and the link itself (HTTP round trips from b to a's internal
# frontend through the link: 2d plus what the relay, HAProxy and HTTP add, the practical floor of
# a forwarded send). Once with ack level `replica`, once with `region`, each on a
# fresh stack. Floors: ack 2d (forward to a, answer back), delivery in b 2d (forward, replicate
# back), delivery in a d; targets (ack level replica): ack p99 <= 2d + 10 ms, delivery in b p99 <=
# 2d + 15 ms. Prints a table and writes bench/results/regions.json.
# Settings (environment): BENCH_REGIONS_DELAY_MS (25), BENCH_REGIONS_RATE (50 msg/s),
# BENCH_REGIONS_SECONDS (30; 10 with --quick), BENCH_REGIONS_LEVELS ("replica region"),
# BENCH_BIN (the chatmesh binary; default target/release/chatmesh, built by bench/run.sh).
# Needs root (network namespaces), node with tests/node/node_modules, PostgreSQL on 127.0.0.1:5432.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$repo"
say() { echo "bench: $*" >&2; }
quick=0
for a in "$@"; do
  case "$a" in --quick) quick=1 ;; *) say "usage: bench/run.sh regions [--quick]"; exit 2 ;; esac
done
delay="${BENCH_REGIONS_DELAY_MS:-25}"
rate="${BENCH_REGIONS_RATE:-50}"
seconds="${BENCH_REGIONS_SECONDS:-30}"
[ "$quick" = 1 ] && [ -z "${BENCH_REGIONS_SECONDS:-}" ] && seconds=10
levels="${BENCH_REGIONS_LEVELS:-replica region}"
bin="${BENCH_BIN:-$repo/target/release/chatmesh}"
[ -x "$bin" ] || { say "no chatmesh binary at $bin"; exit 1; }
[ -d tests/node/node_modules/socket.io-client ] || { say "tests/node/node_modules is missing (scripts/setup.sh --test)"; exit 1; }
[ "$(id -u)" = 0 ] || { say "bench/run.sh regions needs root (network namespaces)"; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/chatmesh-bench-regions.XXXXXX")"
export LOCAL_CLUSTER_DIR="$work/cluster"
export LOCAL_CLUSTER_PORT_BASE="${BENCH_REGIONS_PORT_BASE:-18800}"
export LOCAL_CLUSTER_DB="chatmesh_bench_regions_$$"
export LOCAL_CLUSTER_INSTANCES=2
export LOCAL_CLUSTER_LINK_DELAY_MS="$delay"
export LOCAL_CLUSTER_BIN="$bin"
# One client IP for every user, and a steady 50/s from one sender: the limits are raised.
export CHATMESH_AUTH_RATE_PER_MIN=100000 CHATMESH_SEND_RATE_PER_SEC=100000 CHATMESH_READ_RATE_PER_SEC=100000
lc() { scripts/local-cluster.sh "$@"; }
cleanup() {
  local rc=$?
  [ -f "$LOCAL_CLUSTER_DIR/cluster.env" ] && lc down --purge >>"$work/cluster.log" 2>&1
  if [ "$rc" = 0 ]; then rm -rf "$work"; else say "logs kept in $work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started=$SECONDS
for level in $levels; do
  say "ack level $level: two regions, link delay ${delay} ms each way"
  CHATMESH_ACK_LEVEL="$level" lc up --regions 2 >>"$work/cluster.log" 2>&1 ||
    { say "local-cluster up --regions 2 failed:"; tail -n 30 "$work/cluster.log" >&2; exit 1; }
  say "ack level $level: ${rate} msg/s for ${seconds} s"
  node scripts/regions-client.mjs bench --rate "$rate" --seconds "$seconds" --delay-ms "$delay" \
    --label "$level" --out "$work/$level.json" >/dev/null 2>>"$work/client.log" ||
    { say "the benchmark client failed:"; tail -n 20 "$work/client.log" >&2; exit 1; }
  lc down --purge >>"$work/cluster.log" 2>&1
done

mkdir -p bench/results
python3 - "$work" "$delay" "$rate" "$seconds" "$quick" "$((SECONDS - started))" "$bin" $levels <<'PY'
import json, os, platform, sys
work, d, rate, seconds, quick, took, binary = sys.argv[1:8]
levels = sys.argv[8:]
d = float(d)
runs = [json.load(open(os.path.join(work, f"{l}.json"))) for l in levels]
model = "unknown CPU"
try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
machine = f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}; both regions, the link relay and the clients on the same machine"
def f(v):
    return "n/a" if v is None else f"{v:.1f}"
rows = [
    ("send ack p50 (sender in b)", "ack_ms", "p50", 2 * d, None),
    ("send ack p99", "ack_ms", "p99", 2 * d, 2 * d + 10),
    ("deliver in b p50 (remote)", "deliver_b_ms", "p50", 2 * d, None),
    ("deliver in b p99", "deliver_b_ms", "p99", 2 * d, 2 * d + 15),
    ("deliver in a p50 (home)", "deliver_a_ms", "p50", d, None),
    ("deliver in a p99", "deliver_a_ms", "p99", d, None),
]
extra = [
    ("link HTTP round trip p50 (b -> a, 401)", lambda r: r["link_http_rtt_ms"]["p50"]),
    ("link HTTP round trip p99", lambda r: r["link_http_rtt_ms"]["p99"]),
    ("order violations", lambda r: r["order_violations"]),
    ("missing deliveries (a + b)", lambda r: r["missing_a"] + r["missing_b"]),
    ("send errors", lambda r: sum(r["errors"].values())),
    ("replication lag max (s)", lambda r: None if r["replication_lag_s"] is None else round(r["replication_lag_s"]["max"], 3)),
    ("achieved rate (msg/s)", lambda r: r["achieved_rate"]),
]
w = max(len(r[0]) for r in rows + extra)
print(f"\nregions — {machine}\nlink delay d = {d:g} ms each way, {rate} msg/s for {seconds} s, binary {binary}")
print(f"{'figure (ms)':<{w}}  {'floor':>6}  {'target':>6}  " + "  ".join(f"{'ack=' + l:>12}" for l in levels))
figures = []
for name, key, q, floor, target in rows:
    vals = [r[key][q] for r in runs]
    print(f"{name:<{w}}  {f(floor):>6}  {f(target) if target else '':>6}  " + "  ".join(f"{f(v):>12}" for v in vals))
    figures.append({"name": name, "unit": "ms", "floor": floor, "target": target, **{l: v for l, v in zip(levels, vals)}})
for name, fn in extra:
    vals = [fn(r) for r in runs]
    print(f"{name:<{w}}  {'':>6}  {'':>6}  " + "  ".join(f"{'n/a' if v is None else v:>12}" for v in vals))
    figures.append({"name": name, **{l: v for l, v in zip(levels, vals)}})
for r in runs:
    m = r["meets"]
    print(f"ack={r['label']}: ack p99 <= 2d+10: {'yes' if m['ack_p99'] else 'NO'}; deliver in b p99 <= 2d+15: {'yes' if m['deliver_b_p99'] else 'NO'}; order: {'ok' if m['order'] else 'VIOLATED'}"
          + ("  (targets apply to ack level replica)" if r["label"] != "replica" else ""))
result = {"scenario": "regions", "machine": machine, "quick": quick == "1", "seconds": int(took),
          "command": "bench/run.sh regions" + (" --quick" if quick == "1" else ""),
          "delay_ms": d, "rate": float(rate), "duration_s": float(seconds), "binary": binary,
          "figures": figures, "runs": runs}
path = "bench/results/regions.json"
with open(path, "w") as fh:
    json.dump(result, fh, indent=1)
print(f"results: {path}")
PY
