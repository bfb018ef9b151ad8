-- The ledger of one (limit, key, window): shared::quota::KeyLedger, in Lua. This file is the
-- prelude of sync.lua and exact.lua (concatenated at build time); every function mirrors the
-- Rust method of the same name, and the store tests hold the two to the same answers.
--
-- A ledger is one hash:
--   x          what the regional admitted on the exact path
--   x:<tag>    what it admitted while Redis was away, written back on recovery (by max, so a
--              repeated write-back counts once)
--   nl         present once grants have stopped for the window (sticky)
--   g:<edge>   the edge's granted ceiling   (raised only here)
--   r:<edge>   what the edge handed back    (merged by max)
--   u:<edge>   what the edge admitted       (merged by max)
-- Fields only grow, except x on a refund. Every number is an integer below 2^40 (the regional
-- clamps partitions), so Lua's doubles hold them exactly and products with a weight in parts
-- per million stay below 2^53.

local PPM = 1000000

local function load(key)
  local flat = redis.call('HGETALL', key)
  local l = { exact = 0, near = false, edges = {} }
  for i = 1, #flat, 2 do
    local field, value = flat[i], tonumber(flat[i + 1])
    if field == 'x' or string.sub(field, 1, 2) == 'x:' then
      l.exact = l.exact + value
    elseif field == 'nl' then
      l.near = true
    else
      local kind, edge = string.sub(field, 1, 1), string.sub(field, 3)
      local e = l.edges[edge]
      if not e then
        e = { g = 0, r = 0, u = 0 }
        l.edges[edge] = e
      end
      e[kind] = value
    end
  end
  -- A refund may leave x below zero against tagged write-backs; the total never is.
  l.exact = math.max(0, l.exact)
  return l
end

local function edge_of(l, edge)
  local e = l.edges[edge]
  if not e then
    e = { g = 0, r = 0, u = 0 }
    l.edges[edge] = e
  end
  return e
end

-- T: the exact path plus every edge's used.
local function used(l)
  local t = l.exact
  for _, e in pairs(l.edges) do
    t = t + e.u
  end
  return t
end

-- max(used, granted - released): what an edge holds against the partition.
local function holding(e)
  return math.max(e.u, e.g - e.r)
end

-- T + G plus what the previous window carries.
local function reserved(l, carried)
  local r = l.exact + carried
  for _, e in pairs(l.edges) do
    r = r + holding(e)
  end
  return r
end

local function unused(e)
  return math.max(0, e.g - e.r - e.u)
end

-- ceil(x * ppm / 10^6) for x < 2^40, in two halves so no product reaches 2^53.
local function carry_of(t, ppm)
  local hi = math.floor(t / PPM)
  local lo = t - hi * PPM
  return hi * ppm + math.ceil(lo * ppm / PPM)
end

-- T of the previous window, where a sliding window's carry comes from (0 when ppm is 0: a
-- fixed window carries nothing).
local function previous_used(prev_key, ppm)
  if ppm == 0 then
    return 0
  end
  return used(load(prev_key))
end

local function carried(prev_key, ppm)
  return carry_of(previous_used(prev_key, ppm), ppm)
end

-- KeyLedger::update_near_limit: near once usage leaves less than a unit per edge under θ·P.
local function update_near(l, key, ceiling, carried_usage, n)
  if not l.near and ceiling - (used(l) + carried_usage) < n then
    l.near = true
    redis.call('HSET', key, 'nl', 1)
  end
end

-- KeyLedger::grant: raise the edge's holding by
-- min(min(want, θ·P/n) - unused, (θ·P - T - G) / n); returns how much was minted.
local function grant(l, key, edge, ceiling, carried_usage, n, want)
  update_near(l, key, ceiling, carried_usage, n)
  if l.near then
    return 0
  end
  local e = edge_of(l, edge)
  local share = math.floor(math.max(0, ceiling - reserved(l, carried_usage)) / n)
  local target = math.min(want, math.floor(ceiling / n))
  local delta = math.min(math.max(0, target - unused(e)), share)
  if delta <= 0 then
    return 0
  end
  e.g = math.max(e.g, e.r + e.u) + delta
  redis.call('HSET', key, 'g:' .. edge, e.g)
  return delta
end

-- KeyLedger::pool_spent.
local function pool_spent(l, ceiling, carried_usage, n)
  return (not l.near) and ceiling - reserved(l, carried_usage) < n
end

local function flag(b)
  if b then
    return 1
  end
  return 0
end
