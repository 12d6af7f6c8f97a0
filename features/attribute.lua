-- One user's micro-batch for experiments: their arm, and credit for what they did.
--
-- KEYS (all under the user's hash tag {u:<id>}: one Redis Cluster slot):
--   1 xp (hash: experiment, arm, counters), 2 xl (shown lists, JSON, newest first),
--   3 xe (sorted set: attributed event ids, score ts), 4 xr (attribution records)
-- ARGV: 1 experiment, 2 proposed arm (the hash of the user into today's shares),
--       3 the live arms as "|a|b|c|", 4 window_ms, 5 ttl_s, 6 dedupe window,
--       7 records kept, 8 the events, JSON: [[event_id, outcome (click|cart|purchase),
--       item_id, ts (ms), revenue], ...] (one argument: the client encodes one string per
--       user, not five per event)
-- Returns JSON {"arm", "new" (1: assigned now), "fresh": [event index, ...] (counted now),
--   "credits": [[event index, arm, list id, position (1 = first), first (1: the list's
--   first of this outcome), shadow (0/1)], ...]}
--
-- The arm: the stored one while it is still an arm of the experiment, else the proposed one
-- (a new user, or one whose arm was removed).  A new experiment name starts a new record.
-- Credit: an event of item i at time t goes to the most recently shown list (of this
-- experiment) with t - window <= list ts < t that holds i; shadow lists are credited the same
-- way, once per shadow arm, beside it.  Exactly once per event id: an id in xe is skipped, and
-- when xe is full an event older than all of it is refused (as update_user.lua does), since
-- it cannot be told from one that left the window.
local xp, xl, xe, xr = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local experiment, proposed, live = ARGV[1], ARGV[2], ARGV[3]
local window, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local dedupe, keep = tonumber(ARGV[6]), tonumber(ARGV[7])
local FLAG = {click = 'c', cart = 'a', purchase = 'p'}

if redis.call('HGET', xp, 'exp') ~= experiment then
  redis.call('DEL', xp)
  redis.call('HSET', xp, 'exp', experiment)
end
local arm = redis.call('HGET', xp, 'arm')
local new = 0
if (not arm) or (not string.find(live, '|' .. arm .. '|', 1, true)) then
  arm = proposed
  new = 1
  redis.call('HSET', xp, 'arm', arm)
end

local shown = nil
local function lists()
  if shown == nil then
    shown = {}
    local raw = redis.call('LRANGE', xl, 0, -1)
    for i = 1, #raw do shown[i] = cjson.decode(raw[i]) end
  end
  return shown
end

local function position(l, item)
  for p = 1, #l.items do
    if l.items[p] == item then return p end
  end
  return 0
end

local fresh, credits = {}, {}
local events = cjson.decode(ARGV[8])
for k = 0, #events - 1 do
  local e = events[k + 1]
  local eid, what, item, ts, rev = e[1], e[2], e[3], e[4], e[5]
  local seen = redis.call('ZSCORE', xe, eid)
  if not seen and redis.call('ZCARD', xe) >= dedupe then
    local oldest = redis.call('ZRANGE', xe, 0, 0, 'WITHSCORES')
    seen = ts < tonumber(oldest[2])
  end
  if not seen then
    redis.call('ZADD', xe, ts, eid)
    redis.call('ZREMRANGEBYRANK', xe, 0, -(dedupe + 1))
    fresh[#fresh + 1] = k
    if what == 'purchase' then
      redis.call('HINCRBY', xp, 'buys', 1)
      redis.call('HINCRBYFLOAT', xp, 'spend', rev)
    end
    local live_done, shadow_done = false, {}
    for i, l in ipairs(lists()) do
      local shadow = l.sh == 1
      local open = (shadow and not shadow_done[l.arm]) or ((not shadow) and not live_done)
      if open and l.x == experiment and l.ts < ts and ts <= l.ts + window then
        local p = position(l, item)
        if p > 0 then
          if shadow then shadow_done[l.arm] = true else live_done = true end
          local f, first = FLAG[what], 0
          if (l[f] or 0) == 0 then
            first = 1
            l[f] = 1
            redis.call('LSET', xl, i - 1, cjson.encode(l))
          end
          redis.call('HINCRBY', xp, l.arm .. ':' .. what, 1)
          if first == 1 then
            redis.call('HINCRBY', xp, l.arm .. ':' .. what .. '_lists', 1)
          end
          if what == 'purchase' then
            redis.call('HINCRBYFLOAT', xp, l.arm .. ':revenue', rev)
          end
          credits[#credits + 1] = {k, l.arm, l.id, p, first, l.sh}
          redis.call('LPUSH', xr, cjson.encode({
            e = eid, o = what, l = l.id, p = p, a = l.arm, r = tonumber(rev), t = ts, s = l.sh,
          }))
        end
      end
    end
  end
end

if #credits > 0 then
  redis.call('LTRIM', xr, 0, keep - 1)
  redis.call('EXPIRE', xr, ttl)
end
redis.call('EXPIRE', xp, ttl)
if redis.call('EXISTS', xe) == 1 then
  redis.call('EXPIRE', xe, ttl)
end
if redis.call('EXISTS', xl) == 1 then
  redis.call('EXPIRE', xl, ttl)
end
return cjson.encode({arm = arm, new = new, fresh = fresh, credits = credits})
