-- Counts a recorded cost again after Redis lost its data, once per decision, or a
-- counter's recorded spend of one old day, once per day.
-- KEYS: the counters, then for a decision its decision record. ARGV[1]: {"decision" or
-- "day", "at", "cost", "labels": [...]} as JSON, the cost as text (written as it came: a
-- double of 10^17 or more would be written as 1e+17).
-- A decision recorded since the loss is counted already (record.lua may have kept it in
-- its span's event, under another name than the decision's): its record says so. A day
-- restored as a sum is older than any check that can still be recorded.
local r = cjson.decode(ARGV[1])
local n, member = #KEYS, nil
if r.decision then
  n = n - 1
  if redis.call('HGET', KEYS[n + 1], 'recorded') == '1' then return 0 end
  member = r.decision
else
  member = 'day:' .. r.day
end
for i = 1, n do
  local key = KEYS[i]
  redis.call('HSET', key .. ':m', 'label', r.labels[i])
  if tonumber(r.cost) ~= 0 and redis.call('ZADD', key .. ':ev', 'NX', r.at, member) == 1 then
    redis.call('HSET', key .. ':am', member, r.cost)
    redis.call('HINCRBY', key .. ':m', 'esum', r.cost)
    local low = tonumber(redis.call('HGET', key .. ':m', 'elow'))
    if low == nil or r.at < low then redis.call('HSET', key .. ':m', 'elow', string.format('%d', r.at)) end
  end
end
return 1
