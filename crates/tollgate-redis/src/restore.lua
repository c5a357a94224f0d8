-- Counts a recorded cost again after Redis lost its data, once per decision.
-- KEYS: the counters, then the decision record. ARGV[1]: {"decision", "at", "cost",
-- "labels": [...]} as JSON, the cost as text (written as it came: a double of 10^17 or
-- more would be written as 1e+17).
-- A decision recorded since the loss is counted already (record.lua may have kept it in
-- its span's event, under another name than the decision's): its record says so.
local n = #KEYS - 1
if redis.call('HGET', KEYS[n + 1], 'recorded') == '1' then return 0 end
local r = cjson.decode(ARGV[1])
for i = 1, n do
  local key = KEYS[i]
  redis.call('HSET', key .. ':m', 'label', r.labels[i])
  if tonumber(r.cost) ~= 0 and redis.call('ZADD', key .. ':ev', 'NX', r.at, r.decision) == 1 then
    redis.call('HSET', key .. ':am', r.decision, r.cost)
    redis.call('HINCRBY', key .. ':m', 'esum', r.cost)
    local low = tonumber(redis.call('HGET', key .. ':m', 'elow'))
    if low == nil or r.at < low then redis.call('HSET', key .. ':m', 'elow', string.format('%d', r.at)) end
  end
end
return 1
