-- log: a sliding window log, shared::algorithm::SlidingLog in Lua. That module's doc is the
-- specification, and the store tests hold the two to the same answers; time.lua is the prelude.
--
-- KEYS[1] the log: a sorted set, one member per admitted request. The score is the whole
-- seconds of its time; the member is '<ns, 9 digits>:<id>:<cost>'. Redis orders members of
-- equal score by their bytes, and the zero-padded nanoseconds come first, so the set's order is
-- time order, with every nanosecond exact. The id makes each member unique: a counter from the
-- meta hash, or '<tag>/<k>' for an entry written back after an outage.
-- KEYS[2] the log's meta (same hash tag): a hash {sum, seq}, the total cost of the members (so
-- a decision walks only the entries that have left the window, not the whole log) and the
-- last id handed out.
-- Both keys get the same TTL, STATE_GRACE after the newest entry leaves the window: absent,
-- the log answers as a fresh one.
--
-- acquire: ARGV = 'acquire', now_s, now_ns, W, limit, cost, grace_ms.
--   Returns {verdict, remaining, reset_s, reset_ns, retry_after, id}: id names the new member.
-- refund: ARGV = 'refund', now_s, now_ns, stamp_ns, id, cost. Removes that member if it is
--   still there. Returns {1} when it was, else {0}.
-- absorb: ARGV = 'absorb', now_s, now_ns, W, tag, grace_ms, then (s, ns, cost, k) per entry.
--   Adds the entries that still count, each as member '<ns>:<tag>/<k>:<cost>', so writing the
--   same entries again adds nothing. Returns {cost added}.
local log, meta = KEYS[1], KEYS[2]
local CHUNK = 128

local function member(ns, id, cost)
  return string.format('%09d', ns) .. ':' .. id .. ':' .. int(cost)
end

-- A member and its score as (s, ns, cost).
local function entry(m, score)
  local ns, cost = string.match(m, '^(%d+):.*:(%d+)$')
  return tonumber(score), tonumber(ns), tonumber(cost)
end

-- Walks the entries from rank `from`, oldest first, while keep(s, ns, cost) holds: returns how
-- many it passed and their total cost, and the entry it stopped at (nil at the end).
local function walk(from, keep)
  local n, sum = 0, 0
  while true do
    local chunk = redis.call('ZRANGE', log, from + n, from + n + CHUNK - 1, 'WITHSCORES')
    for i = 1, #chunk, 2 do
      local s, ns, cost = entry(chunk[i], chunk[i + 1])
      if not keep(s, ns, cost) then
        return n, sum, s, ns
      end
      n, sum = n + 1, sum + cost
    end
    if #chunk < 2 * CHUNK then
      return n, sum
    end
  end
end

-- The TTL both keys get while the newest entry is `newest` ns from now.
local function expire(newest, w, grace_ms)
  local ms = ttl(newest + w, grace_ms)
  redis.call('PEXPIRE', log, ms)
  redis.call('PEXPIRE', meta, ms)
end

if action == 'acquire' then
  local w, limit, cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  -- Decisions are made at at = max(now, newest entry) (a clock behind the newest entry is read
  -- as standing there): as a pair, and relative to now.
  local at_s, at_ns, at = now_s, now_ns, 0
  local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  local newest_s, newest_ns
  if #newest > 0 then
    newest_s, newest_ns = entry(newest[1], newest[2])
    local r = rel(newest_s, newest_ns)
    if r > 0 then
      at_s, at_ns, at = newest_s, newest_ns, r
    end
  end
  -- An entry at ts counts while ts + W > at; those that do not are a prefix.
  local expired, expired_sum = walk(0, function(s, ns)
    return rel(s, ns) + w <= at
  end)
  local counting = redis.call('ZCARD', log) - expired
  local sum = tonumber(redis.call('HGET', meta, 'sum') or '0') - expired_sum
  local left = math.max(0, limit - sum)
  -- When the newest counting entry stops counting, or now when none counts.
  local reset_s, reset_ns = now_s, now_ns
  if counting > 0 then
    reset_s, reset_ns = add(newest_s, newest_ns, w)
  end
  if cost > limit then
    return { 3, left, reset_s, reset_ns, 0, 0 }
  end
  if sum + cost <= limit then
    if expired > 0 then
      redis.call('ZREMRANGEBYRANK', log, 0, expired - 1)
    end
    local id = redis.call('HINCRBY', meta, 'seq', 1)
    redis.call('HINCRBY', meta, 'sum', int(cost - expired_sum))
    redis.call('ZADD', log, int(at_s), member(at_ns, int(id), cost))
    expire(at, w, tonumber(ARGV[7]))
    local s, ns = add(at_s, at_ns, w)
    return { 0, left - cost, s, ns, 0, id }
  end
  -- Denied: it fits once enough of the oldest counting entries have left the window.
  local need = sum + cost - limit
  local _, _, s, ns = walk(expired, function(_, _, c)
    need = need - c
    return need > 0
  end)
  local retry = rel(reset_s, reset_ns)
  if s then
    retry = rel(s, ns) + w
  end
  return { 2, left, reset_s, reset_ns, retry, 0 }
elseif action == 'refund' then
  local cost = tonumber(ARGV[6])
  if redis.call('ZREM', log, member(tonumber(ARGV[4]), ARGV[5], cost)) == 1 then
    redis.call('HINCRBY', meta, 'sum', int(-cost))
    return { 1 }
  end
  return { 0 }
elseif action == 'absorb' then
  local w, tag = tonumber(ARGV[4]), ARGV[5]
  local added = 0
  for i = 7, #ARGV, 4 do
    local s, ns, cost = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local m = member(ns, tag .. '/' .. ARGV[i + 3], cost)
    if rel(s, ns) + w > 0 and redis.call('ZADD', log, int(s), m) == 1 then
      added = added + cost
    end
  end
  if added > 0 then
    redis.call('HINCRBY', meta, 'sum', int(added))
    local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
    local s, ns = entry(newest[1], newest[2])
    expire(rel(s, ns), w, tonumber(ARGV[6]))
  end
  return { added }
end
return redis.error_reply('log: unknown action ' .. tostring(action))
