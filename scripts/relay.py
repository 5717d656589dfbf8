#!/usr/bin/env python3
"""A delaying TCP relay that can cut and heal its link: a test tool, not part of chatmesh.

This machine's kernel has no netem qdisc, so the link delay between two local "regions" comes
from this relay: every byte read from one side is written to the other `delay` ms later (one way;
each direction gets the delay), in order, with TCP_NODELAY on both sockets.

    relay.py --route LISTEN_HOST:PORT=TARGET_HOST:PORT [--route ...] [--delay-ms 25]
             [--control 127.0.0.1:PORT] [--ready-file PATH] [--verbose]
    relay.py ctl HOST:PORT cut | heal | delay MS | status

Port 0 is allowed for the listen and control ports. Once everything is bound the relay prints
`relay: route LISTEN_HOST:PORT -> TARGET_HOST:PORT` per route and `relay: control HOST:PORT`, and
writes the ready file (JSON, atomically): {"routes": [{"listen": "h:p", "target": "h:p"}],
"control": "h:p"}.

Control protocol (one line in, one line out, on the control port):
    cut        -> ok cut         a partition: nothing is read from or written to any connection
                                 (senders fill their buffers and block, readers hang; no FIN, no
                                 RST); new connections are accepted and held, not connected on
    heal       -> ok heal        held data flows in order, held connections are connected on
    delay MS   -> ok delay MS    for bytes read from now on
    status     -> ok state=up|cut delay=MS conns=N

A target that refuses a connection gets the client side closed. SIGTERM/SIGINT: exit at once.
Python 3.11+, standard library only.
"""

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import sys

# Per direction: above HIGH bytes queued the source stops being read until the queue is under LOW.
QUEUE_HIGH = 1 << 20
QUEUE_LOW = 256 << 10
WRITE_HIGH = 256 << 10  # the transport's own buffer: above it, the queue waits (pause_writing)

EOF = object()  # the source half-closed: shut down the destination's write side
CLOSE = object()  # the source is gone: close the pair


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def fmt_addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fmt_ms(ms):
    return str(int(ms)) if float(ms).is_integer() else f"{ms:g}"


class Relay:
    def __init__(self, delay_ms, verbose=False):
        self.delay_ms = delay_ms
        self.cut = False
        self.pairs = set()
        self.verbose = verbose

    def log(self, msg):
        if self.verbose:
            print(f"relay: {msg}", file=sys.stderr, flush=True)

    def set_cut(self, cut):
        if cut == self.cut:
            return
        self.cut = cut
        for pair in list(self.pairs):
            if cut:
                pair.on_cut()
            else:
                pair.on_heal()

    def status(self):
        state = "cut" if self.cut else "up"
        return f"ok state={state} delay={fmt_ms(self.delay_ms)} conns={len(self.pairs)}"


class Side(asyncio.Protocol):
    """One socket of a pair (the accepted client, or the connection to the target)."""

    def __init__(self, pair):
        self.pair = pair
        self.transport = None
        self.write_paused = False
        self.closed = False
        self.outbound = None  # Direction reading from this side
        self.inbound = None  # Direction writing to this side

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        # Nothing is read until the pair says so (target connected, link up).
        transport.pause_reading()

    def data_received(self, data):
        self.outbound.push(data)

    def eof_received(self):
        self.outbound.push(EOF)
        self.update_reading()
        return True  # keep our write side open: the other direction may still have data

    def connection_lost(self, exc):
        self.closed = True
        self.pair.side_lost(self)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if self.inbound is not None:
            self.inbound.flush()

    def update_reading(self):
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        want = (
            not self.pair.relay.cut
            and self.pair.state == "open"
            and not self.outbound.eof_seen
            and not self.outbound.backpressure
        )
        if want and not t.is_reading():
            t.resume_reading()
        elif not want and t.is_reading():
            t.pause_reading()


class Direction:
    """Chunks read from src, each written to dst `delay` after it was read, in order."""

    def __init__(self, pair, src, dst):
        self.pair = pair
        self.src = src
        self.dst = dst
        self.queue = collections.deque()  # (due, bytes | EOF | CLOSE)
        self.queued = 0
        self.timer = None
        self.eof_seen = False
        self.eof_delivered = False
        self.backpressure = False
        src.outbound = self
        dst.inbound = self

    def push(self, item):
        loop = asyncio.get_running_loop()
        if item is EOF:
            if self.eof_seen:
                return
            self.eof_seen = True
        elif item is not CLOSE:
            self.queued += len(item)
        self.queue.append((loop.time() + self.pair.relay.delay_ms / 1000.0, item))
        if self.queued >= QUEUE_HIGH and not self.backpressure:
            self.backpressure = True
            self.src.update_reading()
        if self.timer is None:
            self.flush()

    def stop_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def flush(self):
        self.stop_timer()
        loop = asyncio.get_running_loop()
        relay = self.pair.relay
        while self.queue:
            if relay.cut or self.pair.state != "open":
                break
            due, item = self.queue[0]
            if item is not CLOSE and (self.dst.write_paused or self.dst.closed):
                break
            now = loop.time()
            if due > now:
                self.timer = loop.call_at(due, self.flush)
                break
            self.queue.popleft()
            if item is CLOSE:
                self.pair.close()
                return
            if item is EOF:
                self.eof_delivered = True
                t = self.dst.transport
                if t.can_write_eof():
                    t.write_eof()
                if self.pair.other(self).eof_delivered or not t.can_write_eof():
                    self.pair.close()
                    return
                continue
            self.queued -= len(item)
            self.dst.transport.write(item)
        if self.backpressure and self.queued < QUEUE_LOW:
            self.backpressure = False
            self.src.update_reading()


class Pair:
    """An accepted connection and its connection to the target."""

    def __init__(self, relay, route):
        self.relay = relay
        self.route = route
        self.state = "pending"  # pending -> connecting -> open -> closed
        self.client = Side(self)
        self.target = Side(self)
        self.up = Direction(self, self.client, self.target)
        self.down = Direction(self, self.target, self.client)
        relay.pairs.add(self)

    def other(self, direction):
        return self.down if direction is self.up else self.up

    def start(self):
        """Connect to the target unless the link is cut (then on heal)."""
        if self.state != "pending" or self.relay.cut:
            return
        self.state = "connecting"
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self):
        host, port = self.route.target
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.target, host, port)
        except OSError as e:
            self.relay.log(f"{self.route.name}: connect to {fmt_addr(host, port)} failed: {e}")
            self.close()
            return
        if self.state != "connecting":  # the client went away meanwhile
            self.target.transport.close()
            return
        self.state = "open"
        self.relay.log(f"{self.route.name}: connected")
        self.on_heal()

    def on_cut(self):
        for d in (self.up, self.down):
            d.stop_timer()
        for s in (self.client, self.target):
            s.update_reading()

    def on_heal(self):
        if self.state == "pending":
            self.start()
            return
        for s in (self.client, self.target):
            s.update_reading()
        for d in (self.up, self.down):
            d.flush()

    def side_lost(self, side):
        if self.state == "closed":
            return
        if side is self.client and self.state in ("pending", "connecting"):
            self.close()
            return
        # The loss travels like the bytes before it: the other side is closed `delay` later.
        side.outbound.push(CLOSE)

    def close(self):
        if self.state == "closed":
            return
        self.state = "closed"
        for d in (self.up, self.down):
            d.stop_timer()
            d.queue.clear()
        for s in (self.client, self.target):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.close()
        self.relay.pairs.discard(self)

    def abort(self):
        self.state = "closed"
        for d in (self.up, self.down):
            d.stop_timer()
        for s in (self.client, self.target):
            if s.transport is not None:
                s.transport.abort()
        self.relay.pairs.discard(self)


class Route:
    def __init__(self, spec):
        listen, sep, target = spec.partition("=")
        if not sep:
            raise ValueError(f"not LISTEN_HOST:PORT=TARGET_HOST:PORT: {spec!r}")
        self.listen = parse_addr(listen)
        self.target = parse_addr(target)
        self.bound = None
        self.name = ""


async def control_session(relay, reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode("utf-8", "replace").split()
            if words == ["cut"]:
                relay.set_cut(True)
                answer = "ok cut"
            elif words == ["heal"]:
                relay.set_cut(False)
                answer = "ok heal"
            elif words == ["status"]:
                answer = relay.status()
            elif len(words) == 2 and words[0] == "delay":
                try:
                    ms = float(words[1])
                    if not (0 <= ms <= 3_600_000):
                        raise ValueError
                except ValueError:
                    answer = f"error bad delay {words[1]!r} (milliseconds, 0..3600000)"
                else:
                    relay.delay_ms = ms
                    answer = f"ok delay {fmt_ms(ms)}"
            else:
                answer = "error unknown command (cut | heal | delay MS | status)"
            relay.log(f"control: {' '.join(words)} -> {answer}")
            writer.write((answer + "\n").encode())
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def write_ready_file(path, data):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(tmp, path)


async def serve(args):
    loop = asyncio.get_running_loop()
    relay = Relay(args.delay_ms, args.verbose)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    servers = []
    for route in args.route:

        def factory(route=route):
            pair = Pair(relay, route)
            # The accepted socket is held; its target connection is made now, or on heal.
            loop.call_soon(pair.start)
            return pair.client

        host, port = route.listen
        server = await loop.create_server(factory, host, port, reuse_address=True)
        servers.append(server)
        bound = server.sockets[0].getsockname()
        route.bound = fmt_addr(host, bound[1])
        route.name = f"{route.bound}->{fmt_addr(*route.target)}"
        print(f"relay: route {route.bound} -> {fmt_addr(*route.target)}", flush=True)

    ready = {"routes": [{"listen": r.bound, "target": fmt_addr(*r.target)} for r in args.route]}
    if args.control:
        host, port = args.control
        server = await asyncio.start_server(lambda r, w: control_session(relay, r, w), host, port, reuse_address=True)
        servers.append(server)
        ready["control"] = fmt_addr(host, server.sockets[0].getsockname()[1])
        print(f"relay: control {ready['control']}", flush=True)
    else:
        ready["control"] = None
    if args.ready_file:
        write_ready_file(args.ready_file, ready)

    await stop.wait()
    relay.log("stopping")
    for server in servers:
        server.close()
    for pair in list(relay.pairs):
        pair.abort()
    return 0


def ctl(argv):
    if len(argv) < 2:
        print("usage: relay.py ctl HOST:PORT cut|heal|delay MS|status", file=sys.stderr)
        return 2
    try:
        host, port = parse_addr(argv[0])
    except ValueError as e:
        print(f"relay ctl: {e}", file=sys.stderr)
        return 2
    line = " ".join(argv[1:])
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall((line + "\n").encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        print(f"relay ctl: {fmt_addr(host, port)}: {e}", file=sys.stderr)
        return 1
    answer = data.decode("utf-8", "replace").strip()
    if not answer:
        print(f"relay ctl: {fmt_addr(host, port)}: no answer", file=sys.stderr)
        return 1
    print(answer)
    return 0 if answer.startswith("ok") else 1


def main(argv):
    if argv and argv[0] == "ctl":
        return ctl(argv[1:])
    p = argparse.ArgumentParser(description="Delaying TCP relay with cut/heal control (a test tool).")
    p.add_argument("--route", action="append", required=True, type=Route, metavar="LISTEN_HOST:PORT=TARGET_HOST:PORT")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay per direction (default 25)")
    p.add_argument("--control", type=parse_addr, metavar="HOST:PORT", help="control port (cut/heal/delay/status)")
    p.add_argument("--ready-file", metavar="PATH", help="JSON written once everything is bound")
    p.add_argument("--verbose", action="store_true", help="log connections and control commands to stderr")
    args = p.parse_args(argv)
    if args.delay_ms < 0:
        p.error("--delay-ms must be >= 0")
    try:
        return asyncio.run(serve(args))
    except OSError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
