-- chatmesh send: dedupe, sequence, keep, queue for write-back, fan out. Atomic.
-- KEYS[1] seq counter   KEYS[2] dedupe key   KEYS[3] room history stream   KEYS[4] shard write-back stream
-- KEYS[5] the sender's revocation count for the room   KEYS[6] the shard's outbox (regions)
-- ARGV[1] store head seq ('' when unknown)   ARGV[2] message JSON up to the seq value
-- ARGV[3] message JSON after the seq value   ARGV[4] dedupe TTL (s)   ARGV[5] fan-out channel
-- ARGV[6] write-back backlog limit (entries)   ARGV[7] room id   ARGV[8] trace context ('' if none)
-- ARGV[9] the revocation count the sender's membership was confirmed at
-- ARGV[10] outbox length bound ('' when there are no peer regions: no outbox)
-- ARGV[11] the fencing token of the home lease the send is decided under ('' with one region)
-- ARGV[12] until when (Unix ms) that lease lets this region decide ('' with one region)
-- ARGV[13] '1': publish nothing (ack level `region`: the instance publishes once another region
--   holds the message, so that nobody sees a message that a takeover could still replace)
-- Returns {'dup', json} | {'revoked'} | {'init'} | {'full'} | {'lapsed'} | {'ok', json}
local existing = redis.call('GET', KEYS[2])
if existing then
  return {'dup', existing}
end
-- Self-fencing, last check: the lease's validity against Redis's clock (a send that waited in a
-- queue or on the network past it is not sequenced; the drift margin covers the clocks).
if ARGV[12] ~= '' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(ARGV[12]) then
    return {'lapsed'}
  end
end
-- The sender left the room (on any instance) since its membership was checked.
if (redis.call('GET', KEYS[5]) or '0') ~= ARGV[9] then
  return {'revoked'}
end
if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[6]) then
  return {'full'}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[1] == '' then
    return {'init'}
  end
  -- Never below what the store has, nor below what recent history still holds.
  local floor = tonumber(ARGV[1])
  local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local s = tonumber(string.match(last[1][1], '^(%d+)'))
    if s > floor then floor = s end
  end
  redis.call('SET', KEYS[1], floor)
end
local seq = redis.call('INCR', KEYS[1])
local msg = ARGV[2] .. seq .. ARGV[3]
redis.call('XADD', KEYS[3], seq .. '-0', 'm', msg)
redis.call('XADD', KEYS[4], '*', 'm', msg, 'r', ARGV[7], 's', seq, 't', ARGV[8], 'ep', ARGV[11])
redis.call('SET', KEYS[2], msg, 'EX', tonumber(ARGV[4]))
if ARGV[10] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[10], '*', 'r', ARGV[7], 's', seq, 'm', msg, 'ep', ARGV[11])
end
-- seal() is defined by the prelude the instance puts before this script (fanout::seal).
if ARGV[13] ~= '1' then
  redis.call('PUBLISH', ARGV[5], seal(ARGV[5], msg))
end
return {'ok', msg}
