-- Remember the lists one user was shown (and their shadow arms' lists), so later events
-- can be credited to them (attribute.lua).
--
-- KEYS (the user's hash tag {u:<id>}: one Redis Cluster slot): 1 xl, 2 xp
-- ARGV: 1 window_ms, 2 ttl_s, 3 most lists kept, then one list per value, JSON
--       {"id", "x" (experiment), "arm", "ts" (trigger event time), "sh" (1: shadow),
--        "items": [item id, ...]}
-- Returns 1 per list recorded now, 0 for one already recorded (emitted again for a
-- redelivered trigger: same id, same arm), in order.
--
-- Kept: the newest lists, at most ARGV[3], and none shown more than the window before the
-- newest (no later event can be credited to it: it would be past its window).
local xl, xp = KEYS[1], KEYS[2]
local window, ttl, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local have = {}
local raw = redis.call('LRANGE', xl, 0, -1)
for i = 1, #raw do
  local l = cjson.decode(raw[i])
  have[l.id .. '|' .. l.arm] = true
end

local out = {}
for k = 4, #ARGV do
  local l = cjson.decode(ARGV[k])
  local key = l.id .. '|' .. l.arm
  if have[key] then
    out[#out + 1] = 0
  else
    have[key] = true
    redis.call('LPUSH', xl, ARGV[k])
    redis.call('HINCRBY', xp, l.arm .. ':lists', 1)
    out[#out + 1] = 1
  end
end

redis.call('LTRIM', xl, 0, most - 1)
local head = redis.call('LINDEX', xl, 0)
if head then
  local newest = cjson.decode(head).ts
  while true do
    local tail = redis.call('LINDEX', xl, -1)
    if not tail or cjson.decode(tail).ts >= newest - window then break end
    redis.call('RPOP', xl)
  end
  redis.call('EXPIRE', xl, ttl)
end
redis.call('EXPIRE', xp, ttl)
return out
