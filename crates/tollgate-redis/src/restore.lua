-- Counts a recorded cost again after Redis lost its data, once per decision.
-- KEYS: the counters. ARGV[1]: {"decision", "at", "cost", "labels": [...]} as JSON, the
-- cost as text (written as it came: a double of 10^17 or more would be written as 1e+17).
local r = cjson.decode(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('HSET', key .. ':m', 'label', r.labels[i])
  if tonumber(r.cost) ~= 0 and redis.call('ZADD', key .. ':ev', 'NX', r.at, r.decision) == 1 then
    redis.call('HSET', key .. ':am', r.decision, r.cost)
    redis.call('HINCRBY', key .. ':m', 'esum', r.cost)
    local low = tonumber(redis.call('HGET', key .. ':m', 'elow'))
    if low == nil or r.at < low then redis.call('HSET', key .. ':m', 'elow', string.format('%d', r.at)) end
  end
end
return 1
