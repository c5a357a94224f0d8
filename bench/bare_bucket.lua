-- The bare Lua token bucket that redis_bench and bench/redis_script_cost.sh compare
-- tollgate against: a read and a write of one hash, no expiry.
local h = redis.call('HMGET', KEYS[1], 'u', 'l')
local now, cap, rate = tonumber(ARGV[1]), 1e12, 1
local u = tonumber(h[1]) or cap
local l = tonumber(h[2]) or now
u = math.min(cap, u + (now - l) * rate)
if u >= 1 then redis.call('HSET', KEYS[1], 'u', u - 1, 'l', now) return 1 end
return 0
