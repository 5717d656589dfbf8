// One helper for every Node test: spawn the real chatmesh binary on a free port with its own
// data dir, talk to it over REST and with the stock socket.io-client.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
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
    CHATMESH_SEND_RATE_PER_SEC: '100000',
    CHATMESH_DRAIN_DELAY_MS: '0',
    ...env,
  };
  const proc = spawn(binaryPath(), ['serve'], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = [];
  const stderr = [];
  proc.stderr.on('data', (d) => stderr.push(d.toString()));
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));

  const addr = await new Promise((resolve, reject) => {
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
        resolve(ev.addr);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`chatmesh exited early (code ${code}, signal ${signal}): ${stderr.join('')}`));
    });
  });
  const url = `http://${addr}`;
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
  const socket = io(url, { auth: token === undefined ? {} : { token }, transports, reconnection: false, forceNew: true, ...opts });
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
