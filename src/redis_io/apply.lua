-- chatmesh apply: keeps a message sequenced by its room's home region in this region's Redis, in
-- seq order, gap-free. Atomic; idempotent (applying the same seq twice changes nothing).
-- KEYS[1] the room's seq counter (here: the highest seq applied)   KEYS[2] room history stream
-- KEYS[3] the room's pending hash (seq -> message that arrived before the one before it)
-- ARGV[1] seq   ARGV[2] message JSON   ARGV[3] fan-out channel
-- ARGV[4] store head seq ('' when unknown)   ARGV[5] history stream length bound
-- KEYS[4] the room's epoch floor, `token:from_seq` (set by a takeover here)
-- ARGV[6] the fencing token the message was sequenced under ('' when unknown)
-- ARGV[7] the room's dedupe key prefix   ARGV[8] dedupe TTL (s): each applied message's dedupe
--   key is kept here too, so that after a takeover a retry of it is the same message
-- Returns {'init'} | {'dup', applied} | {'gap', applied} (kept in pending) | {'ok', applied}
--   | {'fenced', token}: sequenced at or past this region's takeover of the room, under an
--     older epoch than it
local seq = tonumber(ARGV[1])
if ARGV[6] ~= '' then
  local f = redis.call('GET', KEYS[4])
  if f then
    local token, from = string.match(f, '^(%d+):(%d+)$')
    if tonumber(ARGV[6]) < tonumber(token) and seq >= tonumber(from) then
      return {'fenced', tonumber(token)}
    end
  end
end
local applied = redis.call('GET', KEYS[1])
if not applied then
  if ARGV[4] == '' then
    return {'init'}
  end
  -- The first message of the room this region sees: take it and what follows (sockets here
  -- may be waiting for it, even if the home already wrote it back), and let the gap check
  -- below find what is missing before it: nothing up to the store's head (readable from the
  -- store), nor what recent history here already holds.
  local floor = tonumber(ARGV[4])
  if floor > seq - 1 then floor = seq - 1 end
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local s = tonumber(string.match(last[1][1], '^(%d+)'))
    if s > floor then floor = s end
  end
  redis.call('SET', KEYS[1], floor)
  applied = floor
end
applied = tonumber(applied)
if seq <= applied then
  return {'dup', applied}
end
if seq > applied + 1 then
  redis.call('HSET', KEYS[3], seq, ARGV[2])
  return {'gap', applied}
end
local function keep(s, m)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], s .. '-0', 'm', m)
  local d = cjson.decode(m)
  redis.call('SET', ARGV[7] .. d.sender_id .. ':' .. d.client_msg_id, m, 'EX', tonumber(ARGV[8]))
  -- seal() is defined by the prelude the instance puts before this script (fanout::seal).
  redis.call('PUBLISH', ARGV[3], seal(ARGV[3], m))
end
keep(seq, ARGV[2])
local n = seq + 1
while true do
  local m = redis.call('HGET', KEYS[3], n)
  if not m then break end
  keep(n, m)
  redis.call('HDEL', KEYS[3], n)
  n = n + 1
end
redis.call('SET', KEYS[1], n - 1)
return {'ok', n - 1}
