'use strict';
// Key names of the send script, as src/redis_io/keys.rs builds them. Every key one script run
// touches carries the room's shard hash tag `{sN}`, so the layout matches chatmesh byte for byte
// (only the prefix differs: `bl` by default, so a baseline and a chatmesh can share one Redis).

/** FNV-1a 32-bit over the UTF-8 bytes of `roomId`, modulo `shards` (keys.rs `shard_of`). */
function shardOf(roomId, shards) {
  let h = 0x811c9dc5;
  for (const b of Buffer.from(roomId, 'utf8')) {
    h ^= b;
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0) % Math.max(shards, 1);
}

class Keys {
  constructor(prefix, shards) {
    if (!prefix || /[{} ]/.test(prefix)) throw new Error(`PREFIX: invalid value ${JSON.stringify(prefix)}`);
    if (!Number.isInteger(shards) || shards < 1) throw new Error(`SHARDS: invalid value ${shards}`);
    this.prefix = prefix;
    this.shards = shards;
  }

  tag(roomId) {
    return `${this.prefix}:{s${shardOf(roomId, this.shards)}}`;
  }
  seq(roomId) {
    return `${this.tag(roomId)}:room:${roomId}:seq`;
  }
  history(roomId) {
    return `${this.tag(roomId)}:room:${roomId}:hist`;
  }
  dedupe(roomId, senderId, clientMsgId) {
    return `${this.tag(roomId)}:room:${roomId}:dd:${senderId}:${clientMsgId}`;
  }
  /** The sender's revocation count for the room (chatmesh bumps it on leave; the baseline never does). */
  revocations(roomId, userId) {
    return `${this.tag(roomId)}:room:${roomId}:left:${userId}`;
  }
  /** The room's fan-out channel (the script PUBLISHes there; the baseline does not listen). */
  channel(roomId) {
    return `${this.tag(roomId)}:room:${roomId}`;
  }
  syncStreamOf(roomId) {
    return this.syncStream(shardOf(roomId, this.shards));
  }
  syncStream(shard) {
    return `${this.prefix}:{s${shard}}:sync`;
  }
  allSyncStreams() {
    return Array.from({ length: this.shards }, (_, s) => this.syncStream(s));
  }

  // Baseline-only data (users, rooms, memberships): plain keys outside the `{sN}` layout.
  user(id) {
    return `${this.prefix}:u:${id}`;
  }
  username(name) {
    return `${this.prefix}:uname:${name}`;
  }
  userRooms(id) {
    return `${this.prefix}:u:${id}:rooms`;
  }
  room(id) {
    return `${this.prefix}:r:${id}`;
  }
  members(id) {
    return `${this.prefix}:r:${id}:members`;
  }
  publicRooms() {
    return `${this.prefix}:rooms:public`;
  }
}

module.exports = { Keys, shardOf };
