// Writes the seed corpus (fuzz/corpus/<target>/) from packets encoded by the parsers that
// socket.io-client itself uses (socket.io-parser, engine.io-parser), with the payloads the Node
// suites send (tests/node/*.test.mjs): real wire bytes, not hand-typed guesses.
//
//   node fuzz/seeds.mjs [dir holding node_modules, default tests/node]
//
// Files are named by content hash (as libFuzzer names its own), so rerunning adds nothing twice.
import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const modules = resolve(process.argv[2] ?? join(here, '..', 'tests', 'node'));
const require = createRequire(join(modules, 'package.json'));
const sio = require('socket.io-parser');
const eio = require('engine.io-parser');

function write(target, data) {
  const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
  const dir = join(here, 'corpus', target);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, createHash('sha1').update(bytes).digest('hex')), bytes);
}

const room = '01JEXAMPLE0ROOM0000000000';
const token = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIwMUpVU0VSIiwiZXhwIjoxOTAwMDAwMDAwfQ.c2lnbmF0dXJl';
// [event, payload] pairs as the Node suites send them, valid and refused alike.
const events = [
  ['message:send', { room_id: room, client_msg_id: 'seed-0', body: '  hello, world  ' }],
  ['message:send', { room_id: room, client_msg_id: 'late-3-17', body: 'b3.17' }],
  ['message:send', { room_id: room, client_msg_id: 'c1', body: '👨\u200d👩\u200d👧 multi\nline\ttext' }],
  ['message:send', { room_id: 'user:01JUSER', client_msg_id: 'x', body: 'to a user channel' }],
  ['message:send', 'not an object'],
  ['room:join', { room_id: room }],
  ['room:join', { room_id: room, after_seq: 1990 }],
  ['room:join', { room_id: room, after_seq: 'abc' }],
  ['room:join', { room_id: 42 }],
  ['room:sync', { room_id: room, after_seq: 0, limit: 500 }],
  ['room:sync', { room_id: room, after_seq: -1, limit: 0 }],
  ['room:sync', null],
  ['room:leave', { room_id: room }],
  ['typing', { room_id: room }],
  ['typing', 12],
  ['no:such:event', { hello: 'world' }],
];

const encoder = new sio.Encoder();
const packets = [];
const add = (p) => packets.push(...encoder.encode(p));
add({ type: sio.PacketType.CONNECT, nsp: '/', data: { token } });
add({ type: sio.PacketType.CONNECT, nsp: '/admin', data: { token } });
add({ type: sio.PacketType.CONNECT, nsp: '/' });
add({ type: sio.PacketType.DISCONNECT, nsp: '/' });
events.forEach(([name, data], i) => {
  add({ type: sio.PacketType.EVENT, nsp: '/', id: i, data: [name, data] });
  add({ type: sio.PacketType.EVENT, nsp: '/', data: [name, data] });
});
add({ type: sio.PacketType.EVENT, nsp: '/other', id: 3, data: ['room:join', { room_id: room }] });
add({ type: sio.PacketType.EVENT, nsp: '/', data: ['message:send'] });
add({ type: sio.PacketType.ACK, nsp: '/', id: 5, data: [{ ok: true }] });
// A binary event: a placeholder in the JSON, then the attachment (as Buffer.from('binary payload')).
add({ type: sio.PacketType.EVENT, nsp: '/', id: 9, data: ['message:send', Buffer.from('binary payload')] });

const textPackets = packets.filter((p) => typeof p === 'string');
// Engine.IO framing: each Socket.IO packet is a `message` (4), beside the control packets.
const engine = [
  ...textPackets.map((data) => ({ type: 'message', data })),
  ...packets.filter((p) => typeof p !== 'string').map((data) => ({ type: 'message', data })),
  { type: 'ping', data: 'probe' },
  { type: 'pong' },
  { type: 'upgrade' },
  { type: 'noop' },
  { type: 'close' },
];

eio.encodePayload(engine.slice(0, 2), (body) => write('sio_packet', body));
eio.encodePayload(engine, (body) => write('sio_packet', body));
for (const p of engine) {
  eio.encodePacket(p, false, (frame) => write('sio_packet', typeof frame === 'string' ? frame : Buffer.from(frame)));
}
// event_payload reads one Socket.IO packet (what follows the Engine.IO `4`).
for (const p of textPackets) write('event_payload', p);

// domain: a selector byte (the parser, see fuzz_targets/domain.rs), then the string.
const fields = [
  [0, ['alice_1', 'Alice_1', 'ab', 'al ice', 'alicé', 'a'.repeat(32)]],
  [1, ['password123', 'short', '€'.repeat(8)]],
  [2, ['José', '김철수', 'ad\u200bmin', '   ', '👍 team']],
  [3, ['', 'away \u0007', 'on holiday']],
  [4, ['', 'https://example.com/a.png', 'ftp://x', 'https://', 'http://a b']],
  [5, ['general', '\u202etxt.exe', 'מרים']],
  [6, ['topic\nwith\ttabs', 'bad\r']],
  [7, ['  hello, world  ', ' \n\t ', 'a\u0085', '😀'.repeat(10)]],
  [8, ['abc-DEF_123', 'a b', 'seed-0']],
  [9, ['public', 'private', 'Public']],
  [10, [room, 'user:01JUSER', '']],
  [11, [JSON.stringify(events[0][1]), JSON.stringify(events[9][1]), '{"n":1.5,"z":null,"big":18446744073709551616}']],
];
for (const [selector, values] of fields) {
  for (const v of values) write('domain', Buffer.concat([Buffer.from([selector]), Buffer.from(v)]));
}
