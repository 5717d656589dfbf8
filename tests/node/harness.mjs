// One helper for every Node test: spawn the real chatmesh binary on a free port with its own
// data dir, talk to it over REST and with the stock socket.io-client.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync, appendFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { io } from 'socket.io-client';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');

export function binaryPath() {
  const bin = process.env.CHATMESH_BIN || path.join(repoRoot, 'target', 'debug', 'chatmesh');
  if (!existsSync(bin)) {
    // Fail loudly: a suite that passes without the server it tests is worse than none.
    throw new Error(`chatmesh binary not found at ${bin}; build it first (cargo build) or set CHATMESH_BIN`);
  }
  return bin;
}

/**
 * Start one chatmesh instance. `env` overrides settings; `dataDir` reuses a directory (restart tests).
 * Resolves once the server logged its `listening` line.
 */
export async function startServer({ env = {}, dataDir } = {}) {
  const ownDir = !dataDir;
  const dir = dataDir || mkdtempSync(path.join(tmpdir(), 'chatmesh-node-'));
  const childEnv = {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    RUST_LOG: process.env.RUST_LOG || 'info',
    CHATMESH_BIND: '127.0.0.1:0',
    CHATMESH_STORE_URL: `sqlite://${path.join(dir, 'chatmesh.db')}`,
    CHATMESH_LOG_FORMAT: 'json',
    // Tests open many sockets from one IP and burst sends: limits are raised unless a test sets them.
    CHATMESH_AUTH_RATE_PER_MIN: '100000',
    CHATMESH_LOGIN_FAILURES_PER_MIN: '100000',
    CHATMESH_SEND_RATE_PER_SEC: '100000',
    CHATMESH_READ_RATE_PER_SEC: '100000',
    CHATMESH_ROOM_CHANGE_RATE_PER_MIN: '100000',
    CHATMESH_TYPING_RATE_PER_SEC: '100000',
    CHATMESH_DRAIN_DELAY_MS: '0',
    ...env,
  };
  const proc = spawn(binaryPath(), ['serve'], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = [];
  const stderr = [];
  proc.stderr.on('data', (d) => stderr.push(d.toString()));
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));

  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`chatmesh did not start in 30s: ${stderr.join('')}`)), 30000);
    const rl = createInterface({ input: proc.stdout });
    rl.on('line', (line) => {
      let ev;
      try {
        ev = JSON.parse(line);
      } catch {
        return;
      }
      logs.push(ev);
      if (ev.message === 'listening' && ev.addr) {
        clearTimeout(timer);
        resolve(`${ev.scheme === 'https' ? 'https' : 'http'}://${ev.addr}`);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`chatmesh exited early (code ${code}, signal ${signal}): ${stderr.join('')}`));
    });
  });
  return {
    url,
    dataDir: dir,
    proc,
    logs,
    exited,
    /** Send a signal and wait for exit; returns {code, signal}. */
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
    /** Stop and remove the data dir (unless the caller owns it). */
    async close() {
      await this.stop('SIGKILL');
      if (ownDir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** REST call; resolves {status, body, headers}. */
export async function api(url, method, p, body, token, extraHeaders = {}) {
  const headers = { ...extraHeaders };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(url + p, {
    method,
    headers,
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: res.status, body: json, headers: res.headers };
}

let userCounter = 0;
/** Register a fresh user; resolves {user, token}. */
export async function registerUser(url, prefix = 'u') {
  userCounter += 1;
  const username = `${prefix}_${process.pid}_${userCounter}_${Math.floor(Math.random() * 1e6)}`.slice(0, 32);
  const r = await api(url, 'POST', '/api/v1/auth/register', { username, password: 'correct horse battery' });
  if (r.status !== 201) throw new Error(`register failed: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

export async function createRoom(url, token, name = 'room', visibility = 'public') {
  const r = await api(url, 'POST', '/api/v1/rooms', { name, visibility }, token);
  if (r.status !== 201) throw new Error(`create room failed: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

/** Connect a socket.io-client socket; resolves once connected, rejects on connect_error. */
export function connect(url, token, transports = ['websocket'], opts = {}) {
  // withCredentials: in Node, engine.io-client then keeps cookies like a browser does, so a
  // polling session behind HAProxy stays on its instance (the sticky cookie).
  const socket = io(url, { auth: token === undefined ? {} : { token }, transports, reconnection: false, forceNew: true, withCredentials: true, ...opts });
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (err) => {
      socket.close();
      // Transport errors carry the HTTP status / cause in `description`: keep it visible.
      if (err.description !== undefined && err.message !== 'unauthorized') {
        const d = err.description;
        const body = err.context?.responseText ? ` body=${String(err.context.responseText).slice(0, 200)}` : '';
        err.message = `${err.message} (description: ${d?.message ?? d}${body})`;
      }
      reject(err);
    });
  });
}

/** Emit with an ack; resolves the ack payload. */
export function emitAck(socket, event, payload, timeoutMs = 10000) {
  return socket
    .timeout(timeoutMs)
    .emitWithAck(event, payload)
    .catch((err) => {
      // Name the event in the failure (the stock message is only "operation has timed out").
      err.message = `${err.message} [${event} ${String(JSON.stringify(payload)).slice(0, 200)} on ${socket.io?.engine?.transport?.name ?? '?'}]`;
      throw err;
    });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait until predicate() is true, polling. */
export async function waitFor(predicate, timeoutMs = 10000, what = 'condition') {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

// ---- small helpers shared by the conformance, concurrency and reconnect suites ----

/** The password registerUser() gives every user (for login after a restart). */
export const TEST_PASSWORD = 'correct horse battery';

/** POST /auth/login; resolves {user, token} or throws. */
export async function login(url, username, password = TEST_PASSWORD) {
  const r = await api(url, 'POST', '/api/v1/auth/login', { username, password });
  if (r.status !== 200) throw new Error(`login failed: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

/** Record every payload of `event` on `socket` (optionally filtered) into the returned array. */
export function collect(socket, event, filter = () => true) {
  const seen = [];
  socket.on(event, (p) => {
    if (filter(p)) seen.push(p);
  });
  return seen;
}

/** Resolve with the next payload of `event` on `socket` that satisfies `filter`; reject on timeout. */
export function nextEvent(socket, event, filter = () => true, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const on = (p) => {
      if (!filter(p)) return;
      clearTimeout(timer);
      socket.off(event, on);
      resolve(p);
    };
    const timer = setTimeout(() => {
      socket.off(event, on);
      reject(new Error(`timed out after ${timeoutMs}ms waiting for ${event}`));
    }, timeoutMs);
    socket.on(event, on);
  });
}

/** Every message of a room over REST (after_seq paging, limit 500); resolves {messages, head_seq}. */
export async function fetchAllMessages(url, token, roomId) {
  const all = [];
  let after = 0;
  let head = 0;
  for (let page = 0; page < 1000; page++) {
    const r = await api(url, 'GET', `/api/v1/rooms/${roomId}/messages?after_seq=${after}&limit=500`, undefined, token);
    if (r.status !== 200) throw new Error(`history failed: ${r.status} ${JSON.stringify(r.body)}`);
    all.push(...r.body.messages);
    head = r.body.head_seq;
    if (!r.body.has_more) break;
    if (r.body.messages.length === 0) throw new Error('has_more with an empty page');
    after = r.body.messages[r.body.messages.length - 1].seq;
  }
  return { messages: all, head_seq: head };
}

let cmidCounter = 0;
/** A fresh, valid client_msg_id ([A-Za-z0-9_-], <= 64 chars). */
export function newCmid(prefix = 'm') {
  cmidCounter += 1;
  return `${prefix}-${process.pid}-${cmidCounter}-${Math.floor(Math.random() * 1e9)}`.slice(0, 64);
}

/** room:join that must succeed; resolves the ack. */
export async function joinRoom(socket, roomId, extra = {}, timeoutMs = 10000) {
  const ack = await emitAck(socket, 'room:join', { room_id: roomId, ...extra }, timeoutMs);
  if (!ack || ack.ok !== true) throw new Error(`room:join ${roomId} failed: ${JSON.stringify(ack)}`);
  return ack;
}

/** message:send that must succeed; resolves the acked Message. */
export async function sendMessage(socket, roomId, body, clientMsgId = newCmid(), timeoutMs = 10000) {
  const ack = await emitAck(socket, 'message:send', { room_id: roomId, client_msg_id: clientMsgId, body }, timeoutMs);
  if (!ack || ack.ok !== true || !ack.message) throw new Error(`message:send failed: ${JSON.stringify(ack)}`);
  return ack.message;
}

// ---- cluster mode: a private redis-server, a fresh PostgreSQL or MongoDB database, N instances ----

import { execFile, execFileSync } from 'node:child_process';
import { createServer as createNetServer } from 'node:net';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { MongoClient } from 'mongodb';

const PG_HOST = process.env.CHATMESH_TEST_PG_HOST || '127.0.0.1';
const PG_PORT = process.env.CHATMESH_TEST_PG_PORT || '5432';
const PG_USER = process.env.CHATMESH_TEST_PG_USER || 'postgres';

// Children that must not outlive this test process even if a test throws before its after() runs.
const orphanGuards = new Set();
function runOrphanGuards() {
  for (const kill of orphanGuards) {
    try {
      kill();
    } catch {
      // already gone
    }
  }
  orphanGuards.clear();
}
process.on('exit', runOrphanGuards);
let signalHandlersInstalled = false;
/** Also clean up when the runner interrupts this file (Ctrl-C, timeout): installed on first use. */
function guardSignals() {
  if (signalHandlersInstalled) return;
  signalHandlersInstalled = true;
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.once(sig, () => {
      runOrphanGuards();
      process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 })[sig]);
    });
  }
}

/** A TCP port that was free a moment ago (bind :0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createNetServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Run a command; resolves {code, stdout, stderr} (never rejects on a non-zero exit). */
export function run(cmd, args, opts = {}) {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 30000, maxBuffer: 64 << 20, ...opts }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/**
 * Start a private, non-persistent redis-server on a free port (never the machine's 6379).
 * Resolves {port, url, proc, stop()} once `redis-cli ping` answers PONG.
 */
export async function startRedis() {
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
    const { proc, out, stop } = spawnHelper('redis-server', args);
    const deadline = Date.now() + 10000;
    let up = false;
    while (Date.now() < deadline && proc.exitCode === null && proc.signalCode === null) {
      const r = await run('redis-cli', ['-h', '127.0.0.1', '-p', String(port), 'ping'], { timeout: 2000 });
      if (r.stdout.trim() === 'PONG') {
        up = true;
        break;
      }
      await sleep(50);
    }
    if (up) return { port, url: `redis://127.0.0.1:${port}`, proc, stop };
    await stop();
    if (attempt === 4) throw new Error(`redis-server did not start on port ${port}: ${out.join('')}`);
  }
  throw new Error('unreachable');
}

function psqlArgs(db, sql) {
  return ['-h', PG_HOST, '-p', PG_PORT, '-U', PG_USER, '-d', db, '-v', 'ON_ERROR_STOP=1', '-Atc', sql];
}

/** Run one SQL statement with psql; resolves the rows (arrays of strings, `|`-separated fields). */
export async function pgQuery(db, sql) {
  const r = await run('psql', psqlArgs(db, sql));
  if (r.code !== 0) throw new Error(`psql -d ${db} -c ${JSON.stringify(sql)} failed: ${r.stderr.trim()}`);
  return r.stdout
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => l.split('|'));
}

/** Create a fresh PostgreSQL database on the machine's server; resolves {name, url, query(sql), drop()}. */
export async function createPgDatabase(prefix = 'chatmesh_node_') {
  const name = `${prefix}${randomBytes(6).toString('hex')}`;
  await pgQuery('postgres', `CREATE DATABASE ${name}`);
  const drop = async () => {
    orphanGuards.delete(guard);
    await pgQuery('postgres', `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  };
  // Last resort on exit (synchronous, best effort).
  const guard = () => {
    execFileSync('psql', psqlArgs('postgres', `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`), { stdio: 'ignore', timeout: 10000 });
  };
  orphanGuards.add(guard);
  return {
    kind: 'postgres',
    label: 'PostgreSQL',
    name,
    url: `postgres://${PG_USER}@${PG_HOST}:${PG_PORT}/${name}`,
    query: (sql) => pgQuery(name, sql),
    /** How many messages of the room are stored. */
    async countMessages(roomId) {
      const [[count]] = await pgQuery(name, `select count(*) from messages where room_id='${roomId}'`);
      return Number(count);
    },
    /** The room's stored messages in seq order: [{seq, id, sender_id, client_msg_id, body}]. */
    async messages(roomId) {
      const rows = await pgQuery(name, `select seq, id, sender_id, client_msg_id, body from messages where room_id='${roomId}' order by seq`);
      return rows.map(([seq, id, sender_id, client_msg_id, body]) => ({ seq: Number(seq), id, sender_id, client_msg_id, body }));
    },
    drop,
  };
}

/** `secantusd-py` (SecantusDB, PyPI `secantusdb`): on PATH, else in .tools/venv; throws how to install it. */
export function secantusBinary() {
  const onPath = (process.env.PATH || '').split(path.delimiter).map((d) => path.join(d, 'secantusd-py')).find((p) => existsSync(p));
  const venv = path.join(repoRoot, '.tools', 'venv', 'bin', 'secantusd-py');
  const bin = onPath || (existsSync(venv) ? venv : null);
  if (!bin) {
    // Fail loudly: the MongoDB parameterisation must never pass without its store.
    throw new Error(
      `secantusd-py (SecantusDB ${SECANTUS_VERSION}) is not installed: not on PATH and not at ${venv}. ` +
        'Install it with `scripts/setup.sh --test`, or set CHATMESH_TEST_MONGODB_URL to a real mongod replica set',
    );
  }
  return bin;
}
const SECANTUS_VERSION = '0.7.0b3';

/**
 * Start a private SecantusDB server (a MongoDB-wire server that answers as the primary of a
 * one-member replica set `secantus`) on a free port in its own temp dir. Resolves {port, url(db),
 * stop()} once it logged that it listens; stop() kills it and removes the dir.
 */
export async function startSecantus() {
  const bin = secantusBinary();
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const dir = mkdtempSync(path.join(tmpdir(), 'chatmesh-secantus-'));
    // An empty config of our own: no ./secantusd.toml or ~/.secantus of the machine is read.
    writeFileSync(path.join(dir, 'secantusd.toml'), '');
    const args = ['--config', path.join(dir, 'secantusd.toml'), '--host', '127.0.0.1', '--port', String(port)];
    args.push('--storage-path', path.join(dir, 'data'), '--cache-size', '128M');
    const proc = spawn(bin, args, { cwd: dir, env: { ...process.env, PYTHONUNBUFFERED: '1', PYTHONDONTWRITEBYTECODE: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
    const out = [];
    proc.stdout.on('data', (d) => out.push(d.toString()));
    proc.stderr.on('data', (d) => out.push(d.toString()));
    const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
    const guard = () => {
      proc.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    };
    guardSignals();
    orphanGuards.add(guard);
    const stop = async () => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
      rmSync(dir, { recursive: true, force: true });
      orphanGuards.delete(guard);
    };
    const deadline = Date.now() + 30000;
    const listening = `listening on 127.0.0.1:${port}`;
    while (Date.now() < deadline && proc.exitCode === null && proc.signalCode === null && !out.join('').includes(listening)) {
      await sleep(50);
    }
    if (out.join('').includes(listening)) {
      return { port, url: (db) => `mongodb://127.0.0.1:${port}/${db}?replicaSet=secantus`, stop };
    }
    await stop();
    if (!out.join('').includes('Address already in use') || attempt === 4) {
      throw new Error(`secantusd-py did not start on port ${port}: ${out.join('').slice(-3000)}`);
    }
  }
  throw new Error('unreachable');
}

/**
 * A fresh MongoDB database: on the deployment CHATMESH_TEST_MONGODB_URL names (a real mongod replica
 * set), else on a private SecantusDB server started for it. Resolves {kind, label, name, url,
 * messages(roomId), drop()}; drop() drops the database and stops the private server.
 */
export async function createMongoDatabase(prefix = 'chatmesh_node_') {
  const name = `${prefix}${randomBytes(6).toString('hex')}`;
  const override = process.env.CHATMESH_TEST_MONGODB_URL?.trim();
  const server = override ? null : await startSecantus();
  // The override's path replaced by our database (options kept; credentials keep their authSource).
  const withDb = (u) => {
    const [base, query] = u.split('?');
    const at = base.indexOf('://') + 3;
    const slash = base.indexOf('/', at);
    const creds = base.slice(at, slash < 0 ? undefined : slash).includes('@');
    const path = slash < 0 ? '' : base.slice(slash + 1);
    const params = new URLSearchParams(query || '');
    if (creds && !params.has('authSource')) params.set('authSource', path || 'admin');
    const q = params.toString();
    return `${slash < 0 ? base : base.slice(0, slash)}/${name}${q ? `?${q}` : ''}`;
  };
  const url = override ? withDb(override) : server.url(name);
  const client = new MongoClient(url, { serverSelectionTimeoutMS: 5000 });
  const drop = async () => {
    try {
      await client.db(name).dropDatabase();
      await client.close();
    } finally {
      await server?.stop();
    }
  };
  return {
    kind: 'mongodb',
    label: override ? 'MongoDB' : 'MongoDB (SecantusDB)',
    name,
    url,
    /** How many messages of the room are stored. */
    async countMessages(roomId) {
      return client.db(name).collection('messages').countDocuments({ room_id: roomId });
    },
    /** The room's stored messages in seq order: [{seq, id, sender_id, client_msg_id, body}]. */
    async messages(roomId) {
      const docs = await client.db(name).collection('messages').find({ room_id: roomId }).sort({ seq: 1 }).toArray();
      return docs.map((d) => ({ seq: Number(d.seq), id: d._id, sender_id: d.sender_id, client_msg_id: d.client_msg_id, body: d.body }));
    },
    drop,
  };
}


/** Resolve once GET /health/ready answers 200 on every server. */
export async function waitReady(servers, timeoutMs = 30000) {
  const last = new Map();
  await waitFor(
    async () => {
      const rs = await Promise.all(
        servers.map((s) =>
          api(s.url, 'GET', '/health/ready').catch((e) => ({ status: 0, body: String(e) })),
        ),
      );
      rs.forEach((r, i) => last.set(servers[i].instanceId ?? i, `${r.status} ${JSON.stringify(r.body)}`));
      return rs.every((r) => r.status === 200);
    },
    timeoutMs,
    'GET /health/ready 200 on every instance',
  ).catch((e) => {
    throw new Error(`${e.message}: ${[...last].map(([k, v]) => `${k}: ${v}`).join('; ')}`);
  });
}

/**
 * Start the link between regions: scripts/relay.py (a delaying TCP relay that can cut the link
 * like a partition) with one route per target. Resolves {listen: ['127.0.0.1:p', ...] (one per
 * target, in order), ctl(command), stop()}.
 */
export async function startLink(targets, delayMs = 25) {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatmesh-link-'));
  const ready = path.join(dir, 'ready.json');
  const args = [path.join(repoRoot, 'scripts', 'relay.py')];
  for (const t of targets) args.push('--route', `127.0.0.1:0=${t}`);
  args.push('--delay-ms', String(delayMs), '--control', '127.0.0.1:0', '--ready-file', ready);
  const { out, stop } = spawnHelper('python3', args, dir);
  let info;
  await waitFor(() => {
    try {
      info = JSON.parse(readFileSync(ready, 'utf8'));
      return true;
    } catch {
      return false;
    }
  }, 10000, 'scripts/relay.py ready').catch((e) => {
    throw new Error(`${e.message}: ${out.join('')}`);
  });
  return {
    listen: info.routes.map((r) => r.listen),
    async ctl(command) {
      const r = await run('python3', [path.join(repoRoot, 'scripts', 'relay.py'), 'ctl', info.control, ...command.split(' ')]);
      if (r.code !== 0 || !r.stdout.startsWith('ok')) throw new Error(`relay ${command}: ${r.stdout}${r.stderr}`);
    },
    stop,
  };
}

/**
 * Spawn a helper process (Redis, a relay, HAProxy) that the test owns: killed on a signal to the
 * test, its output kept in `out`; `stop()` kills it, waits and removes `dir` (if given).
 */
function spawnHelper(cmd, args, dir = null) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const out = [];
  proc.stdout.on('data', (d) => out.push(d.toString()));
  proc.stderr.on('data', (d) => out.push(d.toString()));
  const exited = new Promise((resolve) => proc.on('exit', resolve));
  const guard = () => proc.kill('SIGKILL');
  guardSignals();
  orphanGuards.add(guard);
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await exited;
    orphanGuards.delete(guard);
    if (dir) rmSync(dir, { recursive: true, force: true });
  };
  return { proc, out, stop };
}

/**
 * Start HAProxy in front of `servers` ([{name, addr: 'host:port'}]) with the deploy configuration
 * (deploy/haproxy/gen-haproxy-cfg.sh: health checks, sticky cookie, timeouts), an internal
 * frontend for peer regions when `internal` is set, and one frontend per server that pins every
 * request to it (through the backend, by its sticky cookie), so a test can still choose the
 * instance it talks to; `internalPort` binds the internal frontend there. Resolves {lb, internal,
 * pins: {name: url}, stop()}.
 */
export async function startHaproxy(servers, { internal = false, internalPort: wanted } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatmesh-haproxy-'));
  const cfg = path.join(dir, 'haproxy.cfg');
  const [lbPort, statsPort, freeInternal, ...pinPorts] = await Promise.all(
    Array.from({ length: 3 + servers.length }, () => freePort()),
  );
  const internalPort = wanted ?? freeInternal;
  const args = [
    '--bind', `127.0.0.1:${lbPort}`, '--stats', `127.0.0.1:${statsPort}`, '--stats-socket', path.join(dir, 'haproxy.sock'),
    '--log', 'stdout', '--maxconn', '4000', '--server-maxconn', '1000', '--name-prefix', 'pin-', '--out', cfg,
  ];
  if (internal) args.push('--internal-bind', `127.0.0.1:${internalPort}`);
  const gen = await run(path.join(repoRoot, 'deploy', 'haproxy', 'gen-haproxy-cfg.sh'), [...args, ...servers.map((x) => x.addr)]);
  if (gen.code !== 0) throw new Error(`gen-haproxy-cfg.sh: ${gen.stderr}`);
  // The generator names the servers pin-1.. in the order given; the cookie value is the name.
  const pins = servers.map((x, i) => [
    `frontend pin_${x.name}`,
    `    bind 127.0.0.1:${pinPorts[i]}`,
    '    http-request del-header X-Forwarded-For',
    `    http-request set-header Cookie SERVERID=pin-${i + 1}`,
    '    default_backend chatmesh',
    '',
  ].join('\n'));
  appendFileSync(cfg, `\n${pins.join('\n')}`);
  const check = await run('haproxy', ['-c', '-q', '-f', cfg]);
  if (check.code !== 0) throw new Error(`haproxy -c rejected ${cfg}: ${check.stdout}${check.stderr}`);
  const { out, stop } = spawnHelper('haproxy', ['-db', '-f', cfg], dir);
  const lb = `http://127.0.0.1:${lbPort}`;
  await waitFor(async () => (await api(lb, 'GET', '/health/live').catch(() => ({ status: 0 }))).status === 200, 10000, 'HAProxy answers')
    .catch(async (e) => {
      await stop();
      throw new Error(`${e.message}: ${out.join('')}`);
    });
  return {
    lb,
    internal: internal ? `127.0.0.1:${internalPort}` : null,
    pins: Object.fromEntries(servers.map((x, i) => [x.name, `http://127.0.0.1:${pinPorts[i]}`])),
    stop,
  };
}

/**
 * Start a cluster of `n` instances (ids n1..nN) on a private Redis and a fresh database of `store`
 * ('postgres': the machine's PostgreSQL; 'mongodb': see createMongoDatabase), sharing one JWT
 * secret, one cluster secret and one Redis key prefix. Resolves once every instance is ready.
 * Returns {servers, redis, db, prefix, env, close()}; each server also has `instanceId`; `db` has
 * `kind`, `label`, `url` and `messages(roomId)` whatever the store.
 *
 * With `regions: 2`, every region has its own HAProxy (startHaproxy) in front of its instances:
 * each server's `url` goes through it, pinned to that instance (`direct` is the instance itself),
 * `lbs` are the regions' balanced frontends, and the regions reach each other through the link and
 * the other region's internal frontend, as in production (deploy/README.md).
 */
export async function startCluster(n = 3, extraEnv = {}, { store = 'postgres', regions = 1, linkDelayMs = 25 } = {}) {
  if (!['postgres', 'mongodb'].includes(store)) throw new Error(`startCluster: unknown store ${store}`);
  if (![1, 2].includes(regions) || n < regions) throw new Error(`startCluster: regions must be 1 or 2 (and at most n)`);
  // With 2 regions, instance i is in region a (i even) or b (i odd), each region on its own Redis,
  // and every request between them crosses the delaying link (scripts/relay.py).
  const names = regions === 2 ? ['a', 'b'] : [null];
  const redises = [];
  for (let r = 0; r < regions; r++) redises.push(await startRedis());
  const redis = redises[0];
  const ports = regions === 2 ? await Promise.all(Array.from({ length: n }, () => freePort())) : [];
  // The regions' internal frontends (HAProxy), where the link delivers: chosen now, bound once
  // the instances are up (a peer that does not answer yet is retried by the instances).
  const internals = regions === 2 ? await Promise.all(names.map(() => freePort())) : [];
  const proxies = [];
  let link;
  let db;
  const servers = [];
  try {
    if (regions === 2) link = await startLink([`127.0.0.1:${internals[1]}`, `127.0.0.1:${internals[0]}`], linkDelayMs);
    db = store === 'mongodb' ? await createMongoDatabase() : await createPgDatabase();
    const env = {
      CHATMESH_REDIS_URL: redis.url,
      CHATMESH_STORE_URL: db.url,
      CHATMESH_JWT_SECRET: `jwt-${randomBytes(24).toString('hex')}`,
      CHATMESH_CLUSTER_SECRET: `cluster-${randomBytes(24).toString('hex')}`,
      CHATMESH_REDIS_PREFIX: `t${randomBytes(5).toString('hex')}`,
      // In cluster mode the operations views need it.
      CHATMESH_ADMIN_TOKEN: `admin-${randomBytes(12).toString('hex')}`,
      ...extraEnv,
    };
    const regionEnv = (i) => {
      if (regions === 1) return {};
      const r = i % 2;
      return {
        CHATMESH_BIND: `127.0.0.1:${ports[i]}`,
        CHATMESH_REDIS_URL: redises[r].url,
        CHATMESH_REGION: names[r],
        // Region a reaches b's HAProxy through route 0, b reaches a's through 1.
        CHATMESH_PEER_REGIONS: r === 0 ? `b=http://${link.listen[0]}` : `a=http://${link.listen[1]}`,
      };
    };
    const boot = async (i) => {
      const s = await startServer({ env: { ...env, ...regionEnv(i), CHATMESH_INSTANCE_ID: `n${i + 1}` } });
      s.instanceId = `n${i + 1}`;
      s.region = names[i % regions];
      orphanGuards.add((s.guard = () => s.proc.kill('SIGKILL')));
      servers[i] = s;
    };
    // The first instance applies the migrations on the empty database, the others start together.
    await boot(0);
    await Promise.all(Array.from({ length: n - 1 }, (_, i) => boot(i + 1)));
    await waitReady(servers);
    if (regions === 2) {
      for (let r = 0; r < 2; r++) {
        const mine = servers.filter((s) => s.region === names[r]);
        const backends = mine.map((s) => ({ name: s.instanceId, addr: new URL(s.url).host }));
        const proxy = await startHaproxy(backends, { internal: true, internalPort: internals[r] });
        proxies.push(proxy);
        for (const s of mine) {
          s.direct = s.url;
          s.url = proxy.pins[s.instanceId];
        }
      }
      await waitReady(servers);
    }
    return {
      servers,
      redis,
      db,
      link,
      regions,
      lbs: proxies.map((p) => p.lb),
      prefix: env.CHATMESH_REDIS_PREFIX,
      env,
      async close() {
        await Promise.all(servers.filter(Boolean).map(async (s) => {
          await s.close();
          orphanGuards.delete(s.guard);
        }));
        for (const p of proxies) await p.stop();
        await db.drop();
        await link?.stop();
        for (const r of redises) await r.stop();
      },
    };
  } catch (e) {
    await Promise.all(servers.filter(Boolean).map((s) => s.close().then(() => orphanGuards.delete(s.guard))));
    for (const p of proxies) await p.stop();
    await db?.drop().catch(() => {});
    await link?.stop();
    for (const r of redises) await r.stop();
    throw e;
  }
}
