// Engine.IO transport behaviour of chatmesh's own Socket.IO server, with the stock socket.io-client
// and raw HTTP: the heartbeat (both transports), sessions that stop answering, the protocol's error
// answers, and one socket's events arriving in order under a burst.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import WebSocket from 'ws';
import { startServer, api, registerUser, createRoom, connect, emitAck, sleep, waitFor, joinRoom, sendMessage, collect, newCmid } from './harness.mjs';

const PING_INTERVAL_MS = 300;
const PING_TIMEOUT_MS = 300;

let server;
let url;
let alice;

before(async () => {
  server = await startServer({
    env: { CHATMESH_PING_INTERVAL_MS: String(PING_INTERVAL_MS), CHATMESH_PING_TIMEOUT_MS: String(PING_TIMEOUT_MS) },
  });
  url = server.url;
  alice = await registerUser(url, 'hb');
});

after(async () => {
  await server?.close();
});

for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
  describe(`heartbeat over ${transports.join('+')}`, () => {
    test('an idle socket that answers pings stays connected for many intervals and still works', async () => {
      const s = await connect(url, alice.token, transports, { upgrade: transports.length > 1 });
      let pings = 0;
      s.io.engine.on('ping', () => pings++);
      const reasons = [];
      s.on('disconnect', (r) => reasons.push(r));
      await sleep(PING_INTERVAL_MS * 8);
      assert.deepEqual(reasons, [], 'the socket was dropped while it answered every ping');
      assert.ok(pings >= 4, `expected a ping every ${PING_INTERVAL_MS} ms, saw ${pings} in ${PING_INTERVAL_MS * 8} ms`);
      const room = await createRoom(url, alice.token, 'hb');
      await joinRoom(s, room.id);
      const m = await sendMessage(s, room.id, 'after idling');
      assert.equal(m.seq, 1);
      s.close();
    });

    test('a client that stops answering pings is dropped by the server', async () => {
      const s = await connect(url, alice.token, transports, { upgrade: transports.length > 1 });
      if (transports.length > 1) await waitFor(() => s.io.engine.transport.name === 'websocket', 5000, 'upgrade');
      const engine = s.io.engine;
      // The client's own ping-timeout check would close first and blame the server: disable it
      // (engine.io-client internals, pinned by package-lock.json).
      assert.equal(typeof engine._sendPacket, 'function', 'engine.io-client internals changed');
      engine.clearTimeoutFn(engine._pingTimeoutTimer);
      engine._pingTimeoutTime = Infinity;
      engine._resetPingTimeout = () => {};
      const send = engine._sendPacket.bind(engine);
      engine._sendPacket = (type, ...rest) => (type === 'pong' ? undefined : send(type, ...rest));
      const reason = await new Promise((resolve) => s.once('disconnect', resolve));
      assert.ok(['transport close', 'transport error'].includes(reason), `disconnect reason ${reason}`);
      s.close();
    });
  });
}

describe('raw Engine.IO requests', () => {
  test('a polling session that never polls or answers is closed after interval + timeout', async () => {
    const open = await fetch(`${url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(open.status, 200);
    const text = await open.text();
    assert.equal(text[0], '0', `open packet: ${text}`);
    const handshake = JSON.parse(text.slice(1));
    assert.equal(handshake.pingInterval, PING_INTERVAL_MS);
    assert.equal(handshake.pingTimeout, PING_TIMEOUT_MS);
    assert.deepEqual(handshake.upgrades, ['websocket']);
    assert.ok(handshake.maxPayload >= 65536);
    await sleep(PING_INTERVAL_MS + PING_TIMEOUT_MS + 400);
    const poll = await fetch(`${url}/socket.io/?EIO=4&transport=polling&sid=${handshake.sid}`);
    assert.equal(poll.status, 400);
    assert.deepEqual(await poll.json(), { code: 1, message: 'Session ID unknown' });
  });

  test('protocol errors get Engine.IO codes', async () => {
    const cases = [
      ['GET', '/socket.io/?EIO=3&transport=polling', 5],
      ['GET', '/socket.io/?EIO=4&transport=carrier-pigeon', 0],
      ['GET', '/socket.io/?EIO=4&transport=polling&sid=nope', 1],
      ['POST', '/socket.io/?EIO=4&transport=polling', 2],
      ['GET', '/socket.io/?EIO=4&transport=websocket', 3],
    ];
    for (const [method, path, code] of cases) {
      const r = await fetch(`${url}${path}`, { method, body: method === 'POST' ? '40' : undefined });
      assert.equal(r.status, 400, `${method} ${path}`);
      assert.equal((await r.json()).code, code, `${method} ${path}`);
    }
  });

  test('a second long-poll on the same session is refused and closes it', async () => {
    const open = await fetch(`${url}/socket.io/?EIO=4&transport=polling`);
    const { sid } = JSON.parse((await open.text()).slice(1));
    const first = fetch(`${url}/socket.io/?EIO=4&transport=polling&sid=${sid}`);
    await sleep(50);
    const second = await fetch(`${url}/socket.io/?EIO=4&transport=polling&sid=${sid}`);
    assert.equal(second.status, 400);
    const body = await (await first).text();
    assert.ok(body.endsWith('1'), `the waiting poll ends with a close packet: ${JSON.stringify(body)}`);
  });

  test('Socket.IO over raw polling: connect with auth, an event with an ack, another namespace refused', async () => {
    const base = `${url}/socket.io/?EIO=4&transport=polling`;
    const { sid } = JSON.parse((await (await fetch(base)).text()).slice(1));
    const at = `${base}&sid=${sid}`;
    const post = (body) => fetch(at, { method: 'POST', body }).then((r) => r.text());
    assert.equal(await post(`40{"token":"${alice.token}"}\x1e40/admin,`), 'ok');
    const packets = [];
    while (packets.length < 2) packets.push(...(await (await fetch(at)).text()).split('\x1e'));
    assert.match(packets[0], /^40\{"sid":"[^"]+"\}$/);
    assert.equal(packets[1], '44/admin,{"message":"Invalid namespace"}');
    assert.equal(await post('420["room:sync",{"room_id":"nope","after_seq":0}]\x1e421["no:such:event",{}]'), 'ok');
    const acks = [];
    while (acks.length < 2) acks.push(...(await (await fetch(at)).text()).split('\x1e').filter((p) => p.startsWith('43')));
    const byId = Object.fromEntries(acks.map((p) => [p[2], JSON.parse(p.slice(3))[0]]));
    assert.equal(byId['0'].ok, false);
    assert.equal(byId['0'].error.code, 'not_found');
    assert.equal(byId['1'].ok, false);
    assert.equal(byId['1'].error.code, 'validation_failed');
    assert.equal(await post('1'), 'ok');
  });
});

describe('Socket.IO CONNECT timeout', () => {
  const CONNECT_TIMEOUT_MS = 600;
  let quick;
  before(async () => {
    // Pings far apart: only the CONNECT deadline can close these sessions within the test.
    quick = await startServer({ env: { CHATMESH_CONNECT_TIMEOUT_MS: String(CONNECT_TIMEOUT_MS) } });
  });
  after(async () => {
    await quick?.close();
  });

  const handshake = async () => {
    const open = await fetch(`${quick.url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(open.status, 200);
    const text = await open.text();
    return JSON.parse(text.slice(1));
  };

  test('an Engine.IO session that sends no CONNECT is closed after the timeout; one that connected stays', async () => {
    const u = await registerUser(quick.url, 'ct');
    const idle = await handshake();
    const connected = await handshake();
    assert.ok(idle.pingInterval >= 20000, `pings ${idle.pingInterval} ms apart`);
    const post = await fetch(`${quick.url}/socket.io/?EIO=4&transport=polling&sid=${connected.sid}`, {
      method: 'POST',
      body: `40${JSON.stringify({ token: u.token })}`,
    });
    assert.equal(post.status, 200);
    await sleep(CONNECT_TIMEOUT_MS + 700);
    const gone = await fetch(`${quick.url}/socket.io/?EIO=4&transport=polling&sid=${idle.sid}`);
    assert.equal(gone.status, 400, 'the session without CONNECT is closed');
    assert.deepEqual(await gone.json(), { code: 1, message: 'Session ID unknown' });
    const alive = await fetch(`${quick.url}/socket.io/?EIO=4&transport=polling&sid=${connected.sid}`);
    assert.equal(alive.status, 200, 'the connected session is still open');
    assert.match(await alive.text(), /^40\{"sid":/, 'its CONNECT was answered');
  });
});

describe('one request at a time per Engine.IO session', () => {
  let srv;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv?.close();
  });

  const handshake = async () => {
    const open = await fetch(`${srv.url}/socket.io/?EIO=4&transport=polling`);
    assert.equal(open.status, 200);
    return JSON.parse((await open.text()).slice(1));
  };

  test('a POST overlapping another on the same session is refused with 400 and the session closed', async () => {
    const { sid } = await handshake();
    const at = `${srv.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`;
    let release;
    const gate = new Promise((r) => (release = r));
    const enc = new TextEncoder();
    // The first POST's body arrives in two parts; the second POST comes while it is being read.
    const slow = new ReadableStream({
      async start(c) {
        c.enqueue(enc.encode('4'));
        await gate;
        c.enqueue(enc.encode('0'));
        c.close();
      },
    });
    const first = fetch(at, { method: 'POST', body: slow, duplex: 'half' });
    await sleep(300);
    const second = await fetch(at, { method: 'POST', body: '40' });
    assert.equal(second.status, 400, 'the overlapping POST');
    assert.deepEqual(await second.json(), { code: 3, message: 'Bad request' });
    release();
    await first;
    const poll = await fetch(at);
    const text = poll.status === 200 ? await poll.text() : String(poll.status);
    assert.ok(text === '1' || text.endsWith('\x1e1') || text === '400', `the session is closed after the overlap: ${text}`);
  });

  test('a second WebSocket upgrade of a session while one is under way is refused with 400; the first completes', async () => {
    const { sid } = await handshake();
    const wsUrl = `${srv.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket&sid=${sid}`;
    const first = new WebSocket(wsUrl);
    await once(first, 'open');
    const second = new WebSocket(wsUrl);
    second.on('error', () => {});
    const outcome = await new Promise((resolve) => {
      second.on('unexpected-response', (_req, res) => resolve(res.statusCode));
      second.on('open', () => resolve('opened'));
    });
    assert.equal(outcome, 400, 'the concurrent upgrade');
    first.send('2probe');
    const [probe] = await once(first, 'message');
    assert.equal(String(probe), '3probe', 'the first upgrade goes on');
    first.send('5');
    first.close();
  });
});

describe('a client that stops reading', () => {
  let srv;
  before(async () => {
    srv = await startServer({ env: { CHATMESH_SOCKET_BUFFER_BYTES: String(1 << 20), CHATMESH_WRITE_TIMEOUT_MS: '1000' } });
  });
  after(async () => {
    await srv?.close();
  });

  const gauge = async (name) => {
    const text = await (await fetch(`${srv.url}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(`${name} `));
    return line === undefined ? undefined : Number(line.split(' ')[1]);
  };

  test('is disconnected once its queue passes the byte bound or a write passes the deadline; the rest is served', async () => {
    const a = await registerUser(srv.url, 'rd');
    const room = await createRoom(srv.url, a.token, 'flood');
    // A raw Socket.IO client over WebSocket that joins the room and then stops reading its TCP socket.
    const ws = new WebSocket(`${srv.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`);
    const inbox = [];
    let waiting = null;
    ws.on('message', (m) => {
      inbox.push(String(m));
      waiting?.();
    });
    const next = async (pred) => {
      for (;;) {
        const i = inbox.findIndex(pred);
        if (i >= 0) return inbox.splice(i, 1)[0];
        await new Promise((r) => (waiting = r));
      }
    };
    await next((m) => m.startsWith('0{'));
    ws.send(`40${JSON.stringify({ token: a.token })}`);
    await next((m) => m.startsWith('40{'));
    ws.send(`421${JSON.stringify(['room:join', { room_id: room.id }])}`);
    assert.match(await next((m) => m.startsWith('431')), /"ok":true/);
    const reader = await connect(srv.url, a.token, ['websocket']);
    await joinRoom(reader, room.id);
    assert.equal(await gauge('chatmesh_connections'), 2);
    ws._socket.pause();

    // About 12 MB of messages: past what the kernel's buffers hold, so the server's queue grows.
    const body = 'x'.repeat(4000);
    let sent = 0;
    while ((await gauge('chatmesh_connections')) === 2 && sent < 3000) {
      const batch = await Promise.all(
        Array.from({ length: 50 }, () => api(srv.url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body }, a.token)),
      );
      for (const r of batch) assert.equal(r.status, 201, JSON.stringify(r.body));
      sent += batch.length;
    }
    await waitFor(async () => (await gauge('chatmesh_connections')) === 1, 10000, 'the paused client disconnected by the server');
    const slow = await gauge('chatmesh_slow_consumers_disconnected_total');
    // The reading client got everything, in order, and is still connected.
    const m = await sendMessage(reader, room.id, 'after the flood');
    assert.equal(m.seq, sent + 1, `seqs after ${sent} flood messages`);
    assert.equal(reader.connected, true);
    reader.close();
    ws.terminate();
    console.log(`disconnected after ${sent} messages of 4000 bytes (slow-consumer disconnects: ${slow})`);
  });
});

describe('Engine.IO session caps', () => {
  let srv;
  before(async () => {
    srv = await startServer({ env: { CHATMESH_MAX_SESSIONS: '3', CHATMESH_MAX_SESSIONS_PER_IP: '2', CHATMESH_TRUST_PROXY: 'true' } });
  });
  after(async () => {
    await srv?.close();
  });

  const open = (from) => fetch(`${srv.url}/socket.io/?EIO=4&transport=polling`, { headers: { 'x-forwarded-for': from } });

  test('past the per-address and the total cap a handshake gets 403; a closed session gives its place back', async () => {
    const a1 = await open('10.7.0.1');
    const a2 = await open('10.7.0.1');
    assert.equal(a1.status, 200);
    assert.equal(a2.status, 200);
    const a3 = await open('10.7.0.1');
    assert.equal(a3.status, 403, 'a third session from one address');
    assert.deepEqual(await a3.json(), { code: 4, message: 'Forbidden' });
    assert.equal((await open('10.7.0.2')).status, 200, 'another address, the third session in all');
    assert.equal((await open('10.7.0.3')).status, 403, 'a fourth session in all');
    // A new WebSocket session counts the same way, refused before the upgrade.
    const ws = new WebSocket(`${srv.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`, { headers: { 'x-forwarded-for': '10.7.0.4' } });
    ws.on('error', () => {});
    const outcome = await new Promise((resolve) => {
      ws.on('unexpected-response', (_req, res) => resolve(res.statusCode));
      ws.on('open', () => resolve('opened'));
    });
    assert.equal(outcome, 403);
    // Closing one of 10.7.0.1's sessions (an Engine.IO close packet) frees a place at once.
    const { sid } = JSON.parse((await a1.text()).slice(1));
    await a2.text();
    const close = await fetch(`${srv.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body: '1' });
    assert.equal(close.status, 200);
    await waitFor(async () => {
      const again = await open('10.7.0.1');
      await again.text();
      return again.status === 200;
    }, 3000, 'a new session from 10.7.0.1 once one of its two closed');
  });
});

describe('events in flight per socket', () => {
  let srv;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv?.close();
  });

  const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${srv.proc.pid}/status`, 'utf8'))[1]);

  test('one polling POST of 3,000 room:sync against a room of 500 long messages: refused past the cap, cut off, memory bounded', async (t) => {
    const a = await registerUser(srv.url, 'fl');
    const room = await createRoom(srv.url, a.token, 'flood');
    const body = 'y'.repeat(4000);
    for (let i = 0; i < 500; i += 50) {
      const batch = await Promise.all(
        Array.from({ length: 50 }, () => api(srv.url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: newCmid(), body }, a.token)),
      );
      for (const r of batch) assert.equal(r.status, 201);
    }
    const at = (sid) => `${srv.url}/socket.io/?EIO=4&transport=polling${sid ? `&sid=${sid}` : ''}`;
    const { sid } = JSON.parse((await (await fetch(at())).text()).slice(1));
    assert.equal((await fetch(at(sid), { method: 'POST', body: `40${JSON.stringify({ token: a.token })}` })).status, 200);
    assert.match(await (await fetch(at(sid))).text(), /^40\{/);
    const before = rssKiB();
    const packets = Array.from({ length: 3000 }, (_, i) => `42${i}${JSON.stringify(['room:sync', { room_id: room.id, after_seq: 0, limit: 500 }])}`);
    const post = await fetch(at(sid), { method: 'POST', body: packets.join('\x1e') });
    assert.equal(post.status, 200);
    // The session is cut off: polling it finds it closed (or gone).
    await waitFor(async () => {
      const r = await fetch(at(sid));
      const text = r.status === 200 ? await r.text() : '';
      return r.status === 400 || text.endsWith('1');
    }, 20000, 'the flooding session closed by the server');
    await sleep(500);
    const grown = rssKiB() - before;
    t.diagnostic(`RSS before ${before} KiB, after ${before + grown} KiB: grew ${grown} KiB`);
    console.log(`room:sync flood: RSS grew ${grown} KiB (before ${before} KiB)`);
    // 8 reads at once of a 2 MB page, and what the socket may queue (8 MiB), not 3,000 pages (6 GB).
    assert.ok(grown < 256 * 1024, `RSS grew ${grown} KiB`);
    // The instance still serves.
    const s = await connect(srv.url, a.token, ['websocket']);
    const j = await joinRoom(s, room.id, { after_seq: 499 });
    assert.equal(j.messages.length, 1);
    s.close();
  });
});

describe('one socket under a burst', () => {
  for (const transports of [['websocket'], ['polling']]) {
    test(`${transports[0]}: 300 sends without waiting get seqs 1..300 in send order, and every message:new in that order`, async () => {
      const s = await connect(url, alice.token, transports);
      const room = await createRoom(url, alice.token, 'burst');
      await joinRoom(s, room.id);
      const seen = collect(s, 'message:new');
      const acks = await Promise.all(
        Array.from({ length: 300 }, (_, i) => emitAck(s, 'message:send', { room_id: room.id, client_msg_id: newCmid(), body: `b${i}` })),
      );
      assert.deepEqual(acks.map((a) => a.message.body), Array.from({ length: 300 }, (_, i) => `b${i}`));
      assert.deepEqual(acks.map((a) => a.message.seq), Array.from({ length: 300 }, (_, i) => i + 1));
      await waitFor(() => seen.length >= 300, 10000, 'all message:new');
      assert.deepEqual(seen.map((m) => m.seq), Array.from({ length: 300 }, (_, i) => i + 1));
      const hist = await api(url, 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0&limit=500`, undefined, alice.token);
      assert.equal(hist.body.messages.length, 300);
      s.close();
    });
  }
});
