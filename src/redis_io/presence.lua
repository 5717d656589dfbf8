-- chatmesh presence: record a user's first/last socket on this instance and say whether the
-- cluster-wide state changed. Atomic, so two instances changing at once cannot both (or neither)
-- announce it.
-- KEYS[1] this instance's presence set; KEYS[2..] the other live instances' sets (one hash tag)
-- ARGV[1] user id   ARGV[2] '1' = came online here, '0' = went offline here
-- Returns 1 when no other instance has the user (announce), else 0.
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
for i = 2, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], ARGV[1]) == 1 then
    return 0
  end
end
return 1
