'use strict';
// Write-back worker (enabled by PG_URL), like the Node stack's Redis Streams worker: one consumer
// (this instance) of one consumer group over every shard's write-back stream that the send script
// appends to (`<prefix>:{sN}:sync`, fields m/r/s/t as src/sync/redis.rs reads them). Read a batch
// (own pending entries first, then new ones) → one INSERT ... ON CONFLICT DO NOTHING → XACK + XDEL.
// A failed batch stays pending and is read again; entries a dead consumer held are taken over
// with XAUTOCLAIM after CLAIM_IDLE_MS.

const SCHEMA = `CREATE TABLE IF NOT EXISTS messages (
  room_id text NOT NULL,
  seq bigint NOT NULL,
  id text NOT NULL,
  sender_id text NOT NULL,
  client_msg_id text NOT NULL,
  body text NOT NULL,
  created_at timestamptz NOT NULL,
  PRIMARY KEY (room_id, seq)
)`;

const INSERT = `INSERT INTO messages (room_id, seq, id, sender_id, client_msg_id, body, created_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
ON CONFLICT DO NOTHING`;

const BATCH = 500;
const BLOCK_MS = 200;
const CLAIM_IDLE_MS = 15000;

class SyncWorker {
  constructor({ redis, pool, keys, group, consumer, log }) {
    this.redis = redis; // a connection of its own: XREADGROUP BLOCK holds it
    this.pool = pool;
    this.keys = keys;
    this.group = group;
    this.consumer = consumer;
    this.log = log;
    this.streams = keys.allSyncStreams();
    this.stopped = false;
    this.stats = { pending: 0, lag_ms: 0, measured_at: 0, stored: 0 };
  }

  /** Creates the table; instances starting together serialise on an advisory lock. */
  async ensureSchema() {
    const client = await this.pool.connect();
    try {
      await client.query('BEGIN');
      await client.query("SELECT pg_advisory_xact_lock(hashtext('chatmesh-baseline-schema'))");
      await client.query(SCHEMA);
      await client.query('COMMIT');
    } catch (e) {
      await client.query('ROLLBACK').catch(() => {});
      throw e;
    } finally {
      client.release();
    }
  }

  async ensureGroups() {
    for (const s of this.streams) {
      try {
        await this.redis.xgroup('CREATE', s, this.group, '0', 'MKSTREAM');
      } catch (e) {
        if (!String(e.message).startsWith('BUSYGROUP')) throw e;
      }
    }
  }

  /** The room's head in the store (counter initialisation after an 'init' script reply). */
  async head(roomId) {
    const r = await this.pool.query('SELECT COALESCE(MAX(seq), 0) AS head FROM messages WHERE room_id = $1', [roomId]);
    return Number(r.rows[0].head);
  }

  async readBatch() {
    for (const [id, block] of [['0', false], ['>', true]]) {
      const args = ['GROUP', this.group, this.consumer, 'COUNT', BATCH];
      if (block) args.push('BLOCK', BLOCK_MS);
      args.push('STREAMS', ...this.streams, ...this.streams.map(() => id));
      const reply = await this.redis.xreadgroup(...args);
      const entries = [];
      for (const [stream, items] of reply || []) {
        for (const [entryId, fields] of items) {
          if (!fields) continue; // pending entry deleted meanwhile
          let m = null;
          for (let i = 0; i + 1 < fields.length; i += 2) {
            if (fields[i] === 'm') {
              try {
                m = JSON.parse(fields[i + 1]);
              } catch {
                m = null;
              }
            }
          }
          entries.push({ stream, id: entryId, m });
        }
      }
      if (entries.length > 0) return entries;
    }
    return [];
  }

  async commit(entries) {
    const good = entries.filter((e) => e.m);
    const bad = entries.length - good.length;
    if (bad > 0) this.log(`sync: ${bad} unreadable write-back entries dropped`);
    if (good.length > 0) {
      const cols = [[], [], [], [], [], [], []];
      for (const { m } of good) {
        cols[0].push(m.room_id);
        cols[1].push(m.seq);
        cols[2].push(m.id);
        cols[3].push(m.sender_id);
        cols[4].push(m.client_msg_id);
        cols[5].push(m.body);
        cols[6].push(m.created_at);
      }
      await this.pool.query(INSERT, cols);
    }
    const byStream = new Map();
    for (const e of entries) {
      if (!byStream.has(e.stream)) byStream.set(e.stream, []);
      byStream.get(e.stream).push(e.id);
    }
    const pipe = this.redis.pipeline();
    for (const [stream, ids] of byStream) {
      pipe.xack(stream, this.group, ...ids);
      pipe.xdel(stream, ...ids);
    }
    const results = await pipe.exec();
    for (const [err] of results) if (err) throw err;
    this.stats.stored += good.length;
  }

  async reclaim() {
    let claimed = 0;
    for (const s of this.streams) {
      const r = await this.redis.xautoclaim(s, this.group, this.consumer, CLAIM_IDLE_MS, '0-0', 'COUNT', BATCH, 'JUSTID');
      claimed += (r && r[1] ? r[1].length : 0);
    }
    if (claimed > 0) this.log(`sync: reclaimed ${claimed} entries from an idle consumer`);
  }

  /** Backlog (entries in the shard streams) and the age of the oldest one, for /health/ready. */
  async measure(redis) {
    const pipe = redis.pipeline();
    for (const s of this.streams) {
      pipe.xlen(s);
      pipe.xrange(s, '-', '+', 'COUNT', 1);
    }
    const res = await pipe.exec();
    const now = Date.now();
    let pending = 0;
    let oldest = now;
    for (let i = 0; i < res.length; i += 2) {
      pending += Number(res[i][1] || 0);
      const first = res[i + 1][1];
      if (first && first.length > 0) oldest = Math.min(oldest, Number(String(first[0][0]).split('-')[0]));
    }
    this.stats.pending = pending;
    this.stats.lag_ms = now - oldest;
    this.stats.measured_at = now;
  }

  async run() {
    let backoff = 50;
    let lastReclaim = Date.now();
    while (!this.stopped) {
      try {
        if (Date.now() - lastReclaim >= CLAIM_IDLE_MS / 3) {
          lastReclaim = Date.now();
          await this.reclaim();
        }
        const entries = await this.readBatch();
        if (entries.length > 0) await this.commit(entries);
        backoff = 50;
      } catch (e) {
        if (this.stopped) break;
        this.log(`sync step failed (retry in ${backoff} ms): ${e.message}`);
        if (String(e.message).includes('NOGROUP')) await this.ensureGroups().catch(() => {});
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  stop() {
    this.stopped = true;
  }
}

module.exports = { SyncWorker };
