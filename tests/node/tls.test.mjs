// The stock socket.io-client over TLS (CHATMESH_TLS_CERT_FILE / CHATMESH_TLS_KEY_FILE): WebSocket
// (wss), long-polling (https) and the upgrade between them, trusting only a CA this test makes
// with the openssl CLI; a client that does not trust it, and plain HTTP, get nowhere.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startServer, connect, joinRoom, sendMessage, nextEvent, waitFor } from './harness.mjs';

let server;
let pki;
let ca;
let alice;
let room;

/** A CA and a server certificate for 127.0.0.1 signed by it. */
function makePki() {
  const dir = mkdtempSync(path.join(tmpdir(), 'chatmesh-tls-'));
  const ssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=chatmesh node test CA');
  ssl('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=localhost');
  writeFileSync(
    path.join(dir, 'ext.cnf'),
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n',
  );
  ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-set_serial', '1', '-days', '2', '-out', 'server.pem', '-extfile', 'ext.cnf');
  return dir;
}

/** JSON over https trusting the test CA (global fetch cannot be given a CA). */
function httpsJson(method, url, body, token) {
  return new Promise((resolve, reject) => {
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const req = request(url, { method, headers, ca }, (res) => {
      let text = '';
      res.on('data', (d) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: text ? JSON.parse(text) : null }));
    });
    req.on('error', reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

before(async () => {
  pki = makePki();
  ca = readFileSync(path.join(pki, 'ca.pem'));
  server = await startServer({
    env: { CHATMESH_TLS_CERT_FILE: path.join(pki, 'server.pem'), CHATMESH_TLS_KEY_FILE: path.join(pki, 'server.key') },
  });
  assert.match(server.url, /^https:\/\//);
  const username = `tls_${process.pid}_${Date.now() % 100000}`;
  const r = await httpsJson('POST', `${server.url}/api/v1/auth/register`, { username, password: 'correct horse battery' });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  assert.equal(r.headers['strict-transport-security'], 'max-age=63072000');
  alice = r.body;
  const created = await httpsJson('POST', `${server.url}/api/v1/rooms`, { name: 'tls', visibility: 'public' }, alice.token);
  assert.equal(created.status, 201);
  room = created.body;
});

after(async () => {
  await server?.close();
  if (pki) rmSync(pki, { recursive: true, force: true });
});

for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
  test(`socket.io-client over TLS: ${transports.join('+')}`, async () => {
    const s = await connect(server.url, alice.token, transports, { upgrade: transports.length > 1, ca });
    try {
      const want = transports.at(-1);
      await waitFor(() => s.io.engine.transport.name === want, 5000, `transport ${want}`);
      await joinRoom(s, room.id);
      const echoed = nextEvent(s, 'message:new', (m) => m.body === `over ${transports.join('+')}`);
      const m = await sendMessage(s, room.id, `over ${transports.join('+')}`);
      assert.equal((await echoed).seq, m.seq);
    } finally {
      s.close();
    }
  });
}

test('a client that does not trust the CA cannot connect, over either transport', async () => {
  for (const transports of [['websocket'], ['polling']]) {
    await assert.rejects(connect(server.url, alice.token, transports), `${transports} without the CA`);
  }
});

test('plain HTTP to the TLS port gets no Socket.IO session', async () => {
  const plain = server.url.replace('https://', 'http://');
  await assert.rejects(connect(plain, alice.token, ['polling']));
  await assert.rejects(connect(plain, alice.token, ['websocket']));
});
