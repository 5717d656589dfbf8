-- chatmesh throttle: one token bucket shared by every instance. Atomic.
-- KEYS[1] the bucket   ARGV[1] tokens per second   ARGV[2] burst   ARGV[3] 'take' or 'peek'
-- Returns {1, 0} when a token is there (taken with 'take'), else {0, ms until one is}.
-- Redis's clock, not the instances': their skew must not refill anyone's budget.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then
  return {0, math.ceil((1 - tokens) / rate)}
end
if ARGV[3] == 'take' then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', now)
  -- Idle long enough to be full again is the same as no bucket.
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
end
return {1, 0}
