// chatmesh web chat: plain ES2020, no framework. All user text goes through textContent.
'use strict';
(() => {
  const TOKEN_KEY = 'chatmesh.token';
  const ROOM_KEY = 'chatmesh.room';
  const SEND_TIMEOUT_MS = 5000;
  const TYPING_EVERY_MS = 2000;
  const TYPING_SHOW_MS = 3000;
  const $ = (sel) => document.querySelector(sel);

  const S = {
    token: localStorage.getItem(TOKEN_KEY),
    me: null,
    socket: null,
    rooms: new Map(), // id -> Room (joined)
    publicRooms: [],
    current: null, // open room id
    rs: new Map(), // id -> per-room state (see roomState)
    wanted: new Set(), // rooms this socket should be joined to (re-joined after reconnect)
    pending: new Map(), // client_msg_id -> {cmid, roomId, body, attempt, state, error}
    users: new Map(), // id -> Promise<User>
    presence: new Map(), // user id -> 'online' | 'offline'
    typing: new Map(), // room id -> Map(user id -> timer)
    lastTypingAt: 0,
  };

  function roomState(id) {
    let r = S.rs.get(id);
    if (!r) {
      r = { msgs: new Map(), lastSeq: 0, loaded: false, hasOlder: false, syncing: null, unread: 0, members: [] };
      S.rs.set(id, r);
    }
    return r;
  }

  // ---------- helpers ----------
  function el(tag, props = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'text') e.textContent = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids) if (kid) e.append(kid);
    return e;
  }

  function errText(e) {
    if (e && e.error && e.error.code) return `${e.error.message || e.error.code} (${e.error.code})`;
    return (e && e.message) || String(e);
  }

  let errorTimer = null;
  function showError(e) {
    const box = $('#error');
    box.textContent = typeof e === 'string' ? e : errText(e);
    box.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  function randomId(n = 20) {
    const abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-';
    const bytes = crypto.getRandomValues(new Uint8Array(n));
    return Array.from(bytes, (b) => abc[b & 63]).join('');
  }

  function fmtTime(iso) {
    const d = new Date(iso);
    return isNaN(d) ? '' : d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  async function api(method, path, body) {
    const headers = {};
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (S.token) headers.authorization = `Bearer ${S.token}`;
    let res;
    try {
      res = await fetch('/api/v1' + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw { error: { code: 'network', message: 'Network error: the server cannot be reached' } };
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!res.ok) {
      const err = data && data.error ? data : { error: { code: `http_${res.status}`, message: text || res.statusText } };
      err.status = res.status;
      if (res.status === 401 && S.me && err.error.code === 'unauthorized') logout('Your session expired, please log in again.');
      throw err;
    }
    return data;
  }

  function emitAck(event, payload, timeout = 10000) {
    if (!S.socket || !S.socket.connected) return Promise.reject(new Error('not connected'));
    return S.socket.timeout(timeout).emitWithAck(event, payload).then((ack) => {
      if (!ack || !ack.ok) throw ack || { error: { code: 'bad_ack', message: 'empty ack' } };
      return ack;
    });
  }

  function getUser(id) {
    if (!S.users.has(id)) {
      S.users.set(id, api('GET', `/users/${encodeURIComponent(id)}`).catch(() => {
        S.users.delete(id); // try again next time
        return { id, username: id.slice(0, 10), display_name: null };
      }));
    }
    return S.users.get(id);
  }
  const nameOf = (u) => u.display_name || u.username || u.id;

  function nameSpan(userId) {
    const span = el('span', { class: 'name', dataset: { userId }, text: '…' });
    getUser(userId).then((u) => { span.textContent = nameOf(u); });
    return span;
  }

  // ---------- auth ----------
  async function authSubmit(ev) {
    ev.preventDefault();
    const mode = ev.submitter && ev.submitter.value === 'register' ? 'register' : 'login';
    const username = $('#username').value.trim().toLowerCase();
    const password = $('#password').value;
    const body = { username, password };
    const dn = $('#display-name').value.trim();
    if (mode === 'register' && dn) body.display_name = dn;
    $('#auth-error').textContent = '';
    try {
      const r = await api('POST', `/auth/${mode}`, body);
      S.token = r.token;
      localStorage.setItem(TOKEN_KEY, r.token);
      $('#password').value = '';
      await start(r.user);
    } catch (e) {
      $('#auth-error').textContent = errText(e);
    }
  }

  function logout(message) {
    if (S.socket) { S.socket.removeAllListeners(); S.socket.disconnect(); }
    localStorage.removeItem(TOKEN_KEY);
    Object.assign(S, { token: null, me: null, socket: null, current: null, publicRooms: [] });
    for (const m of [S.rooms, S.rs, S.wanted, S.pending, S.users, S.presence, S.typing]) m.clear();
    $('#chat').hidden = true;
    $('#auth').hidden = false;
    $('#logout').hidden = true;
    $('#me').textContent = '';
    $('#auth-error').textContent = message || '';
    setStatus('offline');
  }

  async function start(user) {
    S.me = user;
    S.users.set(user.id, Promise.resolve(user));
    $('#me').textContent = `${nameOf(user)} (@${user.username})`;
    $('#auth').hidden = true;
    $('#chat').hidden = false;
    $('#logout').hidden = false;
    await refreshRooms();
    connectSocket();
    const last = localStorage.getItem(ROOM_KEY);
    const first = S.rooms.has(last) ? last : S.rooms.keys().next().value;
    if (first) openRoom(first);
  }

  // ---------- rooms ----------
  async function refreshRooms() {
    try {
      const [joined, pub] = await Promise.all([api('GET', '/rooms?scope=joined'), api('GET', '/rooms?scope=public')]);
      S.rooms = new Map(joined.rooms.map((r) => [r.id, r]));
      S.publicRooms = pub.rooms;
      renderRooms();
    } catch (e) {
      showError(e);
    }
  }

  function roomItem(room, joined) {
    const r = roomState(room.id);
    const li = el('li', { dataset: { roomId: room.id }, class: room.id === S.current ? 'active' : null },
      el('button', { type: 'button', onclick: () => openRoom(room.id), title: room.topic || room.name },
        el('span', { class: 'room-name', text: (room.visibility === 'private' ? '🔒 ' : '# ') + room.name }),
        joined && r.unread ? el('span', { class: 'badge', text: String(r.unread) }) : null,
        joined ? null : el('span', { class: 'count', text: `${room.member_count} 👤` })));
    return li;
  }

  function renderRooms() {
    const joined = [...S.rooms.values()].sort((a, b) => a.name.localeCompare(b.name));
    $('#joined-rooms').replaceChildren(...joined.map((r) => roomItem(r, true)));
    if (!joined.length) $('#joined-rooms').append(el('li', { class: 'empty', text: 'No rooms yet' }));
    const pub = S.publicRooms.filter((r) => !S.rooms.has(r.id));
    $('#public-rooms').replaceChildren(...pub.map((r) => roomItem(r, false)));
    if (!pub.length) $('#public-rooms').append(el('li', { class: 'empty', text: 'Nothing new to join' }));
  }

  async function createRoom(ev) {
    ev.preventDefault();
    const body = { name: $('#room-name').value.trim(), visibility: $('#room-private').checked ? 'private' : 'public' };
    const topic = $('#room-topic').value.trim();
    if (topic) body.topic = topic;
    try {
      const room = await api('POST', '/rooms', body);
      S.rooms.set(room.id, room);
      $('#create-form').reset();
      renderRooms();
      openRoom(room.id);
    } catch (e) {
      showError(e);
    }
  }

  function openRoom(id) {
    S.current = id;
    localStorage.setItem(ROOM_KEY, id);
    roomState(id).unread = 0;
    S.wanted.add(id);
    renderRooms();
    renderRoom();
    if (S.socket && S.socket.connected) joinRoom(id);
  }

  // room:join (joins public rooms server-side), then history: latest page on first join, after_seq afterwards.
  async function joinRoom(id) {
    const r = roomState(id);
    const payload = { room_id: id };
    if (r.loaded) payload.after_seq = r.lastSeq;
    let ack;
    try {
      ack = await emitAck('room:join', payload);
    } catch (e) {
      if (e && e.error) { S.wanted.delete(id); showError(e); }
      return; // a timeout / disconnect is retried on the next connect
    }
    const isNew = !S.rooms.has(id);
    S.rooms.set(id, ack.room);
    if (isNew) refreshRooms();
    r.head = ack.head_seq;
    if (r.loaded) {
      merge(id, ack.messages || []);
      if (ack.has_more || r.lastSeq < ack.head_seq) await syncRoom(id);
    } else {
      await loadLatest(id);
    }
    if (id === S.current) { renderHeader(); loadMembers(id); }
  }

  async function loadLatest(id) {
    const r = roomState(id);
    try {
      const page = await api('GET', `/rooms/${encodeURIComponent(id)}/messages?limit=50`);
      const top = page.messages.length ? page.messages[page.messages.length - 1].seq : 0;
      r.lastSeq = Math.max(r.lastSeq, top);
      r.hasOlder = page.has_more;
      r.loaded = true;
      merge(id, page.messages);
      if (r.lastSeq < page.head_seq) await syncRoom(id);
      if (id === S.current) $('#load-older').hidden = !r.hasOlder;
    } catch (e) {
      showError(e);
    }
  }

  // Loop room:sync from the last contiguous seq while the server says there is more.
  function syncRoom(id) {
    const r = roomState(id);
    if (r.syncing) return r.syncing;
    r.syncing = (async () => {
      let cursor = r.lastSeq;
      for (let i = 0; i < 1000; i++) {
        const ack = await emitAck('room:sync', { room_id: id, after_seq: cursor, limit: 500 });
        merge(id, ack.messages);
        if (!ack.has_more || !ack.messages.length) break;
        cursor = ack.messages[ack.messages.length - 1].seq;
      }
    })().catch((e) => { if (e && e.error) showError(e); }).finally(() => { r.syncing = null; });
    return r.syncing;
  }

  async function loadOlder() {
    const id = S.current;
    const r = roomState(id);
    const oldest = Math.min(...r.msgs.keys());
    if (!isFinite(oldest)) return;
    try {
      const page = await api('GET', `/rooms/${encodeURIComponent(id)}/messages?before_seq=${oldest}&limit=50`);
      r.hasOlder = page.has_more;
      const sc = $('#scroller');
      const fromBottom = sc.scrollHeight - sc.scrollTop;
      merge(id, page.messages);
      sc.scrollTop = sc.scrollHeight - fromBottom; // keep the view where it was
      if (id === S.current) $('#load-older').hidden = !r.hasOlder;
    } catch (e) {
      showError(e);
    }
  }

  async function loadMembers(id) {
    try {
      const { members } = await api('GET', `/rooms/${encodeURIComponent(id)}/members`);
      roomState(id).members = members;
      for (const u of members) S.users.set(u.id, Promise.resolve(u));
      if (id === S.current) renderMembers();
    } catch { /* members are decoration */ }
  }

  // ---------- messages ----------
  function merge(roomId, messages) {
    const r = roomState(roomId);
    let gap = false;
    for (const m of messages) {
      if (r.msgs.has(m.seq)) continue; // dedupe: an ack and a message:new may carry the same seq
      r.msgs.set(m.seq, m);
      if (m.sender_id === (S.me && S.me.id)) dropPending(m.client_msg_id);
      clearTyping(roomId, m.sender_id);
      if (roomId === S.current) insertMessage(m);
      else if (r.loaded && m.sender_id !== S.me.id) r.unread++;
      if (r.loaded && m.seq > r.lastSeq + 1 && !r.msgs.has(r.lastSeq + 1)) gap = true;
    }
    while (r.msgs.has(r.lastSeq + 1)) r.lastSeq++;
    if (roomId !== S.current && messages.length) renderRooms();
    if (gap && S.socket && S.socket.connected) syncRoom(roomId);
  }

  function messageItem(m) {
    const mine = S.me && m.sender_id === S.me.id;
    return el('li', { class: mine ? 'msg mine' : 'msg', dataset: { seq: String(m.seq), id: m.id } },
      el('div', { class: 'meta' }, nameSpan(m.sender_id),
        el('time', { datetime: m.created_at, title: m.created_at, text: fmtTime(m.created_at) })),
      el('div', { class: 'body', text: m.body }));
  }

  // Insert in seq order; new messages usually go at the end, older pages at the start.
  function insertMessage(m) {
    const list = $('#messages');
    const sc = $('#scroller');
    const atBottom = sc.scrollHeight - sc.scrollTop - sc.clientHeight < 40;
    const item = messageItem(m);
    let after = list.lastElementChild;
    while (after && Number(after.dataset.seq) > m.seq) after = after.previousElementSibling;
    if (after) after.after(item); else list.prepend(item);
    group(item);
    if (item.nextElementSibling) group(item.nextElementSibling);
    if (atBottom || (S.me && m.sender_id === S.me.id)) sc.scrollTop = sc.scrollHeight;
  }

  // A message right after one from the same sender (within 5 min) hides its name line.
  function group(li) {
    const prev = li.previousElementSibling;
    const m = roomState(S.current).msgs.get(Number(li.dataset.seq));
    const p = prev && roomState(S.current).msgs.get(Number(prev.dataset.seq));
    li.classList.toggle('cont', !!(m && p && p.sender_id === m.sender_id && p.seq === m.seq - 1 &&
      Date.parse(m.created_at) - Date.parse(p.created_at) < 300000));
  }

  function sendMessage(ev) {
    ev.preventDefault();
    const input = $('#message-input');
    const body = input.value;
    if (!S.current || !body.trim()) return;
    if ([...body].length > 4000) return showError('A message can have at most 4000 characters.');
    const p = { cmid: randomId(), roomId: S.current, body, attempt: 0, state: 'sending' };
    S.pending.set(p.cmid, p);
    input.value = '';
    S.lastTypingAt = 0; // the next keystroke starts a new typing burst
    renderPending();
    $('#scroller').scrollTop = $('#scroller').scrollHeight;
    attemptSend(p);
  }

  // Sends with the same client_msg_id until acked; the server dedupes retries.
  async function attemptSend(p) {
    if (!S.pending.has(p.cmid)) return;
    if (!S.socket || !S.socket.connected) { p.state = 'waiting'; renderPending(); return; } // flushed on connect
    const attempt = ++p.attempt;
    p.state = 'sending';
    renderPending();
    try {
      const ack = await emitAck('message:send', { room_id: p.roomId, client_msg_id: p.cmid, body: p.body }, SEND_TIMEOUT_MS);
      merge(p.roomId, [ack.message]);
      dropPending(p.cmid);
    } catch (e) {
      if (!S.pending.has(p.cmid) || attempt !== p.attempt) return; // superseded by a newer attempt
      const code = e && e.error && e.error.code;
      if (!code) { // timeout or disconnect: retry now if connected, else on reconnect
        if (S.socket && S.socket.connected) attemptSend(p);
        else { p.state = 'waiting'; renderPending(); }
      } else if (code === 'rate_limited' || code === 'unavailable') {
        p.state = 'waiting';
        renderPending();
        setTimeout(() => attemptSend(p), 1500);
      } else {
        p.state = 'failed';
        p.error = errText(e);
        renderPending();
      }
    }
  }

  function dropPending(cmid) {
    if (S.pending.delete(cmid)) renderPending();
  }

  function flushPending() {
    for (const p of S.pending.values()) if (p.state !== 'failed') attemptSend(p);
  }

  function renderPending() {
    const items = [...S.pending.values()].filter((p) => p.roomId === S.current).map((p) => {
      const label = { sending: 'sending…', waiting: 'waiting for connection…', failed: `not sent: ${p.error}` }[p.state];
      return el('li', { class: `msg mine pending ${p.state}`, dataset: { clientMsgId: p.cmid } },
        el('div', { class: 'meta' }, el('span', { class: 'name', text: nameOf(S.me) }), el('span', { class: 'state', text: label }),
          p.state === 'failed' ? el('button', { class: 'link', type: 'button', text: 'retry', onclick: () => attemptSend(p) }) : null,
          p.state === 'failed' ? el('button', { class: 'link', type: 'button', text: 'discard', onclick: () => dropPending(p.cmid) }) : null),
        el('div', { class: 'body', text: p.body }));
    });
    $('#pending').replaceChildren(...items);
  }

  // ---------- room view ----------
  function renderHeader() {
    const room = S.rooms.get(S.current) || S.publicRooms.find((r) => r.id === S.current);
    $('#room-header').dataset.roomId = S.current || '';
    $('#room-title').textContent = room ? (room.visibility === 'private' ? '🔒 ' : '# ') + room.name : 'No room open';
    $('#room-topic-text').textContent = room ? room.topic || '' : 'Pick a room on the left or create one.';
  }

  function renderMembers() {
    const members = S.current ? roomState(S.current).members : [];
    $('#members').replaceChildren(...members.map((u) => {
      const state = u.id === S.me.id ? 'online' : S.presence.get(u.id) || 'unknown';
      return el('li', { class: state, dataset: { userId: u.id }, title: state, text: nameOf(u) });
    }));
  }

  function renderRoom() {
    const r = roomState(S.current);
    renderHeader();
    renderMembers();
    $('#messages').replaceChildren(...[...r.msgs.values()].sort((a, b) => a.seq - b.seq).map(messageItem));
    for (const li of $('#messages').children) group(li);
    renderPending();
    renderTyping();
    $('#load-older').hidden = !r.hasOlder;
    $('#message-input').disabled = $('#send').disabled = false;
    $('#message-input').focus();
    $('#scroller').scrollTop = $('#scroller').scrollHeight;
  }

  // ---------- typing ----------
  function onInput() {
    const now = Date.now();
    if (!S.current || !$('#message-input').value || now - S.lastTypingAt < TYPING_EVERY_MS) return;
    if (!S.socket || !S.socket.connected) return;
    S.lastTypingAt = now;
    S.socket.emit('typing', { room_id: S.current }, () => {});
  }

  function onTyping({ room_id: roomId, user_id: userId }) {
    if (!roomId || !userId || (S.me && userId === S.me.id)) return;
    if (!S.typing.has(roomId)) S.typing.set(roomId, new Map());
    const m = S.typing.get(roomId);
    clearTimeout(m.get(userId));
    m.set(userId, setTimeout(() => clearTyping(roomId, userId), TYPING_SHOW_MS));
    getUser(userId).then(renderTyping);
    renderTyping();
  }

  function clearTyping(roomId, userId) {
    const m = S.typing.get(roomId);
    if (m && m.has(userId)) { clearTimeout(m.get(userId)); m.delete(userId); renderTyping(); }
  }

  async function renderTyping() {
    const m = S.typing.get(S.current);
    const ids = m ? [...m.keys()] : [];
    const names = (await Promise.all(ids.map(getUser))).map(nameOf);
    const t = $('#typing');
    if (!names.length) t.textContent = '';
    else if (names.length === 1) t.textContent = `${names[0]} is typing…`;
    else t.textContent = `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]} are typing…`;
  }

  // ---------- socket ----------
  function setStatus(state, text) {
    const s = $('#status');
    s.dataset.state = state;
    s.textContent = text || state;
  }

  function connectSocket() {
    setStatus('connecting', 'connecting…');
    const socket = io({ auth: { token: S.token } });
    S.socket = socket;
    socket.on('connect', async () => {
      setStatus('connected');
      // (Re)join every room this page follows, asking only for what came after the last seen seq.
      await Promise.all([...S.wanted].map(joinRoom));
      flushPending();
    });
    socket.on('disconnect', (reason) => {
      if (reason === 'io client disconnect') setStatus('offline');
      else setStatus('reconnecting', 'reconnecting…');
    });
    socket.io.on('reconnect_attempt', () => setStatus('reconnecting', 'reconnecting…'));
    socket.on('connect_error', (err) => {
      if (err && err.message === 'unauthorized') return logout('Your session expired, please log in again.');
      setStatus('reconnecting', 'reconnecting…');
    });
    socket.on('message:new', (m) => merge(m.room_id, [m]));
    socket.on('typing', onTyping);
    socket.on('presence', ({ user_id: userId, state }) => {
      S.presence.set(userId, state);
      renderMembers();
    });
    socket.on('room:updated', (room) => {
      if (S.rooms.has(room.id)) S.rooms.set(room.id, room);
      renderRooms();
      if (room.id === S.current) renderHeader();
    });
    socket.on('user:updated', (u) => {
      S.users.set(u.id, Promise.resolve(u));
      for (const span of document.querySelectorAll('.name[data-user-id]')) if (span.dataset.userId === u.id) span.textContent = nameOf(u);
      if (S.me && u.id === S.me.id) { S.me = u; $('#me').textContent = `${nameOf(u)} (@${u.username})`; }
      renderMembers();
    });
  }

  // The browser knows it lost the network before any heartbeat does: drop the socket at once and
  // come back (with a resync) as soon as the network does.
  window.addEventListener('offline', () => {
    if (!S.socket) return;
    S.socket.disconnect();
    setStatus('reconnecting', 'offline, waiting for network…');
  });
  window.addEventListener('online', () => {
    if (S.socket && !S.socket.connected) { setStatus('reconnecting', 'reconnecting…'); S.socket.connect(); }
  });

  // ---------- wiring ----------
  $('#auth-form').addEventListener('submit', authSubmit);
  $('#create-form').addEventListener('submit', createRoom);
  $('#composer').addEventListener('submit', sendMessage);
  $('#message-input').addEventListener('input', onInput);
  $('#message-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); $('#composer').requestSubmit(); }
  });
  $('#load-older').addEventListener('click', loadOlder);
  $('#refresh-rooms').addEventListener('click', refreshRooms);
  $('#logout').addEventListener('click', () => logout());
  $('#error').addEventListener('click', () => { $('#error').hidden = true; });

  if (S.token) {
    api('GET', '/users/me').then(start).catch((e) => logout(e.status === 401 ? '' : errText(e)));
  }
})();
