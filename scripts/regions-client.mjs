#!/usr/bin/env node
// Socket.IO clients for a two-region stack (scripts/local-cluster.sh up --regions 2), with the stock
// socket.io-client from tests/node/node_modules. Two commands:
//
//   node scripts/regions-client.mjs partition [--rate 5] [--before 5] [--cut 5] [--after 5]
//        [--timeout-ms 1500] [--store-url postgres://...] [--details FILE]
//     scripts/fault-suite.sh's `region-partition`: users in regions a and b, one public room homed
//     in a (created through a's HAProxy) and one homed in b; every sender sends into both rooms
//     continuously; after --before seconds the link is cut (local-cluster.sh link cut) for --cut
//     seconds, then healed; the senders stop --after seconds later. Sends into the room homed
//     across the cut must be answered `unavailable` within the bound (--timeout-ms + 1 s), never
//     acknowledged; sends into the local room must keep being acknowledged. After the heal every
//     refused send is retried with its client_msg_id (idempotent across regions); every receiver
//     (connected to its own region throughout) must have received every seq of both rooms live,
//     gap-free and in order within 30 s of the end (`stalled` counts those that did not: replication
//     did not catch up by itself), and the store (PostgreSQL) must hold every acknowledged message
//     exactly once.
//     Prints `scenario=region-partition sent= acked= stored= ... lost=0 duplicated=0 reordered=0 ...`
//     and exits 1 on any violation.
//
//   node scripts/regions-client.mjs takeover [--phases loss,give-back,isolation] [--rate 5]
//        [--store-url postgres://...] [--details FILE] [--settle 5]
//     scripts/fault-suite.sh's `region-loss`, `give-back` and `region-isolation`, in that order on
//     one stack (ack level `region`, automatic takeover on, default lease settings): users in a
//     and b send continuously into a room homed in a and one homed in b.
//     - loss: region a is killed (`local-cluster.sh region kill a`: Redis, Sentinels, instances,
//       HAProxy, kill -9); a's users reconnect to b (as DNS failover would send them); b takes
//       a's rooms over by itself. Measured: the time from the kill to the first send into a's
//       room acknowledged after it (target 20 s).
//     - give-back: a comes back (`local-cluster.sh up`), steps down and catches up from b; its
//       users move back to a; `local-cluster.sh region takeover a --by a` hands the rooms back
//       under load. Measured: how long the hand-back took and the longest time a's room went
//       without an acknowledged send.
//     - isolation: the link is cut and a is cut off the store (`link cut`, `region isolate a`),
//       a's users stay on a; b takes a's rooms over; then everything heals. a must stop
//       acknowledging a's rooms before b starts; no seq may hold two different messages anywhere
//       (the store, what any client received live or by sync): split_brain_seqs=0.
//     After each phase every unacknowledged send is retried (same client_msg_id), every client
//     catches up, and the store must hold every acknowledged message once, gap-free: one line
//     `scenario=<phase> ... lost= duplicated= reordered= split_brain_seqs= ...` per phase, exit 1
//     on any violation.
//
//   node scripts/regions-client.mjs bench [--rate 50] [--seconds 30] [--delay-ms 25] [--label X]
//        [--out FILE]
//     bench/run.sh regions: a room homed in a, one sender in b, receivers in a and b; send ack
//     latency at the sender, send -> deliver latency at each receiver, order violations, and the
//     replication lag b reports (chatmesh_replication_lag_seconds on b's instances). One JSON object
//     on stdout (and in --out).
//
// The stack is found through scripts/local-cluster.sh (LOCAL_CLUSTER_DIR from the environment):
// `urls` for the load balancers and instances, `link cut|heal` for the partition.
import { createRequire } from 'node:module';
import { execFile, execFileSync } from 'node:child_process';
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..');
const LC = path.join(repo, 'scripts', 'local-cluster.sh');

function die(msg) {
  console.error(`regions-client: ${msg}`);
  process.exit(2);
}
function log(msg) {
  console.error(`regions-client: [${new Date().toISOString().slice(11, 23)}] ${msg}`);
}

const require = createRequire(path.join(repo, 'tests', 'node', 'package.json'));
let io;
try {
  ({ io } = require('socket.io-client'));
} catch (e) {
  die(`socket.io-client not found under tests/node/node_modules (cd tests/node && npm ci): ${e.message}`);
}

// ---- arguments -------------------------------------------------------------------------------------

function parseArgs(argv, defaults) {
  const opts = { ...defaults };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (!a.startsWith('--')) die(`unexpected argument ${a}`);
    const key = a.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in defaults)) die(`unknown option ${a}`);
    const v = argv[i + 1];
    if (v === undefined) die(`${a} needs a value`);
    opts[key] = typeof defaults[key] === 'number' ? Number(v) : v;
    if (typeof defaults[key] === 'number' && !Number.isFinite(opts[key])) die(`${a}: not a number: ${v}`);
    i += 1;
  }
  return opts;
}

// ---- the stack -------------------------------------------------------------------------------------

function stackUrls() {
  const out = execFileSync(LC, ['urls'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  const regions = {};
  for (const line of out.split('\n')) {
    const [region, kind, url] = line.trim().split(/\s+/);
    if (!url) continue;
    regions[region] ??= { lb: null, instances: [] };
    if (kind === 'lb') regions[region].lb = url;
    else if (kind === 'instance') regions[region].instances.push(url);
    else if (kind.startsWith('peer-')) regions[region][kind] = url;
  }
  for (const r of ['a', 'b']) if (!regions[r]?.lb) die(`no region ${r} in \`local-cluster.sh urls\`:\n${out}`);
  return regions;
}

function link(cmd) {
  return new Promise((resolve, reject) => {
    execFile(LC, ['link', ...cmd.split(' ')], { encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`local-cluster.sh link ${cmd}: ${stderr || err.message}`));
      else resolve(stdout.trim());
    });
  });
}

async function api(base, method, p, body, token) {
  const headers = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(base + p, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15000),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  return { status: res.status, body: json };
}

const runTag = Math.random().toString(36).slice(2, 8);
let userCount = 0;
async function register(base, prefix) {
  userCount += 1;
  const username = `${prefix}_${runTag}_${userCount}`.slice(0, 32);
  for (let attempt = 1; ; attempt += 1) {
    const r = await api(base, 'POST', '/api/v1/auth/register', { username, password: 'correct horse battery' });
    if (r.status === 201) return r.body;
    if (attempt >= 5) throw new Error(`register ${username} through ${base}: ${r.status} ${JSON.stringify(r.body)}`);
    await sleep(500);
  }
}

async function createRoom(base, token, name) {
  const r = await api(base, 'POST', '/api/v1/rooms', { name, visibility: 'public' }, token);
  if (r.status !== 201) throw new Error(`create room through ${base}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

function quantile(sorted, q) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}
function stats(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const r = (v) => (v === null ? null : Math.round(v * 100) / 100);
  return {
    n: s.length,
    p50: r(quantile(s, 0.5)),
    p90: r(quantile(s, 0.9)),
    p99: r(quantile(s, 0.99)),
    max: r(s.length ? s[s.length - 1] : null),
    mean: r(s.length ? s.reduce((a, b) => a + b, 0) / s.length : null),
  };
}

// ---- a socket that joins rooms, records what it receives and catches up after a reconnect ----------

class Member {
  constructor(name, region, url, token, roomIds) {
    Object.assign(this, { name, region, url, token, roomIds });
    this.live = new Map(roomIds.map((r) => [r, []])); // room -> [[seq per connection]]
    // room -> per connection {after: the after_seq its room:join asked from, joined: seqs its
    // join/sync answers brought}: what that connection must then have, live or from the join
    this.conns = new Map(roomIds.map((r) => [r, []]));
    this.caughtUp = new Map(roomIds.map((r) => [r, []])); // room -> [[seq, client_msg_id]]
    this.liveIds = new Map(roomIds.map((r) => [r, []])); // room -> [[seq, client_msg_id]]
    this.seen = new Map(roomIds.map((r) => [r, new Set()]));
    this.recvAt = new Map(); // `${room} ${seq}` -> performance.now() of the first live delivery
    this.connections = 0;
    this.joinErrors = [];
    this.joining = null;
  }

  connect() {
    this.socket = io(this.url, {
      auth: { token: this.token },
      transports: ['websocket'],
      reconnection: true,
      reconnectionDelay: 200,
      reconnectionDelayMax: 2000,
      forceNew: true,
    });
    this.socket.on('message:new', (m) => this.onMessage(m));
    this.socket.on('connect', () => {
      this.connections += 1;
      for (const r of this.roomIds) {
        this.live.get(r).push([]);
        this.conns.get(r).push({ after: null, joined: new Set() });
      }
      this.joining = this.joinAll();
    });
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${this.name}: no connection to ${this.url} in 15 s`)), 15000);
      this.socket.once('connect', () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  last(room) {
    // the highest seq up to which this member has everything
    const seen = this.seen.get(room);
    let n = 0;
    while (seen.has(n + 1)) n += 1;
    return n;
  }

  onMessage(m) {
    if (!this.live.has(m.room_id)) return;
    const conns = this.live.get(m.room_id);
    conns[conns.length - 1].push(m.seq);
    this.liveIds.get(m.room_id).push([m.seq, m.client_msg_id]);
    this.seen.get(m.room_id).add(m.seq);
    const k = `${m.room_id} ${m.seq}`;
    if (!this.recvAt.has(k)) this.recvAt.set(k, performance.now());
  }

  record(room, messages, conn) {
    for (const m of messages) {
      this.caughtUp.get(room).push([m.seq, m.client_msg_id]);
      this.seen.get(room).add(m.seq);
      conn?.joined.add(m.seq);
    }
  }

  // Seqs a connection missed: between what its join started from and the last seq it received
  // live, neither delivered live nor in its join/sync answers (a gap in live delivery).
  liveGaps(room) {
    const gaps = [];
    this.live.get(room).forEach((live, i) => {
      const c = this.conns.get(room)[i];
      if (live.length === 0 || c.after === null) return;
      const got = new Set([...live, ...c.joined]);
      const hi = Math.max(...live);
      for (let s = c.after + 1; s <= hi; s += 1) if (!got.has(s)) gaps.push(s);
    });
    return gaps;
  }

  async joinAll() {
    for (const room of this.roomIds) {
      const conn = this.conns.get(room).at(-1);
      for (let attempt = 1; ; attempt += 1) {
        const after = this.last(room);
        const r = await this.emit('room:join', { room_id: room, after_seq: after }, 10000);
        if (r.ok) {
          conn.after = after;
          this.record(room, r.messages ?? [], conn);
          if (r.has_more) await this.sync(room, conn);
          break;
        }
        this.joinErrors.push(r.error?.code ?? 'unknown');
        // A room whose home is being taken over answers `unavailable` for up to ~20 s.
        if (attempt >= 80 || !this.socket.connected) break;
        await sleep(500);
      }
    }
  }

  async sync(room, conn) {
    for (let i = 0; i < 1000; i += 1) {
      const r = await this.emit('room:sync', { room_id: room, after_seq: this.last(room), limit: 500 }, 10000);
      if (!r.ok) return r;
      this.record(room, r.messages ?? [], conn);
      if (!r.has_more || (r.messages ?? []).length === 0) return r;
    }
    return { ok: true };
  }

  async emit(event, payload, timeoutMs) {
    try {
      return await this.socket.timeout(timeoutMs).emitWithAck(event, payload);
    } catch {
      return { ok: false, error: { code: 'client_timeout' } };
    }
  }

  close() {
    this.socket?.close();
  }

  // Another region's load balancer from now on (as a DNS failover would): a new connection,
  // which joins the rooms after what this member has.
  async moveTo(url, region) {
    this.socket?.close();
    this.url = url;
    this.region = region ?? this.region;
    await this.connect();
    await this.joining;
  }
}

// ---- verdict over one room ---------------------------------------------------------------------------

// history: [[seq, client_msg_id]] from the store, ascending; acked: Map client_msg_id -> seq;
// members: Member[] (every one joined the room).
function roomVerdict(room, history, acked, sentIds, members) {
  const v = { room, sent: sentIds.size, acked: acked.size, stored: history.length, lost: 0, duplicated: 0, reordered: 0 };
  const byId = new Map();
  for (const [seq, id] of history) byId.set(id, [...(byId.get(id) ?? []), seq]);
  const bySeq = new Map(history.map(([s, id]) => [s, id]));
  v.head = history.length ? Math.max(...history.map(([s]) => s)) : 0;
  v.history_not_gap_free = history.some(([seq], i) => seq !== i + 1);
  v.duplicated = [...byId.values()].filter((s) => s.length > 1).length;
  v.ack_seq_mismatch = 0;
  for (const [id, seq] of acked) {
    const seqs = byId.get(id);
    if (!seqs) v.lost += 1;
    else if (!seqs.includes(seq)) v.ack_seq_mismatch += 1;
  }
  v.stored_not_acked = [...byId.keys()].filter((id) => !acked.has(id)).length;
  v.stored_not_sent = [...byId.keys()].filter((id) => !sentIds.has(id)).length;
  v.members_incomplete = [];
  v.members_live_out_of_order = [];
  v.members_live_gaps = [];
  v.phantom_seqs = 0;
  let minDelivered = null;
  for (const m of members) {
    const got = m.seen.get(room);
    const n = got.size;
    minDelivered = minDelivered === null ? n : Math.min(minDelivered, n);
    let complete = got.size === v.head;
    for (let s = 1; complete && s <= v.head; s += 1) complete = got.has(s);
    // Live delivery on one connection: exactly the next seq each time (no gap, no duplicate, no
    // step back) once it started.
    const ooo = m.live.get(room).some((conn) => conn.some((s, i) => i > 0 && s !== conn[i - 1] + 1));
    if (!complete) v.members_incomplete.push(`${m.name}: ${n}/${v.head}`);
    if (ooo) v.members_live_out_of_order.push(m.name);
    const gaps = m.liveGaps(room);
    if (gaps.length) v.members_live_gaps.push(`${m.name} (region ${m.region}): missed ${gaps.length} seqs live: ${gaps.slice(0, 10).join(',')}${gaps.length > 10 ? ',...' : ''}`);
    const ids = [...m.liveIds.get(room), ...m.caughtUp.get(room)];
    v.phantom_seqs += new Set(ids.filter(([s, id]) => bySeq.has(s) && bySeq.get(s) !== id).map(([s]) => s)).size;
  }
  v.delivered_per_member_min = minDelivered ?? 0;
  v.reordered =
    v.members_incomplete.length +
    v.members_live_out_of_order.length +
    v.members_live_gaps.length +
    (v.history_not_gap_free ? 1 : 0) +
    v.ack_seq_mismatch +
    v.phantom_seqs;
  return v;
}

function storeHistory(storeUrl, room) {
  const out = execFileSync('psql', [storeUrl, '-qAtX', '-F', '\t', '-c',
    `SELECT seq, client_msg_id FROM messages WHERE room_id = '${room.replace(/'/g, "''")}' ORDER BY seq`], { encoding: 'utf8' });
  return out.split('\n').filter(Boolean).map((l) => {
    const [seq, id] = l.split('\t');
    return [Number(seq), id];
  });
}

// Two senders and one receiver per region (the senders receive too), a room homed in a (created
// through a) and one in b, every user's socket connected and joined to both rooms.
async function twoRoomsSetup(A, B) {
  const specs = [
    ['sa1', 'a', true], ['sa2', 'a', true], ['ra1', 'a', false],
    ['sb1', 'b', true], ['sb2', 'b', true], ['rb1', 'b', false],
  ];
  const users = {};
  for (const [name, region] of specs) users[name] = await register(region === 'a' ? A : B, name);
  const roomA = await createRoom(A, users.sa1.token, `homed in a ${runTag}`);
  const roomB = await createRoom(B, users.sb1.token, `homed in b ${runTag}`);
  const home = { [roomA.id]: 'a', [roomB.id]: 'b' };
  const problems = [];
  if (roomA.home_region !== 'a') problems.push(`room created through a has home_region ${roomA.home_region}`);
  if (roomB.home_region !== 'b') problems.push(`room created through b has home_region ${roomB.home_region}`);
  const rooms = [roomA.id, roomB.id];
  log(`rooms: ${roomA.id} (home ${roomA.home_region}), ${roomB.id} (home ${roomB.home_region})`);
  const members = specs.map(([name, region]) => new Member(name, region, region === 'a' ? A : B, users[name].token, rooms));
  await Promise.all(members.map((m) => m.connect()));
  await Promise.all(members.map((m) => m.joining));
  for (const m of members) if (m.joinErrors.length) problems.push(`${m.name}: room:join errors at the start: ${m.joinErrors.join(',')}`);
  log(`${members.length} sockets connected and joined to both rooms`);
  const senders = members.filter((m) => specs.find((sp) => sp[0] === m.name)[2]);
  return { users, roomA, roomB, home, rooms, problems, members, senders };
}

// Each sender sends one message into each room every 1000/rate ms without waiting for the answers,
// until stop() says so: client_msg_id `<name>-<home>-<tag><n>` (`fire` sends and records it).
function startSenders(senders, rooms, home, rate, tag, stop, fire) {
  return senders.map(async (m) => {
    let n = 0;
    const start = performance.now();
    while (!stop()) {
      n += 1;
      for (const room of rooms) {
        fire(m, room, `${m.name}-${home[room]}-${tag}${n}`, `${m.name} -> room homed in ${home[room]} #${tag}${n}`);
      }
      await sleep(Math.max(0, start + (n * 1000) / rate - performance.now()));
    }
  });
}

// ---- partition -------------------------------------------------------------------------------------

async function partition(argv) {
  const o = parseArgs(argv, { rate: 5, before: 5, cut: 5, after: 5, timeoutMs: 1500, storeUrl: '', details: '', marginMs: 1000 });
  if (!o.storeUrl) die('--store-url is needed (the database the regions share)');
  const urls = stackUrls();
  const A = urls.a.lb;
  const B = urls.b.lb;
  log(`regions: a ${A}, b ${B}`);

  const { users, home, rooms, problems, members, senders } = await twoRoomsSetup(A, B);

  // Senders: every 1000/rate ms one message into each room, without waiting for the previous ack.
  const sends = []; // one per attempt
  const t0 = performance.now();
  let tCut = Infinity;
  let tHeal = Infinity;
  let stopping = false;
  const pending = new Set();
  const ACK_TIMEOUT = 10000;
  async function send(m, room, cmid, body, attempt) {
    const rec = { sender: m.name, region: m.region, room, cross: home[room] !== m.region, cmid, attempt, t_sent: performance.now() - t0 };
    const r = await m.emit('message:send', { room_id: room, client_msg_id: cmid, body }, ACK_TIMEOUT);
    rec.t_answer = performance.now() - t0;
    rec.ms = rec.t_answer - rec.t_sent;
    if (r.ok) rec.seq = r.message?.seq;
    else rec.code = r.error?.code ?? 'unknown';
    rec.ok = !!r.ok;
    sends.push(rec);
    return rec;
  }
  const bodies = new Map();
  const loops = startSenders(senders, rooms, home, o.rate, '', () => stopping, (m, room, cmid, body) => {
    bodies.set(cmid, { m, room, body });
    const p = send(m, room, cmid, body, 1);
    pending.add(p);
    p.finally(() => pending.delete(p));
  });

  await sleep(o.before * 1000);
  log(`cutting the link: ${await link('cut')}`);
  tCut = performance.now() - t0;
  await sleep(o.cut * 1000);
  tHeal = performance.now() - t0;
  log(`healing the link: ${await link('heal')}`);
  await sleep(o.after * 1000);
  stopping = true;
  await Promise.all(loops);
  log(`senders stopped; waiting for ${pending.size} answers`);
  await Promise.all([...pending]);

  // Classify the first attempts.
  const first = sends.filter((s) => s.attempt === 1);
  const bound = o.timeoutMs + o.marginMs;
  const c = {
    cross_sent_during_cut: 0,
    cross_refused_during_cut: 0,
    acked_across_cut: 0,
    cross_other_errors_during_cut: 0,
    refused_late: 0,
    local_sent_during_cut: 0,
    local_acked_during_cut: 0,
    local_failed_during_cut: 0,
    max_refusal_ms: 0,
  };
  const refusalMs = [];
  for (const s of first) {
    const inCut = s.t_sent >= tCut && s.t_sent < tHeal;
    if (s.cross) {
      // An ack that crossed the link while it was cut: the request cannot have reached the home.
      // (Sent before the cut and answered shortly after it started may still be legitimate.)
      if (s.ok && s.t_answer >= tCut + 500 && s.t_answer < tHeal) c.acked_across_cut += 1;
      if (!inCut) continue;
      c.cross_sent_during_cut += 1;
      if (s.code === 'unavailable') {
        c.cross_refused_during_cut += 1;
        refusalMs.push(s.ms);
        if (s.ms > bound) c.refused_late += 1;
      } else if (!s.ok) {
        c.cross_other_errors_during_cut += 1;
      } else if (s.t_answer < tHeal) {
        c.acked_across_cut += 1;
      } else if (s.t_sent + bound < tHeal) {
        // acked only after the heal although the bound ended before it: not answered in time
        c.refused_late += 1;
      }
    } else if (inCut) {
      c.local_sent_during_cut += 1;
      if (s.ok) c.local_acked_during_cut += 1;
      else c.local_failed_during_cut += 1;
    }
  }
  c.max_refusal_ms = Math.round(Math.max(0, ...refusalMs));
  log(`cut ${(tCut / 1000).toFixed(1)}..${(tHeal / 1000).toFixed(1)} s: ${JSON.stringify(c)}`);
  if (c.cross_sent_during_cut === 0) problems.push('no send crossed the cut: the scenario tested nothing');
  if (c.local_acked_during_cut === 0) problems.push('no local send was acknowledged during the cut');
  const refused = first.filter((s) => !s.ok).length;

  // Retry every send that was not acknowledged, with its client_msg_id and body: idempotent
  // across regions (a refused send may have reached its home when the link healed).
  const ackedIds = new Map(); // cmid -> seq
  const conflicting = [];
  for (const s of sends) if (s.ok) ackedIds.set(s.cmid, s.seq);
  const unacked = [...bodies.keys()].filter((id) => !ackedIds.has(id));
  log(`retrying ${unacked.length} unacknowledged sends`);
  for (let round = 1; round <= 20 && unacked.length; round += 1) {
    const results = await Promise.all(unacked.map((id) => {
      const { m, room, body } = bodies.get(id);
      return send(m, room, id, body, round + 1);
    }));
    for (const r of results) if (r.ok) ackedIds.set(r.cmid, r.seq);
    const left = unacked.filter((id) => !ackedIds.has(id));
    unacked.length = 0;
    unacked.push(...left);
    if (unacked.length) await sleep(1000);
  }
  if (unacked.length) problems.push(`${unacked.length} sends still not acknowledged after 20 retries since the heal`);
  // Two acks of one client_msg_id with different seqs: a duplicate the store may not show.
  for (const s of sends) if (s.ok && ackedIds.get(s.cmid) !== s.seq) conflicting.push(s.cmid);

  // Heads from each room's home, then every member catches up (live, or room:sync).
  const heads = {};
  for (const room of rooms) {
    const base = home[room] === 'a' ? A : B;
    const r = await api(base, 'GET', `/api/v1/rooms/${room}`, undefined, users.sa1.token);
    heads[room] = r.body?.head_seq ?? 0;
  }
  const maxAcked = {};
  for (const [id, seq] of ackedIds) {
    const room = bodies.get(id).room;
    maxAcked[room] = Math.max(maxAcked[room] ?? 0, seq);
  }
  for (const room of rooms) heads[room] = Math.max(heads[room], maxAcked[room] ?? 0);
  log(`heads: ${JSON.stringify(heads)}; waiting for every member to catch up`);
  const caughtUp = () => members.every((m) => rooms.every((r) => m.last(r) >= heads[r]));
  const deadline = performance.now() + 30000;
  while (!caughtUp() && performance.now() < deadline) await sleep(100);
  // Sockets stay connected throughout (they talk to their own region only): what they have not
  // received live 30 s after the senders stopped, replication did not bring by itself.
  const stalled = [];
  for (const m of members) for (const r of rooms) if (m.last(r) < heads[r]) stalled.push(`${m.name}/${home[r]}: ${m.last(r)}/${heads[r]}`);
  if (stalled.length) {
    log(`not caught up live 30 s after the senders stopped: ${stalled.join(', ')}; room:sync`);
    for (const m of members) for (const r of rooms) await m.sync(r);
  }

  // The store: only the home writes; wait for the write-back.
  const storeDeadline = performance.now() + 60000;
  let histories;
  for (;;) {
    histories = Object.fromEntries(rooms.map((r) => [r, storeHistory(o.storeUrl, r)]));
    if (rooms.every((r) => histories[r].length >= heads[r]) || performance.now() > storeDeadline) break;
    await sleep(500);
  }

  const perRoom = rooms.map((room) => {
    const acked = new Map([...ackedIds].filter(([id]) => bodies.get(id).room === room));
    const sentIds = new Set([...bodies.keys()].filter((id) => bodies.get(id).room === room));
    return roomVerdict(room, histories[room], acked, sentIds, members);
  });
  for (const m of members) m.close();

  const sum = (k) => perRoom.reduce((a, v) => a + v[k], 0);
  const v = {
    sent: bodies.size,
    acked: ackedIds.size,
    stored: sum('stored'),
    refused,
    delivered_per_client_min: Math.min(...perRoom.map((r) => r.delivered_per_member_min)),
    lost: sum('lost'),
    duplicated: sum('duplicated') + conflicting.length,
    reordered: sum('reordered'),
    acked_across_cut: c.acked_across_cut,
    refused_late: c.refused_late,
    local_failed_during_cut: c.local_failed_during_cut,
    stalled: stalled.length,
    max_refusal_ms: c.max_refusal_ms,
  };
  const line =
    `scenario=region-partition sent=${v.sent} acked=${v.acked} stored=${v.stored} refused=${v.refused} ` +
    `delivered_per_client_min=${v.delivered_per_client_min} lost=${v.lost} duplicated=${v.duplicated} ` +
    `reordered=${v.reordered} acked_across_cut=${v.acked_across_cut} refused_late=${v.refused_late} ` +
    `local_failed_during_cut=${v.local_failed_during_cut} stalled=${v.stalled} max_refusal_ms=${v.max_refusal_ms}`;
  if (c.cross_other_errors_during_cut) problems.push(`${c.cross_other_errors_during_cut} sends across the cut failed with another error than unavailable`);
  const ok = v.lost === 0 && v.duplicated === 0 && v.reordered === 0 && v.acked_across_cut === 0 &&
    v.refused_late === 0 && v.local_failed_during_cut === 0 && v.stalled === 0 && problems.length === 0;
  const details = {
    verdict: v, ok, problems, cut: { t_cut_ms: Math.round(tCut), t_heal_ms: Math.round(tHeal), ...c },
    refusal_ms: stats(refusalMs), heads, rooms: perRoom,
    codes: first.reduce((a, s) => ({ ...a, [s.ok ? 'ok' : s.code]: (a[s.ok ? 'ok' : s.code] ?? 0) + 1 }), {}),
    retries: sends.filter((s) => s.attempt > 1).length,
    stalled,
    members: Object.fromEntries(members.map((m) => [m.name, {
      region: m.region,
      connections: m.connections,
      join_errors: m.joinErrors,
      rooms: Object.fromEntries(rooms.map((r) => [`home ${home[r]}`, {
        live: m.live.get(r).reduce((a, c) => a + c.length, 0),
        caught_up: m.caughtUp.get(r).length,
        last: m.last(r),
      }])),
    }])),
  };
  if (o.details) writeFileSync(o.details, JSON.stringify({ ...details, sends }, null, 1));
  console.error(JSON.stringify(details));
  console.log(line);
  if (!ok) {
    for (const p of problems) log(`PROBLEM: ${p}`);
    for (const r of perRoom) {
      const h = `room homed in ${home[r.room]}`;
      for (const x of r.members_live_gaps) log(`PROBLEM: ${h}: ${x}`);
      for (const x of r.members_live_out_of_order) log(`PROBLEM: ${h}: ${x} received live seqs out of order`);
      for (const x of r.members_incomplete) log(`PROBLEM: ${h}: ${x} received in all`);
      if (r.lost) log(`PROBLEM: ${h}: ${r.lost} acknowledged messages not in the store`);
      if (r.duplicated) log(`PROBLEM: ${h}: ${r.duplicated} client_msg_ids stored more than once`);
      if (r.history_not_gap_free) log(`PROBLEM: ${h}: the store's seqs are not 1..${r.head}`);
      if (r.ack_seq_mismatch) log(`PROBLEM: ${h}: ${r.ack_seq_mismatch} acks name a seq the store gives another message`);
    }
    if (conflicting.length) log(`PROBLEM: ${conflicting.length} client_msg_ids acknowledged with two different seqs`);
    if (stalled.length) log(`PROBLEM: not caught up live 30 s after the senders stopped: ${stalled.join(', ')}`);
    if (v.acked_across_cut) log(`PROBLEM: ${v.acked_across_cut} sends into a room homed across the cut were acknowledged during the cut`);
    if (v.refused_late) log(`PROBLEM: ${v.refused_late} sends across the cut not refused within ${bound} ms`);
    if (v.local_failed_during_cut) log(`PROBLEM: ${v.local_failed_during_cut} sends into a locally homed room failed during the cut`);
    process.exitCode = 1;
  }
}

// ---- bench -----------------------------------------------------------------------------------------

async function scrapeLag(instances) {
  // chatmesh_replication_lag_seconds{peer_region="a"} on each of b's instances: the largest.
  let max = null;
  for (const u of instances) {
    try {
      const r = await fetch(`${u}/metrics`, { signal: AbortSignal.timeout(2000) });
      const text = await r.text();
      for (const line of text.split('\n')) {
        if (!line.startsWith('chatmesh_replication_lag_seconds')) continue;
        const v = Number(line.trim().split(/\s+/).pop());
        if (Number.isFinite(v)) max = max === null ? v : Math.max(max, v);
      }
    } catch {
      // an instance that does not answer in 2 s counts as no sample
    }
  }
  return max;
}

async function bench(argv) {
  const o = parseArgs(argv, { rate: 50, seconds: 30, delayMs: 25, warmup: 20, label: '', out: '' });
  const urls = stackUrls();
  const A = urls.a.lb;
  const B = urls.b.lb;
  const sender = await register(B, 'bs');
  const recvA = await register(A, 'bra');
  const recvB = await register(B, 'brb');
  const room = await createRoom(A, recvA.token, `bench homed in a ${runTag}`);
  if (room.home_region !== 'a') die(`room created through a has home_region ${room.home_region}`);
  const ms = [
    new Member('sender-b', 'b', B, sender.token, [room.id]),
    new Member('receiver-a', 'a', A, recvA.token, [room.id]),
    new Member('receiver-b', 'b', B, recvB.token, [room.id]),
  ];
  await Promise.all(ms.map((m) => m.connect()));
  await Promise.all(ms.map((m) => m.joining));
  for (const m of ms) if (m.joinErrors.length) die(`${m.name}: room:join failed: ${m.joinErrors.join(',')}`);
  const [snd, ra, rb] = ms;

  // Warm-up (connections between the regions, caches): not measured.
  for (let i = 1; i <= o.warmup; i += 1) {
    const r = await snd.emit('message:send', { room_id: room.id, client_msg_id: `w${i}`, body: `warm-up ${i}` }, 10000);
    if (!r.ok) die(`warm-up send ${i}: ${JSON.stringify(r.error)}`);
  }
  await sleep(1000);

  // The link itself: HTTP round trips from b to a's internal frontend through the link relay and
  // a's HAProxy (chatmesh answers 401 without a token) — 2d plus what relay, HAProxy and HTTP cost.
  const linkRtt = [];
  if (urls.b['peer-a']) {
    for (let i = 0; i < 50; i += 1) {
      const t = performance.now();
      try {
        const r = await fetch(`${urls.b['peer-a']}/internal/v1/ping`, { signal: AbortSignal.timeout(5000) });
        await r.arrayBuffer();
        if (i >= 5) linkRtt.push(performance.now() - t); // the first ones open the connection
      } catch {
        // not counted
      }
    }
  }

  const sent = []; // {cmid, t, ack_ms, seq, code}
  const lag = [];
  let lagDone = false;
  const lagLoop = (async () => {
    while (!lagDone) {
      const v = await scrapeLag(urls.b.instances);
      if (v !== null) lag.push(v);
      await sleep(1000);
    }
  })();
  const n = Math.round(o.rate * o.seconds);
  const interval = 1000 / o.rate;
  const start = performance.now();
  const inflight = [];
  for (let i = 1; i <= n; i += 1) {
    const next = start + (i - 1) * interval;
    const wait = next - performance.now();
    if (wait > 0) await sleep(wait);
    const rec = { cmid: `m${i}`, t: performance.now() };
    sent.push(rec);
    inflight.push(snd.emit('message:send', { room_id: room.id, client_msg_id: rec.cmid, body: `bench ${i}` }, 10000).then((r) => {
      rec.ack_ms = performance.now() - rec.t;
      if (r.ok) rec.seq = r.message.seq;
      else rec.code = r.error?.code ?? 'unknown';
    }));
  }
  const elapsed = (performance.now() - start) / 1000;
  await Promise.all(inflight);
  // Deliveries: wait until both receivers have every acked seq (10 s at most).
  const seqs = sent.filter((s) => s.seq !== undefined).map((s) => s.seq);
  const head = Math.max(0, ...seqs);
  const deadline = performance.now() + 10000;
  while (performance.now() < deadline && !(ra.last(room.id) >= head && rb.last(room.id) >= head)) await sleep(50);
  lagDone = true;
  await lagLoop;

  const deliver = (m) => sent.filter((s) => s.seq !== undefined).map((s) => {
    const t = m.recvAt.get(`${room.id} ${s.seq}`);
    return t === undefined ? null : t - s.t;
  });
  const dA = deliver(ra);
  const dB = deliver(rb);
  const order = (m) => m.live.get(room.id).reduce((a, conn) => a + conn.filter((s, i) => i > 0 && s !== conn[i - 1] + 1).length, 0);
  const d = o.delayMs;
  const ack = stats(sent.filter((s) => s.seq !== undefined).map((s) => s.ack_ms));
  const delA = stats(dA.filter((x) => x !== null));
  const delB = stats(dB.filter((x) => x !== null));
  const result = {
    label: o.label,
    delay_ms: d,
    rate: o.rate,
    seconds: o.seconds,
    achieved_rate: Math.round((n / elapsed) * 10) / 10,
    sent: n,
    acked: seqs.length,
    errors: sent.filter((s) => s.code !== undefined).reduce((a, s) => ({ ...a, [s.code]: (a[s.code] ?? 0) + 1 }), {}),
    ack_ms: ack,
    deliver_a_ms: delA,
    deliver_b_ms: delB,
    missing_a: dA.filter((x) => x === null).length,
    missing_b: dB.filter((x) => x === null).length,
    order_violations: order(ra) + order(rb) + order(snd),
    replication_lag_s: lag.length ? { samples: lag.length, max: Math.max(...lag), mean: lag.reduce((a, b) => a + b, 0) / lag.length } : null,
    link_http_rtt_ms: stats(linkRtt),
    floors_ms: { ack: 2 * d, deliver_b: 2 * d, deliver_a: d },
    targets_ms: { ack_p99: 2 * d + 10, deliver_b_p99: 2 * d + 15 },
  };
  result.meets = {
    ack_p99: ack.p99 !== null && ack.p99 <= 2 * d + 10,
    deliver_b_p99: delB.p99 !== null && delB.p99 <= 2 * d + 15,
    order: result.order_violations === 0 && result.missing_a === 0 && result.missing_b === 0,
  };
  for (const m of ms) m.close();
  const text = JSON.stringify(result);
  if (o.out) writeFileSync(o.out, `${text}\n`);
  console.log(text);
}


// ---- takeover: region loss, give back, isolation ------------------------------------------------

function lc(args, timeoutMs = 300000) {
  return new Promise((resolve, reject) => {
    execFile(LC, args, { encoding: 'utf8', timeout: timeoutMs, env: process.env }, (err, stdout, stderr) => {
      if (err) reject(new Error(`local-cluster.sh ${args.join(' ')}: ${(stderr || err.message).slice(-2000)}`));
      else resolve(stdout.trim());
    });
  });
}

// JSON log lines of a region's instances (local-cluster.sh state dir) whose message contains
// `needle`, parsed.
function logLines(region, needle) {
  const dir = process.env.LOCAL_CLUSTER_DIR;
  if (!dir) return [];
  const out = [];
  for (const sub of readdirSync(path.join(dir, region), { withFileTypes: true })) {
    if (!sub.isDirectory() || !sub.name.startsWith('chatmesh-')) continue;
    const file = path.join(dir, region, sub.name, `${region}-${sub.name}.out`);
    let text = '';
    try { text = readFileSync(file, 'utf8'); } catch { continue; }
    for (const l of text.split('\n')) {
      if (!l.includes(needle)) continue;
      try { out.push(JSON.parse(l)); } catch { /* not JSON */ }
    }
  }
  return out;
}

async function takeover(argv) {
  const o = parseArgs(argv, { phases: 'loss,give-back,isolation', rate: 5, storeUrl: '', details: '', settle: 5, ackTimeoutMs: 5000 });
  if (!o.storeUrl) die('--store-url is needed (the database the regions share)');
  const phases = o.phases.split(',').filter(Boolean);
  for (const p of phases) if (!['loss', 'give-back', 'isolation'].includes(p)) die(`unknown phase ${p}`);
  const urls = stackUrls();
  const A = urls.a.lb;
  const B = urls.b.lb;
  log(`regions: a ${A}, b ${B}; phases ${phases.join(', ')}`);

  const { roomA, home, rooms, problems, members, senders } = await twoRoomsSetup(A, B);
  const aMembers = members.filter((m) => m.region === 'a');

  const t0 = performance.now();
  const now = () => performance.now() - t0;
  const sends = [];
  const bodies = new Map();
  const pending = new Set();
  async function send(m, room, cmid, body, attempt) {
    const rec = { sender: m.name, region: m.region, room, cmid, attempt, t_sent: now() };
    const r = await m.emit('message:send', { room_id: room, client_msg_id: cmid, body }, o.ackTimeoutMs);
    rec.t_answer = now();
    if (r.ok) rec.seq = r.message?.seq;
    else rec.code = r.error?.code ?? 'unknown';
    rec.ok = !!r.ok;
    sends.push(rec);
    return rec;
  }
  let stopping = false;
  const fire = (m, room, cmid, body) => {
    bodies.set(cmid, { m, room, body });
    const p = send(m, room, cmid, body, 1);
    pending.add(p);
    p.finally(() => pending.delete(p));
  };
  const loops = startSenders(senders, rooms, home, o.rate, '', () => stopping, fire);
  const acked = new Map(); // cmid -> seq
  const firstAckOfA = (after, region) =>
    sends.filter((x) => x.ok && x.room === roomA.id && x.t_sent >= after && (!region || x.region === region))
      .reduce((t, x) => Math.min(t, x.t_answer), Infinity);
  const untilAckOfA = async (after, within, what, region) => {
    const deadline = performance.now() + within;
    while (firstAckOfA(after, region) === Infinity) {
      if (performance.now() > deadline) throw new Error(`${what}: no send into a's room acknowledged in ${within / 1000} s`);
      await sleep(100);
    }
    return firstAckOfA(after, region);
  };
  // Longest stretch without an acknowledged send into a's room between two times (s).
  const longestGap = (from, to) => {
    const ts = sends.filter((x) => x.ok && x.room === roomA.id && x.t_answer >= from && x.t_answer <= to).map((x) => x.t_answer).sort((x, y) => x - y);
    let prev = from;
    let gap = 0;
    for (const t of [...ts, to]) { gap = Math.max(gap, t - prev); prev = t; }
    return Math.round(gap) / 1000;
  };

  // After a phase: retry what was not acknowledged, let every member catch up, read the store.
  async function settle(name, extra) {
    stopping = true;
    await Promise.all(loops.splice(0));
    await Promise.all([...pending]);
    for (const x of sends) if (x.ok) acked.set(x.cmid, x.seq);
    let unacked = [...bodies.keys()].filter((id) => !acked.has(id));
    log(`${name}: retrying ${unacked.length} unacknowledged sends`);
    const conflicting = [];
    for (let round = 1; round <= 30 && unacked.length; round += 1) {
      const results = await Promise.all(unacked.map((id) => {
        const { m, room, body } = bodies.get(id);
        return send(m, room, id, body, round + 1);
      }));
      for (const r of results) if (r.ok) acked.set(r.cmid, r.seq);
      unacked = unacked.filter((id) => !acked.has(id));
      if (unacked.length) await sleep(1000);
    }
    if (unacked.length) problems.push(`${name}: ${unacked.length} sends still not acknowledged after 30 retries`);
    for (const x of sends) if (x.ok && acked.get(x.cmid) !== x.seq) conflicting.push(x.cmid);
    const heads = {};
    for (const [id, seq] of acked) {
      const room = bodies.get(id).room;
      heads[room] = Math.max(heads[room] ?? 0, seq);
    }
    const deadline = performance.now() + 30000;
    const caughtUp = () => members.every((m) => rooms.every((r) => m.last(r) >= (heads[r] ?? 0)));
    while (!caughtUp() && performance.now() < deadline) await sleep(100);
    const stalled = [];
    for (const m of members) for (const r of rooms) if (m.last(r) < (heads[r] ?? 0)) stalled.push(`${m.name}/${home[r]}: ${m.last(r)}/${heads[r]}`);
    if (stalled.length) {
      log(`${name}: not caught up live 30 s after the senders stopped: ${stalled.join(', ')}; room:sync`);
      for (const m of members) for (const r of rooms) await m.sync(r);
    }
    let histories;
    const storeDeadline = performance.now() + 60000;
    for (;;) {
      histories = Object.fromEntries(rooms.map((r) => [r, storeHistory(o.storeUrl, r)]));
      if (rooms.every((r) => histories[r].length >= (heads[r] ?? 0)) || performance.now() > storeDeadline) break;
      await sleep(500);
    }
    const perRoom = rooms.map((room) => {
      const ackedRoom = new Map([...acked].filter(([id]) => bodies.get(id).room === room));
      const sentIds = new Set([...bodies.keys()].filter((id) => bodies.get(id).room === room));
      return roomVerdict(room, histories[room], ackedRoom, sentIds, members);
    });
    // Split brain: a (room, seq) at which two different messages were seen anywhere.
    let splitBrain = 0;
    for (const room of rooms) {
      const seen = new Map();
      const see = (seq, id) => seen.set(seq, (seen.get(seq) ?? new Set()).add(id));
      for (const [seq, id] of histories[room]) see(seq, id);
      for (const m of members) for (const [seq, id] of [...m.liveIds.get(room), ...m.caughtUp.get(room)]) see(seq, id);
      for (const ids of seen.values()) if (ids.size > 1) splitBrain += 1;
    }
    const sum = (k) => perRoom.reduce((a, v) => a + v[k], 0);
    const v = {
      sent: bodies.size, acked: acked.size, stored: sum('stored'),
      lost: sum('lost'), duplicated: sum('duplicated') + conflicting.length, reordered: sum('reordered'),
      split_brain_seqs: splitBrain, stalled: stalled.length, ...extra,
    };
    const line = `scenario=${name} ` + Object.entries(v).map(([k, x]) => `${k}=${x}`).join(' ');
    const ok = v.lost === 0 && v.duplicated === 0 && v.reordered === 0 && v.split_brain_seqs === 0 && v.stalled === 0;
    console.log(line);
    console.error(JSON.stringify({ phase: name, verdict: v, ok, heads, rooms: perRoom }));
    if (!ok) {
      problems.push(`${name}: ${line}`);
      for (const r of perRoom) {
        const h = `${name}: room homed in ${home[r.room]}`;
        for (const x of [...r.members_live_gaps, ...r.members_live_out_of_order, ...r.members_incomplete]) log(`PROBLEM: ${h}: ${x}`);
        if (r.lost) log(`PROBLEM: ${h}: ${r.lost} acknowledged messages not in the store`);
        if (r.history_not_gap_free) log(`PROBLEM: ${h}: the store's seqs are not 1..${r.head}`);
        if (r.phantom_seqs) log(`PROBLEM: ${h}: ${r.phantom_seqs} seqs a client saw with another message than the store's`);
      }
    }
    // The next phase sends again, with new client_msg_ids.
    stopping = false;
    loops.push(...startSenders(senders, rooms, home, o.rate, name.replace(/[^a-z]/g, ''), () => stopping, fire));
    return ok;
  }

  // The token of the last takeover of a's rooms logged by region `by`'s instances.
  const tokenAfter = () => {
    const t = logLines('b', 'took over the rooms homed there').at(-1);
    return t?.token;
  };
  let allOk = problems.length === 0;
  for (const phase of phases) {
    await sleep(o.settle * 1000);
    if (phase === 'loss') {
      const tKill = now();
      log(`loss: ${await lc(['region', 'kill', 'a'])}`);
      await Promise.all(aMembers.map((m) => m.moveTo(B)));
      const first = await untilAckOfA(tKill, 60000, 'loss');
      log(`loss: a's room acknowledged again ${((first - tKill) / 1000).toFixed(1)} s after the kill`);
      await sleep(o.settle * 1000);
      const took = logLines('b', 'took over the rooms homed there').at(-1) ?? {};
      allOk = (await settle('region-loss', {
        unavailable_s: Math.round(first - tKill) / 1000,
        token: took.token,
        written_back: took.written_back,
        dropped_beyond_gap: took.dropped_beyond_gap,
        landed_past_held: took.landed_past_held,
      })) && allOk;
    } else if (phase === 'give-back') {
      log('give-back: bringing region a back');
      await lc(['up']);
      const tBack = now();
      await Promise.all(aMembers.map((m) => m.moveTo(A, 'a')));
      await sleep(o.settle * 1000);
      const tStart = now();
      const report = JSON.parse((await lc(['region', 'takeover', 'a', '--by', 'a'])).split('\n').pop());
      const tDone = now();
      log(`give-back: ${JSON.stringify(report)} in ${((tDone - tStart) / 1000).toFixed(1)} s`);
      const first = await untilAckOfA(tDone, 30000, 'give-back');
      await sleep(o.settle * 1000);
      allOk = (await settle('give-back', {
        back_s: Math.round(tStart - tBack) / 1000,
        handback_s: Math.round(tDone - tStart) / 1000,
        unavailable_s: longestGap(tStart, Math.max(first, tDone)),
        token: report.token,
      })) && allOk;
    } else if (phase === 'isolation') {
      const tCut = now();
      await lc(['link', 'cut']);
      await lc(['region', 'isolate', 'a']);
      log('isolation: link cut, a cut off the store');
      // b's users' sends into a's room, sent after the cut: acknowledged only once b decides it
      // (before, they are forwarded to a, across the cut).
      const firstByB = await untilAckOfA(tCut + 1000, 60000, 'isolation', 'b');
      const firstB = firstByB;
      // Acks of a's room by a's own instances after the cut (a's users are on a).
      const lastA = sends.filter((x) => x.ok && x.room === roomA.id && x.region === 'a' && x.t_sent >= tCut)
        .reduce((t, x) => Math.max(t, x.t_answer), -Infinity);
      log(`isolation: last ack by a ${lastA === -Infinity ? 'none' : ((lastA - tCut) / 1000).toFixed(1)} s, first by b ${((firstByB - tCut) / 1000).toFixed(1)} s after the cut`);
      if (lastA !== -Infinity && lastA >= firstByB) problems.push('isolation: a acknowledged a send into its room after b started deciding it');
      await sleep(o.settle * 1000);
      await lc(['link', 'heal']);
      await lc(['region', 'rejoin', 'a']);
      log('isolation: healed');
      await sleep(o.settle * 1000);
      // What a sequenced that b never had: dropped by a when it stepped down, refused by the
      // store (a's write-back) and by b (a's outbox): the evidence that fencing did the work.
      const stepped = logLines('a', 'stepped down').filter((l) => l.token === tokenAfter('a'));
      allOk = (await settle('region-isolation', {
        a_last_ack_s: lastA === -Infinity ? 'none' : Math.round(lastA - tCut) / 1000,
        b_first_ack_s: Math.round(firstB - tCut) / 1000,
        stale_dropped_by_a: stepped.reduce((n, l) => Math.max(n, l.dropped ?? 0), 0),
        refused_by_store: logLines('a', 'the store refused this message').length,
        refused_by_b: logLines('b', 'refused a message of a fenced epoch').length,
      })) && allOk;
    }
  }
  stopping = true;
  await Promise.all(loops);
  await Promise.all([...pending]);
  for (const m of members) m.close();
  if (o.details) writeFileSync(o.details, JSON.stringify({ problems, sends }, null, 1));
  for (const p of problems) log(`PROBLEM: ${p}`);
  if (!allOk || problems.length) process.exitCode = 1;
}

const [cmd, ...rest] = process.argv.slice(2);
const commands = { partition, bench, takeover };
if (!commands[cmd]) die('usage: regions-client.mjs partition|takeover|bench [options] (see the header)');
commands[cmd](rest).then(
  () => setTimeout(() => process.exit(process.exitCode ?? 0), 100),
  (e) => {
    console.error(`regions-client: ${e.stack || e}`);
    process.exit(2);
  },
);
