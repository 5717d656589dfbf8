#!/usr/bin/env python3
"""chatmesh benchmark harness: runs one scenario against chatmesh and the Node baseline in turn
(A B A B ...), on the same machine, with the same load generator (bench/loadgen), and prints a
table (figure, chatmesh, baseline, ratio); writes bench/results/SCENARIO.json.

Called by bench/run.sh SCENARIO [--quick]; see README.md "Benchmarks".
"""

import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATMESH = os.path.join(REPO, "target/release/chatmesh")
LOADGEN = os.path.join(REPO, "target/release/chatmesh-loadgen")
BASELINE = os.path.join(REPO, "bench/baseline-node/server.js")
SEND_LUA = os.path.join(REPO, "src/redis_io/send.lua")
SECRET = "bench-secret-0123456789abcdef0123456789"
PG = "postgres://postgres@127.0.0.1:5432"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {secs} s")


def psql(sql):
    subprocess.run(["psql", f"{PG}/postgres", "-qAtc", sql], check=True, capture_output=True)


def cpu_seconds(pid):
    """User + system CPU time of a process (and its reaped children), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    # Fields after the command: state is [0]; utime, stime, cutime, cstime are [11..14].
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Stack:
    """One system under test: a private Redis, optionally a fresh PostgreSQL database, and N
    instances of chatmesh (cluster or embedded mode) or of the Node baseline."""

    def __init__(self, kind, instances=1, mode="cluster", work=None):
        # Cluster mode always gets its own database, dropped afterwards, and both systems write
        # back to it as in production: chatmesh needs a store there, and runs writing into a shared
        # one left their rows behind (and slowed later runs).
        pg = mode == "cluster"
        self.kind, self.n, self.mode, self.pg = kind, instances, mode, pg
        self.work = tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=work)
        self.procs, self.urls, self.redis = [], [], None
        self.db = f"bench_{kind}_{os.getpid()}_{int(time.time() * 1000) % 10**8}" if pg else None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        if self.mode == "cluster":
            self.redis_port = free_port()
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.work],
                stdout=open(os.path.join(self.work, "redis.log"), "w"), stderr=subprocess.STDOUT)
            for _ in range(100):
                if subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                    break
                time.sleep(0.05)
        if self.pg:
            psql(f"CREATE DATABASE {self.db}")
        for i in range(self.n):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            out = open(os.path.join(self.work, f"instance-{i}.log"), "w")
            if self.kind == "chatmesh":
                env = {
                    "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
                    # Per-send log lines off: the benchmark measures the send path, not stdout.
                    "RUST_LOG": "warn", "CHATMESH_LOG_FORMAT": "json",
                    "CHATMESH_BIND": f"127.0.0.1:{port}", "CHATMESH_INSTANCE_ID": f"bench-{i}",
                    "CHATMESH_AUTH_RATE_PER_MIN": "1000000", "CHATMESH_SEND_RATE_PER_SEC": "1000000",
                    "CHATMESH_READ_RATE_PER_SEC": "1000000", "CHATMESH_ROOM_CHANGE_RATE_PER_MIN": "1000000",
                    "CHATMESH_LOGIN_FAILURES_PER_MIN": "1000000",
                    "CHATMESH_MAX_SESSIONS": "1000000", "CHATMESH_MAX_SESSIONS_PER_IP": "1000000",
                    # The load generator opens every connection from 127.0.0.1.
                    "CHATMESH_MAX_CONNECTIONS": "2000000", "CHATMESH_MAX_CONNECTIONS_PER_IP": "2000000",
                    "CHATMESH_JWT_SECRET": SECRET,
                }
                if self.mode == "cluster":
                    env.update({
                        "CHATMESH_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
                        "CHATMESH_CLUSTER_SECRET": SECRET,
                        "CHATMESH_STORE_URL": f"{PG}/{self.db}",
                    })
                else:
                    env["CHATMESH_STORE_URL"] = f"sqlite://{self.work}/chatmesh.db"
                cmd = [CHATMESH, "serve"]
            else:
                env = {
                    "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
                    "PORT": str(port), "HOST": "127.0.0.1",
                    "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}", "PREFIX": "bl",
                    "JWT_SECRET": SECRET, "INSTANCE_ID": f"bench-{i}", "NODE_ENV": "production",
                }
                if self.pg:
                    env["PG_URL"] = f"{PG}/{self.db}"
                cmd = ["node", BASELINE]
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.work)
            self.procs.append(proc)
            self.urls.append(url)
        for url, proc in zip(self.urls, self.procs):
            wait_ready(url, proc)

    def pids(self):
        return [p.pid for p in self.procs]

    def settle(self, quiet=0.1, timeout=120):
        """Waits until the servers and their Redis together use less than `quiet` of a core over a
        second (after an overload they may still be draining queues and write-back); returns the
        seconds waited (`timeout` if they never got quiet)."""
        pids = self.pids() + ([self.redis.pid] if self.redis is not None else [])
        started = time.time()
        before = sum(cpu_seconds(p) for p in pids)
        while time.time() - started < timeout:
            time.sleep(1)
            now = sum(cpu_seconds(p) for p in pids)
            if now - before < quiet:
                return round(time.time() - started, 1)
            before = now
        log(f"{self.kind}: still busy {timeout} s after the overload; measuring anyway")
        return float(timeout)


    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if self.kind == "baseline" else signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
        if self.db:
            try:
                psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
            except subprocess.CalledProcessError:
                log(f"could not drop database {self.db}")
        shutil.rmtree(self.work, ignore_errors=True)


def loadgen(*args, timeout=900):
    cmd = [LOADGEN, *[str(a) for a in args]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(cmd[1:3])} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def redis_ceiling(quick):
    """The send script alone on one Redis core, pipelined by redis-benchmark: what Redis allows."""
    port = free_port()
    work = tempfile.mkdtemp(prefix="bench-redis-")
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                break
            time.sleep(0.05)
        with open(SEND_LUA) as f:
            sha = subprocess.run(["redis-cli", "-p", str(port), "-x", "script", "load"], input=f.read(),
                                 capture_output=True, text=True, check=True).stdout.strip()
        # Same keys and arguments as src/sequencer/redis.rs; a new dedupe key per call.
        n = 200_000 if quick else 1_000_000
        cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-P", "16", "-n", str(n), "-r", "1000000000", "--csv",
               "EVALSHA", sha, "5", "rc:{s1}:seq:room", "rc:{s1}:dedupe:room:__rand_int__", "rc:{s1}:hist:room",
               "rc:{s1}:sync", "rc:{s1}:room:room:left:u", "0", '{"room_id":"room","seq":', ',"body":"ceiling"}', "86400", "rc:room:ch",
               "100000000", "room", "", "0"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = [l for l in r.stdout.splitlines() if l.startswith('"EVALSHA')][-1]
        # The command column holds unescaped quotes; the figures are the quoted numbers after it.
        rps = float(re.findall(r'"([0-9]+(?:\.[0-9]+)?)"', line)[0])
        reply = subprocess.run(["redis-cli", "-p", str(port), "get", "rc:{s1}:seq:room"], capture_output=True, text=True).stdout.strip()
        # A few random dedupe keys repeat (birthday collisions): those calls answer "dup".
        assert int(reply) >= n * 0.999, f"the script did not sequence {n} sends (counter {reply})"
        return rps
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(work, ignore_errors=True)


def postgres_cpu_seconds():
    """CPU seconds of every PostgreSQL server process (the backends doing the write-back)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("postgres"):
                    continue
        except OSError:
            continue
        total += cpu_seconds(int(pid))
    return total


def with_cpu_split(stack, run):
    """Runs `run()` (a load generator call that returns its JSON) and adds the CPU that Redis and
    PostgreSQL spent meanwhile, per acked message of the whole run (warm-up included)."""
    redis0, pg0 = cpu_seconds(stack.redis.pid), postgres_cpu_seconds()
    res = run()
    acks = max(res.get("acked_total") or res["acked"], 1)
    res["redis_cpu_us_per_ack"] = (cpu_seconds(stack.redis.pid) - redis0) * 1e6 / acks
    res["postgres_cpu_us_per_ack"] = (postgres_cpu_seconds() - pg0) * 1e6 / acks
    return res


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- scenarios ------------------------------------------------------------------------------------
# Each returns figures: [(name, unit, chatmesh, baseline, higher_is_better)], and raw results.

def scenario_ingest(quick, rounds):
    secs = 5 if quick else 10
    args = ["ingest", "--senders", 50, "--rooms", 10, "--window", 8, "--seconds", secs, "--warmup", 1]
    raw = {"chatmesh": [], "baseline": [], "embedded": []}
    for r in range(rounds):
        for kind in ("chatmesh", "baseline"):
            log(f"ingest round {r + 1}: {kind} (cluster mode, 1 instance, Redis)")
            with Stack(kind, 1, "cluster") as s:
                raw[kind].append(with_cpu_split(s, lambda: loadgen(*args, "--url", s.urls[0], "--server-pid", s.pids()[0])))
        log(f"ingest round {r + 1}: chatmesh embedded (SQLite)")
        with Stack("chatmesh", 1, "embedded") as s:
            raw["embedded"].append(loadgen("ingest", "--senders", 100, "--rooms", 100, "--window", 8, "--seconds", secs,
                                           "--url", s.urls[0], "--server-pid", s.pids()[0]))
    log("Redis ceiling: the send script alone (redis-benchmark, pipelined)")
    ceiling = redis_ceiling(quick)
    m = lambda kind, f: median([f(x) for x in raw[kind]])
    acked = lambda x: x["acked_per_sec"]
    figures = [
        ("acked msgs/s, cluster mode, 1 instance", "msg/s", m("chatmesh", acked), m("baseline", acked), True),
        ("send latency p50", "ms", m("chatmesh", lambda x: x["latency_ms"]["p50"]), m("baseline", lambda x: x["latency_ms"]["p50"]), False),
        ("send latency p99", "ms", m("chatmesh", lambda x: x["latency_ms"]["p99"]), m("baseline", lambda x: x["latency_ms"]["p99"]), False),
        ("send latency p999", "ms", m("chatmesh", lambda x: x["latency_ms"]["p999"]), m("baseline", lambda x: x["latency_ms"]["p999"]), False),
        ("server CPU per ack", "µs", m("chatmesh", lambda x: x["server_cpu_us_per_ack"]), m("baseline", lambda x: x["server_cpu_us_per_ack"]), False),
        # Where the rest of the 2 cores go: what bounds acked msgs/s on this machine.
        ("load generator CPU per ack", "µs", m("chatmesh", lambda x: x["loadgen_cpu_seconds"] * 1e6 / max(x["acked"], 1)),
         m("baseline", lambda x: x["loadgen_cpu_seconds"] * 1e6 / max(x["acked"], 1)), False),
        ("Redis CPU per ack", "µs", m("chatmesh", lambda x: x["redis_cpu_us_per_ack"]), m("baseline", lambda x: x["redis_cpu_us_per_ack"]), False),
        ("PostgreSQL CPU per ack (write-back)", "µs", m("chatmesh", lambda x: x["postgres_cpu_us_per_ack"]),
         m("baseline", lambda x: x["postgres_cpu_us_per_ack"]), False),
        ("Redis ceiling: send script alone", "scripts/s", ceiling, None, True),
        ("chatmesh acked msgs/s as share of the Redis ceiling", "%", 100.0 * m("chatmesh", acked) / ceiling, None, True),
        ("acked msgs/s, embedded mode (SQLite, 100 rooms)", "msg/s", m("embedded", acked), None, True),
        ("order violations (gaps+dups+reorders+malformed), all runs", "count",
         sum(sum(x["order"].values()) for x in raw["chatmesh"] + raw["embedded"]),
         sum(sum(x["order"].values()) for x in raw["baseline"]), False),
    ]
    return figures, raw


def scenario_fanout(quick, rounds):
    # 10 × 5 is the shape of the Node reference figures (few sockets, many messages each).
    shapes = [(100, 10)] if quick else [(1000, 10), (10, 1000), (10, 5)]
    step = 3 if quick else 4
    raw = {"chatmesh": [], "baseline": []}
    figures = []
    for rooms, members in shapes:
        per = {"chatmesh": [], "baseline": []}
        for r in range(rounds):
            for kind in ("chatmesh", "baseline"):
                log(f"fanout {rooms}×{members} round {r + 1}: {kind} (2 instances)")
                with Stack(kind, 2, "cluster") as s:
                    common = ["--url", ",".join(s.urls), "--rooms", rooms, "--members", members,
                              "--step-seconds", step, "--server-pid", ",".join(map(str, s.pids()))]
                    res = loadgen("fanout", *common, "--rate", max(1, 2000 // members), "--find-max")
                    # Half of max is measured again with fresh sockets: the sweep's last step
                    # overloads the stack, and chatmesh disconnects members that fall 8192 packets
                    # behind (slow consumers; real clients reconnect and resync, the load
                    # generator's do not), so the sweep's own half step can run with members gone.
                    # It starts once the stack is quiet again: right after the overload it is still
                    # working off the backlog (chatmesh: the write-back of every accepted message),
                    # and half of max means half the load, not a recovery. How long that took is
                    # kept as `settle_seconds`.
                    if res["best_within_p99"]:
                        res["settle_seconds"] = s.settle()
                        half = loadgen("fanout", *common, "--rate", res["best_within_p99"]["rate"] / 2)
                        res["half_of_best_after_sweep"] = res["half_of_best"]
                        res["half_of_best"] = half["steps"][0]
                        res["order"] = {k: res["order"][k] + half["order"][k] for k in res["order"]}
                    per[kind].append(res)
                    raw[kind].append(res)
        def pick(kind, key, f, missing=None):
            vals = [f(x[key]) if x[key] else missing for x in per[kind]]
            return median(vals)
        first = lambda kind, f: median([f(x["steps"][0]) for x in per[kind]])
        tag = f"{rooms} rooms × {members}"
        rate0 = per["chatmesh"][0]["steps"][0]["rate"]
        figures += [
            # 0 when no step met the limit (the lowest rate already had p99 above it).
            (f"{tag}: delivered msgs/s at p99 ≤ 5 ms", "msg/s", pick("chatmesh", "best_within_p99", lambda b: b["delivered_per_sec"], 0.0),
             pick("baseline", "best_within_p99", lambda b: b["delivered_per_sec"], 0.0), True),
            (f"{tag}: max delivered msgs/s kept up (p99 ≤ 50 ms)", "msg/s", pick("chatmesh", "sustained", lambda b: b["delivered_per_sec"]),
             pick("baseline", "sustained", lambda b: b["delivered_per_sec"]), True),
            (f"{tag}: server CPU per delivered msg at max kept up", "µs",
             pick("chatmesh", "sustained", lambda b: b["server_cpu_us_per_delivery"]),
             pick("baseline", "sustained", lambda b: b["server_cpu_us_per_delivery"]), False),
            (f"{tag}: send→deliver p99 at {rate0 * members:.0f} deliveries/s (same rate both)", "ms",
             first("chatmesh", lambda b: b["latency_ms"]["p99"]), first("baseline", lambda b: b["latency_ms"]["p99"]), False),
            (f"{tag}: send→deliver p99 across instances at half of max (p99 ≤ 5 ms)", "ms",
             pick("chatmesh", "half_of_best", lambda b: b["latency_ms"]["p99"]),
             pick("baseline", "half_of_best", lambda b: b["latency_ms"]["p99"]), False),
            (f"{tag}: seconds until the stack was quiet after the sweep's overload", "s",
             median([x.get("settle_seconds") for x in per["chatmesh"]]),
             median([x.get("settle_seconds") for x in per["baseline"]]), False),
            (f"{tag}: order violations", "count",
             sum(sum(x["order"].values()) for x in per["chatmesh"]), sum(sum(x["order"].values()) for x in per["baseline"]), False),
        ]
    # The floor under "CPU per delivered msg": the kernel's cost of one loopback TCP send of a
    # delivery's size to a waiting reader, with no server at all (bench/loadgen/src/floor.rs).
    floors = [loadgen("floor", "--connections", 1000, "--seconds", 2 if quick else 4) for _ in range(rounds)]
    raw["floor"] = floors
    figures.append(("kernel floor: CPU per loopback TCP send of a 236-byte frame (no server)", "µs",
                    median([f["cpu_us_per_send"] for f in floors]), None, False))
    return figures, raw


def scenario_idle(quick, rounds):
    wanted = [10_000] if quick else [10_000, 50_000, 100_000]
    # One server process holds one descriptor per connection: counts above the hard limit on
    # open files cannot be opened here (raising it needs CAP_SYS_RESOURCE).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    feasible = hard - 1000 if hard != resource.RLIM_INFINITY else 10**9
    counts = [n for n in wanted if n <= feasible]
    skipped = [n for n in wanted if n > feasible]
    if skipped:
        counts.append(feasible)
        log(f"idle: open-file hard limit {hard}: {skipped} connections impossible here; measuring {feasible} instead")
    hold = 5 if quick else 30
    raw = {"chatmesh": [], "baseline": [], "open_file_hard_limit": hard, "skipped": skipped}
    figures = []
    for n in skipped:
        figures.append((f"RSS per idle connection at {n // 1000}k (not possible here: open-file hard limit {hard})",
                        "KiB", None, None, False))
    for n in counts:
        per = {"chatmesh": [], "baseline": []}
        for r in range(rounds):
            for kind in ("chatmesh", "baseline"):
                log(f"idle {n} round {r + 1}: {kind}")
                with Stack(kind, 1, "cluster") as s:
                    res = loadgen("idle", "--url", s.urls[0], "--connections", n, "--sources", 8,
                                  "--hold-seconds", hold, "--server-pid", s.pids()[0])
                    per[kind].append(res)
                    raw[kind].append(res)
        m = lambda kind, f: median([f(x) for x in per[kind]])
        figures += [
            (f"RSS per idle connection at {n:,}", "KiB", m("chatmesh", lambda x: x["server_rss_per_connection"] / 1024),
             m("baseline", lambda x: x["server_rss_per_connection"] / 1024), False),
            # The growth over the second half only: the first connections reuse memory the server
            # freed before the run (chatmesh: password hashing while the load generator registered).
            (f"RSS per idle connection at {n:,}, second half only", "KiB",
             m("chatmesh", lambda x: x["server_rss_per_connection_second_half"] / 1024),
             m("baseline", lambda x: x["server_rss_per_connection_second_half"] / 1024), False),
            (f"connections open after {hold} s idle ({n:,} asked)", "count", m("chatmesh", lambda x: x["connections"]),
             m("baseline", lambda x: x["connections"]), True),
        ]
    return figures, raw


def scenario_sync(quick, rounds):
    secs = 6 if quick else 15
    raw = {"chatmesh": [], "baseline": []}
    for r in range(rounds):
        for kind in ("chatmesh", "baseline"):
            with Stack(kind, 1, "cluster") as s:
                log(f"sync round {r + 1}: {kind}: max ingest (closed loop)")
                peak = loadgen("ingest", "--url", s.urls[0], "--senders", 50, "--rooms", 10, "--window", 8,
                               "--seconds", 3 if quick else 5, "--server-pid", s.pids()[0])
                rate = peak["acked_per_sec"] / 2
                log(f"sync round {r + 1}: {kind}: {rate:.0f} msg/s open loop (half of {peak['acked_per_sec']:.0f}), lag into PostgreSQL")
                res = loadgen("ingest", "--url", s.urls[0], "--senders", 50, "--rooms", 10, "--rate", f"{rate:.0f}",
                              "--seconds", secs, "--server-pid", s.pids()[0], "--pg-url", f"{PG}/{s.db}")
                res["peak"] = peak["acked_per_sec"]
                raw[kind].append(res)
    m = lambda kind, f: median([f(x) for x in raw[kind]])
    lag = lambda q: (lambda x: (x["pg_visible_lag_ms"] or {}).get(q))
    figures = [
        ("max ingest (closed loop), with write-back", "msg/s", m("chatmesh", lambda x: x["peak"]), m("baseline", lambda x: x["peak"]), True),
        ("ingest rate during the lag measurement (half of max)", "msg/s", m("chatmesh", lambda x: x["acked_per_sec"]),
         m("baseline", lambda x: x["acked_per_sec"]), True),
        ("write-back lag ack → row in PostgreSQL p50", "ms", m("chatmesh", lag("p50")), m("baseline", lag("p50")), False),
        ("write-back lag ack → row in PostgreSQL p99", "ms", m("chatmesh", lag("p99")), m("baseline", lag("p99")), False),
    ]
    return figures, raw


SCENARIOS = {"ingest": scenario_ingest, "fanout": scenario_fanout, "idle": scenario_idle, "sync": scenario_sync}


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}; load generator on the same machine"


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
    return f"{v:,}"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    if len(args) != 1 or args[0] not in list(SCENARIOS) + ["all"]:
        print(f"usage: bench/run.sh {{{'|'.join(SCENARIOS)}|all}} [--quick]", file=sys.stderr)
        return 2
    names = list(SCENARIOS) if args[0] == "all" else [args[0]]
    rounds = 1 if quick else 2
    # 100k idle connections need the descriptors; children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1_048_576
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.makedirs(os.path.join(REPO, "bench/results"), exist_ok=True)
    for name in names:
        started = time.time()
        figures, raw = SCENARIOS[name](quick, rounds)
        rows = []
        for fname, unit, a, b, higher in figures:
            ratio = None
            if a is not None and b is not None and a > 0 and b > 0:
                ratio = a / b if higher else b / a  # > 1: chatmesh is better
            rows.append({"name": fname, "unit": unit, "chatmesh": a, "baseline": b,
                         "ratio": round(ratio, 2) if ratio is not None else None})
        result = {"scenario": name, "machine": machine(), "quick": quick, "rounds": rounds,
                  "seconds": round(time.time() - started, 1),
                  "command": f"bench/run.sh {name}{' --quick' if quick else ''}",
                  "figures": rows, "raw": raw}
        path = os.path.join(REPO, f"bench/results/{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        w = max(len(r["name"]) for r in rows)
        print(f"\n{name} — {result['machine']} — {rounds} round(s), {result['seconds']} s (ratio > 1: chatmesh better)")
        print(f"{'figure':<{w}}  {'unit':>9}  {'chatmesh':>12}  {'baseline':>12}  {'ratio':>6}")
        for r in rows:
            print(f"{r['name']:<{w}}  {r['unit']:>9}  {fmt(r['chatmesh']):>12}  {fmt(r['baseline']):>12}  {fmt(r['ratio']):>6}")
        print(f"results: {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
