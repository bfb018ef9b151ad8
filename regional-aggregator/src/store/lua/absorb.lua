-- absorb: write into the ledger what was decided elsewhere (in the regional's memory while
-- Redis was away), idempotently: each edge's counters by max, the exact count under its own
-- tag by max, the near-limit flag if it was set. Writing the same thing twice changes nothing.
-- KEYS[1] the ledger.
-- ARGV: tag, exact, near_limit (0/1), ttl_ms, then (edge, granted, released, used) per edge.
local key = KEYS[1]

local function raise(field, value)
  local v = tonumber(value)
  if v > 0 and v > tonumber(redis.call('HGET', key, field) or '0') then
    redis.call('HSET', key, field, v)
  end
end

raise('x:' .. ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('HSET', key, 'nl', 1)
end
for i = 5, #ARGV, 4 do
  raise('g:' .. ARGV[i], ARGV[i + 1])
  raise('r:' .. ARGV[i], ARGV[i + 2])
  raise('u:' .. ARGV[i], ARGV[i + 3])
end
if redis.call('EXISTS', key) == 1 then
  redis.call('PEXPIRE', key, ARGV[4])
end
return { 0 }
