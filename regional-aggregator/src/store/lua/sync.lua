-- sync: merge one edge's cumulative counters by max, then mint what it wants.
-- KEYS[1] the ledger, KEYS[2] the previous window's ledger (same hash tag).
-- ARGV: edge, used, released, want, partition, ceiling (θ·P), n, carry_ppm, ttl_ms.
-- Returns {granted, used, released, T, T + G + carried, near_limit, recall}.
local key, edge = KEYS[1], ARGV[1]
local used_in, released_in, want = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ceiling, n = tonumber(ARGV[6]), tonumber(ARGV[7])

local l = load(key)
local e = edge_of(l, edge)
if used_in > e.u then
  e.u = used_in
  redis.call('HSET', key, 'u:' .. edge, used_in)
end
if released_in > e.r then
  e.r = released_in
  redis.call('HSET', key, 'r:' .. edge, released_in)
end
local carry = carried(KEYS[2], tonumber(ARGV[8]))
grant(l, key, edge, ceiling, carry, n, want)
local recall = pool_spent(l, ceiling, carry, n) and unused(e) > want
redis.call('PEXPIRE', key, ARGV[9])
return { e.g, e.u, e.r, used(l), reserved(l, carry), flag(l.near), flag(recall) }
