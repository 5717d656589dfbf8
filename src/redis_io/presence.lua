-- chatmesh presence: record a user's first/last socket on this instance (or, for a change another
-- region reported, in that region) and say whether the state changed in this region and anywhere.
-- Atomic, so two instances changing at once cannot both (or neither) announce it.
-- KEYS[1] the set to change: this instance's presence set, or a peer region's
-- KEYS[2 .. ARGV[3]+1] this region's other sets (the other live instances')
-- KEYS[ARGV[3]+2 ..] the peer regions' sets (users online there, as they reported)
-- ARGV[1] user id   ARGV[2] '1' = came online, '0' = went offline   ARGV[3] count of this region's other sets
-- Returns 0: this region has the user elsewhere (nothing changed);
--         2: changed in this region, but another region has the user (nothing to announce here);
--         1: changed anywhere (announce).
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
local own = tonumber(ARGV[3] or (#KEYS - 1))
for i = 2, own + 1 do
  if redis.call('SISMEMBER', KEYS[i], ARGV[1]) == 1 then
    return 0
  end
end
for i = own + 2, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], ARGV[1]) == 1 then
    return 2
  end
end
return 1
