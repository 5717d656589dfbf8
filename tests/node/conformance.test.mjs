// Socket.IO conformance of chatmesh against API.md, with the stock socket.io-client v4, run once per
// transport set: long-polling only, WebSocket only, and the default polling -> websocket upgrade.
// Against one embedded instance, or (CHATMESH_CONFORMANCE_REGIONS=2, conformance-regions.test.mjs)
// against two regions: every request and socket goes to the next region's HAProxy in turn, so a
// test's users, rooms and sockets are spread over both regions and rooms are homed in either.
import { describe, test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  startServer,
  startCluster,
  api,
  registerUser,
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
} from './harness.mjs';

const TIME_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
// How long we watch for an event that must NOT arrive (after a later event proved delivery works).
const QUIET_MS = 300;

const REGIONS = Number(process.env.CHATMESH_CONFORMANCE_REGIONS || 1);
let server;
let urls = [];
let turn = 0;
/** Where the next request or socket goes: the one instance, or the next region's HAProxy. */
const at = () => urls[turn++ % urls.length];
const allSockets = new Set();

before(async () => {
  if (REGIONS === 2) {
    // Region a: n1 and n3 behind its HAProxy; region b: n2 behind its own.
    server = await startCluster(3, {}, { regions: 2 });
    urls = server.lbs;
    // The spread is real: a room created through each HAProxy is homed in that one's region.
    const u = await registerUser(urls[0], 'home');
    const homes = [];
    for (const lb of urls) homes.push((await createRoom(lb, u.token, 'home')).home_region);
    assert.deepEqual(homes, ['a', 'b'], "rooms created through region a's and b's HAProxy");
  } else {
    server = await startServer();
    urls = [server.url];
  }
});

after(async () => {
  for (const s of allSockets) s.close();
  await server?.close();
});

// Argon2 hashing makes registration slow in debug builds: tests share a few users (every room is
// fresh). 'out' never joins any room, so it shares a room with nobody.
const users = new Map();
function user(name) {
  if (!users.has(name)) users.set(name, registerUser(at(), name));
  return users.get(name);
}

function assertAckError(ack, code, what) {
  assert.ok(ack && typeof ack === 'object', `${what}: ack is not an object: ${JSON.stringify(ack)}`);
  assert.equal(ack.ok, false, `${what}: expected ok:false/${code}, got ${JSON.stringify(ack)}`);
  assert.ok(ack.error && typeof ack.error === 'object', `${what}: no error object in ${JSON.stringify(ack)}`);
  assert.equal(ack.error.code, code, `${what}: expected error.code ${code}, got ${JSON.stringify(ack)}`);
  assert.equal(typeof ack.error.message, 'string', `${what}: error.message must be a string`);
}

function assertMessageShape(m, expected = {}) {
  assert.ok(m && typeof m === 'object', `not a Message: ${JSON.stringify(m)}`);
  for (const k of ['id', 'room_id', 'sender_id', 'client_msg_id', 'body', 'created_at']) {
    assert.equal(typeof m[k], 'string', `Message.${k} must be a string in ${JSON.stringify(m).slice(0, 300)}`);
  }
  assert.ok(Number.isInteger(m.seq) && m.seq >= 1, `Message.seq must be an integer >= 1: ${m.seq}`);
  assert.match(m.created_at, TIME_RE, 'created_at must be RFC 3339 UTC with milliseconds');
  for (const [k, v] of Object.entries(expected)) assert.deepEqual(m[k], v, `Message.${k}`);
}

function assertRoomShape(r, id) {
  assert.ok(r && typeof r === 'object', `not a Room: ${JSON.stringify(r)}`);
  if (id) assert.equal(r.id, id, 'Room.id');
  for (const k of ['id', 'name', 'topic', 'visibility', 'owner_id', 'home_region', 'created_at', 'updated_at']) {
    assert.equal(typeof r[k], 'string', `Room.${k} must be a string in ${JSON.stringify(r)}`);
  }
  assert.ok(Number.isInteger(r.head_seq), 'Room.head_seq must be an integer');
  assert.ok(Number.isInteger(r.member_count), 'Room.member_count must be an integer');
}

/** An id of the same shape as a real one that names nothing. */
function unknownIdLike(id) {
  return id.slice(0, -1) + (id.endsWith('0') ? '1' : '0');
}

/** An HS256 JWT for `sub`, signed with a key the server does not know. */
function foreignJwt(sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, iat: now, exp: now + 3600 });
  const sig = crypto.createHmac('sha256', crypto.randomBytes(32)).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

async function assertHealthy() {
  const r = await api(at(), 'GET', '/health/live');
  assert.equal(r.status, 200, `GET /health/live: ${r.status} ${JSON.stringify(r.body)}`);
  assert.deepEqual(r.body?.status, 'ok');
}

// A room with 505 messages, seeded once and shared by the limit-clamp tests of every transport set.
const SEED_COUNT = 505;
let seeded;
function seedBigRoom() {
  seeded ??= (async () => {
    const owner = await user('a');
    const room = await createRoom(at(), owner.token, 'big room');
    const s = await connect(at(), owner.token, ['websocket']);
    allSockets.add(s);
    await joinRoom(s, room.id);
    const acks = await Promise.all(
      Array.from({ length: SEED_COUNT }, (_, i) => emitAck(s, 'message:send', { room_id: room.id, client_msg_id: `seed-${i}`, body: `seed ${i}` }, 60000)),
    );
    for (const a of acks) assert.equal(a.ok, true, `seeding failed: ${JSON.stringify(a)}`);
    s.close();
    return { owner, room, bySeq: new Map(acks.map((a) => [a.message.seq, a.message])) };
  })();
  return seeded;
}

const TRANSPORT_SETS = [
  { name: 'polling only', transports: ['polling'], final: 'polling' },
  { name: 'websocket only', transports: ['websocket'], final: 'websocket' },
  { name: 'polling upgraded to websocket', transports: ['polling', 'websocket'], final: 'websocket' },
];

for (const ts of TRANSPORT_SETS) {
  describe(`socket.io over ${ts.name}`, () => {
    const mine = new Set();
    async function open(token) {
      const s = await connect(at(), token, ts.transports);
      mine.add(s);
      allSockets.add(s);
      return s;
    }
    afterEach(() => {
      for (const s of mine) s.close();
      mine.clear();
    });

    /** Owner with a public room, plus a second user; both sockets joined to the room. */
    async function twoInRoom() {
      const a = await user('a');
      const b = await user('b');
      const room = await createRoom(at(), a.token, 'two');
      const sa = await open(a.token);
      const sb = await open(b.token);
      await joinRoom(sa, room.id);
      await joinRoom(sb, room.id);
      return { a, b, room, sa, sb };
    }

    test('connects with a valid token on the expected transport', async () => {
      const u = await user('a');
      const s = await open(u.token);
      assert.equal(s.connected, true);
      assert.equal(typeof s.id, 'string');
      await waitFor(() => s.io.engine.transport.name === ts.final, 10000, `transport ${ts.final}`);
      // The connection is usable on the final transport.
      const room = await createRoom(at(), u.token, 'connect');
      const ack = await joinRoom(s, room.id);
      assertRoomShape(ack.room, room.id);
    });

    test('missing, garbage and badly signed tokens fail with connect_error "unauthorized"', async () => {
      const u = await user('a');
      const bad = [
        ['missing', undefined],
        ['empty', ''],
        ['garbage', 'not-a-token'],
        ['garbage jwt shape', 'aaa.bbb.ccc'],
        ['signed with another key', foreignJwt(u.user.id)],
        ['valid token with a suffix', `${u.token}x`],
      ];
      for (const [what, token] of bad) {
        await assert.rejects(connect(at(), token, ts.transports), (err) => {
          assert.equal(err.message, 'unauthorized', `${what} token: connect_error message`);
          return true;
        }, `${what} token must not connect`);
      }
      await assert.rejects(connect(at(), undefined, ts.transports, { auth: { token: 12345 } }), (err) => err.message === 'unauthorized');
    });

    test('room:join of another user\'s public room joins it (membership visible over REST)', async () => {
      const a = await user('a');
      const b = await user('b');
      const room = await createRoom(at(), a.token, 'public one');
      const before = await api(at(), 'GET', `/api/v1/rooms/${room.id}/members`, undefined, b.token);
      assert.equal(before.status, 403, 'members list is for members only before the join');
      assert.equal(before.body?.error?.code, 'forbidden');

      const sb = await open(b.token);
      const ack = await emitAck(sb, 'room:join', { room_id: room.id });
      assert.equal(ack.ok, true, JSON.stringify(ack));
      assertRoomShape(ack.room, room.id);
      assert.equal(ack.head_seq, 0);
      assert.deepEqual(ack.messages, [], 'no after_seq: no messages');
      assert.equal(ack.has_more, false);

      const members = await api(at(), 'GET', `/api/v1/rooms/${room.id}/members`, undefined, b.token);
      assert.equal(members.status, 200, JSON.stringify(members.body));
      const ids = members.body.members.map((m) => m.id).sort();
      assert.deepEqual(ids, [a.user.id, b.user.id].sort());
      const joined = await api(at(), 'GET', '/api/v1/rooms?scope=joined', undefined, b.token);
      assert.ok(joined.body.rooms.some((r) => r.id === room.id), 'room listed in scope=joined');
      const r = await api(at(), 'GET', `/api/v1/rooms/${room.id}`, undefined, b.token);
      assert.equal(r.body.member_count, 2);
    });

    test('room:join of a private room without membership is forbidden; after an invite it works', async () => {
      const a = await user('a');
      const b = await user('b');
      const room = await createRoom(at(), a.token, 'secret', 'private');
      const sb = await open(b.token);
      assertAckError(await emitAck(sb, 'room:join', { room_id: room.id }), 'forbidden', 'join private room');
      const members = await api(at(), 'GET', `/api/v1/rooms/${room.id}/members`, undefined, a.token);
      assert.deepEqual(members.body.members.map((m) => m.id), [a.user.id], 'a refused join must not add a member');

      const inv = await api(at(), 'POST', `/api/v1/rooms/${room.id}/members`, { user_id: b.user.id }, a.token);
      assert.equal(inv.status, 204, JSON.stringify(inv.body));
      const ack = await emitAck(sb, 'room:join', { room_id: room.id });
      assert.equal(ack.ok, true, JSON.stringify(ack));
      assert.equal(ack.room.visibility, 'private');
    });

    test('room:join of an unknown room is not_found; bad payloads are validation_failed', async () => {
      const a = await user('a');
      const room = await createRoom(at(), a.token);
      const s = await open(a.token);
      assertAckError(await emitAck(s, 'room:join', { room_id: unknownIdLike(room.id) }), 'not_found', 'join unknown room');
      assertAckError(await emitAck(s, 'room:join', {}), 'validation_failed', 'join without room_id');
      assertAckError(await emitAck(s, 'room:join', { room_id: 42 }), 'validation_failed', 'join with numeric room_id');
      assertAckError(await emitAck(s, 'room:join', 'room'), 'validation_failed', 'join with a string payload');
      assertAckError(await emitAck(s, 'room:join', { room_id: room.id, after_seq: 'abc' }), 'validation_failed', 'join with after_seq "abc"');
    });

    test('message:send acks the Message with seq 1 and every joined socket gets the identical message:new', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const sa2 = await open(a.token); // a second socket of the sender, also joined
      await joinRoom(sa2, room.id);
      const outsider = await open((await user('out')).token);
      const seen = [sa, sa2, sb, outsider].map((s) => collect(s, 'message:new'));

      const cmid = newCmid('first');
      const ack = await emitAck(sa, 'message:send', { room_id: room.id, client_msg_id: cmid, body: '  hello, world  ' });
      assert.equal(ack.ok, true, JSON.stringify(ack));
      assertMessageShape(ack.message, { room_id: room.id, seq: 1, sender_id: a.user.id, client_msg_id: cmid, body: '  hello, world  ' });

      await waitFor(() => seen.slice(0, 3).every((l) => l.length >= 1), 10000, 'message:new on every joined socket');
      for (const l of seen.slice(0, 3)) assert.deepEqual(l, [ack.message], 'message:new equals the acked Message');

      const m2 = await sendMessage(sb, room.id, 'reply');
      assertMessageShape(m2, { seq: 2, sender_id: b.user.id, body: 'reply' });
      await waitFor(() => seen.slice(0, 3).every((l) => l.length >= 2), 10000, 'second message:new');
      for (const l of seen.slice(0, 3)) assert.deepEqual(l, [ack.message, m2]);
      await sleep(QUIET_MS);
      assert.deepEqual(seen[3], [], 'a socket that did not join gets no message:new');

      const hist = await api(at(), 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0`, undefined, b.token);
      assert.equal(hist.status, 200);
      assert.deepEqual(hist.body.messages, [ack.message, m2], 'REST history returns the same Messages');
      assert.equal(hist.body.head_seq, 2);
      assert.equal(hist.body.has_more, false);
    });

    test('idempotent retry returns the first Message and is delivered once; a different body is conflict', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const seenA = collect(sa, 'message:new');
      const seenB = collect(sb, 'message:new');
      const cmid = newCmid('retry');
      const first = await sendMessage(sa, room.id, 'same body', cmid);
      const again = await emitAck(sa, 'message:send', { room_id: room.id, client_msg_id: cmid, body: 'same body' });
      assert.equal(again.ok, true, JSON.stringify(again));
      assert.deepEqual(again.message, first, 'retry returns the first Message (same id and seq)');

      // A retry from another socket of the same user is the same (sender, room, client_msg_id).
      const sa2 = await open(a.token);
      await joinRoom(sa2, room.id);
      const third = await emitAck(sa2, 'message:send', { room_id: room.id, client_msg_id: cmid, body: 'same body' });
      assert.deepEqual(third.message, first, 'retry from another socket of the sender');

      // ...and over REST: 200 with the original.
      const rest = await api(at(), 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: cmid, body: 'same body' }, a.token);
      assert.equal(rest.status, 200, `REST retry: ${rest.status} ${JSON.stringify(rest.body)}`);
      assert.deepEqual(rest.body, first);

      assertAckError(
        await emitAck(sa, 'message:send', { room_id: room.id, client_msg_id: cmid, body: 'another body' }),
        'conflict',
        'same client_msg_id, different body',
      );
      const restConflict = await api(at(), 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: cmid, body: 'another body' }, a.token);
      assert.equal(restConflict.status, 409);
      assert.equal(restConflict.body?.error?.code, 'conflict');

      // The same client_msg_id from another sender is a different message.
      const other = await sendMessage(sb, room.id, 'same body', cmid);
      assert.notEqual(other.id, first.id);
      assert.equal(other.seq, first.seq + 1, 'retries must not consume seqs');

      const next = await sendMessage(sa, room.id, 'after the retries');
      assert.equal(next.seq, first.seq + 2);
      await waitFor(() => seenA.some((m) => m.id === next.id) && seenB.some((m) => m.id === next.id), 10000, 'last message:new');
      await sleep(QUIET_MS);
      for (const seen of [seenA, seenB]) {
        assert.deepEqual(seen.map((m) => m.seq), [1, 2, 3], 'each message delivered exactly once, in order');
        assert.equal(seen.filter((m) => m.id === first.id).length, 1, 'the retried message is delivered once');
      }
      const hist = await api(at(), 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0`, undefined, a.token);
      assert.deepEqual(hist.body.messages.map((m) => m.seq), [1, 2, 3]);
      assert.equal(hist.body.head_seq, 3);
    });

    test('message:send validation errors are validation_failed and store nothing; limits count scalar values', async () => {
      const a = await user('a');
      const room = await createRoom(at(), a.token, 'validation');
      const s = await open(a.token);
      await joinRoom(s, room.id);
      const send = (payload) => emitAck(s, 'message:send', payload);
      const msg = (body, client_msg_id = newCmid('v')) => ({ room_id: room.id, client_msg_id, body });

      const rejected = [
        ['empty body', msg('')],
        ['missing body', { room_id: room.id, client_msg_id: newCmid() }],
        ['numeric body', msg(42)],
        ['null body', msg(null)],
        ['spaces-only body', msg('   ')],
        ['newline/tab-only body', msg('\n\t \n')],
        ['ideographic-space-only body', msg('\u3000\u3000')],
        ['4001 x "a"', msg('a'.repeat(4001))],
        ['4001 x "€" (3 bytes each)', msg('€'.repeat(4001))],
        ['4001 x emoji (4 bytes, 2 UTF-16 units each)', msg('😀'.repeat(4001))],
        ['BEL control char', msg('ring \u0007 bell')],
        ['carriage return', msg('a\r\nb')],
        ['NUL', msg('a\u0000b')],
        ['DEL U+007F', msg('a\u007fb')],
        ['C1 control U+0085', msg('a\u0085b')],
        ['C1 control U+009F', msg('a\u009fb')],
        ['empty client_msg_id', msg('hi', '')],
        ['65-char client_msg_id', msg('hi', 'a'.repeat(65))],
        ['client_msg_id with a space', msg('hi', 'has space')],
        ['client_msg_id with a slash', msg('hi', 'a/b')],
        ['client_msg_id with a non-ASCII letter', msg('hi', 'caf\u00e9')],
        ['numeric client_msg_id', msg('hi', 12345)],
        ['missing client_msg_id', { room_id: room.id, body: 'hi' }],
        ['missing room_id', { client_msg_id: newCmid(), body: 'hi' }],
        ['numeric room_id', { room_id: 7, client_msg_id: newCmid(), body: 'hi' }],
        ['string payload', 'just a string'],
        ['number payload', 42],
        ['null payload', null],
        ['array payload', [room.id, 'x', 'hi']],
        ['boolean payload', true],
      ];
      for (const [what, payload] of rejected) assertAckError(await send(payload), 'validation_failed', what);
      // No payload at all, just the ack callback.
      assertAckError(await s.timeout(10000).emitWithAck('message:send'), 'validation_failed', 'no payload');

      let expectedSeq = 0;
      const accepted = [
        ['4000 x "a"', 'a'.repeat(4000), newCmid()],
        ['4000 x "€"', '€'.repeat(4000), newCmid()],
        ['4000 x emoji', '😀'.repeat(4000), newCmid()],
        ['newline and tab inside', 'line one\nline two\tend', newCmid()],
        ['leading/trailing whitespace kept verbatim', '\n  padded \t', newCmid()],
        ['single character', 'x', newCmid()],
        ['64-char client_msg_id of every allowed class', 'ok', `Az09_-${'x'.repeat(58)}`],
      ];
      const stored = [];
      for (const [what, body, cmid] of accepted) {
        const ack = await send(msg(body, cmid));
        assert.equal(ack.ok, true, `${what} must be accepted, got ${JSON.stringify(ack).slice(0, 300)}`);
        expectedSeq += 1;
        assert.equal(ack.message.body, body, `${what}: body stored verbatim`);
        assert.equal(ack.message.client_msg_id, cmid);
        assert.equal(ack.message.seq, expectedSeq, `${what}: rejected sends must not consume seqs`);
        stored.push(ack.message);
      }
      const hist = await api(at(), 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0`, undefined, a.token);
      assert.deepEqual(hist.body.messages, stored, 'history holds exactly the accepted messages, verbatim');
    });

    test('message:send to a room you are not a member of is forbidden; unknown room is not_found', async () => {
      const a = await user('a');
      const b = await user('b');
      const pub = await createRoom(at(), a.token, 'pub');
      const priv = await createRoom(at(), a.token, 'priv', 'private');
      const sb = await open(b.token);
      const sa = await open(a.token);
      await joinRoom(sa, pub.id);
      const seen = collect(sa, 'message:new');
      for (const room of [pub, priv]) {
        assertAckError(
          await emitAck(sb, 'message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'let me in' }),
          'forbidden',
          `send to ${room.visibility} room without membership`,
        );
      }
      assertAckError(
        await emitAck(sb, 'message:send', { room_id: unknownIdLike(pub.id), client_msg_id: newCmid(), body: 'hello?' }),
        'not_found',
        'send to unknown room',
      );
      await sleep(QUIET_MS);
      assert.deepEqual(seen, []);
      const r = await api(at(), 'GET', `/api/v1/rooms/${pub.id}`, undefined, a.token);
      assert.equal(r.body.head_seq, 0, 'refused sends store nothing');
    });

    test('typing reaches the other sockets of the room but not the sender', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const c = await user('c');
      const sc = await open(c.token);
      await joinRoom(sc, room.id);
      const outsider = await open((await user('out')).token);
      const typA = collect(sa, 'typing');
      const typOut = collect(outsider, 'typing');
      const gotB = nextEvent(sb, 'typing');
      const gotC = nextEvent(sc, 'typing');
      const ack = await emitAck(sa, 'typing', { room_id: room.id });
      assert.equal(ack.ok, true, JSON.stringify(ack));
      assert.deepEqual(await gotB, { room_id: room.id, user_id: a.user.id });
      assert.deepEqual(await gotC, { room_id: room.id, user_id: a.user.id });
      await sleep(QUIET_MS);
      assert.deepEqual(typA, [], 'the sender does not get its own typing');
      assert.deepEqual(typOut, []);

      const other = await createRoom(at(), c.token, 'not for b', 'private');
      assertAckError(await emitAck(sb, 'typing', { room_id: other.id }), 'forbidden', 'typing in a room you are not a member of');
      assertAckError(await emitAck(sb, 'typing', {}), 'validation_failed', 'typing without room_id');
      assertAckError(await emitAck(sb, 'typing', 'x'), 'validation_failed', 'typing with string payload');
      // Typing is never stored.
      const r = await api(at(), 'GET', `/api/v1/rooms/${room.id}`, undefined, b.token);
      assert.equal(r.body.head_seq, 0);
    });

    test('room:leave stops delivery to that socket but keeps the membership', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const seenB = collect(sb, 'message:new');
      const m1 = await sendMessage(sa, room.id, 'before leave');
      await waitFor(() => seenB.length === 1, 10000, 'message before leave');
      const ack = await emitAck(sb, 'room:leave', { room_id: room.id });
      assert.equal(ack.ok, true, JSON.stringify(ack));
      const seenA = collect(sa, 'message:new');
      const m2 = await sendMessage(sa, room.id, 'after leave');
      await waitFor(() => seenA.some((m) => m.id === m2.id), 10000, 'sender still gets its own message');
      await emitAck(sa, 'typing', { room_id: room.id });
      await sleep(QUIET_MS);
      assert.deepEqual(seenB, [m1], 'no message:new after room:leave');

      const members = await api(at(), 'GET', `/api/v1/rooms/${room.id}/members`, undefined, b.token);
      assert.equal(members.status, 200);
      assert.ok(members.body.members.some((m) => m.id === b.user.id), 'membership unchanged');
      // Rejoining with after_seq catches up.
      const re = await joinRoom(sb, room.id, { after_seq: m1.seq });
      assert.deepEqual(re.messages, [m2]);
      assertAckError(await emitAck(sb, 'room:leave', {}), 'validation_failed', 'room:leave without room_id');
    });

    test('leaving a room over REST stops delivery to every socket of that user', async () => {
      const { b, room, sa, sb } = await twoInRoom();
      const sb2 = await open(b.token);
      await joinRoom(sb2, room.id);
      const seenB = collect(sb, 'message:new');
      const seenB2 = collect(sb2, 'message:new');
      const m1 = await sendMessage(sa, room.id, 'before leave');
      await waitFor(() => seenB.length === 1 && seenB2.length === 1, 10000, 'message before leave');
      const leave = await api(at(), 'POST', `/api/v1/rooms/${room.id}/leave`, undefined, b.token);
      assert.equal(leave.status, 204, JSON.stringify(leave.body));
      const seenA = collect(sa, 'message:new');
      const m2 = await sendMessage(sa, room.id, 'after leave');
      await waitFor(() => seenA.some((m) => m.id === m2.id), 10000, 'the remaining member still gets messages');
      await sleep(QUIET_MS);
      assert.deepEqual(seenB, [m1], 'no message:new on the leaver\'s first socket');
      assert.deepEqual(seenB2, [m1], 'no message:new on the leaver\'s second socket');
      assert.equal(sb.connected && sb2.connected, true, 'the sockets stay connected');
      // Joining again (a public room) resumes delivery and catches up from after_seq.
      const re = await joinRoom(sb, room.id, { after_seq: m1.seq });
      assert.deepEqual(re.messages, [m2]);
      const m3 = await sendMessage(sa, room.id, 'after rejoin');
      await waitFor(() => seenB.some((m) => m.id === m3.id), 10000, 'delivery after rejoining');
      sb2.close();
    });

    test('a socket cannot leave or address its own user channel, so a REST leave still stops its delivery', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const seenB = collect(sb, 'message:new');
      for (const [event, payload] of [
        ['room:leave', { room_id: `user:${b.user.id}` }],
        ['room:join', { room_id: `user:${b.user.id}` }],
        ['room:sync', { room_id: `user:${b.user.id}`, after_seq: 0 }],
        ['typing', { room_id: `user:${b.user.id}` }],
        ['message:send', { room_id: `user:${a.user.id}`, client_msg_id: newCmid(), body: 'to a user channel' }],
      ]) {
        const ack = await emitAck(sb, event, payload);
        assert.equal(ack?.ok, false, `${event} on a user channel: ${JSON.stringify(ack)}`);
        assert.equal(ack.error?.code, 'validation_failed', `${event} on a user channel: ${JSON.stringify(ack)}`);
      }
      const leave = await api(at(), 'POST', `/api/v1/rooms/${room.id}/leave`, undefined, b.token);
      assert.equal(leave.status, 204, JSON.stringify(leave.body));
      const m = await sendMessage(sa, room.id, 'after the leave');
      await sleep(QUIET_MS);
      assert.equal(m.seq, 1);
      assert.deepEqual(seenB, [], 'no message:new on the leaver\'s socket after its REST leave');
      assert.equal(sb.connected, true);
    });

    test('room:sync pages with after_seq/limit and reports has_more and head_seq', async () => {
      const a = await user('a');
      const room = await createRoom(at(), a.token, 'sync');
      const s = await open(a.token);
      await joinRoom(s, room.id);
      const sent = [];
      for (let i = 1; i <= 7; i++) sent.push(await sendMessage(s, room.id, `m${i}`));
      assert.deepEqual(sent.map((m) => m.seq), [1, 2, 3, 4, 5, 6, 7]);

      const sync = (p) => emitAck(s, 'room:sync', { room_id: room.id, ...p });
      let r = await sync({ after_seq: 2, limit: 3 });
      assert.equal(r.ok, true, JSON.stringify(r));
      assert.deepEqual(r.messages, sent.slice(2, 5));
      assert.equal(r.has_more, true);
      assert.equal(r.head_seq, 7);
      r = await sync({ after_seq: 5, limit: 3 });
      assert.deepEqual(r.messages, sent.slice(5, 7));
      assert.equal(r.has_more, false);
      r = await sync({ after_seq: 4, limit: 3 });
      assert.deepEqual(r.messages, sent.slice(4, 7));
      assert.equal(r.has_more, false, 'exactly the rest: no more');
      r = await sync({ after_seq: 7 });
      assert.deepEqual(r.messages, []);
      assert.equal(r.has_more, false);
      assert.equal(r.head_seq, 7);
      r = await sync({ after_seq: 0 });
      assert.deepEqual(r.messages, sent);
      assert.equal(r.has_more, false);

      // room:join with after_seq returns the same slice.
      const j = await joinRoom(s, room.id, { after_seq: 3 });
      assert.deepEqual(j.messages, sent.slice(3));
      assert.equal(j.head_seq, 7);
      assert.equal(j.has_more, false);

      assertAckError(await sync({}), 'validation_failed', 'room:sync without after_seq');
      assertAckError(await sync({ after_seq: 'abc' }), 'validation_failed', 'room:sync with after_seq "abc"');
      assertAckError(await emitAck(s, 'room:sync', { after_seq: 0 }), 'validation_failed', 'room:sync without room_id');
      const stranger = await open((await user('out')).token);
      const priv = await createRoom(at(), a.token, 'priv', 'private');
      assertAckError(await emitAck(stranger, 'room:sync', { room_id: priv.id, after_seq: 0 }), 'forbidden', 'room:sync of a private room you are not in');
    });

    test('room:sync and room:join clamp limit to 500 (default 50)', async () => {
      const { room, owner, bySeq } = await seedBigRoom();
      const s = await open(owner.token);
      const expectSeqs = (msgs, from, to) => {
        assert.equal(msgs.length, to - from + 1, `expected seqs ${from}..${to}, got ${msgs.length} messages`);
        msgs.forEach((m, i) => assert.equal(m.seq, from + i));
        for (const m of msgs) assert.deepEqual(m, bySeq.get(m.seq));
      };
      const join = await joinRoom(s, room.id, { after_seq: 0 });
      expectSeqs(join.messages, 1, 500);
      assert.equal(join.has_more, true);
      assert.equal(join.head_seq, SEED_COUNT);

      let r = await emitAck(s, 'room:sync', { room_id: room.id, after_seq: 0, limit: 1000 });
      expectSeqs(r.messages, 1, 500);
      assert.equal(r.has_more, true);
      assert.equal(r.head_seq, SEED_COUNT);
      r = await emitAck(s, 'room:sync', { room_id: room.id, after_seq: 0 });
      expectSeqs(r.messages, 1, 50);
      assert.equal(r.has_more, true);
      r = await emitAck(s, 'room:sync', { room_id: room.id, after_seq: 500, limit: 1000 });
      expectSeqs(r.messages, 501, SEED_COUNT);
      assert.equal(r.has_more, false);
      const rest = await api(at(), 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0&limit=1000`, undefined, owner.token);
      expectSeqs(rest.body.messages, 1, 500);
      assert.equal(rest.body.has_more, true);
    });

    test('room:updated reaches sockets that joined the room after the owner PATCHes it', async () => {
      const { a, b, room, sa, sb } = await twoInRoom();
      const outsider = await open((await user('out')).token);
      const outSeen = collect(outsider, 'room:updated');
      const gotA = nextEvent(sa, 'room:updated', (r) => r.id === room.id && r.topic === 'fresh topic');
      const gotB = nextEvent(sb, 'room:updated', (r) => r.id === room.id && r.topic === 'fresh topic');
      const notOwner = await api(at(), 'PATCH', `/api/v1/rooms/${room.id}`, { name: 'hijack' }, b.token);
      assert.equal(notOwner.status, 403);
      assert.equal(notOwner.body?.error?.code, 'forbidden');
      const patch = await api(at(), 'PATCH', `/api/v1/rooms/${room.id}`, { name: 'renamed', topic: 'fresh topic' }, a.token);
      assert.equal(patch.status, 200, JSON.stringify(patch.body));
      const evB = await gotB;
      await gotA;
      assertRoomShape(evB, room.id);
      assert.equal(evB.name, 'renamed');
      assert.equal(evB.topic, 'fresh topic');
      assert.equal(evB.owner_id, a.user.id);
      await sleep(QUIET_MS);
      assert.deepEqual(outSeen, []);
    });

    test('user:updated reaches sockets sharing a room after PATCH /users/me', async () => {
      const { a, sb } = await twoInRoom();
      const outsider = await open((await user('out')).token);
      const outSeen = collect(outsider, 'user:updated');
      const name = `Alice ${ts.final} ${Date.now()}`;
      const got = nextEvent(sb, 'user:updated', (u) => u.id === a.user.id && u.display_name === name);
      const patch = await api(at(), 'PATCH', '/api/v1/users/me', { display_name: name, status_text: 'in a meeting ☕' }, a.token);
      assert.equal(patch.status, 200, JSON.stringify(patch.body));
      const ev = await got;
      assert.equal(ev.status_text, 'in a meeting ☕');
      assert.equal(ev.username, a.user.username);
      for (const k of ['id', 'username', 'display_name', 'status_text', 'avatar_url', 'created_at', 'updated_at']) {
        assert.equal(typeof ev[k], 'string', `User.${k}`);
      }
      await sleep(QUIET_MS);
      assert.deepEqual(outSeen, [], 'no user:updated to a socket sharing no room');
    });

    test('presence: online on the first socket, offline when the last one disconnects', async () => {
      const a = await registerUser(at(), 'pa');
      const b = await registerUser(at(), 'pb');
      const room = await createRoom(at(), a.token, 'presence');
      const j = await api(at(), 'POST', `/api/v1/rooms/${room.id}/join`, undefined, b.token);
      assert.equal(j.status, 200, JSON.stringify(j.body));
      const sb = await open(b.token);
      await joinRoom(sb, room.id);
      const aEvents = collect(sb, 'presence', (p) => p.user_id === a.user.id);

      const sa1 = await open(a.token);
      await waitFor(() => aEvents.length >= 1, 10000, 'presence online');
      assert.deepEqual(aEvents, [{ user_id: a.user.id, state: 'online' }]);

      const sa2 = await open(a.token);
      await sleep(QUIET_MS);
      sa1.close();
      await sleep(QUIET_MS);
      assert.deepEqual(aEvents, [{ user_id: a.user.id, state: 'online' }], 'no presence change while a socket of the user is still connected');

      sa2.close();
      await waitFor(() => aEvents.length >= 2, 10000, 'presence offline');
      assert.deepEqual(aEvents, [
        { user_id: a.user.id, state: 'online' },
        { user_id: a.user.id, state: 'offline' },
      ]);
    });

    test('a packet over CHATMESH_MAX_BODY_BYTES gets payload_too_large and the socket keeps working', async () => {
      const a = await user('a');
      const room = await createRoom(at(), a.token, 'big');
      const s = await open(a.token);
      await joinRoom(s, room.id);
      const ack = await emitAck(s, 'message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'x'.repeat(70000) });
      assertAckError(ack, 'payload_too_large', '70000-byte message:send packet (limit 65536)');
      assert.equal(s.connected, true);
      const m = await sendMessage(s, room.id, 'small again');
      assert.equal(m.seq, 1, 'the oversized send stored nothing');
    });

    test('malformed packets, missing acks, unknown events and huge payloads do not take the server down', async () => {
      const a = await user('a');
      const room = await createRoom(at(), a.token, 'abuse');
      const s = await open(a.token);
      await joinRoom(s, room.id);
      s.on('connect_error', () => {});
      // Events without an ack callback, unknown events, odd payloads.
      s.emit('message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'no ack callback' });
      s.emit('message:send', 'not an object');
      s.emit('room:join');
      s.emit('room:sync', null);
      s.emit('typing', 12);
      s.emit('no:such:event', { hello: 'world' });
      s.emit('no:such:event');
      await s.timeout(1000).emitWithAck('no:such:event', { x: 1 }).catch(() => {});
      s.emit('message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'a' }, 'extra', 'args');
      s.emit('message:send', Buffer.from('binary payload'));
      // Raw, malformed Socket.IO packets on the Engine.IO connection.
      const engine = s.io.engine;
      for (const raw of ['2["message:send"', '2garbage', '9', '2[1,2,3]', '2{"a":1}', '', '2999999x["room:join"]', '3["nope"]', '2/other,["x"]', '0', '1', '5-["a"]']) {
        try {
          engine.write(raw);
        } catch {
          /* the socket may already be closed by the server: fine */
        }
      }
      await sleep(200);

      // Packets whose first character takes several bytes: ignored, and the socket goes on.
      const multibyte = await open(a.token);
      await joinRoom(multibyte, room.id);
      const drops = [];
      multibyte.on('disconnect', (reason) => drops.push(reason));
      for (const raw of ['é', '😀["message:send",{}]', '2é', '2/é,["x"]', 'é2["room:join"]']) multibyte.io.engine.write(raw);
      const after = await sendMessage(multibyte, room.id, 'after multi-byte packets');
      assert.ok(after.seq >= 1);
      // socket.io-client would resend a buffered emit after reconnecting: the connection itself
      // must have stayed up.
      assert.deepEqual(drops, [], 'the connection survived packets it could not parse');
      multibyte.close();

      // Raw Engine.IO requests with nonsense.
      const raw = [
        api(at(), 'GET', '/socket.io/?EIO=4&transport=polling&sid=doesnotexist'),
        api(at(), 'POST', '/socket.io/?EIO=4&transport=polling&sid=doesnotexist', 'garbage'),
        api(at(), 'GET', '/socket.io/?EIO=3&transport=polling'),
        api(at(), 'GET', '/socket.io/?EIO=4&transport=carrier-pigeon'),
        api(at(), 'POST', '/socket.io/?EIO=4&transport=polling', '40{"token":'),
      ];
      for (const r of await Promise.all(raw)) assert.ok(r.status >= 200 && r.status < 600);

      // A huge payload on a throwaway socket (far over the limit; the server may drop that socket).
      const big = await open(a.token);
      big.on('connect_error', () => {});
      await big.timeout(5000).emitWithAck('message:send', { room_id: room.id, client_msg_id: newCmid(), body: 'y'.repeat(3_000_000) }).catch(() => {});
      big.close();
      s.close();

      await assertHealthy();
      const fresh = await open(a.token);
      await joinRoom(fresh, room.id);
      const seen = collect(fresh, 'message:new');
      const m = await sendMessage(fresh, room.id, 'still alive');
      await waitFor(() => seen.some((x) => x.id === m.id), 10000, 'message:new after abuse');
      const hist = await api(at(), 'GET', `/api/v1/rooms/${room.id}/messages?after_seq=0`, undefined, a.token);
      const seqs = hist.body.messages.map((x) => x.seq);
      assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1), 'history stays gap-free');
      assert.ok(hist.body.messages.every((x) => x.body.length <= 4000));
    });
  });
}

describe('read and typing rate limits', () => {
  let limited;
  before(async () => {
    limited = await startServer({ env: { CHATMESH_READ_RATE_PER_SEC: '1', CHATMESH_TYPING_RATE_PER_SEC: '1' } });
  });
  after(async () => {
    await limited?.close();
  });

  test('room:sync, room:join, history pages and typing beyond 10x the per-second rate get rate_limited', async () => {
    const a = await registerUser(limited.url);
    const b = await registerUser(limited.url);
    const room = await createRoom(limited.url, a.token, 'reads');
    const s = await connect(limited.url, a.token, ['websocket']);
    allSockets.add(s);
    // The join is the first read of the burst of 10.
    await joinRoom(s, room.id);
    const t0 = Date.now();
    const acks = [];
    for (let i = 0; i < 14; i++) acks.push(await emitAck(s, 'room:sync', { room_id: room.id, after_seq: 0 }));
    const elapsedSec = (Date.now() - t0) / 1000;
    const ok = acks.filter((x) => x.ok === true).length;
    for (const x of acks.filter((y) => y.ok !== true)) assertAckError(x, 'rate_limited', 'room:sync over the rate');
    assert.ok(ok >= 9, `the burst (10, the join included) must pass, got ${ok} of 14 syncs`);
    assert.ok(ok <= 9 + Math.ceil(elapsedSec) + 1, `at most the burst and the refill within ${elapsedSec}s, got ${ok}`);
    assertAckError(await emitAck(s, 'room:join', { room_id: room.id }), 'rate_limited', 'room:join over the rate');
    const page = await api(limited.url, 'GET', `/api/v1/rooms/${room.id}/messages`, undefined, a.token);
    assert.equal(page.status, 429, JSON.stringify(page.body));
    assert.ok(page.headers.get('retry-after'), 'Retry-After on the REST history page');
    // Another user's budget is their own.
    const other = await api(limited.url, 'GET', `/api/v1/rooms/${room.id}/messages`, undefined, b.token);
    assert.equal(other.status, 200, JSON.stringify(other.body));

    const typing = [];
    for (let i = 0; i < 14; i++) typing.push(await emitAck(s, 'typing', { room_id: room.id }));
    const typed = typing.filter((x) => x.ok === true).length;
    for (const x of typing.filter((y) => y.ok !== true)) assertAckError(x, 'rate_limited', 'typing over the rate');
    assert.ok(typed >= 10 && typed <= 12, `typing: the burst of 10 (and what refilled) passes, got ${typed} of 14`);
    s.close();
  });
});

describe('sockets per user and rooms per socket', () => {
  let capped;
  before(async () => {
    capped = await startServer({ env: { CHATMESH_MAX_SOCKETS_PER_USER: '2', CHATMESH_MAX_ROOMS_PER_SOCKET: '2' } });
  });
  after(async () => {
    await capped?.close();
  });

  test('a user past the socket cap gets connect_error; a socket past the room cap cannot join', async () => {
    const a = await registerUser(capped.url);
    const b = await registerUser(capped.url);
    const s1 = await connect(capped.url, a.token, ['websocket']);
    const s2 = await connect(capped.url, a.token, ['polling']);
    allSockets.add(s1);
    allSockets.add(s2);
    await assert.rejects(connect(capped.url, a.token, ['websocket']), /too many connections for this user/, 'a third socket of the same user');
    const sb = await connect(capped.url, b.token, ['websocket']);
    allSockets.add(sb);
    s2.close();
    // The freed slot is counted back once the server has seen the disconnect.
    await waitFor(async () => {
      try {
        const again = await connect(capped.url, a.token, ['websocket']);
        allSockets.add(again);
        return true;
      } catch {
        return false;
      }
    }, 5000, 'a new socket once one of the two closed');

    const rooms = [];
    for (const name of ['c1', 'c2', 'c3']) rooms.push(await createRoom(capped.url, a.token, name));
    await joinRoom(s1, rooms[0].id);
    await joinRoom(s1, rooms[1].id);
    const third = await emitAck(s1, 'room:join', { room_id: rooms[2].id });
    assertAckError(third, 'validation_failed', 'room:join past the room cap');
    assert.match(third.error.message, /at most 2 rooms/);
    await joinRoom(s1, rooms[1].id); // rejoining a room the socket is in is not a new room
    assert.equal((await emitAck(s1, 'room:leave', { room_id: rooms[0].id })).ok, true);
    await joinRoom(s1, rooms[2].id);
    const m = await sendMessage(s1, rooms[2].id, 'in the third room');
    assert.equal(m.seq, 1);
  });
});

describe('send rate limit', () => {
  let limited;
  before(async () => {
    limited = await startServer({ env: { CHATMESH_SEND_RATE_PER_SEC: '2' } });
  });
  after(async () => {
    await limited?.close();
  });

  test('bursts beyond 10x the per-second rate get rate_limited (socket) and 429 + Retry-After (REST)', async () => {
    const a = await registerUser(limited.url);
    const room = await createRoom(limited.url, a.token, 'rl');
    const s = await connect(limited.url, a.token, ['websocket']);
    allSockets.add(s);
    await joinRoom(s, room.id);
    const t0 = Date.now();
    const acks = await Promise.all(
      Array.from({ length: 40 }, (_, i) => emitAck(s, 'message:send', { room_id: room.id, client_msg_id: `rl-${i}`, body: `burst ${i}` })),
    );
    const elapsedSec = (Date.now() - t0) / 1000;
    const ok = acks.filter((x) => x.ok === true);
    const limitedAcks = acks.filter((x) => x.ok === false);
    for (const x of limitedAcks) assertAckError(x, 'rate_limited', 'send over the rate');
    assert.ok(ok.length >= 20, `a burst of 10x the rate (20) must be allowed, got ${ok.length} ok`);
    const allowance = 20 + Math.ceil(2 * elapsedSec) + 1;
    assert.ok(ok.length <= allowance, `at most ${allowance} of 40 sends within ${elapsedSec}s may pass at 2/s, got ${ok.length}`);
    const seqs = ok.map((x) => x.message.seq).sort((p, q) => p - q);
    assert.deepEqual(seqs, Array.from({ length: ok.length }, (_, i) => i + 1), 'rate-limited sends consume no seq');

    const rest = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        api(limited.url, 'POST', `/api/v1/rooms/${room.id}/messages`, { client_msg_id: `rl-rest-${i}`, body: 'x' }, a.token),
      ),
    );
    const tooMany = rest.filter((r) => r.status === 429);
    assert.ok(tooMany.length >= 1, `REST sends while limited: statuses ${rest.map((r) => r.status)}`);
    for (const r of rest) assert.ok(r.status === 201 || r.status === 429, `REST send status ${r.status} ${JSON.stringify(r.body)}`);
    for (const r of tooMany) {
      assert.equal(r.body?.error?.code, 'rate_limited');
      assert.ok(Number(r.headers.get('retry-after')) >= 0 && r.headers.get('retry-after'), 'Retry-After header set');
    }
    s.close();
  });
});
