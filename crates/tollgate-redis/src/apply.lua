-- Applies one decision's plan: answers every operation, then commits all of them or none.
-- KEYS[1..n]: the counters of the n operations; KEYS[n+1]: the decision record;
-- KEYS[n+2]: the lease record.
-- ARGV, flat (lib.rs; no JSON to decode on the hot path): now, ttl, decision, commit
-- (1/0), prefix, lease (JSON or empty), then 7 per operation: type, enforcing (1/0) and
--   tb/fw/sw: limit, per, burst, -, -
--   sp: limit, amount, window start (empty: total), window ms (empty: none), label
--   fc: lookback, monthly budget, -, -, label
--   ls: max, resource, by (JSON), values (JSON), -
local HEADER, STRIDE = 6, 7
local plan = {now = tonumber(ARGV[1]), ttl = tonumber(ARGV[2]), decision = ARGV[3],
  commit = ARGV[4] == '1', prefix = ARGV[5]}
if ARGV[6] ~= '' then plan.lease = cjson.decode(ARGV[6]) end
local now = plan.now
local n = (#ARGV - HEADER) / STRIDE
local ops = {}
for i = 1, n do
  local b = HEADER + (i - 1) * STRIDE
  local t = ARGV[b + 1]
  local op = {t = t, enforcing = ARGV[b + 2] == '1'}
  if t == 'sp' then
    op.limit, op.amount = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    op.ws, op.wms, op.label = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6]), ARGV[b + 7]
  elseif t == 'fc' then
    op.lookback, op.budget, op.label = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 7]
  elseif t == 'ls' then
    op.max, op.resource = tonumber(ARGV[b + 3]), ARGV[b + 4]
    op.by, op.values = cjson.decode(ARGV[b + 5]), cjson.decode(ARGV[b + 6])
  else
    op.limit, op.per, op.burst = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  end
  ops[i] = op
end
local DAY = 86400000

local function num(x) if x == false or x == nil then return nil end return tonumber(x) end

-- Spend counters keep running sums in KEY:m (esum: recorded events still in KEY:ev;
-- folded: events that fell out of every window; rsum: live reservations), so a check
-- costs O(1) amortised whatever the traffic. KEY:m also holds bounds that spare the
-- common path any range query: elow, the time of the oldest event; rexp, at most the
-- earliest expiry of a live reservation; rlow, at most the time of the oldest one; and
-- lx, when the counter's keys lapse (their lifetimes are refreshed from it).
local SPEND_FIELDS = {'esum', 'folded', 'rsum', 'elow', 'rexp', 'rlow', 'lx'}

-- Reads a spend counter's sums (one HMGET) and answers spend since ws (nil: all of it):
-- recorded events before a finite window are folded, expired reservations dropped.
-- Returns the amount in use and the counter's state for the commit.
local function spend(key, ws, reservations)
  local m = key .. ':m'
  local h = redis.call('HMGET', m, unpack(SPEND_FIELDS))
  local st = {esum = num(h[1]) or 0, folded = num(h[2]) or 0, rsum = num(h[3]) or 0,
    elow = num(h[4]), rexp = num(h[5]), rlow = num(h[6]), lx = num(h[7]),
    new = h[1] == false and h[2] == false and h[3] == false}
  if ws ~= nil and st.elow ~= nil and st.elow < ws then
    local old = redis.call('ZRANGEBYSCORE', key .. ':ev', '-inf', '(' .. ws)
    if #old > 0 then
      local folded = 0
      for _, d in ipairs(redis.call('HMGET', key .. ':am', unpack(old))) do folded = folded + (num(d) or 0) end
      st.folded = st.folded + folded
      st.esum = st.esum - folded
      redis.call('ZREMRANGEBYSCORE', key .. ':ev', '-inf', '(' .. ws)
      redis.call('HDEL', key .. ':am', unpack(old))
    end
    local first = redis.call('ZRANGE', key .. ':ev', 0, 0, 'WITHSCORES')
    st.elow = tonumber(first[2])
    st.dirty = true
  end
  local total = st.esum
  if ws == nil then total = total + st.folded end
  if not reservations then return total, st end
  if st.rexp ~= nil and st.rexp <= now then
    local expired = redis.call('ZRANGEBYSCORE', key .. ':rv', '-inf', now)
    if #expired > 0 then
      local gone = 0
      for _, a in ipairs(redis.call('HMGET', key .. ':ra', unpack(expired))) do gone = gone + (num(a) or 0) end
      st.rsum = st.rsum - gone
      redis.call('ZREMRANGEBYSCORE', key .. ':rv', '-inf', now)
      redis.call('ZREM', key .. ':rat', unpack(expired))
      redis.call('HDEL', key .. ':ra', unpack(expired))
    end
    local first = redis.call('ZRANGE', key .. ':rv', 0, 0, 'WITHSCORES')
    st.rexp = tonumber(first[2])
    if st.rexp == nil then st.rlow = nil end
    st.dirty = true
  end
  total = total + st.rsum
  if ws ~= nil and st.rlow ~= nil and st.rlow < ws then
    -- reservations from before the window (a period that just turned) do not count
    local before = redis.call('ZRANGEBYSCORE', key .. ':rat', '-inf', '(' .. ws)
    if #before > 0 then
      for _, a in ipairs(redis.call('HMGET', key .. ':ra', unpack(before))) do total = total - (num(a) or 0) end
    else
      st.rlow = ws
      st.dirty = true
    end
  end
  return total, st
end

-- Writes a spend counter's sums and bounds (one HSET, and an HDEL for bounds that no
-- longer hold), with `extra` fields.
-- Integers are written in full ('%d'): Lua would print large ones with 14 digits.
local function int(x) return string.format('%d', x) end
local BOUNDS = {'elow', 'rexp', 'rlow'}
local function write_spend(key, st, extra)
  local fields = {'esum', int(st.esum), 'folded', int(st.folded), 'rsum', int(st.rsum)}
  local gone = {}
  for _, f in ipairs(BOUNDS) do
    if st[f] ~= nil then
      fields[#fields + 1] = f
      fields[#fields + 1] = int(st[f])
    else
      gone[#gone + 1] = f
    end
  end
  for _, v in ipairs(extra) do fields[#fields + 1] = v end
  redis.call('HSET', key .. ':m', unpack(fields))
  if st.dirty and #gone > 0 then redis.call('HDEL', key .. ':m', unpack(gone)) end
end

-- Commits a spend operation: its reservation, the sums, and the counter's lifetimes (set
-- when a tenth of them has passed; keys created now, when no reservation was live, at once).
-- The label is written with the lifetimes, or when the counter is new.
local function commit_spend(key, op, st, reserve)
  local fresh_reservations = false
  if reserve then
    if st.rsum == 0 then
      -- no live reservation: the reservation keys are gone, and so are their bounds
      fresh_reservations, st.rexp, st.rlow, st.dirty = true, nil, nil, true
    end
    st.rsum = st.rsum + op.amount
    local exp = now + plan.ttl
    if st.rexp == nil or exp < st.rexp then st.rexp = exp end
    if st.rlow == nil or now < st.rlow then st.rlow = now end
  end
  local extra = {}
  local window = op.wms or op.lookback
  local life = nil
  if window ~= nil then
    -- A windowed counter lapses once nothing in it can count any more (a late record
    -- within twice the reservation TTL included); a `total` one never does.
    life = window + 2 * math.max(plan.ttl, 60000) + 1000
    if st.lx == nil or st.lx - now < life - life / 10 then
      st.lx = now + life
      extra = {'label', op.label, 'lx', int(st.lx)}
    else
      life = nil
    end
  elseif st.new then
    extra = {'label', op.label}
  end
  write_spend(key, st, extra)
  st.dirty = false
  if reserve then
    redis.call('ZADD', key .. ':rv', now + plan.ttl, plan.decision)
    redis.call('ZADD', key .. ':rat', now, plan.decision)
    redis.call('HSET', key .. ':ra', plan.decision, op.amount)
  end
  if life ~= nil then
    for _, part in ipairs({':m', ':ev', ':am', ':rv', ':rat', ':ra'}) do
      redis.call('PEXPIRE', key .. part, life)
    end
  elseif fresh_reservations and st.lx ~= nil then
    for _, part in ipairs({':rv', ':rat', ':ra'}) do
      redis.call('PEXPIRE', key .. part, st.lx - now)
    end
  end
end

-- When enough spend leaves a trailing window for `amount` to fit (only on a refusal).
local function retry_after(key, ws, wms, used, amount, limit)
  local items = {}
  local ev = redis.call('ZRANGEBYSCORE', key .. ':ev', ws, '+inf', 'WITHSCORES')
  for i = 1, #ev, 2 do
    table.insert(items, {tonumber(ev[i + 1]), num(redis.call('HGET', key .. ':am', ev[i])) or 0})
  end
  local rv = redis.call('ZRANGEBYSCORE', key .. ':rat', ws, '+inf', 'WITHSCORES')
  for i = 1, #rv, 2 do
    table.insert(items, {tonumber(rv[i + 1]), num(redis.call('HGET', key .. ':ra', rv[i])) or 0})
  end
  table.sort(items, function(x, y) return x[1] < y[1] end)
  local left = used
  for _, it in ipairs(items) do
    left = left - it[2]
    if left < limit and left + amount <= limit then return math.max(1, it[1] + wms + 1 - now) end
  end
  return -1
end

-- Rate counters are one string of two integers, '<a> <b>', written with SET … PX.
local function get_pair(key)
  local v = redis.call('GET', key)
  if not v then return nil, nil end
  local a, b = string.match(v, '^(%S+) (%S+)$')
  return tonumber(a), tonumber(b)
end

local function set_pair(key, a, b, ttl)
  redis.call('SET', key, int(a) .. ' ' .. int(b), 'PX', int(ttl))
end

local results = {}
local effects = {}
local states = {}
local blocked = false
for i, op in ipairs(ops) do
  local key = KEYS[i]
  local granted, used, remaining, retry, effect = false, 0, 0, -1, nil
  if op.t == 'tb' then
    -- One string per bucket, '<units> <last>', set with its lifetime: a read and a write,
    -- as a bare token bucket does.
    local u, l = get_pair(key .. ':b')
    local capacity = op.burst * op.per
    local cur = capacity
    if u ~= nil then
      local elapsed = math.max(0, now - l)
      if elapsed * op.limit >= capacity - u then cur = capacity else cur = u + elapsed * op.limit end
    end
    used = math.floor((capacity - cur) / op.per)
    if cur >= op.per then
      granted = true
      local after = cur - op.per
      remaining = math.floor(after / op.per)
      effect = {after, math.ceil((capacity - after) / op.limit) + 1000}
    else
      retry = math.max(1, math.ceil((op.per - cur) / op.limit))
    end
  elseif op.t == 'fw' then
    -- One string per counter, '<window> <count>', set with its lifetime.
    local window = math.floor(now / op.per)
    local taken = 0
    local w, c = get_pair(key .. ':w')
    if w == window then taken = c or 0 end
    used = taken
    local window_end = (window + 1) * op.per
    if taken < op.limit then
      granted = true
      remaining = op.limit - taken - 1
      effect = {window, taken + 1, window_end - now + 1000}
    else
      retry = math.max(1, window_end - now)
    end
  elseif op.t == 'sw' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - op.per))
    local taken = redis.call('ZCARD', key)
    used = taken
    if taken < op.limit then
      granted = true
      remaining = op.limit - taken - 1
      effect = true
    else
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      retry = math.max(1, tonumber(oldest[2]) + op.per - now + 1)
    end
  elseif op.t == 'sp' then
    local ws = op.ws
    used, states[i] = spend(key, ws, true)
    local refused = used >= op.limit or used + op.amount > op.limit
    granted = not refused
    local reserves = (not refused) or (not op.enforcing)
    remaining = math.max(0, op.limit - used - (reserves and op.amount or 0))
    if refused and ws ~= nil and op.wms ~= nil then
      retry = retry_after(key, ws, op.wms, used, op.amount, op.limit)
    end
    effect = true
  elseif op.t == 'fc' then
    local spent
    spent, states[i] = spend(key, now - op.lookback, false)
    granted = spent * 30 * DAY < op.budget * op.lookback
    used = math.floor(spent * 30 * DAY / op.lookback)
    remaining = math.max(0, op.budget - used)
    effect = true
  elseif op.t == 'ls' then
    -- A counter seen for the first time starts from the live leases of its resource
    -- and subject (a quota added after engines were provisioned counts them).
    if redis.call('EXISTS', key .. ':s') == 0 then
      local index = redis.call('HGETALL', plan.prefix .. ':lr:' .. op.resource)
      for j = 1, #index, 2 do
        local id, lease = index[j], cjson.decode(index[j + 1])
        local exp = tonumber(lease.e)
        local live = exp == -1 or exp > now
        local matches = true
        for k, dim in ipairs(op.by) do
          local v = (dim == 'resource') and op.resource or lease.s[dim]
          if v ~= op.values[k] then matches = false end
        end
        if live and matches then
          redis.call('ZADD', key, exp == -1 and '+inf' or exp, id)
          local record = plan.prefix .. ':l:' .. id
          local keys = redis.call('HGET', record, 'keys')
          if keys then
            local list = cjson.decode(keys)
            table.insert(list, key)
            redis.call('HSET', record, 'keys', cjson.encode(list))
          end
        end
      end
      redis.call('SET', key .. ':s', 1)
    end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local live = redis.call('ZCARD', key)
    used = live
    granted = live < op.max
    remaining = math.max(0, op.max - live - (granted and 1 or 0))
    effect = true
  end
  if op.enforcing and not granted then blocked = true end
  results[i] = {granted and 1 or 0, used, remaining, retry}
  effects[i] = effect
end

if plan.commit and not blocked then
  local sinks = {}
  local lease_keys = {}
  for i, op in ipairs(ops) do
    local key = KEYS[i]
    local effect = effects[i]
    if op.t == 'tb' and effect then
      set_pair(key .. ':b', effect[1], now, effect[2])
    elseif op.t == 'fw' and effect then
      set_pair(key .. ':w', effect[1], effect[2], effect[3])
    elseif op.t == 'sw' and effect then
      redis.call('ZADD', key, now, now .. ':' .. plan.decision .. ':' .. i)
      redis.call('PEXPIRE', key, op.per + 1000)
    elseif op.t == 'sp' or op.t == 'fc' then
      commit_spend(key, op, states[i], op.t == 'sp' and op.amount > 0)
      table.insert(sinks, key)
    elseif op.t == 'ls' and plan.lease then
      if results[i][1] == 1 or not op.enforcing then
        redis.call('ZADD', key, plan.lease.exp or '+inf', plan.lease.id)
        table.insert(lease_keys, key)
      end
    end
  end
  if #sinks > 0 then
    local record = KEYS[n + 1]
    redis.call('HSET', record, 'at', now, 'sinks', cjson.encode(sinks), 'recorded', 0)
    redis.call('PEXPIRE', record, 2 * math.max(plan.ttl, 60000))
  end
  if plan.lease then
    local lease = KEYS[n + 2]
    local exp = plan.lease.exp or -1
    redis.call('HSET', lease, 'keys', cjson.encode(lease_keys), 'exp', exp, 'res', plan.lease.resource)
    redis.call('HSET', plan.prefix .. ':lr:' .. plan.lease.resource, plan.lease.id, cjson.encode({s = plan.lease.subject, e = exp}))
  end
end
-- Folds and expiries made while answering are kept even when nothing was committed.
for i, st in pairs(states) do
  if st.dirty then write_spend(KEYS[i], st, {}) end
end
return results
