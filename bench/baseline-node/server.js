'use strict';
// chatmesh-baseline-node: the Node stack chatmesh replaces, as a benchmark peer. One process per
// instance; node:http for REST, Socket.IO 4 with @socket.io/redis-adapter for real time, users /
// rooms / memberships in Redis, messages sequenced by chatmesh's own send script
// (../../src/redis_io/send.lua), written back to PostgreSQL by a Redis Streams worker (PG_URL).
// See README.md for what it implements and what it leaves out.

const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const Redis = require('ioredis');
const jwt = require('jsonwebtoken');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');

const { Keys } = require('./lib/keys');
const { ApiError, asApiError } = require('./lib/errors');
const { Sequencer } = require('./lib/sequencer');
const { OrderedDelivery, install: installOrderedDelivery } = require('./lib/ordered-delivery');
const { SyncWorker } = require('./lib/sync-worker');
const v = require('./lib/util');

// ---- configuration ----------------------------------------------------------------------------

function intEnv(name, def, min = 0) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < min) {
    console.error(`${name}: invalid value ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return n;
}

const PORT = intEnv('PORT', 5101);
const HOST = process.env.HOST || '127.0.0.1';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const PREFIX = process.env.PREFIX || 'bl';
const SHARDS = intEnv('SHARDS', 64, 1);
const JWT_SECRET = process.env.JWT_SECRET || 'chatmesh-baseline-dev-secret-do-not-use-in-production';
const PG_URL = process.env.PG_URL || '';
const SYNC_GROUP = process.env.SYNC_GROUP || 'baseline';
const DEDUPE_TTL_SECS = intEnv('DEDUPE_TTL_SECS', 24 * 3600, 1);
const BACKLOG_LIMIT = intEnv('BACKLOG_LIMIT', 200000, 1);
const GAP_WAIT_MS = intEnv('GAP_WAIT_MS', 300, 1);
const ORDERED = process.env.ORDERED_DELIVERY !== '0';
const MAX_BODY_BYTES = intEnv('MAX_BODY_BYTES', 65536, 1024);
const TOKEN_TTL_SECS = intEnv('TOKEN_TTL_SECS', 86400, 1);
const REGION = process.env.REGION || 'local';
const SCRIPT_PATH = path.resolve(__dirname, '../../src/redis_io/send.lua');
const MEMBER_CACHE_MS = 10000;
const MAX_PAGE = 500;

let keys;
try {
  keys = new Keys(PREFIX, SHARDS);
} catch (e) {
  console.error(e.message);
  process.exit(2);
}

const log = (msg) => console.error(`[baseline ${new Date().toISOString()}] ${msg}`);

// ---- Redis, PostgreSQL, sequencer -------------------------------------------------------------

const redisOpts = { lazyConnect: false };
const redis = new Redis(REDIS_URL, redisOpts); // commands (scripts, users, rooms, history)
const pub = new Redis(REDIS_URL, redisOpts); // adapter publish
const sub = new Redis(REDIS_URL, redisOpts); // adapter subscribe
for (const [name, c] of [['redis', redis], ['pub', pub], ['sub', sub]]) {
  c.on('error', (e) => log(`${name}: ${e.message}`));
}

let pool = null;
let worker = null;
let instanceId = process.env.INSTANCE_ID || '';

const sequencer = new Sequencer(redis, keys, SCRIPT_PATH, {
  dedupeTtlSecs: DEDUPE_TTL_SECS,
  backlogLimit: BACKLOG_LIMIT,
  // No durable store: nothing can be below a missing counter but what recent history holds,
  // which the script checks itself. With PostgreSQL: its head, as chatmesh does.
  storeHead: async (roomId) => (worker ? worker.head(roomId) : 0),
});

// ---- users, rooms, memberships (Redis hashes and sets) ---------------------------------------

function userOut(h) {
  return {
    id: h.id,
    username: h.username,
    display_name: h.display_name,
    status_text: h.status_text || '',
    avatar_url: h.avatar_url || '',
    created_at: h.created_at,
    updated_at: h.updated_at,
  };
}

function roomOut(h, head, memberCount) {
  return {
    id: h.id,
    name: h.name,
    topic: h.topic || '',
    visibility: h.visibility,
    owner_id: h.owner_id,
    home_region: h.home_region,
    head_seq: Number(head || 0),
    member_count: Number(memberCount || 0),
    created_at: h.created_at,
    updated_at: h.updated_at,
  };
}

function token(userId) {
  return jwt.sign({ sub: userId }, JWT_SECRET, { algorithm: 'HS256', expiresIn: TOKEN_TTL_SECS });
}

function verifyToken(t) {
  try {
    const claims = jwt.verify(String(t || ''), JWT_SECRET, { algorithms: ['HS256'] });
    if (!claims || typeof claims.sub !== 'string') throw new Error('no sub');
    return claims.sub;
  } catch {
    throw new ApiError('unauthorized', 'missing, malformed, expired or badly signed token');
  }
}

async function register(input) {
  const username = v.str(input, 'username', { min: 3, max: 32 }).toLowerCase();
  if (!/^[a-z0-9_]+$/.test(username)) throw new ApiError('validation_failed', 'username must be 3..=32 of [a-z0-9_]');
  const password = v.str(input, 'password', { min: 8, max: 128 });
  const display = v.str(input, 'display_name', { min: 1, max: 64, optional: true });
  const id = v.ulid();
  const hash = await v.hashPassword(password);
  if (!(await redis.set(keys.username(username), id, 'NX'))) throw new ApiError('conflict', 'username is taken');
  const now = new Date().toISOString();
  const h = { id, username, display_name: display || username, status_text: '', avatar_url: '', created_at: now, updated_at: now };
  await redis.hset(keys.user(id), { ...h, password_hash: hash });
  return { user: userOut(h), token: token(id) };
}

async function login(input) {
  const username = v.str(input, 'username', { min: 1, max: 128 }).toLowerCase();
  const password = v.str(input, 'password', { min: 1, max: 1024 });
  const id = await redis.get(keys.username(username));
  const h = id ? await redis.hgetall(keys.user(id)) : null;
  if (!h || !h.id || !(await v.verifyPassword(password, h.password_hash))) {
    throw new ApiError('invalid_credentials', 'wrong username or password');
  }
  return { user: userOut(h), token: token(h.id) };
}

async function user(id) {
  const h = await redis.hgetall(keys.user(id));
  if (!h || !h.id) throw new ApiError('not_found', 'user not found');
  return userOut(h);
}

/** The room (with head and member count) and whether `userId` is a member. */
async function roomState(roomId, userId) {
  const [[, h], [, head], [, count], [, member]] = await redis
    .pipeline()
    .hgetall(keys.room(roomId))
    .get(keys.seq(roomId))
    .scard(keys.members(roomId))
    .sismember(keys.members(roomId), userId || '')
    .exec();
  if (!h || !h.id) throw new ApiError('not_found', 'room not found');
  return { room: roomOut(h, head, count), member: member === 1 };
}

async function createRoom(userId, input) {
  const name = v.str(input, 'name', { min: 1, max: 80 });
  if (name.trim() === '') throw new ApiError('validation_failed', 'name must not be only whitespace');
  const topic = v.str(input, 'topic', { min: 0, max: 512, optional: true }) || '';
  const visibility = input.visibility === undefined ? 'public' : input.visibility;
  if (visibility !== 'public' && visibility !== 'private') {
    throw new ApiError('validation_failed', 'visibility must be "public" or "private"');
  }
  const id = v.ulid();
  const now = new Date().toISOString();
  const h = { id, name, topic, visibility, owner_id: userId, home_region: REGION, created_at: now, updated_at: now };
  const m = redis.multi().hset(keys.room(id), h).sadd(keys.members(id), userId).sadd(keys.userRooms(userId), id);
  if (visibility === 'public') m.sadd(keys.publicRooms(), id);
  await m.exec();
  return roomOut(h, 0, 1);
}

/** Adds `userId` to a public room it is not in (private: forbidden). Returns the room. */
async function joinRoom(userId, roomId) {
  const st = await roomState(roomId, userId);
  if (st.member) return st.room;
  if (st.room.visibility === 'private') throw new ApiError('forbidden', 'this room is private; ask its owner for an invite');
  await redis.multi().sadd(keys.members(roomId), userId).sadd(keys.userRooms(userId), roomId).exec();
  rememberMember(userId, roomId);
  return { ...st.room, member_count: st.room.member_count + 1 };
}

async function leaveRoom(userId, roomId) {
  await roomState(roomId, userId);
  await redis.multi().srem(keys.members(roomId), userId).srem(keys.userRooms(userId), roomId).exec();
  memberCache.delete(`${userId}\u0000${roomId}`);
}

async function listRooms(userId, scope) {
  if (scope !== 'joined' && scope !== 'public') throw new ApiError('validation_failed', 'scope must be joined or public');
  const ids = await redis.smembers(scope === 'joined' ? keys.userRooms(userId) : keys.publicRooms());
  const rooms = [];
  for (const id of ids) {
    try {
      rooms.push((await roomState(id, userId)).room);
    } catch {
      // deleted meanwhile
    }
  }
  return { rooms };
}

// Membership of senders, cached per instance for MEMBER_CACHE_MS (positive answers only), as a
// Node stack caches it in memory in front of its store.
const memberCache = new Map();
function rememberMember(userId, roomId) {
  memberCache.set(`${userId}\u0000${roomId}`, Date.now() + MEMBER_CACHE_MS);
}

async function ensureMember(userId, roomId) {
  const k = `${userId}\u0000${roomId}`;
  const until = memberCache.get(k);
  if (until && until > Date.now()) return;
  if (await redis.sismember(keys.members(roomId), userId)) {
    rememberMember(userId, roomId);
    return;
  }
  if (!(await redis.exists(keys.room(roomId)))) throw new ApiError('not_found', 'room not found');
  throw new ApiError('forbidden', 'not a member of this room');
}
setInterval(() => {
  const now = Date.now();
  for (const [k, until] of memberCache) if (until <= now) memberCache.delete(k);
}, 30000).unref();

// ---- history (the room's recent-history stream; the baseline never trims it) -----------------

function clampLimit(limit) {
  if (limit === undefined) return 50;
  if (limit < 1) throw new ApiError('validation_failed', 'limit must be at least 1');
  return Math.min(limit, MAX_PAGE);
}

const entryMessage = ([, fields]) => JSON.parse(fields[1]);

/** { messages, head_seq, has_more }: seq > after, or the `limit` below `before`, or the latest. */
async function page(roomId, { after, before, limit }) {
  const hk = keys.history(roomId);
  const m = redis.multi().get(keys.seq(roomId));
  if (after !== undefined) m.xrange(hk, `${after + 1}-0`, '+', 'COUNT', limit + 1);
  else if (before !== undefined && before > 1) m.xrevrange(hk, `(${before}-0`, '-', 'COUNT', limit + 1);
  else if (before === undefined) m.xrevrange(hk, '+', '-', 'COUNT', limit + 1);
  const [[, head], second] = await m.exec();
  let msgs = (second ? second[1] : []).map(entryMessage);
  const hasMore = msgs.length > limit;
  msgs = msgs.slice(0, limit);
  if (after === undefined) msgs.reverse();
  return { messages: msgs, head_seq: Number(head || 0), has_more: hasMore };
}

async function headSeq(roomId) {
  return Number((await redis.get(keys.seq(roomId))) || 0);
}

/** Messages fromSeq..=toSeq (gap fill of the ordered delivery). */
async function historyRange(roomId, fromSeq, toSeq) {
  if (toSeq < fromSeq) return [];
  return (await redis.xrange(keys.history(roomId), `${fromSeq}-0`, `${toSeq}-0`)).map(entryMessage);
}

// ---- sending ----------------------------------------------------------------------------------

/** Validates a send; resolves the message without its seq (membership checked). */
async function prepareSend(userId, roomId, input) {
  const client_msg_id = v.clientMsgId(input);
  const body = v.body(input);
  await ensureMember(userId, roomId);
  return { id: v.ulid(), room_id: roomId, sender_id: userId, client_msg_id, body, created_at: new Date().toISOString() };
}

/** Sequences a prepared message and broadcasts it (not on an idempotent retry). */
async function sequenceAndBroadcast(m) {
  const r = await sequencer.send(m);
  if (!r.duplicate) io.to(r.message.room_id).emit('message:new', r.message);
  return r;
}

// ---- HTTP -------------------------------------------------------------------------------------

function send(res, status, obj, headers = {}) {
  const body = obj === undefined ? '' : JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let failed = false;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY_BYTES && !failed) {
        failed = true;
        reject(new ApiError('payload_too_large', `request body over ${MAX_BODY_BYTES} bytes`));
      }
      if (!failed) chunks.push(c);
    });
    req.on('end', () => {
      if (failed) return;
      const text = Buffer.concat(chunks).toString('utf8');
      if (text.trim() === '') return resolve({});
      try {
        const val = JSON.parse(text);
        if (!val || typeof val !== 'object' || Array.isArray(val)) throw new Error('not an object');
        resolve(val);
      } catch {
        reject(new ApiError('validation_failed', 'body must be a JSON object'));
      }
    });
    req.on('error', reject);
  });
}

function bearer(req) {
  const h = req.headers.authorization || '';
  const m = /^Bearer\s+(.+)$/i.exec(h);
  if (!m) throw new ApiError('unauthorized', 'missing bearer token');
  return verifyToken(m[1]);
}

function queryInt(url, name) {
  const raw = url.searchParams.get(name);
  if (raw === null) return undefined;
  if (!/^\d+$/.test(raw)) throw new ApiError('validation_failed', `${name} must be a non-negative integer`);
  return Number(raw);
}

async function readiness() {
  const checks = {};
  let ok = true;
  let t = Date.now();
  try {
    await redis.ping();
    checks.redis = { ok: true, latency_ms: Date.now() - t };
  } catch {
    checks.redis = { ok: false, latency_ms: Date.now() - t };
    ok = false;
  }
  if (pool) {
    t = Date.now();
    try {
      await pool.query('SELECT 1');
      checks.store = { ok: true, latency_ms: Date.now() - t };
    } catch {
      checks.store = { ok: false, latency_ms: Date.now() - t };
    }
    const s = worker.stats;
    checks.sync = { ok: Date.now() - s.measured_at < 5000, latency_ms: 0, lag_ms: s.lag_ms, pending: s.pending };
  }
  return { ok, checks };
}

async function route(req, res) {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname;
  const method = req.method;
  let m;
  if (method === 'GET' && p === '/health/live') return send(res, 200, { status: 'ok' });
  if (method === 'GET' && p === '/health/ready') {
    const r = await readiness();
    return send(res, r.ok ? 200 : 503, { status: r.ok ? 'ready' : 'not_ready', checks: r.checks });
  }
  if (method === 'GET' && p === '/debug/stats') {
    // Baseline-only: how often the ordered delivery had to hold, drop or fill (see lib/ordered-delivery.js).
    return send(res, 200, {
      instance_id: instanceId,
      ordered_delivery: io.orderedDelivery ? io.orderedDelivery.stats : null,
      sync: worker ? worker.stats : null,
    });
  }
  if (method === 'POST' && p === '/api/v1/auth/register') return send(res, 201, await register(await readJson(req)));
  if (method === 'POST' && p === '/api/v1/auth/login') return send(res, 200, await login(await readJson(req)));
  if (!p.startsWith('/api/v1/')) throw new ApiError('not_found', 'no such route');
  const me = bearer(req);
  if (method === 'GET' && p === '/api/v1/users/me') return send(res, 200, await user(me));
  if (method === 'GET' && (m = /^\/api\/v1\/users\/([^/]+)$/.exec(p))) return send(res, 200, await user(m[1]));
  if (method === 'POST' && p === '/api/v1/rooms') return send(res, 201, await createRoom(me, await readJson(req)));
  if (method === 'GET' && p === '/api/v1/rooms') {
    return send(res, 200, await listRooms(me, url.searchParams.get('scope') || 'joined'));
  }
  if ((m = /^\/api\/v1\/rooms\/([A-Za-z0-9_-]{1,64})(\/[a-z]+)?$/.exec(p))) {
    const [, roomId, sub] = m;
    if (method === 'GET' && !sub) {
      const st = await roomState(roomId, me);
      if (st.room.visibility === 'private' && !st.member) throw new ApiError('forbidden', 'this room is private');
      return send(res, 200, st.room);
    }
    if (method === 'POST' && sub === '/join') return send(res, 200, await joinRoom(me, roomId));
    if (method === 'POST' && sub === '/leave') {
      await leaveRoom(me, roomId);
      res.writeHead(204);
      return res.end();
    }
    if (method === 'GET' && sub === '/messages') {
      await ensureMember(me, roomId);
      const after = queryInt(url, 'after_seq');
      const before = queryInt(url, 'before_seq');
      return send(res, 200, await page(roomId, { after, before, limit: clampLimit(queryInt(url, 'limit')) }));
    }
    if (method === 'POST' && sub === '/messages') {
      const msg = await prepareSend(me, roomId, await readJson(req));
      const r = await sequenceAndBroadcast(msg);
      return send(res, r.duplicate ? 200 : 201, r.message);
    }
  }
  throw new ApiError('not_found', 'no such route');
}

const server = http.createServer((req, res) => {
  route(req, res).catch((e) => {
    const err = asApiError(e, log);
    if (!res.headersSent) send(res, err.status, { error: err.toJSON() });
    else res.end();
  });
});

// ---- Socket.IO --------------------------------------------------------------------------------

if (ORDERED) installOrderedDelivery();
const io = new Server(server, {
  serveClient: false,
  maxHttpBufferSize: MAX_BODY_BYTES * 4,
  adapter: createAdapter(pub, sub, { key: `${PREFIX}:sio` }),
});
if (ORDERED) {
  io.orderedDelivery = new OrderedDelivery(historyRange, GAP_WAIT_MS, log);
  io.of('/').adapter.on('delete-room', (room) => io.orderedDelivery.drop(room));
}

io.use(async (socket, next) => {
  try {
    const userId = verifyToken(socket.handshake.auth && socket.handshake.auth.token);
    if (!(await redis.exists(keys.user(userId)))) throw new Error('unknown user');
    socket.data.userId = userId;
    next();
  } catch {
    next(new Error('unauthorized'));
  }
});

/** Registers `event`: the handler's result becomes `{ok: true, ...}`, a failure the error ack. */
function on(socket, event, handler) {
  socket.on(event, (payload, ack) => {
    if (typeof payload === 'function' && ack === undefined) {
      ack = payload;
      payload = undefined;
    }
    const reply = typeof ack === 'function' ? ack : () => {};
    let result;
    try {
      if (!payload || typeof payload !== 'object' || Array.isArray(payload)) {
        throw new ApiError('validation_failed', 'payload must be a JSON object');
      }
      result = handler(payload);
    } catch (e) {
      result = Promise.reject(e);
    }
    Promise.resolve(result).then(
      (r) => reply({ ok: true, ...r }),
      (e) => reply({ ok: false, error: asApiError(e, log).toJSON() }),
    );
  });
}

io.on('connection', (socket) => {
  const me = socket.data.userId;
  // A socket's sends reach Redis in the order it emitted them: validation and the membership
  // check run one after another per socket; the scripts then run pipelined.
  let turn = Promise.resolve();

  on(socket, 'room:join', async (d) => {
    const roomId = v.roomId(d);
    const after = v.seqArg(d, 'after_seq');
    const room = await joinRoom(me, roomId);
    const order = io.orderedDelivery;
    // Join the delivery group before reading history: a message accepted in between is then
    // delivered live or found in the read (or both; clients dedupe by seq), never neither.
    if (order) order.prepare(roomId);
    socket.join(roomId);
    let pg;
    try {
      pg = after !== undefined
        ? await page(roomId, { after, limit: MAX_PAGE })
        : { head_seq: await headSeq(roomId), messages: [], has_more: false };
    } catch (e) {
      if (order) order.abort(roomId);
      throw e;
    }
    if (order) order.start(roomId, pg.head_seq);
    return { room: { ...room, head_seq: pg.head_seq }, head_seq: pg.head_seq, messages: pg.messages, has_more: pg.has_more };
  });

  on(socket, 'room:leave', async (d) => {
    socket.leave(v.roomId(d));
    return {};
  });

  on(socket, 'room:sync', async (d) => {
    const roomId = v.roomId(d);
    const after = v.seqArg(d, 'after_seq');
    if (after === undefined) throw new ApiError('validation_failed', 'after_seq is required');
    const limit = clampLimit(v.seqArg(d, 'limit'));
    await ensureMember(me, roomId);
    return page(roomId, { after, limit });
  });

  on(socket, 'message:send', async (d) => {
    const roomId = v.roomId(d);
    const prepared = turn.then(() => prepareSend(me, roomId, d)).then((m) => ({ r: sequenceAndBroadcast(m) }));
    turn = prepared.then(
      () => {},
      () => {},
    );
    const { message } = await (await prepared).r;
    return { message };
  });

  on(socket, 'typing', async (d) => {
    const roomId = v.roomId(d);
    await ensureMember(me, roomId);
    socket.to(roomId).emit('typing', { room_id: roomId, user_id: me });
    return {};
  });
});

// ---- start / stop -----------------------------------------------------------------------------

async function main() {
  await sequencer.load();
  if (PG_URL) {
    const { Pool } = require('pg');
    pool = new Pool({ connectionString: PG_URL, max: 4 });
    pool.on('error', (e) => log(`pg: ${e.message}`));
    const syncRedis = new Redis(REDIS_URL, redisOpts);
    syncRedis.on('error', (e) => log(`sync redis: ${e.message}`));
    worker = new SyncWorker({ redis: syncRedis, pool, keys, group: SYNC_GROUP, consumer: '', log });
    await worker.ensureSchema();
    await worker.ensureGroups();
  }
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(PORT, HOST, resolve);
  });
  const addr = server.address();
  if (!instanceId) instanceId = `${os.hostname()}:${addr.port}`;
  if (worker) {
    worker.consumer = instanceId;
    worker.run();
    const measure = () => worker.measure(redis).catch((e) => log(`sync measure: ${e.message}`));
    measure();
    setInterval(measure, 500).unref();
  }
  console.log(`listening on http://${HOST}:${addr.port}`);
}

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: shutting down`);
  const force = setTimeout(() => process.exit(0), 3000);
  force.unref();
  if (worker) worker.stop();
  io.close();
  server.close();
  await Promise.allSettled([pool && pool.end()]);
  for (const c of [redis, pub, sub, worker && worker.redis]) if (c) c.disconnect();
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

main().catch((e) => {
  console.error(`start failed: ${e.message}`);
  process.exit(1);
});
