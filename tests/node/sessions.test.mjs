// Revoked and expired tokens against connected socket.io-client sockets: a logout on one instance
// cuts the sockets of that token on every instance within a second, and their reconnect gets
// connect_error "unauthorized"; a password change cuts every earlier token's sockets but not a
// login's made after it; a socket whose token expires is cut at its expiry.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';

import { api, connect, login, registerUser, startCluster, startServer, TEST_PASSWORD } from './harness.mjs';

/** Resolves with the time the socket disconnected. */
function disconnected(socket) {
  return new Promise((resolve) => socket.once('disconnect', () => resolve(Date.now())));
}

async function refused(url, token) {
  try {
    const s = await connect(url, token);
    s.close();
    return 'connected';
  } catch (e) {
    return e.message;
  }
}

test('logout and password change cut sockets on every instance within a second', { timeout: 120000 }, async (t) => {
  const cluster = await startCluster(2);
  const [n1, n2] = cluster.servers;
  try {
    const alice = await registerUser(n1.url, 'alice');
    const second = await login(n2.url, alice.user.username);
    const onN1 = await connect(n1.url, alice.token);
    const onN2 = await connect(n2.url, alice.token);
    const otherToken = await connect(n2.url, second.token);
    const cut = [disconnected(onN1), disconnected(onN2)];
    let otherCut = false;
    otherToken.on('disconnect', () => { otherCut = true; });

    const t0 = Date.now();
    assert.equal((await api(n1.url, 'POST', '/api/v1/auth/logout', undefined, alice.token)).status, 204);
    // REST on the other instance refuses the token at once.
    const me = await api(n2.url, 'GET', '/api/v1/users/me', undefined, alice.token);
    assert.equal(me.status, 401);
    assert.equal(me.body.error.message, 'invalid or expired token');
    const times = await Promise.all(cut);
    t.diagnostic(`sockets cut ${times.map((x) => x - t0).join(' ms and ')} ms after the logout was sent (n1, n2)`);
    for (const x of times) assert.ok(x - t0 < 1000, `socket cut ${x - t0} ms after the logout`);
    assert.equal(await refused(n2.url, alice.token), 'unauthorized', 'reconnect with the revoked token');
    assert.equal(await refused(n1.url, alice.token), 'unauthorized');
    assert.equal(otherCut, false, 'the other token\'s socket stays');
    assert.equal((await api(n1.url, 'GET', '/api/v1/users/me', undefined, second.token)).status, 200);

    // A password change ends every earlier token: the socket of `second`, on n2, made on n1.
    const otherGone = disconnected(otherToken);
    const t1 = Date.now();
    const r = await api(n1.url, 'POST', '/api/v1/users/me/password', {
      current_password: TEST_PASSWORD,
      new_password: 'another horse battery',
    }, second.token);
    assert.equal(r.status, 204, JSON.stringify(r.body));
    const at = await otherGone;
    t.diagnostic(`socket on n2 cut ${at - t1} ms after the password change was sent on n1`);
    assert.ok(at - t1 < 1500, `socket cut ${at - t1} ms after the change answered`);
    assert.equal(await refused(n2.url, second.token), 'unauthorized');
    const fresh = await login(n2.url, alice.user.username, 'another horse battery');
    const kept = await connect(n1.url, fresh.token);
    assert.equal((await api(n2.url, 'GET', '/api/v1/users/me', undefined, fresh.token)).status, 200);
    kept.close();
  } finally {
    await cluster.close();
  }
});

/** An HS256 user token as chatmesh issues them, signed by the test with the instance's secret. */
function userToken(secret, sub, ttlSecs) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, iss: 'chatmesh', aud: 'chatmesh-user', iat: now, exp: now + ttlSecs })}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

test('a socket is cut when its token expires, and cannot come back with it', { timeout: 60000 }, async (t) => {
  const secret = `jwt-${'k'.repeat(40)}`;
  const srv = await startServer({ env: { CHATMESH_JWT_SECRET: secret } });
  try {
    const u = await registerUser(srv.url, 'expiring');
    const token = userToken(secret, u.user.id, 2);
    const s = await connect(srv.url, token);
    const t0 = Date.now();
    const at = await disconnected(s);
    t.diagnostic(`cut ${at - t0} ms after connecting with a 2 s token`);
    // Cut when the token stops being taken: its exp (2 s, from a second-resolution iat) plus the
    // verifier's 5 s leeway for clock skew.
    assert.ok(at - t0 >= 5000 && at - t0 <= 9000, `cut ${at - t0} ms after connecting with a 2 s token`);
    assert.equal(await refused(srv.url, token), 'unauthorized', 'the expired token refused at once');
    assert.equal((await api(srv.url, 'GET', '/api/v1/users/me', undefined, token)).status, 401);
  } finally {
    await srv.close();
  }
});
