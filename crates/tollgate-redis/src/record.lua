-- Replaces a decision's reservations by its actual cost, once.
-- KEYS[1]: the decision record. ARGV[1]: the cost (micro-dollars), ARGV[2]: the decision.
local d = redis.call('HMGET', KEYS[1], 'at', 'sinks', 'recorded')
if not d[1] then return {'unknown'} end
if d[3] == '1' then return {'duplicate'} end
local cost = tonumber(ARGV[1])
local decision = ARGV[2]
local sinks = cjson.decode(d[2])
-- Redis integers are i64, and the scripts read these sums as doubles: a cost that would
-- take a counter's recorded spend near i64::MAX micro-dollars (9.2 trillion dollars) is
-- refused before anything is written (a script that fails halfway keeps what it wrote).
-- Each counter's span (apply.lua): spend whose check times share one is kept as one event,
-- named by the span's number and scored at the latest time recorded in it, so that a
-- calendar budget holds an event a day, not one per call.
local spans = {}
if cost ~= 0 then
  for i, key in ipairs(sinks) do
    local m = redis.call('HMGET', key .. ':m', 'esum', 'folded', 'span')
    if (tonumber(m[1]) or 0) + (tonumber(m[2]) or 0) + cost >= 9.2e18 then return {'overflow'} end
    spans[i] = tonumber(m[3]) or 1
  end
end
for i, key in ipairs(sinks) do
  local amount = tonumber(redis.call('HGET', key .. ':ra', decision))
  if amount then
    redis.call('HINCRBY', key .. ':m', 'rsum', -amount)
    -- a reservation from before a period's turn leaves the sum kept of those (apply.lua)
    local bws = tonumber(redis.call('HGET', key .. ':m', 'bws'))
    if bws ~= nil and tonumber(d[1]) < bws then redis.call('HINCRBY', key .. ':m', 'bsum', -amount) end
    redis.call('HDEL', key .. ':ra', decision)
    redis.call('ZREM', key .. ':rv', decision)
    redis.call('ZREM', key .. ':rat', decision)
  end
  if cost ~= 0 then
    if spans[i] > 1 then
      local member = 'span:' .. string.format('%d', math.floor(tonumber(d[1]) / spans[i]))
      redis.call('ZADD', key .. ':ev', 'GT', d[1], member)
      redis.call('HINCRBY', key .. ':am', member, ARGV[1])
    else
      redis.call('ZADD', key .. ':ev', d[1], decision)
      -- the argument's own text: a double of 10^17 or more would be written as 1e+17
      redis.call('HSET', key .. ':am', decision, ARGV[1])
    end
    redis.call('HINCRBY', key .. ':m', 'esum', ARGV[1])
    -- the oldest event's time, which spares checks a range query (see apply.lua)
    local low = tonumber(redis.call('HGET', key .. ':m', 'elow'))
    if low == nil or tonumber(d[1]) < low then redis.call('HSET', key .. ':m', 'elow', d[1]) end
    -- new keys of a windowed counter lapse with it
    local life = redis.call('PTTL', key .. ':m')
    if life > 0 then
      redis.call('PEXPIRE', key .. ':ev', life)
      redis.call('PEXPIRE', key .. ':am', life)
    end
  end
end
redis.call('HSET', KEYS[1], 'recorded', 1)
-- the check's time and the counters' labels, so the store can keep what was counted
local out = {'recorded', d[1]}
for _, key in ipairs(sinks) do
  table.insert(out, redis.call('HGET', key .. ':m', 'label') or '')
end
return out
