-- refund: give back exact-path consumption for a request another of its limits denied.
-- KEYS[1] the ledger. ARGV: cost. Only the live count x moves (it may go below zero when the
-- consumption was written back under a tag); ledger.lua clamps the exact total at zero, as
-- KeyLedger::refund saturates. Nothing else changes.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'x', -tonumber(ARGV[1]))
end
return { 0 }
