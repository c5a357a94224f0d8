-- Releases a lease. KEYS[1]: the lease record. ARGV: the lease id, now, the key prefix.
local d = redis.call('HMGET', KEYS[1], 'keys', 'exp', 'res')
if not d[1] then return 0 end
if d[3] then redis.call('HDEL', ARGV[3] .. ':lr:' .. d[3], ARGV[1]) end
for _, key in ipairs(cjson.decode(d[1])) do redis.call('ZREM', key, ARGV[1]) end
redis.call('DEL', KEYS[1])
local exp = tonumber(d[2])
if exp ~= -1 and exp <= tonumber(ARGV[2]) then return 0 end
return 1
