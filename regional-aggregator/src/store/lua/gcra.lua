-- gcra: a token bucket as GCRA, shared::algorithm::Gcra in Lua, and its grants to edges,
-- shared::quota::lease. Those modules' docs are the specification, and the store tests hold
-- the two to the same answers; ledger.lua and time.lua are the prelude.
--
-- KEYS[1] the bucket: a hash {tat_s, tat_ns}, the theoretical arrival time (when the bucket is
-- full again). Absent: never seen, or full again for STATE_GRACE (its TTL), which a fresh
-- bucket answers the same as.
--
-- acquire: ARGV = 'acquire', now_s, now_ns, T, burst, B*T, cost, grace_ms; KEYS[2..] the
--   bucket's lease ledgers still counted, if any, whose unused grants are parked first.
--   Returns {verdict, remaining, reset_s, reset_ns, retry_after, 0}.
-- lease: KEYS[2] the lease ledger of the op, KEYS[3] the other one still counted.
--   ARGV = 'lease', now_s, now_ns, T, burst, edge, used, released, want, floor(theta*B), n,
--   ledger_ttl_ms, grace_ms. Returns {granted, used, released, admitted, level, recall}.
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

-- G: what the edges hold unused in the lease ledgers KEYS[from..].
local function parked(from)
  local g = 0
  for i = from, #KEYS do
    for _, e in pairs(load(KEYS[i]).edges) do
      g = g + unused(e)
    end
  end
  return g
end

if action == 'acquire' then
  local t, burst, tolerance = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local cost = tonumber(ARGV[7])
  -- base = max(tat, now, now + G*T): as a pair, and relative to now.
  local base_s, base_ns, base = now_s, now_ns, 0
  if tat_s then
    local r = rel(tat_s, tat_ns)
    if r > 0 then
      base_s, base_ns, base = tat_s, tat_ns, r
    end
  end
  local floor = math.min(SPAN, parked(2) * t)
  if floor > base then
    base = floor
    base_s, base_ns = add(now_s, now_ns, floor)
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
elseif action == 'lease' then
  local t, burst = tonumber(ARGV[4]), tonumber(ARGV[5])
  local edge, ceiling, n = ARGV[6], tonumber(ARGV[10]), tonumber(ARGV[11])
  local used_in, released_in, want = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local tolerance = burst * t
  -- The TAT relative to now; a fresh bucket is full at any now, as 0 is.
  local x, changed = 0, false
  if tat_s then
    x = rel(tat_s, tat_ns)
  end
  -- lease::charge: a holding that grew takes from max(tat, now); one that shrank gives back.
  local function charge(before, after)
    if after > before then
      x = math.min(SPAN, math.max(x, 0) + (after - before) * t)
      changed = true
    elseif after < before then
      x = math.max(-SPAN, x - (before - after) * t)
      changed = true
    end
  end
  local function level()
    return math.floor(math.max(0, tolerance - math.max(0, x)) / t)
  end
  -- lease::park: the level leaves room for every token the edges hold unused.
  local l = load(KEYS[2])
  local g = parked(3)
  for _, e in pairs(l.edges) do
    g = g + unused(e)
  end
  local floor = math.min(SPAN, g * t)
  if floor > x then
    x, changed = floor, true
  end
  -- merge, and charge the change of the edge's holding
  local e = edge_of(l, edge)
  local before, used_before = holding(e), e.u
  if used_in > e.u then
    e.u = used_in
    redis.call('HSET', KEYS[2], 'u:' .. edge, used_in)
  end
  if released_in > e.r then
    e.r = released_in
    redis.call('HSET', KEYS[2], 'r:' .. edge, released_in)
  end
  charge(before, holding(e))
  -- mint
  local pool = math.max(0, level() - (burst - ceiling))
  local target = math.min(want, math.floor(ceiling / n))
  local delta = math.min(math.max(0, target - unused(e)), math.floor(pool / n))
  if delta > 0 then
    before = holding(e)
    e.g = math.max(e.g, e.r + e.u) + delta
    redis.call('HSET', KEYS[2], 'g:' .. edge, e.g)
    charge(before, holding(e))
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[12])
  if changed then
    local s, ns = add(now_s, now_ns, x)
    store(s, ns)
    redis.call('PEXPIRE', key, ttl(x, tonumber(ARGV[13])))
  end
  return { e.g, e.u, e.r, e.u - used_before, level(), flag(pool < n and unused(e) > want) }
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
