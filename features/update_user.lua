-- Apply one shop event to one user's state, atomically and idempotently.
--
-- KEYS: 1 emb, 2 meta, 3 hist, 4 ev (dedupe window), 5 q (last query),
--       6 pend (the latest trigger not yet confirmed published), 7 mem (whole-past items)
-- ARGV: 1 event_id, 2 ts (ms), 3 type, 4 item_id ("" for search), 5 weight,
--       6 half_life_ms, 7 hist_len, 8 ttl_s, 9 vec (float32 LE bytes or ""),
--       10 min_emit_interval_ms, 11 always_emit (0/1), 12 dedupe_window,
--       13 memory_len (0: no memory), 14 the event's forward-decay weight for mem
-- Returns {applied (0 = duplicate), emit (0/1), recent items before this event...}
-- A duplicate returns emit = 1 only when it is the pending trigger: the worker wrote the
-- state, then died before its recommendation was published; the redelivery re-triggers it.
--
-- The embedding is kept as a decayed sum referenced to meta.ref_ts (the newest
-- event time seen): a newer event rescales the sum, an older one is added with
-- its own decay factor.  Either way the result is the same sum, so arrival
-- order does not matter and a late event is folded in, not dropped.
local emb_key, meta_key, hist_key, ev_key, q_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pend_key, mem_key = KEYS[6], KEYS[7]
local event_id, ts, etype, item_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local weight, half_life = tonumber(ARGV[5]), tonumber(ARGV[6])
local hist_len, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local vec, min_gap, always = ARGV[9], tonumber(ARGV[10]), ARGV[11] == '1'
local window = tonumber(ARGV[12])
local mem_len, mem_weight = tonumber(ARGV[13]), ARGV[14]

-- Dedupe: the ids of the user's latest `window` events (by event time).  An event older
-- than all of them when the window is full cannot be told from a replay of one that left
-- the window: it is refused (counted as a duplicate) rather than risk counting it twice.
if redis.call('ZSCORE', ev_key, event_id) then
  if redis.call('GET', pend_key) == event_id then
    return {0, 1}
  end
  return {0, 0}
end
if redis.call('ZCARD', ev_key) >= window then
  local oldest = redis.call('ZRANGE', ev_key, 0, 0, 'WITHSCORES')
  if ts < tonumber(oldest[2]) then
    return {0, 0}
  end
end
redis.call('ZADD', ev_key, ts, event_id)
redis.call('ZREMRANGEBYRANK', ev_key, 0, -(window + 1))

local recent = redis.call('LRANGE', hist_key, 0, 4)
local ref = tonumber(redis.call('HGET', meta_key, 'ref_ts') or '-1')

if vec ~= '' then
  local dim = string.len(vec) / 4
  local fmt = '<' .. string.rep('f', dim)
  local add = {struct.unpack(fmt, vec)}
  local old = redis.call('GET', emb_key)
  local out = {}
  if old and string.len(old) == string.len(vec) and ref >= 0 then
    local cur = {struct.unpack(fmt, old)}
    local keep, w = 1.0, weight
    if ts >= ref then
      keep = 2 ^ (-(ts - ref) / half_life)
    else
      w = weight * 2 ^ (-(ref - ts) / half_life)
    end
    for i = 1, dim do out[i] = cur[i] * keep + add[i] * w end
  else
    for i = 1, dim do out[i] = add[i] * weight end
  end
  redis.call('SET', emb_key, struct.pack(fmt, unpack(out)), 'EX', ttl)
  if etype == 'search' then
    redis.call('SET', q_key, vec, 'EX', ttl)
  end
end

if ts > ref then
  ref = ts
end
redis.call('HSET', meta_key, 'ref_ts', ref)
redis.call('HINCRBY', meta_key, 'n', 1)

if item_id ~= '' then
  redis.call('LPUSH', hist_key, item_id .. '|' .. etype .. '|' .. ts)
  redis.call('LTRIM', hist_key, 0, hist_len - 1)
  -- The whole past, bounded: a forward-decayed count per item (the weight is computed by
  -- the caller, features.decay), the weakest evicted.  A new item carries the newest
  -- event's weight, so it displaces items last seen long ago, not the other way round.
  if mem_len > 0 then
    redis.call('ZINCRBY', mem_key, mem_weight, item_id)
    redis.call('ZREMRANGEBYRANK', mem_key, 0, -(mem_len + 1))
  end
end

local emit = 0
local last = tonumber(redis.call('HGET', meta_key, 'last_emit_ts') or '-1')
if always or last < 0 or ts - last >= min_gap then
  emit = 1
  if ts > last then
    redis.call('HSET', meta_key, 'last_emit_ts', ts)
  end
  redis.call('SET', pend_key, event_id, 'EX', ttl)
end

redis.call('EXPIRE', meta_key, ttl)
redis.call('EXPIRE', hist_key, ttl)
redis.call('EXPIRE', ev_key, ttl)
redis.call('EXPIRE', mem_key, ttl)
if redis.call('EXISTS', emb_key) == 1 then
  redis.call('EXPIRE', emb_key, ttl)
end

local result = {1, emit}
for i = 1, #recent do result[#result + 1] = recent[i] end
return result
