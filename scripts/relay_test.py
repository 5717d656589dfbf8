#!/usr/bin/env python3
"""Self-test of scripts/relay.py against a local echo server: python3 scripts/relay_test.py

Starts the relay on port 0 (delay 50 ms one way) in front of an echo server and checks: bytes
arrive intact and in order (several MiB, both directions at once, half-close passed on); a round
trip takes >= 2 x delay and < 2 x delay + a margin; `delay MS` takes effect; during `cut` an echo
gets no reply and the connection is neither closed nor reset, and after `heal` the reply arrives;
a connection opened during a cut reaches nothing (the echo server sees no connection) until heal;
a refused target closes the client; the `ctl` CLI; SIGTERM ends the relay promptly.
"""

import json
import os
import random
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
RELAY = os.path.join(HERE, "relay.py")
DELAY_MS = 50
# Scheduling slack on a loaded 2-core machine (a cargo build may be running beside the test).
MARGIN_MS = float(os.environ.get("RELAY_TEST_MARGIN_MS", "40"))


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        srv = self.server
        with srv.lock:
            srv.accepted += 1
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                break
            with srv.lock:
                srv.received += len(data)
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.lock = threading.Lock()
        self.accepted = 0
        self.received = 0

    def counts(self):
        with self.lock:
            return self.accepted, self.received


def recv_exact(sock, n, timeout):
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def start_relay(routes, delay_ms, tmp):
    ready = os.path.join(tmp, f"ready-{random.randrange(1 << 30)}.json")
    cmd = [sys.executable, RELAY, "--delay-ms", str(delay_ms), "--control", "127.0.0.1:0", "--ready-file", ready]
    for r in routes:
        cmd += ["--route", r]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("relay wrote no ready file in 10 s")
        time.sleep(0.02)
    with open(ready) as f:
        info = json.load(f)
    return proc, info


def addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


class RelayTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.echo = EchoServer()
        threading.Thread(target=cls.echo.serve_forever, daemon=True).start()
        port = cls.echo.server_address[1]
        cls.relay, cls.info = start_relay([f"127.0.0.1:0=127.0.0.1:{port}"], DELAY_MS, cls.tmp.name)
        cls.listen = addr(cls.info["routes"][0]["listen"])
        cls.control = cls.info["control"]

    @classmethod
    def tearDownClass(cls):
        cls.relay.terminate()
        try:
            cls.relay.wait(5)
        except subprocess.TimeoutExpired:
            cls.relay.kill()
        cls.relay.stdout.close()
        cls.relay.stderr.close()
        cls.echo.shutdown()
        cls.echo.server_close()
        cls.tmp.cleanup()

    def setUp(self):
        # Every test starts with the link up and the default delay.
        self.ctl("heal")
        self.ctl(f"delay {DELAY_MS}")

    def ctl(self, line):
        with socket.create_connection(addr(self.control), timeout=5) as s:
            s.sendall((line + "\n").encode())
            f = s.makefile("r")
            answer = f.readline().strip()
        self.assertTrue(answer.startswith("ok"), f"control {line!r} answered {answer!r}")
        return answer

    def connect(self):
        s = socket.create_connection(self.listen, timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addCleanup(s.close)
        return s

    def rtt_ms(self, s, payload=b"ping"):
        t = time.monotonic()
        s.sendall(payload)
        self.assertEqual(recv_exact(s, len(payload), 5), payload)
        return (time.monotonic() - t) * 1000

    def assert_rtts(self, s, delay_ms, n=7):
        rtts = [self.rtt_ms(s, f"msg{i}".encode()) for i in range(n)]
        floor = 2 * delay_ms
        self.assertGreaterEqual(min(rtts), floor, f"round trips {rtts} under 2 x {delay_ms} ms")
        self.assertLess(statistics.median(rtts), floor + MARGIN_MS, f"round trips {rtts}: median over 2 x {delay_ms} + {MARGIN_MS} ms")

    def test_control_answers(self):
        self.assertEqual(self.ctl("status").split()[:3], ["ok", "state=up", f"delay={DELAY_MS}"])
        self.assertEqual(self.ctl("delay 7"), "ok delay 7")
        self.assertIn("delay=7 ", self.ctl("status") + " ")
        with socket.create_connection(addr(self.control), timeout=5) as s:
            s.sendall(b"frobnicate\n")
            self.assertTrue(s.makefile("r").readline().startswith("error"))

    def test_ctl_cli(self):
        out = subprocess.run([sys.executable, RELAY, "ctl", self.control, "status"], capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(out.stdout.startswith("ok state=up"), out.stdout)
        out = subprocess.run([sys.executable, RELAY, "ctl", self.control, "delay", "33"], capture_output=True, text=True, timeout=10)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "ok delay 33"))
        out = subprocess.run([sys.executable, RELAY, "ctl", self.control, "bogus"], capture_output=True, text=True, timeout=10)
        self.assertNotEqual(out.returncode, 0)
        # Nothing listening there: a message and a non-zero exit.
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()
        out = subprocess.run([sys.executable, RELAY, "ctl", f"127.0.0.1:{port}", "status"], capture_output=True, text=True, timeout=10)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("relay ctl", out.stderr)

    def test_intact_and_in_order(self):
        self.ctl("delay 5")
        s = self.connect()
        rng = random.Random(16)
        data = rng.randbytes(6 << 20)  # beyond the relay's queue limit: backpressure engages
        received = bytearray()

        def reader():
            s2 = s.dup()
            s2.settimeout(30)
            while True:
                chunk = s2.recv(1 << 16)
                if not chunk:
                    break
                received.extend(chunk)
            s2.close()

        t = threading.Thread(target=reader)
        t.start()
        i = 0
        while i < len(data):
            n = rng.randrange(1, 70000)
            s.sendall(data[i : i + n])
            i += n
        s.shutdown(socket.SHUT_WR)  # the echo server sees EOF only through the relay
        t.join(60)
        self.assertFalse(t.is_alive(), "no EOF came back through the relay")
        self.assertEqual(len(received), len(data))
        self.assertTrue(received == data, "bytes differ (corrupted or reordered)")

    def test_round_trip_is_twice_the_delay(self):
        s = self.connect()
        self.rtt_ms(s)  # the target connection is made on accept
        self.assert_rtts(s, DELAY_MS)

    def test_delay_change(self):
        s = self.connect()
        self.rtt_ms(s)
        self.assertEqual(self.ctl("delay 10"), "ok delay 10")
        self.assert_rtts(s, 10)
        self.assertEqual(self.ctl("delay 120"), "ok delay 120")
        self.assert_rtts(s, 120, n=3)
        self.assertEqual(self.ctl("delay 0"), "ok delay 0")
        self.assertLess(min(self.rtt_ms(s) for _ in range(5)), MARGIN_MS)

    def test_cut_holds_existing_connection(self):
        s = self.connect()
        self.rtt_ms(s)
        _, before = self.echo.counts()
        self.assertEqual(self.ctl("cut"), "ok cut")
        self.assertIn("state=cut", self.ctl("status"))
        s.sendall(b"during-the-cut")
        s.settimeout(1.0)
        t = time.monotonic()
        with self.assertRaises(socket.timeout, msg="a reply (or a close) came through a cut link"):
            data = s.recv(100)
            # b"" would be a clean close, which a partition must not look like
            self.fail(f"recv during cut returned {data!r}")
        self.assertGreaterEqual(time.monotonic() - t, 0.95)
        self.assertEqual(self.echo.counts()[1], before, "the echo server received bytes during the cut")
        # Still open: more bytes can be written and are held in order.
        s.sendall(b"+more")
        self.assertEqual(self.ctl("heal"), "ok heal")
        t = time.monotonic()
        self.assertEqual(recv_exact(s, 19, 5), b"during-the-cut+more")
        self.assertLess(time.monotonic() - t, 1.0)
        self.rtt_ms(s)  # and the connection goes on

    def test_cut_holds_new_connection(self):
        accepted_before, _ = self.echo.counts()
        self.ctl("cut")
        s = socket.create_connection(self.listen, timeout=5)  # the kernel accepts it
        self.addCleanup(s.close)
        s.sendall(b"hello-from-the-cut")
        s.settimeout(1.0)
        with self.assertRaises(socket.timeout, msg="a reply (or a close) came through a cut link"):
            data = s.recv(100)
            self.fail(f"recv during cut returned {data!r}")
        self.assertEqual(self.echo.counts()[0], accepted_before, "the relay connected to the target during a cut")
        self.assertIn("conns=", self.ctl("status"))
        self.ctl("heal")
        self.assertEqual(recv_exact(s, 18, 5), b"hello-from-the-cut")
        self.assertEqual(self.echo.counts()[0], accepted_before + 1)

    def test_cut_is_not_a_close_for_a_blocked_sender(self):
        s = self.connect()
        self.rtt_ms(s)
        self.ctl("cut")
        # Fill the buffers: a sender must eventually block, not fail.
        s.settimeout(2.0)
        sent = 0
        with self.assertRaises(socket.timeout):
            while True:
                sent += s.send(b"x" * 65536)
                if sent > 256 << 20:
                    self.fail("256 MiB went into a cut link without blocking")
        self.ctl("heal")
        # Everything sent comes back.
        s.settimeout(30)
        got = 0
        while got < sent:
            chunk = s.recv(1 << 20)
            self.assertTrue(chunk, "closed after heal")
            got += len(chunk)
        self.assertEqual(got, sent)


class RelayEdgeTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_refused_target_closes_client(self):
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()
        proc, info = start_relay([f"127.0.0.1:0=127.0.0.1:{port}"], 10, self.tmp.name)
        try:
            s = socket.create_connection(addr(info["routes"][0]["listen"]), timeout=5)
            s.settimeout(5)
            try:
                data = s.recv(10)
            except ConnectionResetError:
                data = b""
            self.assertEqual(data, b"")
            s.close()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    def test_stdout_lines_several_routes_and_sigterm(self):
        echo = EchoServer()
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        self.addCleanup(echo.server_close)
        self.addCleanup(echo.shutdown)
        port = echo.server_address[1]
        proc, info = start_relay([f"127.0.0.1:0=127.0.0.1:{port}", f"127.0.0.1:0=127.0.0.1:{port}"], 0, self.tmp.name)
        try:
            self.assertEqual(len(info["routes"]), 2)
            lines = [proc.stdout.readline().strip() for _ in range(3)]
            for r, line in zip(info["routes"], lines):
                self.assertEqual(line, f"relay: route {r['listen']} -> {r['target']}")
            self.assertEqual(lines[2], f"relay: control {info['control']}")
            conns = [socket.create_connection(addr(r["listen"]), timeout=5) for r in info["routes"]]
            for c in conns:
                c.sendall(b"abc")
                self.assertEqual(recv_exact(c, 3, 5), b"abc")
            t = time.monotonic()
            proc.terminate()
            proc.wait(5)
            self.assertLess(time.monotonic() - t, 2.0, "SIGTERM took too long")
            for c in conns:
                c.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
