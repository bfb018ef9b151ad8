-- refund: give back exact-path consumption for a request another of its limits denied.
-- KEYS[1] the ledger. ARGV: cost. Never below zero; nothing else changes.
local x = tonumber(redis.call('HGET', KEYS[1], 'x') or '0')
if x > 0 then
  redis.call('HSET', KEYS[1], 'x', math.max(0, x - tonumber(ARGV[1])))
end
return { 0 }
