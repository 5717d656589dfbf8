'use strict';
// Per-room in-order delivery of `message:new` on top of @socket.io/redis-adapter.
//
// Why: the send script hands out seqs atomically, but the broadcast is a separate step
// (`io.to(room).emit`, which the adapter PUBLISHes on its own channel and delivers locally at
// once). Two instances that sequence seq N and N+1 may publish them in the other order, and an
// instance's local delivery races the pub/sub messages of the others, so a plain Node stack can
// deliver N+1 before N. chatmesh avoids that by publishing inside the script; the baseline keeps
// the Node stack's broadcast path and adds what such a stack needs to keep the ordering promise:
// every local delivery of a `message:new` (local emit or pub/sub) goes through a per-room
// buffer that releases seqs strictly in order, drops seqs already delivered, and fills a gap
// that outlives GAP_WAIT_MS from the room's recent-history stream (the script wrote every message
// there before anyone could broadcast it).
//
// Hook: both paths of the adapter end in `super.broadcast(packet, opts)` (RedisAdapter.broadcast
// for local emits, RedisAdapter.onmessage for pub/sub), i.e. the in-memory Adapter's broadcast.
// A class inserted between RedisAdapter and Adapter catches both; everything else passes through.

const { RedisAdapter } = require('@socket.io/redis-adapter');

const Adapter = Object.getPrototypeOf(RedisAdapter.prototype).constructor;
const EVENT = 2; // socket.io-parser PacketType.EVENT

class OrderedLocalDelivery extends Adapter {
  broadcast(packet, opts) {
    const order = this.nsp.server.orderedDelivery;
    const msg = order && packet && packet.type === EVENT && Array.isArray(packet.data) && packet.data[0] === 'message:new'
      ? packet.data[1]
      : null;
    if (msg && opts && opts.rooms && opts.rooms.size === 1 && Number.isInteger(msg.seq)) {
      // No local socket in the room: nothing to deliver here (and no cursor to keep).
      if (this.rooms.has(msg.room_id)) order.offer(this, msg.room_id, msg.seq, packet, opts);
      return;
    }
    super.broadcast(packet, opts);
  }
}

let installed = false;
function install() {
  if (installed) return;
  Object.setPrototypeOf(OrderedLocalDelivery.prototype, Adapter.prototype);
  Object.setPrototypeOf(RedisAdapter.prototype, OrderedLocalDelivery.prototype);
  installed = true;
}

class OrderedDelivery {
  /**
   * @param fetchRange async (roomId, fromSeq, toSeq) => [message objects] from recent history
   * @param gapWaitMs how long a gap may wait for its broadcast before it is filled from history
   */
  constructor(fetchRange, gapWaitMs, log) {
    this.fetchRange = fetchRange;
    this.gapWaitMs = gapWaitMs;
    this.log = log;
    /** room → { next, pending: Map<seq, [packet, opts]>, timer, filling } */
    this.rooms = new Map();
    this.stats = { delivered: 0, held: 0, dropped: 0, filled: 0 };
  }

  /**
   * A socket is about to join `roomId`: when this instance has no delivery running for the room,
   * hold what arrives until `start` says where delivery begins.
   */
  prepare(roomId) {
    if (!this.rooms.has(roomId)) this.rooms.set(roomId, { next: null, pending: new Map(), timer: null, filling: false });
  }

  /** The joining socket read head `head`: delivery starts after it unless it already runs. */
  start(roomId, head) {
    const st = this.rooms.get(roomId);
    if (!st) return this.rooms.set(roomId, { next: head + 1, pending: new Map(), timer: null, filling: false });
    if (st.next !== null) return;
    st.next = head + 1;
    for (const seq of st.pending.keys()) if (seq < st.next) st.pending.delete(seq);
    this.drain(roomId, st);
  }

  /** The join failed before `start`: deliver from what arrived, if anything. */
  abort(roomId) {
    const st = this.rooms.get(roomId);
    if (!st || st.next !== null) return;
    if (st.pending.size === 0) return this.rooms.delete(roomId);
    this.start(roomId, Math.min(...st.pending.keys()) - 1);
  }

  /** The room has no local socket left (adapter `delete-room`). */
  drop(roomId) {
    const st = this.rooms.get(roomId);
    if (st && st.timer) clearTimeout(st.timer);
    this.rooms.delete(roomId);
  }

  offer(adapter, roomId, seq, packet, opts) {
    let st = this.rooms.get(roomId);
    if (!st) {
      st = { next: seq, pending: new Map(), timer: null, filling: false };
      this.rooms.set(roomId, st);
    }
    if ((st.next !== null && seq < st.next) || st.pending.has(seq)) {
      this.stats.dropped++;
      return;
    }
    st.pending.set(seq, [adapter, packet, opts]);
    if (st.next === null) return; // a join is reading the head
    if (seq !== st.next) this.stats.held++;
    this.drain(roomId, st);
  }

  drain(roomId, st) {
    while (st.pending.has(st.next)) {
      const [adapter, packet, opts] = st.pending.get(st.next);
      st.pending.delete(st.next);
      st.next++;
      this.stats.delivered++;
      Adapter.prototype.broadcast.call(adapter, packet, opts);
    }
    if (st.pending.size === 0) {
      if (st.timer) clearTimeout(st.timer);
      st.timer = null;
    } else if (!st.timer && !st.filling) {
      st.timer = setTimeout(() => this.fill(roomId, st), this.gapWaitMs);
    }
  }

  async fill(roomId, st) {
    st.timer = null;
    if (this.rooms.get(roomId) !== st || st.pending.size === 0) return;
    st.filling = true;
    const until = Math.min(...st.pending.keys()) - 1;
    const from = st.next;
    let msgs = [];
    try {
      msgs = await this.fetchRange(roomId, from, until);
    } catch (e) {
      this.log(`gap fill of room ${roomId} ${from}..${until} failed: ${e.message}`);
    }
    st.filling = false;
    if (this.rooms.get(roomId) !== st) return;
    if (st.pending.size === 0) return this.drain(roomId, st);
    const [adapter, , opts] = st.pending.values().next().value;
    for (const m of msgs) {
      if (m.seq >= st.next && !st.pending.has(m.seq)) {
        st.pending.set(m.seq, [adapter, { type: EVENT, data: ['message:new', m], nsp: adapter.nsp.name }, opts]);
        this.stats.filled++;
      }
    }
    if (!st.pending.has(st.next) && st.next <= until) {
      // Not in history either (it cannot be: the script writes history first); skip the hole.
      this.log(`room ${roomId}: seqs ${st.next}..${until} missing from history; skipped`);
      st.next = until + 1;
    }
    this.drain(roomId, st);
  }
}

module.exports = { install, OrderedDelivery };
