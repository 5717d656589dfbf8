// chatmesh operations page (/admin): plain ES2020, no framework, nothing loaded from outside.
// Polls GET /api/v1/cluster every 2 s with the admin token; rates are computed here from the
// counters' deltas. Text that comes from the server (ids, targets, error messages) only ever goes
// through textContent.
'use strict';
(() => {
  const TOKEN_KEY = 'chatmesh.adminToken';
  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const WINDOW_MS = 10 * 60 * 1000; // chart window
  const LATE_MS = 5000; // an instance record older than this is flagged (heartbeats are ~1 s)
  const MAX_ERRORS = 100;
  const CIRCUIT_ORDER = ['redis', 'store'];
  const $ = (sel) => document.querySelector(sel);

  const S = {
    token: null,
    timer: null,
    inflight: null, // AbortController of the request in flight
    generation: 0, // bumped when the token changes: late answers for an older token are dropped
    data: null, // last good answer
    receivedAt: 0, // Date.now() when it arrived
    clockOffset: 0, // server clock minus ours (ms), only used when the skew is large
    prev: new Map(), // instance id -> {accepted, delivered, at, started} counters at the last snapshot
    rates: new Map(), // instance id -> {accepted, delivered} msgs/s (null: unknown yet)
    history: [], // {t, rate, lag} for the chart; rate/lag null marks a gap
    rows: new Map(), // instance id -> <tr>
    errorSig: null, // signature of the rendered error list (null: nothing rendered yet)
    newestErrorAt: null,
    hoverX: null, // CSS px over the chart, or null
  };

  // ---------- small helpers ----------
  function el(tag, props = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'text') e.textContent = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined && kid !== false) e.append(kid);
    return e;
  }

  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
  const parseTime = (iso) => {
    const t = typeof iso === 'string' ? Date.parse(iso) : NaN;
    return Number.isFinite(t) ? t : null;
  };
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  const serverNow = () => Date.now() + S.clockOffset;

  function fmtInt(v) {
    return num(v) === null ? '–' : Math.round(v).toLocaleString('en-US');
  }
  function fmtRate(r) {
    if (num(r) === null) return '–';
    if (r === 0) return '0';
    if (r < 0.05) return '<0.1';
    if (r < 100) return r.toFixed(1);
    return Math.round(r).toLocaleString('en-US');
  }
  /** 850 ms, 3.2 s, 42 s, 5 m 07 s, 3 h 04 m, 2 d 5 h */
  function fmtDuration(ms, { precise = true } = {}) {
    if (num(ms) === null) return '–';
    ms = Math.max(0, ms);
    if (precise && ms < 1000) return `${Math.round(ms)} ms`;
    if (precise && ms < 10000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} m ${pad(s % 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${pad(m % 60)} m`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }
  function fmtAge(ms) {
    if (num(ms) === null) return '–';
    return ms < 1000 ? 'just now' : `${fmtDuration(ms, { precise: false })} ago`;
  }
  function fmtClock(ms, withMillis = false) {
    const d = new Date(ms);
    const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return withMillis ? `${hms}.${pad(d.getMilliseconds(), 3)}` : hms;
  }

  // ---------- token ----------
  function loadToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || null;
    } catch {
      return null;
    }
  }
  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage disabled: the token lives in memory for this page only
    }
  }
  /** `#token=...` (for automation): take it, then strip it from the address bar and the history entry. */
  function takeFragmentToken() {
    const hash = location.hash.replace(/^#/, '');
    if (!hash) return null;
    let token = null;
    const rest = [];
    for (const part of hash.split('&')) {
      if (part.startsWith('token=')) {
        try {
          token = decodeURIComponent(part.slice(6));
        } catch {
          token = part.slice(6);
        }
      } else if (part) rest.push(part);
    }
    if (token === null) return null;
    history.replaceState(history.state, '', location.pathname + location.search + (rest.length ? `#${rest.join('&')}` : ''));
    return token.trim() || null;
  }

  // ---------- page state ----------
  const STATE_LABEL = { loading: 'loading', ok: 'live', unauthorized: 'locked', error: 'stale' };
  function setState(state) {
    document.body.dataset.state = state;
    const pill = $('#state');
    pill.dataset.state = state;
    pill.textContent = state === 'error' && !S.data ? 'offline' : STATE_LABEL[state];
    $('#change-token').hidden = !S.token || state === 'unauthorized';
  }

  function showBanner(kind, ...parts) {
    const b = $('#banner');
    b.dataset.kind = kind;
    fill(b, ...parts);
    b.hidden = false;
  }
  /** replaceChildren() that skips null/false (it would insert them as the text "null"). */
  function fill(parent, ...kids) {
    parent.replaceChildren(...kids.filter((k) => k !== null && k !== undefined && k !== false));
  }
  function hideBanner() {
    const b = $('#banner');
    b.hidden = true;
    b.replaceChildren();
  }

  function askForToken(message) {
    stopPolling();
    $('#dash').hidden = true;
    $('#login').hidden = false;
    setState('unauthorized');
    if (message) showBanner('auth', message);
    else hideBanner();
    const input = $('#token');
    input.value = '';
    input.focus();
  }

  // ---------- polling ----------
  function stopPolling() {
    clearTimeout(S.timer);
    S.timer = null;
    if (S.inflight) S.inflight.abort();
    S.inflight = null;
    S.generation += 1;
  }

  function schedule(delay) {
    clearTimeout(S.timer);
    S.timer = setTimeout(poll, Math.max(0, delay));
  }

  async function poll() {
    S.timer = null;
    const gen = S.generation;
    const ctrl = new AbortController();
    S.inflight = ctrl;
    const killer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    const started = Date.now();
    let outcome;
    try {
      const headers = { accept: 'application/json' };
      if (S.token) headers.authorization = `Bearer ${S.token}`;
      const res = await fetch('/api/v1/cluster', { headers, cache: 'no-store', credentials: 'omit', signal: ctrl.signal });
      const text = await res.text();
      let body = null;
      try {
        body = text ? JSON.parse(text) : null;
      } catch {
        body = null;
      }
      if (res.status === 401) outcome = { kind: 'unauthorized', body };
      else if (!res.ok) {
        const e = body && body.error ? `${body.error.message || ''} (${body.error.code})` : res.statusText;
        outcome = { kind: 'error', why: `HTTP ${res.status} ${e}`.trim() };
      } else if (!body || !Array.isArray(body.instances)) {
        outcome = { kind: 'error', why: 'the answer is not a cluster view' };
      } else outcome = { kind: 'ok', body, date: res.headers.get('date') };
    } catch (e) {
      outcome = { kind: 'error', why: ctrl.signal.aborted ? `no answer in ${FETCH_TIMEOUT_MS / 1000} s` : 'network error' };
    } finally {
      clearTimeout(killer);
      if (S.inflight === ctrl) S.inflight = null;
    }
    if (gen !== S.generation) return; // the token changed (or polling stopped) meanwhile

    if (outcome.kind === 'unauthorized') {
      const hadToken = Boolean(S.token);
      S.token = null;
      storeToken(null);
      const said = outcome.body && outcome.body.error && outcome.body.error.message;
      askForToken(
        (hadToken
          ? 'The admin token was rejected (401 unauthorized). Enter it again.'
          : 'This server needs its admin token (401 unauthorized).') + (said ? ` Server: “${said}”.` : ''),
      );
      return;
    }
    if (outcome.kind === 'ok') applyData(outcome.body, outcome.date);
    else applyFailure(outcome.why);
    schedule(POLL_MS - (Date.now() - started));
  }

  function applyFailure(why) {
    setState('error');
    $('#login').hidden = true;
    $('#dash').hidden = !S.data;
    $('#dash').classList.toggle('stale', Boolean(S.data));
    const last = S.history[S.history.length - 1];
    if (S.data && last && (last.rate !== null || last.lag !== null)) S.history.push({ t: Date.now(), rate: null, lag: null });
    const msg = el('span', { class: 'why', text: `Cannot read /api/v1/cluster: ${why}.` });
    const more = S.data
      ? el('span', { id: 'stale-note', text: staleNote() })
      : el('span', { text: 'No data yet; retrying every 2 s.' });
    showBanner('error', msg, ' ', more);
    drawChart();
  }
  const staleNote = () =>
    `Showing data from ${fmtClock(S.receivedAt)} (${fmtDuration(Date.now() - S.receivedAt, { precise: false })} old); retrying every 2 s.`;

  // ---------- data ----------
  function applyData(body, dateHeader) {
    const now = Date.now();
    // Ages are computed on the server's clock; a skew under 3 s is noise of the 1 s Date header.
    const date = dateHeader ? Date.parse(dateHeader) : NaN;
    S.clockOffset = Number.isFinite(date) && Math.abs(date - now) > 3000 ? date - now : 0;
    S.data = body;
    S.receivedAt = now;
    const sNow = serverNow();

    // Rates from counter deltas between two snapshots of the same instance, on the instance's own
    // clock (last_seen): records of other instances are up to ~1 s old, so the poll interval would be wrong.
    const seen = new Set();
    for (const inst of body.instances) {
      const id = String(inst.id);
      seen.add(id);
      const at = parseTime(inst.last_seen) ?? sNow;
      const cur = { accepted: num(inst.accepted_total), delivered: num(inst.delivered_total), at, started: inst.started_at };
      const p = S.prev.get(id);
      if (!p || p.started !== cur.started) {
        S.prev.set(id, cur);
        S.rates.set(id, { accepted: null, delivered: null });
      } else if (at > p.at) {
        const dt = (at - p.at) / 1000;
        const rate = (a, b) => (a === null || b === null || a < b ? null : (a - b) / dt);
        S.rates.set(id, { accepted: rate(cur.accepted, p.accepted), delivered: rate(cur.delivered, p.delivered) });
        S.prev.set(id, cur);
      } // else: the same snapshot again, keep the last rate
      if (sNow - at > LATE_MS) S.rates.set(id, { accepted: null, delivered: null });
    }
    for (const id of [...S.prev.keys()]) {
      if (!seen.has(id)) {
        S.prev.delete(id);
        S.rates.delete(id);
      }
    }

    const sum = (key) => {
      let total = null;
      for (const r of S.rates.values()) if (r[key] !== null) total = (total || 0) + r[key];
      return total;
    };
    const accepted = sum('accepted');
    const delivered = sum('delivered');
    const sync = body.sync || {};

    S.history.push({ t: now, rate: accepted, lag: num(sync.lag_ms) });
    while (S.history.length && S.history[0].t < now - WINDOW_MS) S.history.shift();

    setState('ok');
    hideBanner();
    $('#login').hidden = true;
    $('#dash').hidden = false;
    $('#dash').classList.remove('stale');
    $('#served-by').textContent = body.instance_id ? `served by ${body.instance_id}${body.region ? ` · ${body.region}` : ''}` : '';

    renderTotals(body, accepted, delivered);
    renderInstances(body);
    renderRegions(body);
    renderErrors(body);
    drawChart();
    tick();
  }

  function setTotal(sel, text, value, level) {
    const e = $(sel);
    e.textContent = text;
    e.dataset.value = value === null || value === undefined ? '' : String(value);
    if (level) e.dataset.level = level;
    else delete e.dataset.level;
  }

  function renderTotals(body, accepted, delivered) {
    const total = body.instances.length;
    const ready = body.instances.filter((i) => i.ready === true).length;
    setTotal('#t-ready', `${ready}/${total}`, ready, ready === total && total > 0 ? 'ok' : ready === 0 ? 'bad' : 'warn');
    const r = $('#t-ready');
    r.dataset.ready = String(ready);
    r.dataset.total = String(total);
    $('#t-ready-sub').textContent = ready === total ? 'all instances ready' : `${total - ready} not ready`;

    let conns = 0;
    for (const i of body.instances) conns += num(i.connections) || 0;
    setTotal('#t-conn', fmtInt(conns), conns);
    setTotal('#t-accepted', fmtRate(accepted), accepted);
    const d = $('#t-delivered');
    const counted = body.instances.some((i) => num(i.delivered_total) !== null);
    d.textContent = delivered !== null ? `delivered ${fmtRate(delivered)}/s` : counted ? 'delivered: measuring…' : 'delivered: –';
    d.dataset.value = delivered === null ? '' : String(delivered);

    const sync = body.sync || {};
    const pending = num(sync.pending);
    const lag = num(sync.lag_ms);
    setTotal('#t-pending', fmtInt(pending), pending, pending > 10000 ? 'warn' : null);
    setTotal('#t-lag', fmtDuration(lag), lag, lag === null ? null : lag > 60000 ? 'bad' : lag > 5000 ? 'warn' : null);
  }

  function badge(text, cls, title) {
    return el('span', { class: `badge ${cls}`, title, text });
  }

  function circuitBadges(circuits) {
    if (!circuits || typeof circuits !== 'object') return [el('span', { class: 'muted', text: '–' })];
    const names = Object.keys(circuits).sort((a, b) => {
      const ia = CIRCUIT_ORDER.indexOf(a);
      const ib = CIRCUIT_ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
    });
    if (!names.length) return [el('span', { class: 'muted', text: '–' })];
    return names.map((name) => {
      const state = String(circuits[name]);
      const known = ['closed', 'open', 'half_open'].includes(state) ? state : 'unknown';
      const b = badge(`${name} ${state.replace('_', '-')}`, `circuit c-${known}`,
        `${name} circuit breaker: ${state.replace('_', ' ')}`);
      b.dataset.circuit = name;
      b.dataset.circuitState = state;
      return b;
    });
  }

  const COLS = ['id', 'region', 'address', 'status', 'connections', 'accepted', 'delivered', 'circuits', 'uptime', 'last-seen'];
  const NUMERIC = new Set(['connections', 'accepted', 'delivered', 'uptime', 'last-seen']);

  // With peer regions (CHATMESH_PEER_REGIONS) the view lists them under `regions`.
  function renderRegions(body) {
    const card = $('#regions-card');
    const peers = Array.isArray(body.regions) ? body.regions : [];
    card.hidden = peers.length === 0;
    if (card.hidden) return;
    // Which region decides whose rooms (the home leases): a region lists its own home, and any
    // region it took over.
    const homes = Array.isArray(body.homes) ? body.homes : [];
    const decides = (region) => homes
      .filter((h) => h.decided_by === region)
      .map((h) => `${h.home}${h.home === region ? '' : ' (taken over)'} #${h.token}`)
      .join(', ') || '–';
    const row = (region, status, instances, lag) => {
      const tr = el('tr', { 'data-testid': 'region-row' });
      tr.dataset.region = region;
      const ids = instances.map((i) => String(i.id));
      tr.append(
        el('td', { text: region }),
        el('td', { text: status }),
        el('td', { 'data-testid': 'region-decides', text: decides(region) }),
        el('td', { text: ids.length ? `${ids.length}: ${ids.join(', ')}` : '–' }),
        el('td', { class: 'num', text: lag === null || lag === undefined ? '–' : `${Number(lag).toFixed(1)} s` }),
      );
      return tr;
    };
    const rows = [row(String(body.region || '?'), 'this region', body.instances || [], null)];
    for (const p of peers) {
      const status = p.reachable ? 'reachable' : `unreachable${p.error ? `: ${p.error}` : ''}`;
      rows.push(row(String(p.region), status, Array.isArray(p.instances) ? p.instances : [], p.replication_lag_seconds));
    }
    $('#region-rows').replaceChildren(...rows);
  }

  function renderInstances(body) {
    const tbody = $('#instance-rows');
    const sNow = serverNow();
    const ids = new Set();
    body.instances.forEach((inst, index) => {
      const id = String(inst.id);
      ids.add(id);
      let tr = S.rows.get(id);
      if (!tr) {
        tr = el('tr', { 'data-testid': 'instance-row' });
        for (const c of COLS) tr.append(el('td', { class: NUMERIC.has(c) ? 'num' : null, dataset: { col: c } }));
        S.rows.set(id, tr);
      }
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
      const cell = (c) => tr.children[COLS.indexOf(c)];
      const lastSeen = parseTime(inst.last_seen);
      const late = lastSeen !== null && sNow - lastSeen > LATE_MS;
      tr.dataset.instanceId = id;
      tr.dataset.ready = String(inst.ready === true);
      tr.dataset.lastSeen = lastSeen === null ? '' : String(lastSeen);
      tr.dataset.startedAt = String(parseTime(inst.started_at) ?? '');
      tr.classList.toggle('not-ready', inst.ready !== true);
      tr.classList.toggle('late', late);

      const here = id === String(body.instance_id);
      fill(cell('id'),
        el('span', { class: 'id', text: id }),
        here ? badge('this page', 'here', 'This instance answered the request') : null,
        inst.version ? el('span', { class: 'version', text: `v${inst.version}` }) : null,
      );
      cell('region').textContent = inst.region || '–';
      cell('address').replaceChildren(el('code', { text: inst.address || '–' }));
      fill(cell('status'),
        inst.ready === true ? badge('ready', 'ok', 'GET /health/ready answers 200') : badge('not ready', 'bad', 'Not taking traffic'),
        late ? badge('late', 'warn', 'No heartbeat for more than 5 s') : null,
      );
      const conns = num(inst.connections);
      cell('connections').textContent = fmtInt(conns);
      cell('connections').dataset.value = conns === null ? '' : String(conns);
      const rate = S.rates.get(id) || { accepted: null, delivered: null };
      cell('accepted').textContent = fmtRate(rate.accepted);
      cell('accepted').dataset.value = rate.accepted === null ? '' : String(rate.accepted);
      cell('delivered').textContent = fmtRate(rate.delivered);
      cell('delivered').dataset.value = rate.delivered === null ? '' : String(rate.delivered);
      cell('circuits').replaceChildren(...circuitBadges(inst.circuits));
    });
    for (const [id, tr] of S.rows) {
      if (!ids.has(id)) {
        tr.remove();
        S.rows.delete(id);
      }
    }
    if (!body.instances.length) {
      tbody.replaceChildren(el('tr', {}, el('td', { class: 'empty', colspan: COLS.length, text: 'No live instance.' })));
    } else {
      for (const row of [...tbody.children]) if (!row.dataset.instanceId) row.remove();
    }
    $('#instance-count').textContent = `(${body.instances.length})`;
    updateAges();
  }

  /** Uptime and last-seen columns move with the clock between polls. */
  function updateAges() {
    const sNow = serverNow();
    for (const tr of S.rows.values()) {
      const started = Number(tr.dataset.startedAt);
      const seen = Number(tr.dataset.lastSeen);
      const up = tr.dataset.startedAt ? sNow - started : null;
      const age = tr.dataset.lastSeen ? sNow - seen : null;
      const c = (name) => tr.children[COLS.indexOf(name)];
      c('uptime').textContent = fmtDuration(up, { precise: false });
      c('last-seen').textContent = fmtAge(age);
      c('last-seen').title = tr.dataset.lastSeen ? new Date(seen).toISOString() : '';
    }
  }

  function renderErrors(body) {
    const all = [];
    const keys = new Set();
    for (const inst of body.instances) {
      for (const e of Array.isArray(inst.recent_errors) ? inst.recent_errors : []) {
        if (!e || typeof e !== 'object') continue;
        const key = `${inst.id}|${e.at}|${e.target}|${e.message}`;
        if (keys.has(key)) continue;
        keys.add(key);
        all.push({ key, instance: String(inst.id), at: e.at, t: parseTime(e.at), level: String(e.level || 'ERROR').toUpperCase(),
          target: e.target ? String(e.target) : '', message: e.message === undefined ? '' : String(e.message) });
      }
    }
    all.sort((a, b) => (b.t ?? -Infinity) - (a.t ?? -Infinity) || a.instance.localeCompare(b.instance));
    const shown = all.slice(0, MAX_ERRORS);
    $('#error-count').textContent = all.length ? `(${all.length}${all.length > MAX_ERRORS ? `, newest ${MAX_ERRORS} shown` : ''})` : '';
    const sig = shown.map((e) => e.key).join('\n');
    if (sig === S.errorSig) return; // unchanged: keep the DOM (and any selection) as it is
    const previousNewest = S.newestErrorAt;
    S.errorSig = sig;
    S.newestErrorAt = shown.length ? shown[0].t : previousNewest;
    const list = $('#errors');
    if (!shown.length) {
      list.replaceChildren(el('li', { class: 'empty', text: 'No warnings or errors reported by any instance.' }));
      return;
    }
    list.replaceChildren(...shown.map((e) => {
      const level = ['ERROR', 'WARN', 'INFO', 'DEBUG', 'TRACE'].includes(e.level) ? e.level.toLowerCase() : 'other';
      const fresh = previousNewest !== null && e.t !== null && e.t > previousNewest;
      return el('li', { class: `err lvl-${level}${fresh ? ' fresh' : ''}`, 'data-testid': 'error-item', dataset: { instanceId: e.instance, level: e.level } },
        el('div', { class: 'meta' },
          el('time', { datetime: e.at, title: e.at, text: e.t === null ? String(e.at) : fmtClock(e.t, true) }),
          el('span', { class: `lvl lvl-${level}`, text: e.level }),
          el('span', { class: 'inst', text: e.instance }),
          e.target ? el('code', { class: 'target', text: e.target }) : null),
        el('div', { class: 'msg', text: e.message }));
    }));
  }

  // ---------- chart ----------
  function cssVar(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  /** A round step so that `ticks` steps cover `max` (1, 2, 2.5, 5 × 10^k). */
  function niceStep(max, ticks) {
    const raw = max / ticks;
    const mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  function fmtLagTick(ms) {
    if (ms === 0) return '0';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${+(ms / 1000).toFixed(1)} s`;
    return `${+(ms / 60000).toFixed(1)} m`;
  }

  function drawChart() {
    const canvas = $('#chart');
    const cssW = canvas.clientWidth;
    const cssH = canvas.clientHeight;
    if (!cssW || !cssH) return;
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(cssW * dpr);
    const H = Math.round(cssH * dpr);
    if (canvas.width !== W || canvas.height !== H) {
      canvas.width = W;
      canvas.height = H;
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);

    const C = {
      grid: cssVar('--chart-grid', '#e6e8ec'),
      text: cssVar('--chart-text', '#6b7280'),
      accepted: cssVar('--chart-accepted', '#2f6feb'),
      fill: cssVar('--chart-accepted-fill', 'rgba(47,111,235,.12)'),
      lag: cssVar('--chart-lag', '#d9480f'),
    };
    const pad = { l: 52, r: 58, t: 12, b: 26 };
    const pw = Math.max(10, cssW - pad.l - pad.r);
    const ph = Math.max(10, cssH - pad.t - pad.b);
    const now = Date.now();
    const t0 = now - WINDOW_MS;
    const pts = S.history.filter((p) => p.t >= t0);
    const TICKS = 4;

    let maxRate = 0;
    let maxLag = 0;
    for (const p of pts) {
      if (p.rate !== null) maxRate = Math.max(maxRate, p.rate);
      if (p.lag !== null) maxLag = Math.max(maxLag, p.lag);
    }
    const rateStep = niceStep(Math.max(maxRate, 4), TICKS);
    const lagStep = niceStep(Math.max(maxLag, 100), TICKS);
    const x = (t) => pad.l + ((t - t0) / WINDOW_MS) * pw;
    const yRate = (v) => pad.t + ph - (v / (rateStep * TICKS)) * ph;
    const yLag = (v) => pad.t + ph - (v / (lagStep * TICKS)) * ph;

    // grid and axes
    ctx.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
    ctx.lineWidth = 1;
    ctx.strokeStyle = C.grid;
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= TICKS; i++) {
      const y = Math.round(pad.t + ph - (i / TICKS) * ph) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.fillStyle = C.accepted;
      ctx.textAlign = 'right';
      ctx.fillText((rateStep * i).toLocaleString('en-US', { maximumFractionDigits: 1 }), pad.l - 8, y);
      ctx.fillStyle = C.lag;
      ctx.textAlign = 'left';
      ctx.fillText(fmtLagTick(lagStep * i), pad.l + pw + 8, y);
    }
    ctx.fillStyle = C.text;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const every = pw < 420 ? 5 : 2; // minutes between time labels
    for (let m = 10; m >= 0; m -= every) {
      const xx = Math.round(x(now - m * 60000)) + 0.5;
      ctx.strokeStyle = C.grid;
      ctx.beginPath();
      ctx.moveTo(xx, pad.t);
      ctx.lineTo(xx, pad.t + ph + 4);
      ctx.stroke();
      ctx.fillText(m === 0 ? 'now' : `−${m} min`, xx, pad.t + ph + 8);
    }

    // series: a line per run of known values (gaps stay gaps); a lone point is a dot
    const runs = (key) => {
      const out = [];
      let cur = [];
      for (const p of pts) {
        if (p[key] === null) {
          if (cur.length) out.push(cur);
          cur = [];
        } else cur.push(p);
      }
      if (cur.length) out.push(cur);
      return out;
    };
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.l, pad.t - 2, pw + 1, ph + 4);
    ctx.clip();
    ctx.lineJoin = 'round';
    ctx.lineCap = 'round';
    for (const run of runs('rate')) {
      if (run.length > 1) {
        ctx.beginPath();
        ctx.moveTo(x(run[0].t), yRate(0));
        for (const p of run) ctx.lineTo(x(p.t), yRate(p.rate));
        ctx.lineTo(x(run[run.length - 1].t), yRate(0));
        ctx.closePath();
        ctx.fillStyle = C.fill;
        ctx.fill();
      }
      strokeRun(ctx, run, (p) => x(p.t), (p) => yRate(p.rate), C.accepted, 2);
    }
    for (const run of runs('lag')) strokeRun(ctx, run, (p) => x(p.t), (p) => yLag(p.lag), C.lag, 1.5);
    ctx.restore();

    let drawn = 0;
    for (const p of pts) if (p.rate !== null) drawn += 1;
    canvas.dataset.points = String(drawn);

    if (!pts.some((p) => p.rate !== null || p.lag !== null)) {
      ctx.fillStyle = C.text;
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.font = '13px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
      ctx.fillText('waiting for data…', pad.l + pw / 2, pad.t + ph / 2);
    }

    // hover readout: the poll nearest to the pointer
    const readout = $('#chart-readout');
    if (S.hoverX !== null && pts.length) {
      let best = null;
      for (const p of pts) if (!best || Math.abs(x(p.t) - S.hoverX) < Math.abs(x(best.t) - S.hoverX)) best = p;
      const bx = Math.round(x(best.t)) + 0.5;
      ctx.strokeStyle = C.text;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(bx, pad.t);
      ctx.lineTo(bx, pad.t + ph);
      ctx.stroke();
      ctx.setLineDash([]);
      readout.textContent = `${fmtClock(best.t)} · ${fmtRate(best.rate)} msgs/s · lag ${fmtDuration(best.lag)}`;
      readout.hidden = false;
    } else if (readout) readout.hidden = true;
  }

  function strokeRun(ctx, run, fx, fy, color, width) {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = width;
    if (run.length === 1) {
      ctx.beginPath();
      ctx.arc(fx(run[0]), fy(run[0]), width + 1, 0, Math.PI * 2);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    run.forEach((p, i) => (i ? ctx.lineTo(fx(p), fy(p)) : ctx.moveTo(fx(p), fy(p))));
    ctx.stroke();
  }

  // ---------- clock ----------
  function tick() {
    if (S.receivedAt) {
      const age = Date.now() - S.receivedAt;
      const u = $('#updated');
      u.textContent = `updated ${fmtClock(S.receivedAt)}`;
      u.title = `${fmtDuration(age, { precise: false })} ago`;
      const note = $('#stale-note');
      if (note) note.textContent = staleNote();
    }
    updateAges();
    drawChart();
  }

  // ---------- wiring ----------
  $('#token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('#token').value.trim();
    if (!token) return;
    stopPolling();
    S.token = token;
    storeToken(token);
    $('#token').value = '';
    $('#login').hidden = true;
    hideBanner();
    setState('loading');
    poll();
  });

  $('#change-token').addEventListener('click', () => {
    S.token = null;
    storeToken(null);
    askForToken(null);
  });

  $('#banner').addEventListener('click', () => {
    if (document.body.dataset.state === 'error') {
      // retry now
      stopPolling();
      poll();
    }
  });

  const canvas = $('#chart');
  const readout = el('div', { id: 'chart-readout', class: 'readout', hidden: true });
  canvas.parentElement.append(readout);
  canvas.addEventListener('mousemove', (ev) => {
    S.hoverX = ev.offsetX;
    drawChart();
  });
  canvas.addEventListener('mouseleave', () => {
    S.hoverX = null;
    drawChart();
  });
  if (window.ResizeObserver) new ResizeObserver(() => drawChart()).observe(canvas);
  else window.addEventListener('resize', drawChart);

  setInterval(tick, 1000);

  const fromFragment = takeFragmentToken();
  if (fromFragment) storeToken(fromFragment);
  S.token = fromFragment || loadToken();
  setState('loading');
  poll();
})();
