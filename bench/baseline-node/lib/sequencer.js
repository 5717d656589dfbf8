'use strict';
// Sequencing with chatmesh's own send script (src/redis_io/send.lua, read at start), called the way
// src/sequencer/redis.rs calls it: EVALSHA with 5 keys and 9 args, the message JSON split around
// its seq value so the script splices the seq in, '' as store head first and the store's head
// after an 'init' reply.

const crypto = require('node:crypto');
const fs = require('node:fs');
const { ApiError } = require('./errors');

const MAX_ROUNDS = 3;

/**
 * The wire JSON of a message with its seq left out, as (before, after): field order as chatmesh's
 * `Message` struct (id, room_id, seq, sender_id, client_msg_id, body, created_at). Quotes inside
 * strings are escaped, so the marker occurs exactly once.
 */
function jsonAroundSeq(m) {
  const json = JSON.stringify({
    id: m.id,
    room_id: m.room_id,
    seq: 0,
    sender_id: m.sender_id,
    client_msg_id: m.client_msg_id,
    body: m.body,
    created_at: m.created_at,
  });
  const marker = '"seq":0,';
  const at = json.indexOf(marker);
  const split = at + '"seq":'.length;
  return [json.slice(0, split), json.slice(split + 1)];
}

class Sequencer {
  /**
   * @param storeHead async (roomId) => head seq of the durable store (0 without one)
   */
  constructor(redis, keys, scriptPath, { dedupeTtlSecs, backlogLimit, storeHead }) {
    this.redis = redis;
    this.keys = keys;
    this.script = fs.readFileSync(scriptPath, 'utf8');
    this.sha = crypto.createHash('sha1').update(this.script).digest('hex');
    this.dedupeTtlSecs = dedupeTtlSecs;
    this.backlogLimit = backlogLimit;
    this.storeHead = storeHead;
  }

  async load() {
    const sha = await this.redis.script('LOAD', this.script);
    if (sha !== this.sha) throw new Error(`SCRIPT LOAD returned ${sha}, expected ${this.sha}`);
  }

  async evalsha(m, head) {
    const [before, after] = jsonAroundSeq(m);
    const k = this.keys;
    const args = [
      this.sha,
      5,
      k.seq(m.room_id),
      k.dedupe(m.room_id, m.sender_id, m.client_msg_id),
      k.history(m.room_id),
      k.syncStreamOf(m.room_id),
      k.revocations(m.room_id, m.sender_id),
      head,
      before,
      after,
      this.dedupeTtlSecs,
      k.channel(m.room_id),
      this.backlogLimit,
      m.room_id,
      '', // trace context: none
      '0', // revocation count: the baseline checks membership on its own and never bumps it
    ];
    try {
      return await this.redis.evalsha(...args);
    } catch (e) {
      if (!String(e.message).startsWith('NOSCRIPT')) throw e;
      await this.load();
      return this.redis.evalsha(...args);
    }
  }

  /**
   * Sequences `m` (everything but seq). Resolves { duplicate, message } with the message as
   * stored (a parsed object) or rejects with an ApiError.
   */
  async send(m) {
    let head = '';
    for (let round = 0; round < MAX_ROUNDS; round++) {
      let reply;
      try {
        reply = await this.evalsha(m, head);
      } catch (e) {
        throw new ApiError('unavailable', `Redis is unavailable; retry (${e.message})`);
      }
      const kind = Array.isArray(reply) ? String(reply[0]) : '';
      switch (kind) {
        case 'ok':
          return { duplicate: false, message: JSON.parse(reply[1]) };
        case 'dup': {
          const orig = JSON.parse(reply[1]);
          if (orig.body !== m.body) {
            throw new ApiError('conflict', 'client_msg_id was already used with a different body');
          }
          return { duplicate: true, message: orig };
        }
        case 'init':
          // The room's counter is missing: start it from the store's head.
          try {
            head = String(await this.storeHead(m.room_id));
          } catch (e) {
            throw new ApiError('unavailable', `cannot initialise the room's sequence (store unreachable); retry`);
          }
          break;
        case 'full':
          throw new ApiError('unavailable', 'the write-back backlog is full (the store is behind); retry later');
        default:
          throw new ApiError('unavailable', `unexpected script reply ${JSON.stringify(reply)}`);
      }
    }
    throw new ApiError('unavailable', "the room's sequence could not be initialised");
  }
}

module.exports = { Sequencer, jsonAroundSeq };
