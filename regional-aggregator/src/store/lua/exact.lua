-- exact: consume cost iff T + G + carried + cost <= P; a grant rides along when it passes.
-- KEYS[1] the ledger, KEYS[2] the previous window's ledger (same hash tag).
-- ARGV: edge, cost, want, partition, ceiling (θ·P), n, carry_ppm, ttl_ms.
-- Returns {allowed, granted, remaining, near_limit, held, T, T of the previous window}.
local key, edge = KEYS[1], ARGV[1]
local cost, want, partition = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ceiling, n = tonumber(ARGV[5]), tonumber(ARGV[6])

local l = load(key)
local ppm = tonumber(ARGV[7])
local previous = previous_used(KEYS[2], ppm)
local carry = carry_of(previous, ppm)
local allowed = cost <= partition and reserved(l, carry) + cost <= partition
local held = false
if allowed then
  l.exact = l.exact + cost
  redis.call('HINCRBY', key, 'x', cost)
  update_near(l, key, ceiling, carry, n)
  grant(l, key, edge, ceiling, carry, n, want)
  redis.call('PEXPIRE', key, ARGV[8])
else
  -- Denied only because of grants other edges hold unused: they come back soon.
  held = used(l) + carry + cost <= partition
end
local remaining = math.max(0, partition - reserved(l, carry))
return { flag(allowed), edge_of(l, edge).g, remaining, flag(l.near), flag(held), used(l), previous }
