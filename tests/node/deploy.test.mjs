// The deployment stack end to end: scripts/local-cluster.sh brings up Redis primary + replica +
// 3 Sentinels (deploy/redis), a fresh PostgreSQL database, 3 chatmesh instances (ack level
// `replica`) and HAProxy (deploy/haproxy) on its own ports and state dir; every client talks to
// HAProxy only. Then `down` must leave nothing running.
//
// Needs haproxy, redis-server and a PostgreSQL server on 127.0.0.1:5432 (scripts/setup.sh --test
// installs them): a missing one FAILS this file, it is never skipped. The binary is CHATMESH_BIN
// when set (what scripts/test.sh built), else the script builds the release binary itself.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, existsSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  repoRoot,
  api,
  registerUser,
  createRoom,
  connect,
  joinRoom,
  sendMessage,
  collect,
  waitFor,
  run,
  pgQuery,
} from './harness.mjs';

const SCRIPT = path.join(repoRoot, 'scripts', 'local-cluster.sh');
const INSTANCES = 3;
const stateDir = realpathSync(mkdtempSync(path.join(tmpdir(), 'chatmesh-deploy-')));
const dbName = `chatmesh_deploy_${randomBytes(5).toString('hex')}`;
let portBase; // chosen in before(): HAProxy portBase, stats portBase+1 (layout: local-cluster.sh)
let lb; // http://127.0.0.1:<portBase>
let statsUrl;
let wentDown = false;
const sockets = new Set();

function scriptEnv() {
  const env = {
    ...process.env,
    LOCAL_CLUSTER_DIR: stateDir,
    LOCAL_CLUSTER_PORT_BASE: String(portBase),
    LOCAL_CLUSTER_INSTANCES: String(INSTANCES),
    LOCAL_CLUSTER_DB: dbName,
  };
  if (process.env.CHATMESH_BIN) env.LOCAL_CLUSTER_BIN = process.env.CHATMESH_BIN;
  return env;
}

/** Run scripts/local-cluster.sh <args>; resolves {code, stdout, stderr}. */
function cluster(args, timeout = 120000) {
  return run('bash', [SCRIPT, ...args], { env: scriptEnv(), timeout, cwd: repoRoot });
}

/** Last resort (exit, signal): stop and purge synchronously. */
function purgeSync() {
  if (portBase === undefined) return;
  try {
    execFileSync('bash', [SCRIPT, 'down', '--purge'], { env: scriptEnv(), stdio: 'ignore', timeout: 60000 });
  } catch {
    // best effort
  }
}
process.on('exit', () => {
  if (!wentDown) purgeSync();
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    purgeSync();
    process.exit(130);
  });
}

/** Processes whose working directory is in the state dir: every process the script starts. */
function stackProcesses() {
  const found = [];
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let cwd;
    try {
      cwd = readlinkSync(`/proc/${pid}/cwd`);
    } catch {
      continue; // gone, a zombie, or not ours to read
    }
    if (cwd === stateDir || cwd.startsWith(stateDir + path.sep)) {
      let comm = '?';
      try {
        comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
      } catch {
        // exited meanwhile
      }
      found.push({ pid: Number(pid), comm, cwd });
    }
  }
  return found;
}

function alive(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z /.test(stat); // a zombie has exited
  } catch {
    return false;
  }
}

function portFree(port) {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A port base whose whole layout is free, below the ephemeral range other tests draw from. */
async function pickPortBase() {
  const offsets = [0, 1, 10, 11, 12, 20, 21, 30, 31, 32];
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + 40 * Math.floor(Math.random() * 250);
    const free = await Promise.all(offsets.map((o) => portFree(base + o)));
    if (free.every(Boolean)) return base;
  }
  throw new Error('no free port layout found in 20000..30000');
}

async function requireTool(cmd, args, what) {
  const r = await run(cmd, args, { timeout: 10000 });
  if (r.code !== 0) {
    throw new Error(`${what} is missing or broken (\`${cmd} ${args.join(' ')}\` exit ${r.code}: ${r.stderr.trim()}); run scripts/setup.sh --test`);
  }
}

/** The chatmesh backend's servers from HAProxy's stats CSV: [{name, status, check}]. */
async function backendServers() {
  const res = await fetch(`${statsUrl}/stats;csv`);
  assert.equal(res.status, 200, 'HAProxy stats CSV answers 200');
  const [header, ...rows] = (await res.text()).trim().split('\n');
  const cols = header.replace(/^# /, '').split(',');
  const at = (row, name) => row.split(',')[cols.indexOf(name)];
  return rows
    .filter((r) => at(r, 'pxname') === 'chatmesh' && !['FRONTEND', 'BACKEND'].includes(at(r, 'svname')))
    .map((r) => ({ name: at(r, 'svname'), status: at(r, 'status'), check: at(r, 'check_status') }));
}

before(async () => {
  // Fail, never skip, when the stack cannot be built here.
  await requireTool('haproxy', ['-v'], 'haproxy');
  await requireTool('redis-server', ['--version'], 'redis-server');
  await requireTool('redis-cli', ['--version'], 'redis-cli');
  await pgQuery('postgres', 'SELECT 1').catch((e) => {
    throw new Error(`PostgreSQL on 127.0.0.1:5432 is not usable (${e.message}); run scripts/setup.sh --test`);
  });
  portBase = await pickPortBase();
  lb = `http://127.0.0.1:${portBase}`;
  statsUrl = `http://127.0.0.1:${portBase + 1}`;
  const started = Date.now();
  // Up to a release build when CHATMESH_BIN is not given; a few seconds otherwise.
  const r = await cluster(['up'], process.env.CHATMESH_BIN ? 120000 : 600000);
  if (r.code !== 0) {
    throw new Error(`local-cluster.sh up failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  }
  assert.match(r.stdout, new RegExp(`http://127\\.0\\.0\\.1:${portBase}\\b`), 'up prints the HAProxy URL');
  console.log(`local cluster up in ${Date.now() - started} ms (port base ${portBase}, ${stateDir}, db ${dbName})`);
});

after(async () => {
  for (const s of sockets) s.close();
  if (portBase === undefined) {
    // A prerequisite was missing: nothing was started.
    rmSync(stateDir, { recursive: true, force: true });
    return;
  }
  const r = await cluster(['down', '--purge'], 60000);
  wentDown = true;
  assert.equal(r.code, 0, `down --purge: ${r.stderr}`);
  const left = stackProcesses();
  if (left.length > 0) {
    for (const p of left) {
      try {
        process.kill(p.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
  assert.deepEqual(left, [], 'no process of the state dir survives down --purge');
  assert.equal(existsSync(stateDir), false, 'down --purge removes the state dir');
  const dbs = await pgQuery('postgres', `SELECT 1 FROM pg_database WHERE datname = '${dbName}'`);
  assert.deepEqual(dbs, [], 'down --purge drops the database');
  rmSync(stateDir, { recursive: true, force: true });
});

async function open(token, transports, opts = {}) {
  const s = await connect(lb, token, transports, opts);
  sockets.add(s);
  return s;
}

/**
 * Both sockets joined `roomId`; each sends `k` messages (pipelined, both senders at once). Every
 * socket must receive all 2k messages exactly once, in seq order 1..2k, the same sequence on both,
 * and each sender's messages in the order it emitted them.
 */
async function exchange(sa, sb, roomId, what, k = 15) {
  const seenA = collect(sa, 'message:new', (m) => m.room_id === roomId);
  const seenB = collect(sb, 'message:new', (m) => m.room_id === roomId);
  const sendAll = (s, tag) => Promise.all(Array.from({ length: k }, (_, i) => sendMessage(s, roomId, `${tag}-${i}`)));
  const [acksA, acksB] = await Promise.all([sendAll(sa, 'a'), sendAll(sb, 'b')]);
  await waitFor(() => seenA.length >= 2 * k && seenB.length >= 2 * k, 15000, `${what}: both sockets receive ${2 * k} messages`).catch(
    (e) => {
      throw new Error(`${e.message} (A has ${seenA.length}, B has ${seenB.length})`);
    },
  );
  const expected = Array.from({ length: 2 * k }, (_, i) => i + 1);
  for (const [who, seen] of [['A', seenA], ['B', seenB]]) {
    assert.deepEqual(seen.map((m) => m.seq), expected, `${what}: socket ${who} receives seqs 1..${2 * k} in order, once each`);
    for (const tag of ['a', 'b']) {
      assert.deepEqual(
        seen.filter((m) => m.body.startsWith(`${tag}-`)).map((m) => m.body),
        Array.from({ length: k }, (_, i) => `${tag}-${i}`),
        `${what}: socket ${who} sees sender ${tag}'s messages in emission order`,
      );
    }
  }
  assert.deepEqual(seenA.map((m) => m.id), seenB.map((m) => m.id), `${what}: both sockets see the same sequence`);
  const bySeq = new Map(seenA.map((m) => [m.seq, m]));
  for (const [tag, acks] of [['a', acksA], ['b', acksB]]) {
    acks.forEach((m, i) => assert.equal(bySeq.get(m.seq)?.body, `${tag}-${i}`, `${what}: ack seq ${m.seq} matches delivery`));
  }
}

let alice;
let bob;

test('GET /health/ready through HAProxy answers 200', async () => {
  const r = await api(lb, 'GET', '/health/ready');
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.status, 'ready');
  assert.ok(r.body.checks.redis?.ok && r.body.checks.store?.ok, JSON.stringify(r.body));
});

test(`HAProxy stats show ${INSTANCES} chatmesh backends UP with a passing health check`, async () => {
  const servers = await backendServers();
  assert.equal(servers.length, INSTANCES, JSON.stringify(servers));
  for (const s of servers) {
    assert.equal(s.status, 'UP', `${s.name}: ${JSON.stringify(s)}`);
    assert.equal(s.check, 'L7OK', `${s.name}: last /health/ready check: ${JSON.stringify(s)}`);
  }
  const adminToken = readFileSync(path.join(stateDir, 'secrets', 'admin_token'), 'utf8').trim();
  assert.equal((await api(lb, 'GET', '/api/v1/cluster')).status, 401, 'the cluster view without the admin token');
  const cluster = await api(lb, 'GET', '/api/v1/cluster', undefined, adminToken);
  assert.equal(cluster.status, 200, JSON.stringify(cluster.body));
  assert.equal(cluster.body.instances.length, INSTANCES, `live instances: ${JSON.stringify(cluster.body.instances)}`);
});

test('register two users through HAProxy', async () => {
  alice = await registerUser(lb, 'dep');
  bob = await registerUser(lb, 'dep');
  const me = await api(lb, 'GET', '/api/v1/users/me', undefined, bob.token);
  assert.equal(me.status, 200);
  assert.equal(me.body.id, bob.user.id);
});

test('the SERVERID cookie pins an Engine.IO session to the instance that holds it', async () => {
  const base = `${lb}/socket.io/?EIO=4&transport=polling`;
  const hs = await fetch(base);
  assert.equal(hs.status, 200);
  const cookie = (hs.headers.getSetCookie?.() ?? [hs.headers.get('set-cookie')]).find((c) => c?.startsWith('SERVERID='));
  assert.ok(cookie, `the handshake sets the sticky cookie (headers: ${JSON.stringify([...hs.headers])})`);
  const server = cookie.split(';')[0].slice('SERVERID='.length);
  const { sid } = JSON.parse((await hs.text()).slice(1));
  const other = (await backendServers()).map((s) => s.name).find((n) => n !== server);
  const post = (srv, body) =>
    fetch(`${base}&sid=${sid}`, {
      method: 'POST',
      headers: { cookie: `SERVERID=${srv}`, 'content-type': 'text/plain;charset=UTF-8' },
      body,
    });
  // Another instance does not know the session: without stickiness a long-polling client fails.
  const wrong = await post(other, `40${JSON.stringify({ token: alice.token })}`);
  assert.equal(wrong.status, 400, `session ${sid} of ${server} must be unknown on ${other}`);
  await wrong.text();
  const right = await post(server, `40${JSON.stringify({ token: alice.token })}`);
  assert.equal(right.status, 200, `POST to ${server}: ${await right.clone().text()}`);
  await right.text();
  // Long-poll on the same instance until the Socket.IO CONNECT answer arrives (answering pings).
  const packets = [];
  for (let i = 0; i < 5 && !packets.some((p) => p.startsWith('40')); i++) {
    const poll = await fetch(`${base}&sid=${sid}`, { headers: { cookie: `SERVERID=${server}` }, signal: AbortSignal.timeout(10000) });
    assert.equal(poll.status, 200, `poll on ${server}`);
    const got = (await poll.text()).split('\x1e');
    packets.push(...got);
    if (got.includes('2')) await (await post(server, '3')).text(); // pong
  }
  assert.ok(packets.some((p) => /^40\{"sid":/.test(p)), `the Socket.IO CONNECT answer comes back on ${server}: ${JSON.stringify(packets)}`);
  await (await post(server, '1')).text(); // close the session
});

/** The sticky cookie the client's Engine.IO cookie jar holds (node-side socket.io-client). */
function stickyCookie(socket) {
  const jar = socket.io.engine?._cookieJar;
  if (!jar) return undefined;
  for (const [name, c] of jar.cookies) if (name === 'SERVERID') return c.value;
  return undefined;
}

test('polling-only clients (sticky cookie) exchange messages in order', async () => {
  const room = await createRoom(lb, alice.token, 'deploy-polling');
  // withCredentials turns on socket.io-client's cookie jar in Node (a browser keeps cookies itself).
  const sa = await open(alice.token, ['polling'], { withCredentials: true });
  const sb = await open(bob.token, ['polling'], { withCredentials: true });
  for (const s of [sa, sb]) {
    assert.equal(s.io.engine.transport.name, 'polling');
    assert.match(String(stickyCookie(s)), /^chatmesh-\d$/, 'the client carries the SERVERID cookie');
  }
  await joinRoom(sa, room.id);
  await joinRoom(sb, room.id);
  await exchange(sa, sb, room.id, 'polling');
});

test('WebSocket clients exchange messages in order', async () => {
  const room = await createRoom(lb, alice.token, 'deploy-ws');
  const sa = await open(alice.token, ['websocket']);
  const sb = await open(bob.token, ['websocket']);
  await joinRoom(sa, room.id);
  await joinRoom(sb, room.id);
  await exchange(sa, sb, room.id, 'websocket');
});

test('polling clients upgrade to WebSocket through HAProxy and exchange messages in order', async () => {
  const room = await createRoom(lb, alice.token, 'deploy-upgrade');
  const sa = await open(alice.token, ['polling', 'websocket'], { withCredentials: true });
  const sb = await open(bob.token, ['polling', 'websocket'], { withCredentials: true });
  // The upgrade request must reach the instance holding the polling session (the cookie again).
  await waitFor(() => sa.io.engine.transport.name === 'websocket' && sb.io.engine.transport.name === 'websocket', 10000, 'both sockets upgraded to websocket');
  await joinRoom(sa, room.id);
  await joinRoom(sb, room.id);
  await exchange(sa, sb, room.id, 'upgrade');
});

test('clients pinned to different instances (polling and WebSocket) exchange messages in order', async () => {
  const room = await createRoom(lb, alice.token, 'deploy-cross');
  const sa = await open(alice.token, ['websocket'], { extraHeaders: { cookie: 'SERVERID=chatmesh-1' } });
  const sb = await open(bob.token, ['polling'], { extraHeaders: { cookie: `SERVERID=chatmesh-${INSTANCES}` } });
  await joinRoom(sa, room.id);
  await joinRoom(sb, room.id);
  await exchange(sa, sb, room.id, 'cross-instance');
});

test('down stops every process of the stack and is idempotent', async () => {
  for (const s of sockets) s.close();
  sockets.clear();
  const before = stackProcesses();
  const comms = before.map((p) => p.comm).sort();
  assert.equal(comms.filter((c) => c === 'chatmesh').length, INSTANCES, `running: ${JSON.stringify(before)}`);
  assert.equal(comms.filter((c) => c === 'haproxy').length, 1, `running: ${JSON.stringify(before)}`);
  assert.equal(comms.filter((c) => c === 'redis-server').length, 5, `2 data nodes + 3 Sentinels: ${JSON.stringify(before)}`);

  const down = await cluster(['down'], 60000);
  assert.equal(down.code, 0, `down: ${down.stderr}`);
  assert.deepEqual(stackProcesses(), [], 'nothing of the state dir runs after down');
  for (const p of before) assert.equal(alive(p.pid), false, `${p.comm} (pid ${p.pid}) stopped`);
  for (const port of [portBase, portBase + 1, portBase + 10, portBase + 20, portBase + 30]) {
    assert.equal(await portFree(port), true, `port ${port} released`);
  }
  const again = await cluster(['down'], 60000);
  assert.equal(again.code, 0, `second down: ${again.stderr}`);
  const status = await cluster(['status'], 30000);
  assert.equal(status.code, 0);
  assert.doesNotMatch(status.stdout, /running/, status.stdout);
});
