-- leaky: a leaky bucket, meter or shaper, shared::algorithm::LeakyBucket in Lua. That module's
-- doc is the specification, and the store tests hold the two to the same answers; time.lua is
-- the prelude.
--
-- KEYS[1] the bucket: a hash {level, last_s, last_ns}, the level (as the time the content
-- takes to drain, ns) as of `last`. Absent: never seen, or empty for STATE_GRACE (its TTL),
-- which a fresh bucket answers the same as.
--
-- acquire: ARGV = 'acquire', now_s, now_ns, T, capacity, C*T, cost, shaper (0 or 1), grace_ms.
--   Returns {verdict, remaining, reset_s, reset_ns, wait, 0}: wait is the shaper's delay
--   (verdict 1) or the retry_after of a denial (verdict 2).
-- refund: ARGV = 'refund', now_s, now_ns, cost*T, floor_s, floor_ns. Leaked to now, the level
--   drops by cost*T, never below the level at which the bucket empties at floor (where the
--   refunded acquire started) and never rises; an absent bucket is left alone. Returns {1} when
--   it was there, else {0}.
-- absorb: ARGV = 'absorb', now_s, now_ns, level, last_s, last_ns, grace_ms. Of the two states,
--   the one that empties later stays. Returns {1} when it changed, else {0}.
local key = KEYS[1]
local held = redis.call('HMGET', key, 'level', 'last_s', 'last_ns')
local stored = tonumber(held[1])
local last_s, last_ns = tonumber(held[2]), tonumber(held[3])

-- Decisions are made at at = max(now, last) (a clock behind `last` is read as standing there):
-- as a pair, and relative to now; `level` is what is left at `at`.
local at_s, at_ns, at, level = now_s, now_ns, 0, 0
if stored then
  local last = rel(last_s, last_ns)
  if last > 0 then
    at_s, at_ns, at = last_s, last_ns, last
  end
  level = math.max(0, stored - (at - last))
end

local function store(lvl, s, ns)
  redis.call('HSET', key, 'level', int(lvl), 'last_s', int(s), 'last_ns', int(ns))
end

if action == 'acquire' then
  local t, capacity, full = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local cost, shaper = tonumber(ARGV[7]), ARGV[8] == '1'
  -- Whole units of room with the bucket at level x.
  local function room(x)
    return math.floor(math.max(0, full - x) / t)
  end
  if cost > capacity then
    local s, ns = add(at_s, at_ns, level)
    return { 3, room(level), s, ns, 0, 0 }
  end
  local taken = cost * t -- at most C*T: cost <= capacity
  if level <= full - taken then
    local after = level + taken
    local s, ns = add(at_s, at_ns, after)
    store(after, at_s, at_ns)
    redis.call('PEXPIRE', key, ttl(at + after, tonumber(ARGV[9])))
    if shaper and level > 0 then
      return { 1, room(after), s, ns, level + at, 0 }
    end
    return { 0, room(after), s, ns, 0, 0 }
  end
  local s, ns = add(at_s, at_ns, level)
  return { 2, room(level), s, ns, level - (full - taken) + at, 0 }
elseif action == 'refund' then
  if not stored then
    return { 0 }
  end
  local taken = tonumber(ARGV[4])
  local floor = rel(tonumber(ARGV[5]), tonumber(ARGV[6])) - at
  store(math.min(level, math.max(level - taken, floor, 0)), at_s, at_ns)
  return { 1 }
elseif action == 'absorb' then
  local lvl, s, ns = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local empty = rel(s, ns) + lvl
  if (stored and rel(last_s, last_ns) + stored >= empty) or empty <= 0 then
    return { 0 }
  end
  store(lvl, s, ns)
  redis.call('PEXPIRE', key, ttl(empty, tonumber(ARGV[7])))
  return { 1 }
end
return redis.error_reply('leaky: unknown action ' .. tostring(action))
