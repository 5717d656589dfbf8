// Per-room total order under concurrency (API.md §3.1, §3.4): 20 users each fire 25 sends at once
// into one room; seqs must be exactly 1..500 and every socket must see all 500 in seq order.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, api, registerUser, createRoom, connect, emitAck, waitFor, collect, joinRoom } from './harness.mjs';

const USERS = 20;
const PER_USER = 25;
const TOTAL = USERS * PER_USER;

let server;
let users = [];
const sockets = new Set();

before(async () => {
  server = await startServer();
  // Registration hashes with Argon2 (slow in debug builds): two at a time for 2 cores.
  for (let i = 0; i < USERS; i += 2) {
    users.push(...(await Promise.all([registerUser(server.url, `c${i}`), registerUser(server.url, `c${i + 1}`)])));
  }
});

after(async () => {
  for (const s of sockets) s.close();
  await server?.close();
});

async function burst(transportFor) {
  const url = server.url;
  const room = await createRoom(url, users[0].token, 'burst');
  const socks = [];
  for (let i = 0; i < USERS; i++) {
    const s = await connect(url, users[i].token, transportFor(i));
    sockets.add(s);
    socks.push(s);
  }
  const received = socks.map((s) => collect(s, 'message:new', (m) => m.room_id === room.id));
  const joins = await Promise.all(socks.map((s) => joinRoom(s, room.id, {}, 30000)));
  for (const j of joins) assert.equal(j.head_seq, 0);

  // All 500 sends emitted without awaiting any of them.
  const pending = [];
  for (let k = 0; k < PER_USER; k++) {
    for (let u = 0; u < USERS; u++) {
      const payload = { room_id: room.id, client_msg_id: `u${u}-k${k}`, body: `user ${u} message ${k} ✓` };
      pending.push(emitAck(socks[u], 'message:send', payload, 60000).then((ack) => ({ u, k, payload, ack })));
    }
  }
  const results = await Promise.all(pending);

  const bySeq = new Map();
  for (const { u, payload, ack } of results) {
    assert.equal(ack.ok, true, `send ${payload.client_msg_id} failed: ${JSON.stringify(ack)}`);
    const m = ack.message;
    assert.equal(m.room_id, room.id);
    assert.equal(m.sender_id, users[u].user.id);
    assert.equal(m.client_msg_id, payload.client_msg_id);
    assert.equal(m.body, payload.body);
    assert.ok(!bySeq.has(m.seq), `duplicate seq ${m.seq} for ${m.client_msg_id} and ${bySeq.get(m.seq)?.client_msg_id}`);
    bySeq.set(m.seq, m);
  }
  const seqs = [...bySeq.keys()].sort((a, b) => a - b);
  assert.deepEqual(seqs, Array.from({ length: TOTAL }, (_, i) => i + 1), 'acked seqs are exactly 1..500');
  assert.equal(new Set(results.map((r) => r.ack.message.id)).size, TOTAL, 'distinct message ids');

  await waitFor(() => received.every((l) => l.length >= TOTAL), 60000, 'all 500 message:new on every socket').catch((e) => {
    throw new Error(`${e.message}; counts: ${received.map((l) => l.length).join(',')}`);
  });
  for (let i = 0; i < USERS; i++) {
    const got = received[i];
    const gotSeqs = got.map((m) => m.seq);
    for (let j = 0; j < gotSeqs.length; j++) {
      if (gotSeqs[j] !== j + 1) {
        assert.fail(`socket ${i} (${transportFor(i)}) got seq ${gotSeqs[j]} at position ${j} (expected ${j + 1}); first seqs: ${gotSeqs.slice(Math.max(0, j - 3), j + 3)}`);
      }
    }
    assert.equal(got.length, TOTAL, `socket ${i}: exactly 500 message:new, no duplicates`);
    for (const m of got) assert.deepEqual(m, bySeq.get(m.seq), `socket ${i}: message:new seq ${m.seq} equals the ack`);
  }

  const hist = await api(url, 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0&limit=500`, undefined, users[3].token);
  assert.equal(hist.status, 200, JSON.stringify(hist.body));
  assert.equal(hist.body.messages.length, TOTAL);
  assert.equal(hist.body.head_seq, TOTAL);
  assert.equal(hist.body.has_more, false);
  hist.body.messages.forEach((m, i) => {
    assert.equal(m.seq, i + 1, 'history ascending, gap-free');
    const acked = bySeq.get(m.seq);
    assert.equal(m.id, acked.id, `history seq ${m.seq}: id`);
    assert.equal(m.body, acked.body, `history seq ${m.seq}: body`);
    assert.deepEqual(m, acked);
  });
  for (const s of socks) s.close();
}

describe('20 sockets x 25 concurrent sends into one room', () => {
  test('all on websocket: seqs 1..500, in-order gap-free delivery to every socket, history matches', async () => {
    await burst(() => ['websocket']);
  });

  test('half on long-polling, half on websocket: same guarantees', async () => {
    await burst((i) => (i % 2 === 0 ? ['polling'] : ['websocket']));
  });
});

describe('joining a room in the middle of a burst', () => {
  test('join ack history + live message:new (deduped by seq) cover every seq exactly, live in order', async (t) => {
    const url = server.url;
    const SENDERS = 10;
    const EACH = 30;
    const N = SENDERS * EACH;
    const room = await createRoom(url, users[0].token, 'late joiners');
    const senders = [];
    for (let i = 0; i < SENDERS; i++) {
      const s = await connect(url, users[i].token, ['websocket']);
      sockets.add(s);
      senders.push(s);
      await joinRoom(s, room.id);
    }
    // Late joiners: users 10..15, half on polling; connected before the burst, joined during it.
    const late = [];
    for (let i = SENDERS; i < SENDERS + 6; i++) {
      const s = await connect(url, users[i].token, i % 2 ? ['polling'] : ['websocket']);
      sockets.add(s);
      late.push({ s, live: collect(s, 'message:new', (m) => m.room_id === room.id) });
    }
    const pending = [];
    for (let k = 0; k < EACH; k++) {
      for (let u = 0; u < SENDERS; u++) {
        pending.push(emitAck(senders[u], 'message:send', { room_id: room.id, client_msg_id: `late-${u}-${k}`, body: `b${u}.${k}` }, 60000));
      }
    }
    // Join while the sends are being processed, at staggered points.
    const joins = late.map(({ s }, i) =>
      new Promise((r) => setTimeout(r, 5 + i * 15)).then(() => joinRoom(s, room.id, { after_seq: 0 }, 30000)),
    );
    const acks = await Promise.all(pending);
    for (const a of acks) assert.equal(a.ok, true, JSON.stringify(a));
    const bySeq = new Map(acks.map((a) => [a.message.seq, a.message]));
    assert.equal(bySeq.size, N);
    const joinAcks = await Promise.all(joins);
    t.diagnostic(`join history lengths: ${joinAcks.map((j) => j.messages.length).join(',')} of ${N}`);
    await waitFor(
      () => late.every(({ live }, i) => new Set([...joinAcks[i].messages, ...live].map((m) => m.seq)).size >= N),
      30000,
      'every late joiner has every seq',
    );
    late.forEach(({ live }, i) => {
      const hist = joinAcks[i].messages;
      hist.forEach((m, j) => assert.equal(m.seq, j + 1, `joiner ${i}: join history is 1..k`));
      for (let j = 1; j < live.length; j++) {
        assert.ok(live[j].seq > live[j - 1].seq, `joiner ${i}: live seq ${live[j].seq} after ${live[j - 1].seq}`);
      }
      const k = hist.length ? hist[hist.length - 1].seq : 0;
      // Live delivery may overlap the history (joined before the read), but must leave no hole after it.
      const firstLiveAfter = live.find((m) => m.seq > k);
      if (k < N) assert.equal(firstLiveAfter?.seq, k + 1, `joiner ${i}: first live message after history seq ${k}`);
      const union = new Map([...hist, ...live].map((m) => [m.seq, m]));
      assert.equal(union.size, N);
      for (const [seq, m] of union) assert.deepEqual(m, bySeq.get(seq));
    });
  });
});
