// Attacks on the pub/sub channels instances talk over: whoever can reach Redis but does not hold
// CHATMESH_CLUSTER_SECRET publishes copies of real traffic (captured from the channels), altered,
// unsigned, resealed with another key, or replayed verbatim. None may reach a socket; each is
// counted in chatmesh_forged_events_total. A payload sealed with the right key (the test knows the
// cluster secret) is delivered: the positive control that the forgeries fail on their seal alone.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect as netConnect } from 'node:net';
import { createHmac } from 'node:crypto';

import {
  api,
  collect,
  connect,
  createRoom,
  emitAck,
  joinRoom,
  registerUser,
  sendMessage,
  sleep,
  startCluster,
  waitFor,
} from './harness.mjs';

/** A RESP connection to Redis: commands in, replies and pushes out (arrays of strings). */
function respClient(port) {
  const sock = netConnect(port, '127.0.0.1');
  let buf = Buffer.alloc(0);
  const items = [];
  const waiters = [];
  const parse = (at) => {
    const nl = buf.indexOf('\r\n', at);
    if (nl < 0) return null;
    const kind = String.fromCharCode(buf[at]);
    const line = buf.subarray(at + 1, nl).toString();
    if (kind === '+' || kind === '-' || kind === ':') return { value: kind === '-' ? new Error(line) : line, next: nl + 2 };
    if (kind === '$') {
      const n = Number(line);
      if (n < 0) return { value: null, next: nl + 2 };
      if (buf.length < nl + 2 + n + 2) return null;
      return { value: buf.subarray(nl + 2, nl + 2 + n).toString(), next: nl + 2 + n + 2 };
    }
    if (kind === '*') {
      const n = Number(line);
      const out = [];
      let pos = nl + 2;
      for (let i = 0; i < n; i++) {
        const r = parse(pos);
        if (!r) return null;
        out.push(r.value);
        pos = r.next;
      }
      return { value: out, next: pos };
    }
    throw new Error(`unexpected RESP ${kind}`);
  };
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const r = parse(0);
      if (!r) break;
      buf = buf.subarray(r.next);
      items.push(r.value);
      waiters.splice(0).forEach((w) => w());
    }
  });
  const encode = (args) =>
    `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('');
  return {
    items,
    send: (...args) => sock.write(encode(args.map(String))),
    async next() {
      while (items.length === 0) await new Promise((r) => waiters.push(r));
      return items.shift();
    },
    close: () => sock.destroy(),
  };
}

/** HMAC-SHA1 seal as chatmesh computes it (docs/security.md, "Trust between instances"). */
function sealWith(secret, channel, body) {
  const key = createHmac('sha256', secret).update('chatmesh pub/sub seal v1').digest();
  const tag = createHmac('sha1', key).update(`${channel}\n${body}`).digest('hex');
  return tag + body;
}

async function forgedCount(url) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const counts = {};
  for (const m of text.matchAll(/^chatmesh_forged_events_total\{reason="(\w+)"\} (\d+)/gm)) counts[m[1]] = Number(m[2]);
  return counts;
}

test('a forged PUBLISH on any channel, shaped like real traffic, reaches no socket', { timeout: 120000 }, async () => {
  const cluster = await startCluster(2);
  const [n1, n2] = cluster.servers;
  const sub = respClient(cluster.redis.port);
  const pub = respClient(cluster.redis.port);
  try {
    const alice = await registerUser(n1.url, 'alice');
    const bob = await registerUser(n2.url, 'bob');
    const room = await createRoom(n1.url, alice.token, 'forgery');
    assert.equal((await api(n2.url, 'POST', `/api/v1/rooms/${room.id}/join`, undefined, bob.token)).status, 200);
    const a = await connect(n1.url, alice.token);
    const b = await connect(n2.url, bob.token);
    await joinRoom(a, room.id);
    await joinRoom(b, room.id);
    const messages = collect(b, 'message:new');
    const typing = collect(b, 'typing');
    const presence = collect(b, 'presence');
    const roomUpdates = collect(b, 'room:updated');

    // Capture real traffic on every channel of this cluster's prefix.
    sub.send('PSUBSCRIBE', `${cluster.prefix}:*`);
    assert.equal((await sub.next())[0], 'psubscribe');
    const captured = [];
    const capture = (async () => {
      for (;;) {
        const m = await sub.next();
        if (m[0] === 'pmessage') captured.push({ channel: m[2], payload: m[3] });
      }
    })();
    capture.catch(() => {});

    const genuine = await sendMessage(a, room.id, 'genuine one');
    assert.equal((await emitAck(a, 'typing', { room_id: room.id })).ok, true);
    await waitFor(() => messages.length === 1 && typing.length === 1, 10000, 'the genuine message and typing on n2');
    await waitFor(() => captured.some((c) => c.payload.includes('"typing"')), 10000, 'the typing event captured');
    const roomMsg = captured.find((c) => c.payload.includes('"genuine one"'));
    const typingEv = captured.find((c) => c.payload.includes('"typing"'));
    assert.ok(roomMsg && typingEv, 'real traffic captured');
    // What a sealed payload looks like: 40 hex characters, then the JSON an instance sent.
    assert.match(roomMsg.payload, /^[0-9a-f]{40}\{/);
    const msgJson = roomMsg.payload.slice(40);
    const evJson = typingEv.payload.slice(40);
    const before = await forgedCount(n2.url);

    const forgedMessage = msgJson.replace(`"seq":${genuine.seq}`, `"seq":${genuine.seq + 1}`).replace('genuine one', 'FORGED');
    const forgedEvent = JSON.stringify({
      ...JSON.parse(evJson),
      n: 1_000_000,
      event: 'presence',
      data: { user_id: alice.user.id, state: 'offline' },
    });
    const roomUpdate = JSON.stringify({
      ...JSON.parse(evJson),
      n: 1_000_001,
      event: 'room:updated',
      data: { ...room, name: 'FORGED' },
    });
    const attacks = [
      ['room channel, unsigned', roomMsg.channel, forgedMessage],
      ['room channel, real seal on altered body', roomMsg.channel, roomMsg.payload.slice(0, 40) + forgedMessage],
      ['room channel, sealed with another key', roomMsg.channel, sealWith('not-the-cluster-secret-0123456789', roomMsg.channel, forgedMessage)],
      ['room channel, verbatim replay', roomMsg.channel, roomMsg.payload],
      ['events channel, unsigned presence', typingEv.channel, forgedEvent],
      ['events channel, real seal on another event', typingEv.channel, typingEv.payload.slice(0, 40) + roomUpdate],
      ['events channel, verbatim replay of typing', typingEv.channel, typingEv.payload],
      ['events channel, sealed with another key', typingEv.channel, sealWith('not-the-cluster-secret-0123456789', typingEv.channel, roomUpdate)],
    ];
    for (const [, channel, payload] of attacks) pub.send('PUBLISH', channel, payload);
    for (let i = 0; i < attacks.length; i++) {
      const receivers = await pub.next();
      assert.ok(Number(receivers) >= 2, `every instance received attack ${attacks[i][0]} (${receivers})`);
    }
    // The dropped payloads are counted; wait for the counts instead of sleeping.
    await waitFor(async () => {
      const c = await forgedCount(n2.url);
      return (c.unsigned ?? 0) - (before.unsigned ?? 0) >= 2 && (c.bad_seal ?? 0) - (before.bad_seal ?? 0) >= 4 &&
        (c.replayed ?? 0) - (before.replayed ?? 0) >= 1;
    }, 10000, 'n2 to count the forgeries');
    const after = await forgedCount(n2.url);
    assert.deepEqual(
      { unsigned: after.unsigned - (before.unsigned ?? 0), bad_seal: after.bad_seal - (before.bad_seal ?? 0), replayed: after.replayed - (before.replayed ?? 0) },
      { unsigned: 2, bad_seal: 4, replayed: 1 },
      'the verbatim room replay is dropped as already delivered (its seq), not counted',
    );

    // The next genuine message takes the seq the forgery claimed, and is the one delivered.
    const next = await sendMessage(a, room.id, 'genuine two');
    assert.equal(next.seq, genuine.seq + 1);
    await waitFor(() => messages.length >= 2, 10000, 'the second genuine message');
    await sleep(200);
    assert.deepEqual(messages.map((m) => [m.seq, m.body]), [[genuine.seq, 'genuine one'], [next.seq, 'genuine two']]);
    assert.equal(typing.length, 1, 'the replayed typing reached no socket');
    assert.deepEqual(presence.filter((p) => p.state === 'offline'), [], 'the forged presence reached no socket');
    assert.deepEqual(roomUpdates.filter((r) => r.name === 'FORGED'), [], 'the forged room update reached no socket');

    // Control: the same forged room update sealed with the cluster's key is delivered, so the
    // attacks above failed on their seal, not on their shape.
    pub.send('PUBLISH', typingEv.channel, sealWith(cluster.env.CHATMESH_CLUSTER_SECRET, typingEv.channel, roomUpdate));
    await pub.next();
    await waitFor(() => roomUpdates.some((r) => r.name === 'FORGED'), 10000, 'the correctly sealed event');
    a.close();
    b.close();
  } finally {
    sub.close();
    pub.close();
    await cluster.close();
  }
});
