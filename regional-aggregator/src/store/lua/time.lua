-- Time in the limiter-state scripts: the prelude of gcra.lua, leaky.lua and log.lua
-- (concatenated at build time).
--
-- Times are nanoseconds since the Unix epoch (DESIGN §9), about 1.8e18 in 2026, and Lua's
-- numbers are doubles, exact for integers only up to 2^53 (about 9.0e15). So a time never
-- travels or rests as one number: the regional passes `now`, and Redis stores every time, as a
-- pair of exact integers, whole seconds since the epoch and nanoseconds within the second
-- (0 <= ns < 10^9). The scripts never form an absolute time as a number. They compute with
-- times relative to now (`rel`), which are small, and they add a span to a stored pair (`add`),
-- which carries into the seconds exactly: `math.fmod` is exact, and the rest of the carry is
-- an exact multiple of 10^9.
--
-- Spans (a bucket's B*T or C*T, a log's window W, anything cost*T up to them) are at most 2^52
-- ns: the regional refuses longer ones (store::MAX_SPAN). A relative time is clamped to
-- +-2^52, which is further from now than any span reaches, so every comparison with a span
-- comes out as it would unclamped; and a relative time plus one span stays within 2^53, where
-- doubles are still exact. Nothing here is ever a sum of more than that. (A difference of two
-- times more than 104 days apart is not exact as a double, but it is far beyond 2^52, so it
-- clamps to exactly +-2^52 all the same.)
--
-- Numbers are written to Redis with int(), never as Lua numbers: Redis formats those with at
-- most 17 significant digits in some versions and 14 in others.
--
-- ARGV[1] is the action ('acquire', 'refund' or 'absorb'); ARGV[2], ARGV[3] the regional's now
-- as (seconds, nanoseconds). Verdicts, as in shared::algorithm::Verdict: 0 allow, 1 delay,
-- 2 deny, 3 insufficient capacity.

local NS = 1000000000
local SPAN = 4503599627370496 -- 2^52
local action = ARGV[1]
local now_s, now_ns = tonumber(ARGV[2]), tonumber(ARGV[3])

-- (s, ns) - now, in nanoseconds, clamped to [-2^52, 2^52].
local function rel(s, ns)
  return math.max(-SPAN, math.min(SPAN, (s - now_s) * NS + (ns - now_ns)))
end

-- (s, ns) + d as a pair with 0 <= ns < 10^9; exact for |d| <= 2^53 - 10^9.
local function add(s, ns, d)
  local v = ns + d
  local r = math.fmod(v, NS)
  if r < 0 then
    r = r + NS
  end
  return s + (v - r) / NS, r
end

-- (s1, ns1) > (s2, ns2), for normalized pairs.
local function later(s1, ns1, s2, ns2)
  return s1 > s2 or (s1 == s2 and ns1 > ns2)
end

-- An integer as Redis should store it: every digit.
local function int(x)
  return string.format('%d', x)
end

-- A key's TTL in ms: until `r` ns from now, rounded up, plus the grace (store::STATE_GRACE).
local function ttl(r, grace_ms)
  return int(math.floor((math.max(r, 0) + 999999) / 1000000) + grace_ms)
end
