// Cluster mode (CHATMESH_REDIS_URL set) against API.md with the stock socket.io-client: three
// instances on one private redis-server and one fresh database, sockets spread over the instances.
// The contract must be the same as in embedded mode whichever instance a client talks to, and
// whichever durable store the cluster writes back to: CHATMESH_CLUSTER_STORE picks it, 'postgres'
// (the default; the machine's PostgreSQL) or 'mongodb' (a private SecantusDB, or the mongod that
// CHATMESH_TEST_MONGODB_URL names); cluster-mongodb.test.mjs runs this file with 'mongodb'.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startCluster,
  api,
  registerUser,
  login,
  createRoom,
  connect,
  emitAck,
  waitFor,
  sleep,
  collect,
  nextEvent,
  newCmid,
  joinRoom,
  sendMessage,
  fetchAllMessages,
} from './harness.mjs';

const STORE = process.env.CHATMESH_CLUSTER_STORE || 'postgres';
// 2: n1 and n3 in region a, n2 in region b, each region on its own Redis, every request between
// them through a delaying link (cluster-regions.test.mjs); rooms are homed where they were created.
const REGIONS = Number(process.env.CHATMESH_CLUSTER_REGIONS || 1);

// How long we watch for an event that must NOT arrive. Longer than in embedded mode: cross-instance
// events go through Redis pub/sub.
const QUIET_MS = 800;
const TRANSPORTS = [['websocket'], ['polling'], ['polling', 'websocket']];
const tname = (t) => t.join('+');

let cluster;
let n; // n[0..2]: the servers n1, n2, n3
const sockets = new Set();

// A room whose only socket on n3 left early; the last test rejoins it there after the instance had
// time to drop its idle subscription (see the test 'a room left idle on an instance ...').
const IDLE_MS = 32000;
let idle;

before(async () => {
  cluster = await startCluster(3, {}, { store: STORE, regions: REGIONS });
  n = cluster.servers;
  const owner = await registerUser(n[0].url, 'io');
  const room = await createRoom(n[0].url, owner.token, 'idle');
  const s3 = await open(n[2], owner.token, ['websocket']);
  const seen = collect(s3, 'message:new', (m) => m.room_id === room.id);
  await joinRoom(s3, room.id);
  const s1 = await open(n[0], owner.token, ['websocket']);
  await joinRoom(s1, room.id);
  const first = await sendMessage(s1, room.id, 'before idling');
  await waitFor(() => seen.length === 1, 10000, 'n3 socket receives the first message of the idle room');
  s3.close();
  s1.close();
  idle = { owner, room, first, since: Date.now() };
});

after(async () => {
  for (const s of sockets) s.close();
  await cluster?.close();
});

/** Connect on server `srv` and remember the socket for cleanup; `label` shows up in failures. */
async function open(srv, token, transports = ['websocket']) {
  const s = await connect(srv.url, token, transports).catch((e) => {
    throw new Error(`connect to ${srv.instanceId} over ${tname(transports)}: ${e.message}`);
  });
  s.where = `${srv.instanceId}/${tname(transports)}`;
  sockets.add(s);
  return s;
}

function assertAckError(ack, code, what) {
  assert.ok(ack && typeof ack === 'object', `${what}: ack is not an object: ${JSON.stringify(ack)}`);
  assert.equal(ack.ok, false, `${what}: expected ok:false/${code}, got ${JSON.stringify(ack)}`);
  assert.equal(ack.error?.code, code, `${what}: expected error.code ${code}, got ${JSON.stringify(ack)}`);
  assert.equal(typeof ack.error.message, 'string', `${what}: error.message must be a string`);
}

/** Check that the seqs of `list` are exactly from..to, in order. */
function assertSeqRun(list, from, to, what) {
  const seqs = list.map((m) => m.seq);
  for (let i = 0; i < seqs.length; i++) {
    if (seqs[i] !== from + i) {
      assert.fail(`${what}: seq ${seqs[i]} at position ${i} (expected ${from + i}); around: ${seqs.slice(Math.max(0, i - 3), i + 4)}`);
    }
  }
  assert.equal(seqs.length, to - from + 1, `${what}: expected seqs ${from}..${to}, got ${seqs.length} messages`);
}

async function clusterView(srv) {
  const r = await api(srv.url, 'GET', '/api/v1/cluster', undefined, cluster.env.CHATMESH_ADMIN_TOKEN);
  assert.equal(r.status, 200, `GET /api/v1/cluster on ${srv.instanceId}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
}

describe(`cluster of 3 instances (store: ${STORE}, regions: ${REGIONS})`, () => {
  test('conformance with sockets spread over the instances, websocket and polling mixed', async () => {
    // A registers on n1 and logs in on n2 and n3: one JWT secret for the whole cluster.
    const a = await registerUser(n[0].url, 'ca');
    const a2 = await login(n[1].url, a.user.username);
    const a3 = await login(n[2].url, a.user.username);
    assert.equal(a2.user.id, a.user.id, 'login on n2 finds the user registered on n1');
    assert.equal(a3.user.id, a.user.id, 'login on n3 finds the user registered on n1');
    for (const [i, tok] of [a.token, a2.token, a3.token].entries()) {
      for (const srv of n) {
        const me = await api(srv.url, 'GET', '/api/v1/users/me', undefined, tok);
        assert.equal(me.status, 200, `GET /users/me on ${srv.instanceId} with the token from n${i + 1}: ${me.status} ${JSON.stringify(me.body)}`);
        assert.equal(me.body.id, a.user.id);
      }
    }
    const b = await registerUser(n[1].url, 'cb');
    const c = await registerUser(n[2].url, 'cc');

    const room = await createRoom(n[0].url, a.token, 'spread');
    for (const srv of n) {
      const r = await api(srv.url, 'GET', `/api/v1/rooms/${room.id}`, undefined, b.token);
      assert.equal(r.status, 200, `GET room created on n1 from ${srv.instanceId}: ${r.status} ${JSON.stringify(r.body)}`);
      assert.equal(r.body.id, room.id);
    }

    // Round robin over n1, n2, n3; transports rotate too, so every instance serves two different ones.
    const plan = [
      { u: a, tok: a.token },
      { u: a, tok: a2.token },
      { u: b, tok: b.token },
      { u: c, tok: c.token },
      { u: b, tok: b.token },
      { u: c, tok: c.token },
    ];
    const socks = [];
    for (const [i, p] of plan.entries()) {
      const srv = n[i % 3];
      const s = await open(srv, p.tok, TRANSPORTS[(i + Math.floor(i / 3)) % 3]);
      socks.push({ s, srv, user: p.u, where: s.where });
    }
    // B and C join the room created on n1 through sockets on n2/n3 (public room: room:join joins it).
    const order = [2, 5, 4, 3, 1, 0];
    for (const i of order) {
      const j = await joinRoom(socks[i].s, room.id);
      assert.equal(j.room.id, room.id);
      assert.equal(j.head_seq, 0);
    }
    const members = await api(n[0].url, 'GET', `/api/v1/rooms/${room.id}/members`, undefined, a.token);
    assert.equal(members.status, 200);
    assert.deepEqual(
      new Set(members.body.members.map((m) => m.id)),
      new Set([a.user.id, b.user.id, c.user.id]),
      'members on n1 after joins on n2/n3',
    );

    // message:send on n2 -> identical message:new on every joined socket of every instance.
    const got = socks.map(({ s }) => collect(s, 'message:new', (m) => m.room_id === room.id));
    const m1 = await sendMessage(socks[1].s, room.id, 'hello from n2 ✓');
    assert.equal(m1.seq, 1);
    assert.equal(m1.sender_id, a.user.id);
    await waitFor(() => got.every((l) => l.length >= 1), 10000, 'message:new on every socket').catch((e) => {
      throw new Error(`${e.message}; missing on: ${socks.filter((_, i) => got[i].length === 0).map((x) => x.where)}`);
    });
    const m2 = await sendMessage(socks[5].s, room.id, 'and from n3');
    await waitFor(() => got.every((l) => l.length >= 2), 10000, 'second message:new on every socket');
    await sleep(QUIET_MS);
    socks.forEach(({ where }, i) => assert.deepEqual(got[i], [m1, m2], `message:new on ${where}`));

    // typing on n3 reaches every other socket of the room (n1, n2, and n3's other socket), not the sender.
    const typist = socks[2]; // B on n3
    assert.equal(typist.srv, n[2]);
    const typ = socks.map(({ s }) => collect(s, 'typing', (t) => t.room_id === room.id));
    const ack = await emitAck(typist.s, 'typing', { room_id: room.id });
    assert.equal(ack.ok, true, JSON.stringify(ack));
    await waitFor(() => typ.every((l, i) => i === 2 || l.length >= 1), 10000, 'typing on the other sockets').catch((e) => {
      throw new Error(`${e.message}; missing on: ${socks.filter((_, i) => i !== 2 && typ[i].length === 0).map((x) => x.where)}`);
    });
    await sleep(QUIET_MS);
    socks.forEach(({ where }, i) => {
      if (i === 2) assert.deepEqual(typ[i], [], `the typist's own socket (${where}) gets no typing`);
      else assert.deepEqual(typ[i], [{ room_id: room.id, user_id: b.user.id }], `typing on ${where}`);
    });

    // room:updated after PATCH on n1 reaches every joined socket, on n2/n3 too.
    const outsider = await registerUser(n[2].url, 'co');
    const outSocks = [await open(n[1], outsider.token, ['websocket']), await open(n[2], outsider.token, ['polling'])];
    const outRoomUpd = outSocks.map((s) => collect(s, 'room:updated'));
    const outUserUpd = outSocks.map((s) => collect(s, 'user:updated'));
    const roomUpd = socks.map(({ s }) => collect(s, 'room:updated', (r) => r.id === room.id && r.topic === 'cluster topic'));
    const patch = await api(n[0].url, 'PATCH', `/api/v1/rooms/${room.id}`, { name: 'renamed on n1', topic: 'cluster topic' }, a.token);
    assert.equal(patch.status, 200, JSON.stringify(patch.body));
    await waitFor(() => roomUpd.every((l) => l.length >= 1), 10000, 'room:updated on every socket').catch((e) => {
      throw new Error(`${e.message}; missing on: ${socks.filter((_, i) => roomUpd[i].length === 0).map((x) => x.where)}`);
    });
    socks.forEach(({ where }, i) => {
      const ev = roomUpd[i][0];
      assert.equal(ev.name, 'renamed on n1', `room:updated name on ${where}`);
      assert.equal(ev.owner_id, a.user.id);
      assert.equal(ev.head_seq, 2, `room:updated head_seq on ${where}`);
    });
    // The PATCH is visible over REST on every instance (L1 caches invalidated).
    for (const srv of n) {
      await waitFor(
        async () => (await api(srv.url, 'GET', `/api/v1/rooms/${room.id}`, undefined, b.token)).body?.topic === 'cluster topic',
        5000,
        `GET room on ${srv.instanceId} shows the PATCH made on n1`,
      );
    }

    // user:updated: C patches its profile on n1; every socket sharing the room gets it, on every instance.
    const name = `C renamed ${Date.now()}`;
    const userUpd = socks.map(({ s }) => collect(s, 'user:updated', (u) => u.id === c.user.id && u.display_name === name));
    const up = await api(n[0].url, 'PATCH', '/api/v1/users/me', { display_name: name, status_text: 'on n1 ☕' }, c.token);
    assert.equal(up.status, 200, JSON.stringify(up.body));
    const watchers = socks.map((x, i) => i).filter((i) => socks[i].user !== c);
    await waitFor(() => watchers.every((i) => userUpd[i].length >= 1), 10000, 'user:updated on sockets of A and B').catch((e) => {
      throw new Error(`${e.message}; missing on: ${watchers.filter((i) => userUpd[i].length === 0).map((i) => socks[i].where)}`);
    });
    for (const i of watchers) {
      const ev = userUpd[i][0];
      assert.equal(ev.status_text, 'on n1 ☕', `user:updated on ${socks[i].where}`);
      assert.equal(ev.username, c.user.username);
    }
    for (const srv of n) {
      await waitFor(
        async () => (await api(srv.url, 'GET', `/api/v1/users/${c.user.id}`, undefined, a.token)).body?.display_name === name,
        5000,
        `GET /users/{id} on ${srv.instanceId} shows the PATCH made on n1`,
      );
    }
    await sleep(QUIET_MS);
    outRoomUpd.forEach((l) => assert.deepEqual(l, [], 'no room:updated to a socket that did not join the room'));
    outUserUpd.forEach((l) => assert.deepEqual(l, [], 'no user:updated to a socket sharing no room with C'));

    // Presence: D has sockets on n2 and n3. Online once; offline only when both are closed.
    const d = await registerUser(n[0].url, 'cd');
    const dj = await api(n[0].url, 'POST', `/api/v1/rooms/${room.id}/join`, undefined, d.token);
    assert.equal(dj.status, 200, JSON.stringify(dj.body));
    const observers = [socks[0], socks[4], socks[5]]; // n1, n2, n3
    const pres = observers.map(({ s }) => collect(s, 'presence', (p) => p.user_id === d.user.id));
    const presOut = outSocks.map((s) => collect(s, 'presence', (p) => p.user_id === d.user.id));
    const online = [{ user_id: d.user.id, state: 'online' }];
    const dn2 = await open(n[1], d.token, ['websocket']);
    await waitFor(() => pres.every((l) => l.length >= 1), 10000, 'presence online on observers of every instance').catch((e) => {
      throw new Error(`${e.message}; got: ${pres.map((l, i) => `${observers[i].where}=${JSON.stringify(l)}`).join(' ')}`);
    });
    await sleep(QUIET_MS);
    const dn3 = await open(n[2], d.token, ['polling']);
    await sleep(QUIET_MS);
    pres.forEach((l, i) => assert.deepEqual(l, online, `${observers[i].where}: online once, D's second socket (n3) is no change`));
    dn2.close();
    await sleep(QUIET_MS * 2);
    pres.forEach((l, i) =>
      assert.deepEqual(l, online, `${observers[i].where}: no offline while D still has a socket on n3 (closed the one on n2)`),
    );
    dn3.close();
    await waitFor(() => pres.every((l) => l.length >= 2), 10000, 'presence offline after both sockets closed').catch((e) => {
      throw new Error(`${e.message}; got: ${pres.map((l, i) => `${observers[i].where}=${JSON.stringify(l)}`).join(' ')}`);
    });
    await sleep(QUIET_MS);
    pres.forEach((l, i) => assert.deepEqual(l, [...online, { user_id: d.user.id, state: 'offline' }], `presence on ${observers[i].where}`));
    presOut.forEach((l) => assert.deepEqual(l, [], 'no presence to a socket sharing no room with D'));
    for (const x of [...socks.map((y) => y.s), ...outSocks]) x.close();
  });

  test('presence with sockets opened and closed at the same moment on two instances: online once, offline once', async () => {
    // A user opening the app on two devices at once, behind a balancer that put them on n2 and n3.
    // Presence must still report one online and, after both are gone, one offline (no flapping).
    const a = await registerUser(n[0].url, 'pw');
    const room = await createRoom(n[0].url, a.token, 'presence race');
    const observers = [];
    for (const srv of n) {
      const s = await open(srv, a.token, ['websocket']);
      await joinRoom(s, room.id);
      observers.push(s);
    }
    const failures = [];
    const ROUNDS = 4;
    for (let round = 0; round < ROUNDS; round++) {
      const d = await registerUser(n[0].url, `pr${round}`);
      const dj = await api(n[0].url, 'POST', `/api/v1/rooms/${room.id}/join`, undefined, d.token);
      assert.equal(dj.status, 200, JSON.stringify(dj.body));
      const ev = observers.map((s) => collect(s, 'presence', (p) => p.user_id === d.user.id));
      const [x, y] = await Promise.all([open(n[1], d.token, ['websocket']), open(n[2], d.token, ['websocket'])]);
      await waitFor(() => ev.every((l) => l.length >= 1), 3000, 'online').catch(() => {});
      await sleep(QUIET_MS);
      const afterOpen = ev.map((l) => l.map((p) => p.state));
      x.close();
      y.close();
      await waitFor(() => ev.every((l) => l.some((p) => p.state === 'offline')), 3000, 'offline').catch(() => {});
      await sleep(QUIET_MS);
      const afterClose = ev.map((l) => l.map((p) => p.state));
      observers.forEach((o, i) => {
        if (JSON.stringify(afterOpen[i]) !== '["online"]' || JSON.stringify(afterClose[i]) !== '["online","offline"]') {
          failures.push(`round ${round}, observer on ${o.where}: after both opened ${JSON.stringify(afterOpen[i])}, after both closed ${JSON.stringify(afterClose[i])}`);
        }
      });
    }
    for (const s of observers) s.close();
    assert.deepEqual(
      failures,
      [],
      `expected ["online"] once both sockets (n2, n3) were open and ["online","offline"] once both were closed, in each of ${ROUNDS} rounds`,
    );
  });

  test('30 senders over 3 instances x 50 concurrent sends: seqs 1..1500, in-order delivery everywhere, history and the store agree', async (t) => {
    const SENDERS = 30;
    const EACH = 50;
    const TOTAL = SENDERS * EACH;
    const owner = await registerUser(n[0].url, 'bo');
    const room = await createRoom(n[0].url, owner.token, 'burst');
    // 30 users, registered on their own instance (one at a time per instance).
    const users = [];
    for (let i = 0; i < SENDERS; i += 3) {
      users.push(...(await Promise.all([0, 1, 2].map((k) => registerUser(n[k].url, `s${i + k}`)))));
    }
    // Sender i is on instance i % 3; every fourth sender polls.
    const senders = [];
    for (let i = 0; i < SENDERS; i++) {
      const srv = n[i % 3];
      const tr = i % 4 === 3 ? ['polling'] : ['websocket'];
      senders.push({ s: await open(srv, users[i].token, tr), i });
    }
    // Dedicated receivers: two per instance, one websocket, one polling (the owner's sockets).
    const receivers = [];
    for (const srv of n) {
      for (const tr of [['websocket'], ['polling']]) receivers.push(await open(srv, owner.token, tr));
    }
    const all = [...senders.map((x) => x.s), ...receivers];
    const got = all.map((s) => collect(s, 'message:new', (m) => m.room_id === room.id));
    for (let i = 0; i < all.length; i += 6) {
      const joins = await Promise.all(all.slice(i, i + 6).map((s) => joinRoom(s, room.id, {}, 30000)));
      for (const j of joins) assert.equal(j.head_seq, 0);
    }

    const t0 = Date.now();
    const pending = [];
    for (let k = 0; k < EACH; k++) {
      for (const { s, i } of senders) {
        const payload = { room_id: room.id, client_msg_id: `s${i}-k${k}`, body: `sender ${i} message ${k} on n${(i % 3) + 1} ✓` };
        pending.push(emitAck(s, 'message:send', payload, 60000).then((ack) => ({ i, k, payload, ack })));
      }
    }
    const results = await Promise.all(pending);
    t.diagnostic(`1500 acks in ${Date.now() - t0} ms`);

    const bySeq = new Map();
    const lastSeqOf = new Map();
    for (const { i, k, payload, ack } of results) {
      assert.equal(ack.ok, true, `send ${payload.client_msg_id} via ${senders[i].s.where} failed: ${JSON.stringify(ack)}`);
      const m = ack.message;
      assert.equal(m.room_id, room.id);
      assert.equal(m.sender_id, users[i].user.id);
      assert.equal(m.client_msg_id, payload.client_msg_id);
      assert.equal(m.body, payload.body);
      assert.ok(!bySeq.has(m.seq), `duplicate seq ${m.seq}: ${m.client_msg_id} and ${bySeq.get(m.seq)?.client_msg_id}`);
      bySeq.set(m.seq, m);
      // One socket's sends are sequenced in the order it emitted them.
      const prev = lastSeqOf.get(i) ?? 0;
      assert.ok(m.seq > prev, `sender ${i} (${senders[i].s.where}): message ${k} got seq ${m.seq} after seq ${prev}`);
      lastSeqOf.set(i, m.seq);
    }
    const seqs = [...bySeq.keys()].sort((x, y) => x - y);
    assert.deepEqual(seqs, Array.from({ length: TOTAL }, (_, i) => i + 1), 'acked seqs are exactly 1..1500');
    assert.equal(new Set(results.map((r) => r.ack.message.id)).size, TOTAL, 'distinct message ids');

    await waitFor(() => got.every((l) => l.length >= TOTAL), 60000, 'all 1500 message:new on every socket').catch((e) => {
      throw new Error(`${e.message}; counts: ${all.map((s, i) => `${s.where}=${got[i].length}`).join(',')}`);
    });
    await sleep(QUIET_MS);
    all.forEach((s, i) => {
      const what = `${i < SENDERS ? `sender ${i}` : `receiver ${i - SENDERS}`} on ${s.where}`;
      assertSeqRun(got[i], 1, TOTAL, `${what}: message:new`);
      for (const m of got[i]) {
        if (JSON.stringify(m) !== JSON.stringify(bySeq.get(m.seq))) assert.deepEqual(m, bySeq.get(m.seq), `${what}: message:new seq ${m.seq} equals the ack`);
      }
    });

    // REST history from each instance: the same 1500.
    for (const srv of n) {
      const h = await fetchAllMessages(srv.url, users[0].token, room.id);
      assert.equal(h.head_seq, TOTAL, `head_seq on ${srv.instanceId}`);
      assertSeqRun(h.messages, 1, TOTAL, `history on ${srv.instanceId}`);
      h.messages.forEach((m) => {
        if (JSON.stringify(m) !== JSON.stringify(bySeq.get(m.seq))) assert.deepEqual(m, bySeq.get(m.seq), `history on ${srv.instanceId}: seq ${m.seq}`);
      });
    }

    // Write-back: once every instance reports sync.pending == 0, the store holds exactly the 1500
    // (read from the store itself: psql, or the mongodb driver).
    const t1 = Date.now();
    let views = [];
    await waitFor(
      async () => {
        views = await Promise.all(n.map(clusterView));
        return views.every((v) => v.sync?.pending === 0);
      },
      30000,
      'sync.pending == 0 on every instance',
    ).catch((e) => {
      throw new Error(`${e.message}; sync: ${views.map((v) => `${v.instance_id}=${JSON.stringify(v.sync)}`).join(' ')}`);
    });
    const store = cluster.db.label;
    let count = 0;
    await waitFor(
      async () => {
        count = await cluster.db.countMessages(room.id);
        return count === TOTAL;
      },
      15000,
      `${store} holds 1500 rows for the room`,
    ).catch((e) => {
      throw new Error(`${e.message}; it holds ${count} (sync.pending was 0 ${Date.now() - t1} ms ago)`);
    });
    t.diagnostic(`write-back into ${store} drained ${Date.now() - t1} ms after the history check`);
    const rows = await cluster.db.messages(room.id);
    const stored = rows.map((r) => r.seq);
    const row = [rows.length, Math.min(...stored), Math.max(...stored), new Set(stored).size].map(String);
    assert.deepEqual(row, [String(TOTAL), '1', String(TOTAL), String(TOTAL)], 'count, min(seq), max(seq), count(distinct seq)');
    assert.equal(rows.length, TOTAL);
    for (const { seq, id, sender_id: sender, client_msg_id: cmid } of rows) {
      const m = bySeq.get(Number(seq));
      assert.ok(m, `row seq ${seq} was acked`);
      assert.equal(id, m.id, `${store} row seq ${seq}: id`);
      assert.equal(sender, m.sender_id, `${store} row seq ${seq}: sender_id`);
      assert.equal(cmid, m.client_msg_id, `${store} row seq ${seq}: client_msg_id`);
    }
    for (const s of all) s.close();
  });

  test('idempotent send across instances: same id and seq, delivered once; another body is a conflict', async () => {
    const a = await registerUser(n[0].url, 'ia');
    const a2 = await login(n[1].url, a.user.username);
    const a3 = await login(n[2].url, a.user.username);
    const r = await registerUser(n[2].url, 'ir');
    const room = await createRoom(n[0].url, a.token, 'idem');
    const s1 = await open(n[0], a.token, ['websocket']);
    const s2 = await open(n[1], a2.token, ['polling']);
    await joinRoom(s1, room.id);
    await joinRoom(s2, room.id);
    const recv = [await open(n[0], r.token, ['polling']), await open(n[1], r.token, ['websocket']), await open(n[2], r.token, ['websocket'])];
    for (const s of recv) await joinRoom(s, room.id);
    const watched = [s1, s2, ...recv];
    const got = watched.map((s) => collect(s, 'message:new', (m) => m.room_id === room.id));

    const cmid = newCmid('idem');
    const body = 'exactly once, whichever instance 🚀';
    const first = await sendMessage(s1, room.id, body, cmid);
    assert.equal(first.seq, 1);
    const viaN2 = await sendMessage(s2, room.id, body, cmid);
    assert.deepEqual(viaN2, first, 'socket retry on n2 returns the message first accepted on n1');
    const viaN3 = await api(n[2].url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: cmid, body }, a3.token);
    assert.equal(viaN3.status, 200, `REST retry on n3: expected 200 with the original, got ${viaN3.status} ${JSON.stringify(viaN3.body)}`);
    assert.deepEqual(viaN3.body, first, 'REST retry on n3 returns the message first accepted on n1');

    const conflictRest = await api(n[2].url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: cmid, body: 'another body' }, a3.token);
    assert.equal(conflictRest.status, 409, `same client_msg_id, other body, REST on n3: ${conflictRest.status} ${JSON.stringify(conflictRest.body)}`);
    assert.equal(conflictRest.body?.error?.code, 'conflict');
    assertAckError(
      await emitAck(s2, 'message:send', { room_id: room.id, client_msg_id: cmid, body: 'another body' }),
      'conflict',
      'same client_msg_id, other body, socket on n2',
    );

    // A later message proves delivery has caught up; the first one was delivered exactly once.
    const next = await sendMessage(s2, room.id, 'next');
    assert.equal(next.seq, 2, 'retries and conflicts took no seq');
    await waitFor(() => got.every((l) => l.some((m) => m.id === next.id)), 10000, 'the follow-up message everywhere');
    await sleep(QUIET_MS);
    watched.forEach((s, i) => assert.deepEqual(got[i], [first, next], `message:new on ${s.where}: the retried message once`));
    for (const srv of n) {
      const h = await fetchAllMessages(srv.url, r.token, room.id);
      assert.deepEqual(h.messages, [first, next], `history on ${srv.instanceId}`);
    }
    for (const s of watched) s.close();
  });

  test('reconnect anywhere: a socket that saw seq N on n1 catches up exactly the missed messages on n3', async () => {
    const a = await registerUser(n[1].url, 'ra');
    const b = await registerUser(n[0].url, 'rb');
    const room = await createRoom(n[1].url, a.token, 'reconnect');
    const sa = await open(n[1], a.token, ['websocket']);
    await joinRoom(sa, room.id);
    const sb = await open(n[0], b.token, ['polling']);
    const seenB = collect(sb, 'message:new', (m) => m.room_id === room.id);
    await joinRoom(sb, room.id);
    const before = [];
    for (let i = 0; i < 5; i++) before.push(await sendMessage(sa, room.id, `before ${i}`));
    await waitFor(() => seenB.length >= 5, 10000, 'n1 socket sees the first 5');
    assert.deepEqual(seenB, before);
    const N = seenB[seenB.length - 1].seq;
    sb.close();

    const missed = await Promise.all(Array.from({ length: 20 }, (_, i) => sendMessage(sa, room.id, `missed ${i}`, newCmid(), 30000)));
    missed.sort((x, y) => x.seq - y.seq);
    assertSeqRun(missed, N + 1, N + 20, 'acks of the 20 sends via n2');

    const sb3 = await open(n[2], b.token, ['websocket']);
    const live = collect(sb3, 'message:new', (m) => m.room_id === room.id);
    const j = await joinRoom(sb3, room.id, { after_seq: N });
    assert.equal(j.head_seq, N + 20, 'head_seq in the join ack on n3');
    assert.equal(j.has_more, false);
    assert.deepEqual(j.messages, missed, 'room:join {after_seq: N} on n3 returns exactly the 20 missed messages');
    const sync = await emitAck(sb3, 'room:sync', { room_id: room.id, after_seq: N, limit: 500 });
    assert.equal(sync.ok, true, JSON.stringify(sync));
    assert.deepEqual(sync.messages, missed, 'room:sync on n3');
    // And it is live from there on.
    const after = await sendMessage(sa, room.id, 'after reconnect');
    await waitFor(() => live.some((m) => m.id === after.id), 10000, 'live message on the n3 socket');
    assert.deepEqual(live, [after]);
    sa.close();
    sb3.close();
  });

  test('joining mid-burst on instances with no subscription to the room yet: history + live cover every seq, no hole', async (t) => {
    // The senders are all on n1; n2 and n3 have no socket in the room until the late joiners join,
    // so each join must subscribe its instance to the room before it reads history.
    const SENDERS = 6;
    const EACH = 40;
    const N = SENDERS * EACH;
    const owner = await registerUser(n[0].url, 'lo');
    const room = await createRoom(n[0].url, owner.token, 'late joiners');
    const users = [];
    for (let i = 0; i < SENDERS; i += 3) users.push(...(await Promise.all([0, 1, 2].map((k) => registerUser(n[k].url, `l${i + k}`)))));
    const senders = [];
    for (let i = 0; i < SENDERS; i++) {
      const s = await open(n[0], users[i].token, ['websocket']);
      await joinRoom(s, room.id);
      senders.push(s);
    }
    const late = [];
    for (let i = 0; i < 6; i++) {
      const srv = n[1 + (i % 2)];
      const s = await open(srv, owner.token, i % 3 === 2 ? ['polling'] : ['websocket']);
      late.push({ s, live: collect(s, 'message:new', (m) => m.room_id === room.id) });
    }
    // Each sender sends its messages one after the other (a steady stream rather than one pipelined
    // batch); joiner i joins once (i + 1) * N / 8 sends have been acknowledged: inside the stream.
    const triggers = late.map((_, i) => Math.floor(((i + 1) * N) / 8));
    const joins = [];
    let acked = 0;
    const pending = senders.map(async (s, u) => {
      const out = [];
      for (let k = 0; k < EACH; k++) {
        const ack = await emitAck(s, 'message:send', { room_id: room.id, client_msg_id: `late-${u}-${k}`, body: `b${u}.${k}` }, 60000);
        out.push(ack);
        acked += 1;
        triggers.forEach((at, i) => {
          if (acked === at) joins[i] = joinRoom(late[i].s, room.id, { after_seq: 0 }, 30000);
        });
      }
      return out;
    });
    const acks = (await Promise.all(pending)).flat();
    for (const a of acks) assert.equal(a.ok, true, JSON.stringify(a));
    const bySeq = new Map(acks.map((a) => [a.message.seq, a.message]));
    assert.equal(bySeq.size, N);
    const joinAcks = await Promise.all(joins);
    t.diagnostic(`join history lengths: ${joinAcks.map((j) => j.messages.length).join(',')} of ${N}`);
    await waitFor(
      () => late.every(({ live }, i) => new Set([...joinAcks[i].messages, ...live].map((m) => m.seq)).size >= N),
      30000,
      'every late joiner has every seq',
    ).catch((e) => {
      throw new Error(`${e.message}; ${late.map(({ s, live }, i) => `${s.where}: history ${joinAcks[i].messages.length}, live ${live.length} (first ${live[0]?.seq})`).join('; ')}`);
    });
    late.forEach(({ s, live }, i) => {
      const hist = joinAcks[i].messages;
      assertSeqRun(hist, 1, hist.length, `joiner ${i} on ${s.where}: join history`);
      for (let j = 1; j < live.length; j++) {
        assert.ok(live[j].seq > live[j - 1].seq, `joiner ${i} on ${s.where}: live seq ${live[j].seq} after ${live[j - 1].seq}`);
      }
      const k = hist.length ? hist[hist.length - 1].seq : 0;
      const firstLiveAfter = live.find((m) => m.seq > k);
      if (k < N) assert.equal(firstLiveAfter?.seq, k + 1, `joiner ${i} on ${s.where}: first live message after history seq ${k}`);
      const union = new Map([...hist, ...live].map((m) => [m.seq, m]));
      assert.equal(union.size, N);
      for (const [seq, m] of union) assert.deepEqual(m, bySeq.get(seq));
    });
    for (const s of [...senders, ...late.map((x) => x.s)]) s.close();
  });

  test('membership changes made on one instance are enforced on the others, sends and deliveries', async () => {
    const a = await registerUser(n[0].url, 'ma');
    const b = await registerUser(n[1].url, 'mb');
    const room = await createRoom(n[0].url, a.token, 'private', 'private');
    // n3 learns that B is not a member (a cached "no" must not outlive the invite).
    const sb3 = await open(n[2], b.token, ['websocket']);
    assertAckError(await emitAck(sb3, 'room:join', { room_id: room.id }), 'forbidden', 'room:join of a private room on n3 before the invite');
    const early = await api(n[2].url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body: 'not yet' }, b.token);
    assert.equal(early.status, 403, `send on n3 before the invite: ${early.status} ${JSON.stringify(early.body)}`);

    const inv = await api(n[0].url, 'POST', `/api/v1/rooms/${room.id}/members`, { user_id: b.user.id }, a.token);
    assert.equal(inv.status, 204, JSON.stringify(inv.body));
    const j = await emitAck(sb3, 'room:join', { room_id: room.id });
    assert.equal(j.ok, true, `room:join on n3 right after the invite on n1 (204): ${JSON.stringify(j)}`);
    const seen3 = collect(sb3, 'message:new');
    const m = await sendMessage(sb3, room.id, 'invited on n1, sent on n3');
    assert.equal(m.seq, 1);

    // B leaves on n2; n3 (which just saw B as a member) must refuse B's sends from then on.
    const leave = await api(n[1].url, 'POST', `/api/v1/rooms/${room.id}/leave`, undefined, b.token);
    assert.equal(leave.status, 204, JSON.stringify(leave.body));
    const viaRest = await api(n[2].url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body: 'after leaving' }, b.token);
    assert.equal(viaRest.status, 403, `REST send on n3 right after leaving on n2 (204): ${viaRest.status} ${JSON.stringify(viaRest.body)}`);
    assertAckError(
      await emitAck(sb3, 'message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'after leaving' }),
      'forbidden',
      'socket send on n3 right after leaving on n2',
    );
    // B's socket on n3 stops receiving the room: A's next message, sent on n1 after the leave was
    // answered on n2, must not reach it.
    const afterLeave = await api(n[0].url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body: 'B has left' }, a.token);
    assert.equal(afterLeave.status, 201, JSON.stringify(afterLeave.body));
    await sleep(QUIET_MS);
    assert.deepEqual(seen3.map((x) => x.body), ['invited on n1, sent on n3'], 'message:new on n3 after B left on n2');
    const hist = await api(n[0].url, 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0`, undefined, a.token);
    assert.equal(hist.status, 200);
    assert.deepEqual(hist.body.messages, [m, afterLeave.body], 'only members\' messages were stored');
    sb3.close();
  });

  test('a room left idle on an instance delivers again after a rejoin there, without replaying what the join read', async (t) => {
    // n3 had one socket in the room, which left in before(); after more than the idle sweep
    // (30 s, DESIGN.md: subscriptions of rooms without local sockets are dropped) 2,000 messages
    // are sent on n1, then a new socket on n3 rejoins with after_seq = head. It must get exactly the
    // live messages after that: none of the 2,000 again (n3 must not take the first live message
    // for a jump from what it delivered before idling and "fill" the gap), none twice.
    const wait = IDLE_MS - (Date.now() - idle.since);
    t.diagnostic(`waiting ${Math.max(0, wait)} ms more for the room to be idle on n3 for ${IDLE_MS} ms`);
    if (wait > 0) await sleep(wait);
    const s1 = await open(n[0], idle.owner.token, ['websocket']);
    await joinRoom(s1, idle.room.id);
    const missed = [];
    for (let batch = 0; batch < 40; batch++) {
      const acks = await Promise.all(Array.from({ length: 50 }, (_, i) => sendMessage(s1, idle.room.id, `while n3 was idle ${batch}.${i}`)));
      missed.push(...acks);
    }
    const head = Math.max(...missed.map((m) => m.seq));
    assert.equal(head, idle.first.seq + 2000, 'seqs of the 2,000 sends while n3 was idle');
    const s3 = await open(n[2], idle.owner.token, ['polling']);
    const live = collect(s3, 'message:new', (m) => m.room_id === idle.room.id);
    const j = await joinRoom(s3, idle.room.id, { after_seq: head });
    assert.deepEqual(j.messages, [], 'rejoin at the head reads nothing');
    assert.equal(j.head_seq, head);
    const caughtUp = await emitAck(s3, 'room:sync', { room_id: idle.room.id, after_seq: idle.first.seq + 1990 });
    assertSeqRun(caughtUp.messages, idle.first.seq + 1991, head, 'room:sync on the rejoined n3 socket');
    const next = [];
    for (let i = 0; i < 3; i++) next.push(await sendMessage(s1, idle.room.id, `live again ${i}`));
    await waitFor(() => live.filter((m) => m.seq > head).length >= 3, 10000, 'live messages on the rejoined n3 socket').catch((e) => {
      throw new Error(`${e.message}; got ${live.length} messages, seqs ${JSON.stringify(live.map((m) => m.seq).slice(0, 20))}`);
    });
    await sleep(QUIET_MS);
    assert.ok(s3.connected, 'the rejoined n3 socket is still connected');
    assert.deepEqual(
      live.map((m) => m.seq),
      next.map((m) => m.seq),
      `message:new on the rejoined n3 socket: only the live messages, once each (first seqs seen: ${JSON.stringify(live.slice(0, 5).map((m) => m.seq))})`,
    );
    assert.deepEqual(live, next);
    s1.close();
    s3.close();
  });

  // Across regions this holds too: an instance outside a room's home asks the home for its head
  // (the replicated one trails it by the replication lag).
  test('head_seq in every answer covers the sends acknowledged on other instances just before, with no wait', async () => {
    // The store's head lags the write-back; every answer carrying head_seq must still be at least
    // the seq of every send acknowledged before the request began (API.md: clients decide from it
    // whether they caught up).
    const a = await registerUser(n[0].url, 'hd');
    const room = await createRoom(n[0].url, a.token, 'heads');
    const socks = [];
    for (const srv of n) socks.push(await open(srv, a.token, ['websocket']));
    for (const s of socks) await joinRoom(s, room.id);
    const updates = collect(socks[1], 'room:updated', (r) => r.id === room.id);
    for (let i = 0; i < 6; i++) {
      const at = n[i % 3];
      const r = await api(at.url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body: `h${i}` }, a.token);
      assert.equal(r.status, 201, JSON.stringify(r.body));
      const sent = (await sendMessage(socks[(i + 1) % 3], room.id, `s${i}`)).seq;
      assert.equal(sent, r.body.seq + 1);
      const other = n[(i + 1) % 3];
      const third = n[(i + 2) % 3];
      const where = (what, srv) => `${what} on ${srv.instanceId} right after seq ${sent} was acked`;
      const got = await api(other.url, 'GET', `/api/v1/rooms/${room.id}`, undefined, a.token);
      assert.ok(got.body.head_seq >= sent, `${where('GET /rooms/{id}', other)}: ${JSON.stringify(got.body)}`);
      const list = await api(third.url, 'GET', '/api/v1/rooms', undefined, a.token);
      const listed = list.body.rooms.find((x) => x.id === room.id);
      assert.ok(listed?.head_seq >= sent, `${where('GET /rooms', third)}: ${JSON.stringify(listed)}`);
      const patched = await api(third.url, 'PATCH', `/api/v1/rooms/${room.id}`, { topic: `t${i}` }, a.token);
      assert.ok(patched.body.head_seq >= sent, `${where('PATCH /rooms/{id}', third)}: ${JSON.stringify(patched.body)}`);
      const hist = await api(other.url, 'GET', `/api/v1/rooms/${room.id}/messages?limit=1`, undefined, a.token);
      assert.ok(hist.body.head_seq >= sent, `${where('history page', other)}: ${JSON.stringify(hist.body)}`);
      const joined = await joinRoom(socks[(i + 2) % 3], room.id);
      assert.ok(joined.head_seq >= sent && joined.room.head_seq >= sent, `${where('room:join', n[(i + 2) % 3])}: ${JSON.stringify(joined)}`);
      const synced = await emitAck(socks[i % 3], 'room:sync', { room_id: room.id, after_seq: sent - 1 });
      assert.ok(synced.ok && synced.head_seq >= sent, `${where('room:sync', at)}: ${JSON.stringify(synced)}`);
      await waitFor(() => updates.some((u) => u.topic === `t${i}`), 5000, `room:updated with topic t${i}`);
      const update = updates.find((u) => u.topic === `t${i}`);
      assert.ok(update.head_seq >= sent, `${where('room:updated from PATCH', third)}: ${JSON.stringify(update)}`);
    }
    for (const s of socks) s.close();
  });

  test('/api/v1/cluster lists every instance as ready; /health/ready has redis, store and sync checks', async () => {
    // Each region's view lists the instances of its region (its Redis), and the other regions'
    // under `regions`.
    const idsOf = (srv) => n.filter((x) => x.region === srv.region).map((x) => x.instanceId).sort();
    let views = [];
    await waitFor(
      async () => {
        views = await Promise.all(n.map(clusterView));
        return views.every((v, i) => idsOf(n[i]).every((id) => v.instances?.some((x) => x.id === id && x.ready === true)));
      },
      15000,
      'every instance listing n1, n2, n3 as ready',
    ).catch((e) => {
      throw new Error(`${e.message}; ${views.map((v) => JSON.stringify(v)).join('\n')}`);
    });
    views.forEach((v, i) => {
      const where = `GET /api/v1/cluster on n${i + 1}`;
      assert.equal(v.instance_id, `n${i + 1}`, `${where}: instance_id`);
      assert.equal(typeof v.region, 'string', `${where}: region`);
      assert.deepEqual(v.instances.map((x) => x.id).sort(), idsOf(n[i]), `${where}: exactly the live instances of its region`);
      if (REGIONS > 1) {
        const others = n.filter((x) => x.region !== n[i].region);
        const peer = v.regions?.find((r) => r.region === others[0].region);
        assert.ok(peer, `${where}: regions lists ${others[0].region}: ${JSON.stringify(v.regions)}`);
        assert.deepEqual(peer.instances.map((x) => x.id).sort(), others.map((x) => x.instanceId).sort(), `${where}: the other region's instances`);
        assert.equal(typeof peer.replication_lag_seconds, 'number', `${where}: replication lag from ${peer.region}`);
      }
      for (const x of v.instances) {
        for (const k of ['id', 'region', 'address', 'started_at', 'last_seen']) assert.equal(typeof x[k], 'string', `${where}: instances[${x.id}].${k}`);
        assert.ok(Number.isInteger(x.connections) && x.connections >= 0, `${where}: instances[${x.id}].connections`);
        assert.equal(x.ready, true, `${where}: instances[${x.id}].ready`);
      }
      assert.ok(Number.isInteger(v.sync?.pending) && v.sync.pending >= 0, `${where}: sync.pending ${JSON.stringify(v.sync)}`);
      assert.equal(typeof v.sync.lag_ms, 'number', `${where}: sync.lag_ms`);
    });
    for (const srv of n) {
      const r = await api(srv.url, 'GET', '/health/ready');
      const where = `GET /health/ready on ${srv.instanceId}`;
      assert.equal(r.status, 200, `${where}: ${r.status} ${JSON.stringify(r.body)}`);
      assert.equal(r.body.status, 'ready');
      const ch = r.body.checks;
      assert.equal(ch?.redis?.ok, true, `${where}: checks.redis.ok in ${JSON.stringify(ch)}`);
      assert.equal(ch?.store?.ok, true, `${where}: checks.store.ok in ${JSON.stringify(ch)}`);
      assert.equal(typeof ch?.redis?.latency_ms, 'number', `${where}: checks.redis.latency_ms`);
      assert.equal(typeof ch?.store?.latency_ms, 'number', `${where}: checks.store.latency_ms`);
      assert.ok(Number.isInteger(ch?.sync?.pending) && ch.sync.pending >= 0, `${where}: checks.sync.pending in ${JSON.stringify(ch)}`);
      assert.equal(typeof ch.sync.lag_ms, 'number', `${where}: checks.sync.lag_ms`);
      assert.equal(typeof ch.sync.ok, 'boolean', `${where}: checks.sync.ok`);
    }
  });

  test('instance records carry the address the instance actually listens on', async () => {
    // DESIGN.md §5: instances heartbeat {id, region, address, ...}; the address is what peers and
    // operators use to reach it, so a bind of 127.0.0.1:0 must be reported as the bound port.
    const v = await clusterView(n[0]);
    for (const srv of n.filter((x) => x.region === n[0].region)) {
      const rec = v.instances.find((x) => x.id === srv.instanceId);
      // Behind a region's HAProxy, `direct` is the instance's own address.
      assert.equal(rec?.address, new URL(srv.direct ?? srv.url).host, `GET /api/v1/cluster on n1: instances[${srv.instanceId}].address`);
    }
  });
});
