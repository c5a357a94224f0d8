-- Recorded spend and live reservations of one counter since ARGV[1] ('total': all).
-- KEYS[1]: the counter. ARGV[2]: now.
local now = tonumber(ARGV[2])
local ws = nil
if ARGV[1] ~= 'total' then ws = tonumber(ARGV[1]) end
local key = KEYS[1]
local expired = redis.call('ZRANGEBYSCORE', key .. ':rv', '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', key .. ':rv', '-inf', now)
  redis.call('HDEL', key .. ':ra', unpack(expired))
end
local spent = 0
if ws == nil then spent = tonumber(redis.call('HGET', key .. ':m', 'folded') or '0') or 0 end
local members = redis.call('ZRANGEBYSCORE', key .. ':ev', ws == nil and '-inf' or ws, '+inf')
for _, m in ipairs(members) do spent = spent + (tonumber(redis.call('HGET', key .. ':am', m)) or 0) end
local reserved = 0
local all = redis.call('HGETALL', key .. ':ra')
for i = 1, #all, 2 do
  local at, amount = string.match(all[i + 1], '^(-?%d+):(-?%d+)$')
  if ws == nil or tonumber(at) >= ws then reserved = reserved + tonumber(amount) end
end
return {spent, reserved}
