-- gcra: a token bucket as GCRA, shared::algorithm::Gcra in Lua. That module's doc is the
-- specification, and the store tests hold the two to the same answers; time.lua is the prelude.
--
-- KEYS[1] the bucket: a hash {tat_s, tat_ns}, the theoretical arrival time (when the bucket is
-- full again). Absent: never seen, or full again for STATE_GRACE (its TTL), which a fresh
-- bucket answers the same as.
--
-- acquire: ARGV = 'acquire', now_s, now_ns, T, burst, B*T, cost, grace_ms.
--   Returns {verdict, remaining, reset_s, reset_ns, retry_after, 0}.
-- refund: ARGV = 'refund', now_s, now_ns, cost*T, floor_s, floor_ns. The TAT moves back by
--   cost*T, never below floor (where the refunded acquire started) and never forward; an absent
--   bucket is left alone. Returns {1} when it changed, else {0}.
-- absorb: ARGV = 'absorb', now_s, now_ns, tat_s, tat_ns, grace_ms. The TAT becomes the later of
--   the two. Returns {1} when it changed, else {0}.
local key = KEYS[1]
local held = redis.call('HMGET', key, 'tat_s', 'tat_ns')
local tat_s, tat_ns = tonumber(held[1]), tonumber(held[2])

local function store(s, ns)
  redis.call('HSET', key, 'tat_s', int(s), 'tat_ns', int(ns))
end

if action == 'acquire' then
  local t, burst, tolerance = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local cost = tonumber(ARGV[7])
  -- base = max(tat, now): as a pair, and relative to now.
  local base_s, base_ns, base = now_s, now_ns, 0
  if tat_s then
    local r = rel(tat_s, tat_ns)
    if r > 0 then
      base_s, base_ns, base = tat_s, tat_ns, r
    end
  end
  -- Whole tokens left with the bucket full again x after now.
  local function tokens(x)
    return math.floor(math.max(0, tolerance - x) / t)
  end
  if cost > burst then
    return { 3, tokens(base), base_s, base_ns, 0, 0 }
  end
  local taken = cost * t -- at most B*T: cost <= burst
  if base <= tolerance - taken then
    local s, ns = add(base_s, base_ns, taken)
    store(s, ns)
    redis.call('PEXPIRE', key, ttl(base + taken, tonumber(ARGV[8])))
    return { 0, tokens(base + taken), s, ns, 0, 0 }
  end
  return { 2, tokens(base), base_s, base_ns, base + taken - tolerance, 0 }
elseif action == 'refund' then
  if not tat_s then
    return { 0 }
  end
  local s, ns = add(tat_s, tat_ns, -tonumber(ARGV[4]))
  local floor_s, floor_ns = tonumber(ARGV[5]), tonumber(ARGV[6])
  if later(floor_s, floor_ns, s, ns) then
    s, ns = floor_s, floor_ns
  end
  if later(s, ns, tat_s, tat_ns) or (s == tat_s and ns == tat_ns) then
    return { 0 }
  end
  store(s, ns)
  return { 1 }
elseif action == 'absorb' then
  local s, ns = tonumber(ARGV[4]), tonumber(ARGV[5])
  local r = rel(s, ns)
  if (tat_s and not later(s, ns, tat_s, tat_ns)) or r <= 0 then
    return { 0 }
  end
  store(s, ns)
  redis.call('PEXPIRE', key, ttl(r, tonumber(ARGV[6])))
  return { 1 }
end
return redis.error_reply('gcra: unknown action ' .. tostring(action))
