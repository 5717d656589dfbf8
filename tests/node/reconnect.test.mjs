// Nothing is lost across reconnects and restarts (API.md §3.3, §3.4): catch-up with room:join /
// room:sync after_seq, graceful SIGTERM restart, and SIGKILL in the middle of a burst of sends.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startServer,
  api,
  registerUser,
  createRoom,
  connect,
  emitAck,
  waitFor,
  collect,
  joinRoom,
  sendMessage,
  fetchAllMessages,
} from './harness.mjs';

const sockets = new Set();
const servers = new Set();
const dirs = new Set();

after(async () => {
  for (const s of sockets) s.close();
  for (const s of servers) await s.close();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function start(opts) {
  const s = await startServer(opts);
  servers.add(s);
  return s;
}

async function open(url, token, transports = ['websocket']) {
  const s = await connect(url, token, transports);
  sockets.add(s);
  return s;
}

function ownDataDir() {
  const d = mkdtempSync(path.join(tmpdir(), 'chatmesh-restart-'));
  dirs.add(d);
  return d;
}

/** stop() with a deadline, so a server that never exits fails the test instead of hanging it. */
async function stopWithin(server, signal, ms = 20000) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`chatmesh did not exit within ${ms}ms of ${signal}`)), ms);
  });
  try {
    return await Promise.race([server.stop(signal), deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** Fire `n` sends from `socket` without awaiting; resolves the acked Messages in seq order. */
async function sendMany(socket, roomId, n, tag) {
  const acks = await Promise.all(
    Array.from({ length: n }, (_, i) =>
      emitAck(socket, 'message:send', { room_id: roomId, client_msg_id: `${tag}-${i}`, body: `${tag} #${i}` }, 60000),
    ),
  );
  for (const a of acks) assert.equal(a.ok, true, `send failed: ${JSON.stringify(a)}`);
  return acks.map((a) => a.message).sort((x, y) => x.seq - y.seq);
}

/**
 * Keep `window` sends in flight from `socket` until stop() is true, the socket drops, or `max` were
 * sent. Every send is recorded in `sent` (its payload); acked Messages go through onAck.
 */
function streamSends(socket, roomId, tag, { window = 20, max = 3000, sent, onAck, stop }) {
  let i = 0;
  return new Promise((resolve) => {
    let inFlight = 0;
    const pump = () => {
      while (inFlight < window && i < max && !stop() && socket.connected) {
        const payload = { room_id: roomId, client_msg_id: `${tag}-${i}`, body: `${tag} says ${i}` };
        i += 1;
        inFlight += 1;
        sent.push(payload);
        emitAck(socket, 'message:send', payload, 20000)
          .then(
            (ack) => onAck(ack, payload),
            () => onAck(null, payload),
          )
          .finally(() => {
            inFlight -= 1;
            pump();
          });
      }
      if (inFlight === 0) resolve(i);
    };
    pump();
  });
}

function assertGapFree(messages, head) {
  const seqs = messages.map((m) => m.seq);
  for (let i = 0; i < seqs.length; i++) {
    if (seqs[i] !== i + 1) assert.fail(`history not gap-free: position ${i} has seq ${seqs[i]} (around ${seqs.slice(Math.max(0, i - 3), i + 3)})`);
  }
  assert.equal(seqs.length, head, `history holds 1..head_seq (${head})`);
}

describe('reconnect with after_seq', () => {
  let server;
  before(async () => {
    server = await start();
  });

  async function scenario(missed) {
    const url = server.url;
    const a = await registerUser(url, 'ra');
    const b = await registerUser(url, 'rb');
    const room = await createRoom(url, a.token, 'reconnect');
    const sb = await open(url, b.token);
    await joinRoom(sb, room.id);
    const sa = await open(url, a.token);
    const seenA = collect(sa, 'message:new');
    await joinRoom(sa, room.id);
    const early = await sendMany(sb, room.id, 5, 'early');
    await waitFor(() => seenA.length === 5, 10000, 'first 5 messages');
    assert.deepEqual(seenA, early);
    const lastSeen = seenA[seenA.length - 1].seq;
    sa.disconnect();
    await waitFor(() => !sa.connected, 5000, 'disconnect');

    const missedMsgs = await sendMany(sb, room.id, missed, 'missed');
    assert.deepEqual(missedMsgs.map((m) => m.seq), Array.from({ length: missed }, (_, i) => lastSeen + 1 + i));

    const sa2 = await open(url, a.token);
    const live = collect(sa2, 'message:new');
    const join = await joinRoom(sa2, room.id, { after_seq: lastSeen }, 30000);
    const head = lastSeen + missed;
    assert.equal(join.head_seq, head);
    assert.equal(join.messages.length, Math.min(missed, 500), 'room:join returns at most 500');
    assert.equal(join.has_more, missed > 500);
    const caughtUp = [...join.messages];
    let syncs = 0;
    let more = join.has_more;
    while (more) {
      const after = caughtUp[caughtUp.length - 1].seq;
      const r = await emitAck(sa2, 'room:sync', { room_id: room.id, after_seq: after, limit: 500 }, 30000);
      assert.equal(r.ok, true, JSON.stringify(r).slice(0, 300));
      assert.ok(r.messages.length > 0, 'has_more promised more messages');
      caughtUp.push(...r.messages);
      more = r.has_more;
      syncs += 1;
      assert.ok(syncs < 10, 'room:sync keeps saying has_more');
    }
    if (missed > 500) assert.ok(syncs >= 1, 'paging through room:sync was needed');
    assert.deepEqual(caughtUp, missedMsgs, 'catch-up returns exactly the missed messages, in order');

    // Live delivery continues after the catch-up.
    const next = await sendMessage(sb, room.id, 'after reconnect');
    assert.equal(next.seq, head + 1);
    await waitFor(() => live.some((m) => m.id === next.id), 10000, 'live message:new after reconnect');
    // Anything delivered live during the join is a subset of the catch-up plus the new message (dedupe by seq).
    const bySeq = new Map([...missedMsgs, next].map((m) => [m.seq, m]));
    for (const m of live) assert.deepEqual(m, bySeq.get(m.seq));
    assert.ok(live.length === new Set(live.map((m) => m.seq)).size, 'no duplicate live deliveries');
  }

  test('12 messages missed while away: room:join after_seq returns exactly those', async () => {
    await scenario(12);
  });

  test('600 messages missed: room:join returns 500 with has_more, room:sync pages the rest', async () => {
    await scenario(600);
  });
});

describe('server restarts with the same data dir', () => {
  test('SIGTERM: exits 0, every acked send survives, a reconnecting client catches up with after_seq', async (t) => {
    const dataDir = ownDataDir();
    let s1 = await start({ dataDir });
    const a = await registerUser(s1.url, 'ta');
    const b = await registerUser(s1.url, 'tb');
    const room = await createRoom(s1.url, a.token, 'restart');
    assert.equal((await api(s1.url, 'POST', `/api/v1/rooms/${room.id}/join`, undefined, b.token)).status, 200);
    const sa = await open(s1.url, a.token);
    const seenA = collect(sa, 'message:new');
    await joinRoom(sa, room.id);
    const sb = await open(s1.url, b.token);
    await joinRoom(sb, room.id);
    const first = await sendMany(sb, room.id, 10, 'pre');
    await waitFor(() => seenA.length === 10, 10000, 'a sees the first 10');
    const lastSeen = seenA[9].seq;

    // A stream of sends still in flight when SIGTERM arrives.
    const acked = [...first];
    const settled = [];
    let terminating = false;
    const stream = streamSends(sb, room.id, 'burst', {
      max: 1000,
      sent: [],
      stop: () => false,
      onAck: (ack) => {
        settled.push(ack);
        if (ack?.ok) acked.push(ack.message);
      },
    });
    await waitFor(() => acked.length >= 60, 20000, 'some acks of the stream');
    terminating = true;
    const exit = await stopWithin(s1, 'SIGTERM');
    assert.deepEqual(exit, { code: 0, signal: null }, 'SIGTERM is a clean shutdown with exit code 0');
    await stream;
    assert.ok(terminating);
    t.diagnostic(`stream at SIGTERM: ${settled.filter((x) => x?.ok).length} acked ok, ${settled.filter((x) => x && !x.ok).length} refused, ${settled.filter((x) => !x).length} unanswered`);
    const CODES = ['validation_failed', 'unauthorized', 'forbidden', 'not_found', 'conflict', 'payload_too_large', 'rate_limited', 'unavailable'];
    for (const ack of settled) {
      // In-flight sends may be refused while draining, but only with a documented error.
      if (ack && ack.ok !== true) assert.ok(ack.ok === false && CODES.includes(ack.error?.code), `ack during SIGTERM: ${JSON.stringify(ack)}`);
    }

    s1 = await start({ dataDir });
    // The embedded-mode JWT secret is kept in the data dir: tokens stay valid across the restart.
    const me = await api(s1.url, 'GET', '/api/v1/users/me', undefined, a.token);
    assert.equal(me.status, 200, `old token after restart: ${me.status} ${JSON.stringify(me.body)}`);

    const { messages, head_seq } = await fetchAllMessages(s1.url, a.token, room.id);
    assertGapFree(messages, head_seq);
    for (const m of acked) assert.deepEqual(messages[m.seq - 1], m, `acked message seq ${m.seq} kept unchanged`);

    const sb2 = await open(s1.url, b.token);
    await joinRoom(sb2, room.id);
    const after = await sendMessage(sb2, room.id, 'after restart');
    assert.equal(after.seq, head_seq + 1, 'seq continues after the restart');
    // An acked message retried after the restart is still deduplicated.
    const retry = await emitAck(sb2, 'message:send', { room_id: room.id, client_msg_id: first[3].client_msg_id, body: first[3].body });
    assert.deepEqual(retry.message, first[3], 'idempotent retry across restart');

    const sa2 = await open(s1.url, a.token);
    const join = await joinRoom(sa2, room.id, { after_seq: lastSeen });
    assert.equal(join.head_seq, after.seq);
    const caughtUp = [...join.messages];
    for (let more = join.has_more, n = 0; more; n++) {
      assert.ok(n < 10 && caughtUp.length > 0, 'room:sync paging does not end');
      const r = await emitAck(sa2, 'room:sync', { room_id: room.id, after_seq: caughtUp[caughtUp.length - 1].seq, limit: 500 });
      assert.equal(r.ok, true, JSON.stringify(r).slice(0, 300));
      caughtUp.push(...r.messages);
      more = r.has_more;
    }
    assert.deepEqual(caughtUp, [...messages.slice(lastSeen), after], 'catch-up after the restart is exact');
    await stopWithin(s1, 'SIGTERM');
  });

  test('SIGKILL during a burst: every acked send is kept with its seq, history gap-free, retries dedupe', async (t) => {
    const dataDir = ownDataDir();
    let s1 = await start({ dataDir });
    const a = await registerUser(s1.url, 'ka');
    const b = await registerUser(s1.url, 'kb');
    const room = await createRoom(s1.url, a.token, 'kill');
    const sa = await open(s1.url, a.token);
    const sb = await open(s1.url, b.token);
    await joinRoom(sa, room.id);
    await joinRoom(sb, room.id);

    const intents = [];
    const acked = [];
    let killed = false;
    const onAck = (ack) => {
      if (ack?.ok) acked.push(ack.message);
      if (!killed && acked.length >= 150) {
        killed = true;
        s1.proc.kill('SIGKILL');
      }
    };
    const streams = [['a', sa, a], ['b', sb, b]].map(([who, sock, owner]) => {
      const sent = [];
      // Keeps sending until the socket notices the server is gone, so the kill lands mid-stream.
      const done = streamSends(sock, room.id, who, { window: 40, sent, onAck, stop: () => false });
      return done.then(() => sent.map((payload) => ({ payload, owner })));
    });
    await waitFor(() => killed, 30000, '150 acks before the kill');
    const exit = await stopWithin(s1, 'SIGKILL');
    assert.equal(exit.signal, 'SIGKILL');
    for (const list of await Promise.all(streams)) intents.push(...list);
    t.diagnostic(`SIGKILL after ${acked.length} of ${intents.length} sends were acked`);
    assert.ok(acked.length >= 150);
    assert.ok(acked.length < intents.length, `the kill must land mid-stream (acked ${acked.length} of ${intents.length})`);

    s1 = await start({ dataDir });
    const { messages, head_seq } = await fetchAllMessages(s1.url, a.token, room.id);
    assertGapFree(messages, head_seq);
    assert.ok(head_seq >= acked.length, `head_seq ${head_seq} < acked ${acked.length}`);
    for (const m of acked) assert.deepEqual(messages[m.seq - 1], m, `acked message seq ${m.seq} kept with the same id and seq`);
    t.diagnostic(`after restart: head_seq ${head_seq}, ${head_seq - acked.length} stored without an ack`);

    // Retrying every send (acked or not) over REST converges to each message stored exactly once.
    const ackedByCmid = new Map(acked.map((m) => [`${m.sender_id}/${m.client_msg_id}`, m]));
    for (let i = 0; i < intents.length; i += 8) {
      await Promise.all(
        intents.slice(i, i + 8).map(async ({ payload, owner }) => {
          const r = await api(s1.url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: payload.client_msg_id, body: payload.body }, owner.token);
          assert.ok(r.status === 200 || r.status === 201, `retry ${payload.client_msg_id}: ${r.status} ${JSON.stringify(r.body)}`);
          const before = ackedByCmid.get(`${owner.user.id}/${payload.client_msg_id}`);
          if (before) {
            assert.equal(r.status, 200, `retry of acked ${payload.client_msg_id} is 200`);
            assert.deepEqual(r.body, before);
          }
        }),
      );
    }
    const final = await fetchAllMessages(s1.url, a.token, room.id);
    assertGapFree(final.messages, final.head_seq);
    assert.equal(final.head_seq, intents.length, `each of the ${intents.length} client_msg_ids stored exactly once`);
    const keys = new Set(final.messages.map((m) => `${m.sender_id}/${m.client_msg_id}`));
    assert.equal(keys.size, intents.length);
    await stopWithin(s1, 'SIGTERM');
  });
});
