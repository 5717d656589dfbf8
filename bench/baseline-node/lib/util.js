'use strict';
// ULIDs, passwords (scrypt), validation (API.md §2).

const crypto = require('node:crypto');
const { promisify } = require('node:util');
const { ApiError } = require('./errors');

const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

/** A ULID: 48-bit ms time + 80 random bits, Crockford base32 (26 chars). */
function ulid(now = Date.now()) {
  let out = '';
  let t = now;
  for (let i = 0; i < 10; i++) {
    out = CROCKFORD[t % 32] + out;
    t = Math.floor(t / 32);
  }
  const rnd = crypto.randomBytes(16);
  for (let i = 0; i < 16; i++) out += CROCKFORD[rnd[i] & 31];
  return out;
}

const scrypt = promisify(crypto.scrypt);
const SCRYPT = { N: 16384, r: 8, p: 1 };

async function hashPassword(password) {
  const salt = crypto.randomBytes(16);
  const key = await scrypt(password, salt, 32, SCRYPT);
  return `scrypt$${SCRYPT.N}$${SCRYPT.r}$${SCRYPT.p}$${salt.toString('base64')}$${key.toString('base64')}`;
}

async function verifyPassword(password, stored) {
  const parts = String(stored || '').split('$');
  if (parts.length !== 6 || parts[0] !== 'scrypt') return false;
  const [, N, r, p, salt, hash] = parts;
  const want = Buffer.from(hash, 'base64');
  const got = await scrypt(password, Buffer.from(salt, 'base64'), want.length, { N: +N, r: +r, p: +p });
  return crypto.timingSafeEqual(want, got);
}

/** Length in Unicode scalar values; null when the string holds a lone surrogate. */
function scalars(s) {
  if (/\p{Surrogate}/u.test(s)) return null;
  let n = 0;
  for (const _ of s) n++;
  return n;
}

function str(obj, field, { min = 0, max, optional = false } = {}) {
  const v = obj ? obj[field] : undefined;
  if (v === undefined || v === null) {
    if (optional) return undefined;
    throw new ApiError('validation_failed', `${field} is required`);
  }
  if (typeof v !== 'string') throw new ApiError('validation_failed', `${field} must be a string`);
  const n = scalars(v);
  if (n === null || n < min || n > max) {
    throw new ApiError('validation_failed', `${field} must be ${min}..=${max} characters`);
  }
  return v;
}

const CONTROL = /[\p{Cc}]/u;

function body(obj) {
  const b = str(obj, 'body', { min: 1, max: 4000 });
  if (b.trim() === '') throw new ApiError('validation_failed', 'body must not be only whitespace');
  if (CONTROL.test(b.replace(/[\n\t]/g, ''))) {
    throw new ApiError('validation_failed', 'body must not contain control characters other than \\n and \\t');
  }
  return b;
}

function clientMsgId(obj) {
  const c = str(obj, 'client_msg_id', { min: 1, max: 64 });
  if (!/^[A-Za-z0-9_-]+$/.test(c)) throw new ApiError('validation_failed', 'client_msg_id must be 1..=64 of [A-Za-z0-9_-]');
  return c;
}

function roomId(obj) {
  const r = str(obj, 'room_id', { min: 1, max: 64 });
  if (!/^[A-Za-z0-9_-]+$/.test(r)) throw new ApiError('not_found', 'room not found');
  return r;
}

/** A non-negative integer field, or undefined when absent. */
function seqArg(obj, field) {
  const v = obj ? obj[field] : undefined;
  if (v === undefined || v === null) return undefined;
  const n = typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : v;
  if (!Number.isSafeInteger(n) || n < 0) throw new ApiError('validation_failed', `${field} must be a non-negative integer`);
  return n;
}

module.exports = { ulid, hashPassword, verifyPassword, str, body, clientMsgId, roomId, seqArg };
