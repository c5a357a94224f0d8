-- Recorded spend and live reservations of one counter since ARGV[1] ('total': all),
-- read-only. KEYS[1]: the counter. ARGV[2]: now.
local now = tonumber(ARGV[2])
local ws = nil
if ARGV[1] ~= 'total' then ws = tonumber(ARGV[1]) end
local key = KEYS[1]
local function num(x) if x == false or x == nil then return 0 end return tonumber(x) or 0 end
local spent = 0
if ws == nil then
  local h = redis.call('HMGET', key .. ':m', 'esum', 'folded')
  spent = num(h[1]) + num(h[2])
else
  for _, d in ipairs(redis.call('ZRANGEBYSCORE', key .. ':ev', ws, '+inf')) do
    spent = spent + num(redis.call('HGET', key .. ':am', d))
  end
end
local reserved = 0
for _, d in ipairs(redis.call('ZRANGEBYSCORE', key .. ':rat', ws == nil and '-inf' or ws, '+inf')) do
  local expires = redis.call('ZSCORE', key .. ':rv', d)
  if expires and tonumber(expires) > now then reserved = reserved + num(redis.call('HGET', key .. ':ra', d)) end
end
return {spent, reserved}
