-- Add several increments to one sorted set and refresh its TTL: one call per key per batch.
--
-- KEYS: 1 the sorted set (one key, so the call stays in one Redis Cluster slot)
-- ARGV: 1 ttl_s, 2 keep (most members kept, highest scores first; 0 = all),
--       then member, increment, member, increment, ...
-- Returns the number of members bumped.
local key, ttl, keep = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV, 2 do
  redis.call('ZINCRBY', key, ARGV[i + 1], ARGV[i])
  n = n + 1
end
if keep > 0 then
  -- Forward-decayed scores: the lowest are the weakest or the stalest pairs.
  redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
end
redis.call('EXPIRE', key, ttl)
return n
