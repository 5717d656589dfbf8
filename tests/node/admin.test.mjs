// Browser test of the operations page that chatmesh serves at `/admin`: a 2-instance cluster with
// CHATMESH_ADMIN_TOKEN set, chat traffic through both instances, and the page in real Chromium.
// A wrong token locks the page; the right one shows both instances, live totals, rates computed
// from the counters and a chart that is drawn.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';
import { startCluster, api, registerUser, createRoom, connect, joinRoom, sendMessage, sleep, repoRoot } from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = path.join(repoRoot, 'target', 'test-artifacts');

/** What the page shows for each instance row. */
const rowsOf = (page) =>
  page.$$eval('[data-testid="instance-row"]', (rows) =>
    rows.map((r) => ({
      id: r.dataset.instanceId,
      ready: r.dataset.ready,
      shownId: r.querySelector('[data-col="id"] .id')?.textContent,
      connections: r.querySelector('[data-col="connections"]').dataset.value,
      accepted: r.querySelector('[data-col="accepted"]').dataset.value,
    })));

/** data-value of a total, as a number (NaN while unknown). */
const totalOf = (page, testid) =>
  page.$eval(`[data-testid="${testid}"]`, (e) => (e.dataset.value === '' ? NaN : Number(e.dataset.value)));

/** waitForFunction that says what it waited for and what the page showed. */
async function waitOnPage(page, what, fn, arg, timeout = 15000) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    const shown = await page.evaluate(() => ({
      state: document.body.dataset.state,
      banner: document.querySelector('[data-testid="banner"]')?.textContent,
      totals: document.querySelector('[data-testid="totals"]')?.innerText,
      rows: [...document.querySelectorAll('[data-testid="instance-row"]')].map((r) => r.innerText),
    })).catch(() => 'page unreadable');
    throw new Error(`timed out waiting for ${what}; the page shows ${JSON.stringify(shown)}`);
  }
}

test('the operations page shows a live 2-instance cluster behind the admin token', { timeout: 150000 }, async () => {
  assert.ok(existsSync(CHROMIUM),
    `Chromium not found at ${CHROMIUM}: install it (apt-get install chromium) or set CHROMIUM_PATH; this test never skips`);
  const adminToken = `admin-${randomBytes(16).toString('hex')}`;
  let cluster;
  let browser;
  const sockets = [];
  let stopSending = false;
  let sender = null;
  try {
    cluster = await startCluster(2, { CHATMESH_ADMIN_TOKEN: adminToken });
    const [n1, n2] = cluster.servers;

    // The page and its assets are served by chatmesh itself, and the API behind it is guarded.
    for (const [p, type] of [['/admin', /^text\/html/], ['/assets/admin.js', /javascript/], ['/assets/admin.css', /^text\/css/]]) {
      const r = await fetch(n1.url + p);
      assert.equal(r.status, 200, `GET ${p} on ${n1.instanceId} (does this binary embed web/admin.*?)`);
      assert.match(r.headers.get('content-type') || '', type, `content-type of ${p}`);
    }
    for (const token of [undefined, 'not-the-admin-token']) {
      const r = await api(n1.url, 'GET', '/api/v1/cluster', undefined, token);
      assert.equal(r.status, 401, `GET /api/v1/cluster with ${token ? 'a wrong' : 'no'} token`);
      assert.equal(r.body?.error?.code, 'unauthorized');
    }

    // Traffic through both instances: one user on each, one room, both sockets stay connected.
    const alice = await registerUser(n1.url, 'ops');
    const bob = await registerUser(n2.url, 'ops');
    const room = await createRoom(n1.url, alice.token, 'ops-room');
    const s1 = await connect(n1.url, alice.token);
    sockets.push(s1);
    const s2 = await connect(n2.url, bob.token);
    sockets.push(s2);
    await joinRoom(s1, room.id);
    await joinRoom(s2, room.id);
    for (let i = 0; i < 5; i++) {
      await sendMessage(s1, room.id, `via n1 #${i}`);
      await sendMessage(s2, room.id, `via n2 #${i}`);
    }
    // ...and keep sending (~10/s, alternating instances) while the page watches.
    sender = (async () => {
      for (let i = 0; !stopSending; i++) {
        await sendMessage(i % 2 ? s2 : s1, room.id, `tick ${i}`);
        await sleep(100);
      }
    })();
    sender.catch(() => {}); // awaited (and its error reported) below

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    // deviceScaleFactor 2: the chart must size its backing store to the device pixels.
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 2 });
    const page = await ctx.newPage();
    const pageErrors = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));

    // A wrong token, given in the URL fragment as automation does: the page is locked and asks again.
    await page.goto(`${n1.url}/admin#token=not-the-admin-token`);
    await waitOnPage(page, 'body[data-state=unauthorized] with a wrong token',
      () => document.body.dataset.state === 'unauthorized');
    assert.equal(new URL(page.url()).hash, '', 'the token is stripped from the address bar');
    assert.ok(await page.isVisible('[data-testid="token-input"]'), 'the token form is shown');
    assert.match(await page.textContent('[data-testid="banner"]'), /401/, 'the banner says why');
    assert.equal(await page.isVisible('[data-testid="dashboard"]'), false, 'no data while locked');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('chatmesh.adminToken')), null, 'a rejected token is not kept');

    // The right token, through the form.
    await page.fill('[data-testid="token-input"]', adminToken);
    await page.click('[data-testid="token-submit"]');
    await waitOnPage(page, 'body[data-state=ok] with the right token', () => document.body.dataset.state === 'ok');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('chatmesh.adminToken')), adminToken, 'token kept for the tab');

    // Both instances, ready, each row named by its id; the totals say 2/2.
    await waitOnPage(page, 'two ready instance rows', () => {
      const rows = [...document.querySelectorAll('[data-testid="instance-row"]')];
      return rows.length === 2 && rows.every((r) => r.dataset.ready === 'true');
    });
    const rows = await rowsOf(page);
    assert.deepEqual(rows.map((r) => r.id).sort(), ['n1', 'n2'], 'one row per instance');
    for (const r of rows) assert.equal(r.shownId, r.id, `row ${r.id} shows its id`);
    assert.equal((await page.textContent('[data-testid="total-ready"]')).trim(), '2/2');

    // Connections: each instance holds one of our sockets.
    await waitOnPage(page, 'connections > 0 on both instances', () => {
      const rows = [...document.querySelectorAll('[data-testid="instance-row"]')];
      const total = Number(document.querySelector('[data-testid="total-connections"]').dataset.value);
      return total > 0 && rows.every((r) => Number(r.querySelector('[data-col="connections"]').dataset.value) > 0);
    });
    assert.ok((await totalOf(page, 'total-connections')) >= 2, 'two sockets are connected');

    // Accepted msgs/s, from the counters' deltas between polls, while we keep sending.
    await waitOnPage(page, 'accepted msgs/s > 0 (total and per instance)', () => {
      const rows = [...document.querySelectorAll('[data-testid="instance-row"]')];
      const total = Number(document.querySelector('[data-testid="total-accepted-rate"]').dataset.value || 0);
      return total > 0 && rows.every((r) => Number(r.querySelector('[data-col="accepted"]').dataset.value || 0) > 0);
    }, undefined, 20000);
    const accepted = await totalOf(page, 'total-accepted-rate');
    assert.ok(accepted > 0 && accepted < 1000, `accepted msgs/s is plausible: ${accepted}`);
    assert.match(await page.textContent('[data-testid="total-accepted-rate"]'), /^\s*[\d.,<]+\s*$/);

    // The chart has drawn the series: blue (accepted) pixels inside the plot area, at device resolution.
    await waitOnPage(page, 'the chart to hold 2+ points', () =>
      Number(document.querySelector('[data-testid="chart"]').dataset.points) >= 2);
    const chart = await page.evaluate(() => {
      const c = document.querySelector('[data-testid="chart"]');
      const { data, width, height } = c.getContext('2d').getImageData(0, 0, c.width, c.height);
      const dpr = window.devicePixelRatio;
      // Plot area only (the left axis labels are drawn in the series colour too).
      const x0 = Math.ceil(60 * dpr);
      const x1 = Math.floor(width - 60 * dpr);
      let painted = 0;
      let series = 0;
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          const i = (y * width + x) * 4;
          if (data[i + 3] === 0) continue;
          painted += 1;
          const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
          if (x >= x0 && x <= x1 && a > 200 && b > 180 && r < 110 && g < 160) series += 1;
        }
      }
      return { width, height, cssWidth: c.clientWidth, cssHeight: c.clientHeight, dpr, painted, series };
    });
    assert.equal(chart.dpr, 2);
    assert.equal(chart.width, Math.round(chart.cssWidth * chart.dpr), `canvas width in device pixels: ${JSON.stringify(chart)}`);
    assert.equal(chart.height, Math.round(chart.cssHeight * chart.dpr), `canvas height in device pixels: ${JSON.stringify(chart)}`);
    assert.ok(chart.painted > 1000, `the chart is not blank: ${JSON.stringify(chart)}`);
    assert.ok(chart.series > 10, `the accepted msgs/s series is drawn: ${JSON.stringify(chart)}`);

    // The recent-errors list is there (empty or not, it always has at least one line).
    assert.ok(await page.isVisible('[data-testid="error-list"]'), 'error list shown');
    assert.ok((await page.$$('[data-testid="error-list"] li')).length >= 1, 'error list has content');

    // The sender has been fine all along.
    stopSending = true;
    await sender;
    sender = null;

    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, 'admin.png'), fullPage: true });
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the page');
  } finally {
    stopSending = true;
    if (sender) await sender.catch(() => {});
    for (const s of sockets) s.close();
    if (browser) await browser.close().catch(() => {});
    if (cluster) await cluster.close();
  }
});
