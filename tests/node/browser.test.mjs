// Browser test of the web chat page that chatmesh serves at `/`: two people in real Chromium
// register, meet in a public room, chat, see each other type, and one of them drops off the
// network and resyncs (room:join with after_seq) when back.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startServer, repoRoot } from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = path.join(repoRoot, 'target', 'test-artifacts');

// Reads the page's message list: [{seq, body}] in DOM order.
const messagesOf = (page) =>
  page.$$eval('#messages li[data-seq]', (lis) =>
    lis.map((li) => ({ seq: Number(li.dataset.seq), body: li.querySelector('.body').textContent })));

async function waitForMessages(page, expected, who) {
  try {
    await page.waitForFunction(
      (n) => document.querySelectorAll('#messages li[data-seq]').length >= n,
      expected.length, { timeout: 10000 });
  } catch (e) {
    throw new Error(`${who}'s page did not show ${expected.length} messages: ${JSON.stringify(await messagesOf(page))}`);
  }
  assert.deepEqual(await messagesOf(page), expected.map((body, i) => ({ seq: i + 1, body })), `${who}'s messages`);
}

async function register(page, url, username) {
  await page.goto(url);
  await page.fill('#username', username);
  await page.fill('#password', 'correct horse battery');
  await page.fill('#display-name', username[0].toUpperCase() + username.slice(1).replace(/_.*/, ''));
  await page.click('#register');
  await page.waitForSelector('#chat:not([hidden])', { timeout: 10000 }).catch(async () => {
    throw new Error(`registration of ${username} failed: ${await page.textContent('#auth-error')}`);
  });
  await page.waitForSelector('#status[data-state="connected"]', { timeout: 10000 });
}

async function send(page, body) {
  await page.fill('#message-input', body);
  await page.click('#send');
}

test('two people chat in the web page, with typing and resync after a network drop', { timeout: 90000 }, async () => {
  assert.ok(existsSync(CHROMIUM),
    `Chromium not found at ${CHROMIUM}: install it (apt-get install chromium) or set CHROMIUM_PATH; this test never skips`);
  let server;
  let browser;
  try {
    server = await startServer();
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const viewport = { width: 1100, height: 720 };
    const aliceCtx = await browser.newContext({ viewport });
    const bobCtx = await browser.newContext({ viewport });
    const alice = await aliceCtx.newPage();
    const bob = await bobCtx.newPage();
    const pageErrors = [];
    for (const [who, p] of [['alice', alice], ['bob', bob]]) p.on('pageerror', (e) => pageErrors.push(`${who}: ${e.message}`));

    // The page and its assets are served by chatmesh itself.
    const sfx = `${process.pid % 10000}_${Math.floor(Math.random() * 1e5)}`;
    // A failed login shows the API error.
    await alice.goto(server.url);
    await alice.fill('#username', `nobody_${sfx}`);
    await alice.fill('#password', 'wrong password');
    await alice.click('#login');
    await alice.waitForFunction(() => document.querySelector('#auth-error').textContent !== '', null, { timeout: 10000 });
    assert.match(await alice.textContent('#auth-error'), /invalid_credentials/);

    await register(alice, server.url, `alice_${sfx}`);

    // Alice creates a public room and ends up in it.
    await alice.fill('#room-name', 'lobby');
    await alice.fill('#room-topic', 'Say hi <b>here</b>');
    await alice.click('#create-room');
    const roomItem = alice.locator('#joined-rooms li[data-room-id]', { hasText: 'lobby' });
    await roomItem.waitFor({ timeout: 10000 });
    const roomId = await roomItem.getAttribute('data-room-id');
    await alice.waitForSelector(`#room-header[data-room-id="${roomId}"]`);
    assert.equal(await alice.textContent('#room-topic-text'), 'Say hi <b>here</b>', 'topic is shown as text');

    // Bob registers and joins it from the public room list.
    await register(bob, server.url, `bob_${sfx}`);
    await bob.click('#refresh-rooms');
    await bob.click(`#public-rooms li[data-room-id="${roomId}"] button`, { timeout: 10000 });
    await bob.waitForSelector(`#joined-rooms li[data-room-id="${roomId}"]`, { timeout: 10000 });
    await bob.waitForSelector(`#room-header[data-room-id="${roomId}"]`);

    // They talk both ways.
    const said = ['hello bob', 'hi alice <script>x()</script>'];
    await send(alice, said[0]);
    await waitForMessages(bob, said.slice(0, 1), 'bob');
    await send(bob, said[1]);
    await waitForMessages(alice, said, 'alice');
    await waitForMessages(bob, said, 'bob');
    assert.equal(await bob.locator('#messages li[data-seq="1"] .name').textContent(), 'Alice', 'sender display name');

    // Alice types; Bob sees it.
    await alice.locator('#message-input').pressSequentially('typing something', { delay: 20 });
    await bob.waitForFunction(() => /is typing/.test(document.querySelector('#typing').textContent), null, { timeout: 5000 });
    assert.match(await bob.textContent('#typing'), /^Alice is typing…$/);
    await alice.fill('#message-input', '');

    // Bob loses the network; Alice keeps talking; Bob comes back and resyncs.
    await bobCtx.setOffline(true);
    await bob.waitForSelector('#status:not([data-state="connected"])', { timeout: 5000 });
    const more = ['are you there?', 'message four', 'message five'];
    for (const m of more) await send(alice, m);
    const all = [...said, ...more];
    await waitForMessages(alice, all, 'alice');
    assert.equal((await messagesOf(bob)).length, 2, 'bob is offline and got nothing live');
    // What Bob writes while offline waits, and is sent (same client_msg_id) once he is back.
    await send(bob, 'written offline');
    await bob.waitForSelector('#pending li.waiting', { timeout: 5000 });
    await bobCtx.setOffline(false);
    await bob.waitForSelector('#status[data-state="connected"]', { timeout: 15000 });

    // Bob's page resyncs the 3 messages he missed (room:join after_seq 2), then his offline
    // message lands as seq 6 on both pages, exactly once.
    const final = [...all, 'written offline'];
    await waitForMessages(alice, final, 'alice');
    await waitForMessages(bob, final, 'bob');
    await bob.waitForFunction(() => document.querySelectorAll('#pending li').length === 0, null, { timeout: 10000 });

    mkdirSync(ARTIFACTS, { recursive: true });
    await bob.screenshot({ path: path.join(ARTIFACTS, 'chat.png') });
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the pages');
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.close();
  }
});
