-- Applies one decision's plan: answers every operation, then commits all of them or none.
-- KEYS[1..n]: the counters of the n operations (a token bucket's and a fixed window's
-- with their ':b' and ':w' suffixes); then the decision record when an operation spends
-- or forecasts, and last the lease record when the plan takes a lease (keys a call does
-- not use are not sent).
-- ARGV, flat (lib.rs; no JSON to decode on the hot path): now, commit (1/0), the number
-- of operations, then per operation its type, enforcing (1/0) and
--   tb/fw/sw: limit, per, burst
--   sp: limit, amount, window start (empty: total), window ms (empty: none), label, span
--   fc: lookback, monthly budget, label
--   ls: max, resource, by (JSON), values (JSON)
-- and last, unless every operation is a token bucket or a fixed window: the reservation
-- TTL, the decision id, the key prefix and the lease (JSON or empty). Redis makes a Lua
-- string of every argument on every call, so a call carries only those its plan reads.
-- Locals, not tables: the script runs whole on every call, in Redis's one thread.
local now, commit, n = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])

-- A number as integer text: every digit ('%d'; Lua's own conversion keeps 14), and the
-- nearest i64 for a double at or past 2^63 (a limit or sum near i64::MAX, in doubles),
-- which '%d' would write as -2^63.
local function int(x)
  if x >= 9223372036854775807 then return '9223372036854775807' end
  if x < -9223372036854775807 then return '-9223372036854775808' end
  return string.format('%d', x)
end

-- Rate counters are one string: a 1 byte, then three doubles (struct '<Bddd'): units or
-- window, last take or count, and the deadline — when the key expires. Packed, not text:
-- Lua's pattern matching and formatting cost a one-counter call a sixth of its time in
-- Redis. Text ('<a> <b> <deadline>', which versions before 2026-12 wrote) is still read.
-- A lifetime is set (SET … PX) only when the key must outlive its deadline, and kept
-- (SET … KEEPTTL) otherwise: setting it costs Redis as much as the rest of the SET.
local function get_counter(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  if string.byte(v, 1) == 1 then
    local _, a, b, deadline = struct.unpack('<Bddd', v)
    return a, b, deadline
  end
  local a, b, deadline = string.match(v, '^(%S+) (%S+) ?(%S*)$')
  return tonumber(a), tonumber(b), tonumber(deadline)
end

-- Writes a and b for a key that must live until `need`; `deadline` is the one it has.
local function set_counter(key, a, b, deadline, need)
  if deadline ~= nil and deadline >= need then
    redis.call('SET', key, struct.pack('<Bddd', 1, a, b, deadline), 'KEEPTTL')
  else
    -- with room, so that a busy key's lifetime is not set on every call
    local life = need - now
    life = life + math.max(1000, math.floor(life / 8))
    redis.call('SET', key, struct.pack('<Bddd', 1, a, b, now + life), 'PX', life)
  end
end

-- Answers a token bucket ('tb': units and last take, a read and a write as a bare bucket
-- does) or a fixed window ('fw': window and count) whose arguments start after ARGV[b]:
-- granted, used, remaining, retry after, and when granted what committing writes (a, b,
-- the key's deadline, when it may lapse) — values, not a table.
local function answer_rate(key, t, b)
  local limit, per = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local x, y, deadline = get_counter(key)
  if t == 'tb' then
    local capacity = tonumber(ARGV[b + 5]) * per
    local cur = capacity
    if x ~= nil then
      local elapsed = math.max(0, now - y)
      if elapsed * limit >= capacity - x then cur = capacity else cur = x + elapsed * limit end
    end
    local used = math.floor((capacity - cur) / per)
    if cur < per then return false, used, 0, math.max(1, math.ceil((per - cur) / limit)) end
    local after = cur - per
    -- the key may lapse once the bucket is full again
    return true, used, math.floor(after / per), -1,
      after, now, deadline, now + math.ceil((capacity - after) / limit) + 1000
  end
  local window = math.floor(now / per)
  local taken = 0
  if x == window then taken = y or 0 end
  local window_end = (window + 1) * per
  if taken >= limit then return false, taken, 0, math.max(1, window_end - now) end
  -- the key may lapse once its window is over
  return true, taken, limit - taken - 1, -1, window, taken + 1, deadline, window_end + 1000
end

-- The commonest plan, one token bucket or fixed window and no lease (nothing after its
-- arguments), is answered and committed in one pass with no table: Redis's Lua costs
-- tens of nanoseconds a statement, and the general walk below would cost such a call
-- about a quarter of its time in Redis.
if n == 1 and (ARGV[4] == 'tb' or ARGV[4] == 'fw') and ARGV[9] == nil then
  local granted, used, remaining, retry, a, b, deadline, need = answer_rate(KEYS[1], ARGV[4], 3)
  if commit and granted then set_counter(KEYS[1], a, b, deadline, need) end
  return string.format('%d %s %s %d', granted and 1 or 0, int(used), int(remaining), retry)
end

-- Where each operation's arguments start (one before its type), and what the plan holds.
local at = {}
local has_spend, has_tables = false, false
local c = 3
for i = 1, n do
  local t = ARGV[c + 1]
  at[i] = c
  if t == 'sp' then
    c, has_spend, has_tables = c + 8, true, true
  elseif t == 'fc' then
    c, has_spend, has_tables = c + 5, true, true
  elseif t == 'ls' then
    c, has_tables = c + 6, true
  else
    c = c + 5
  end
end
local ttl, decision, prefix, lease = 0, '', '', nil
if ARGV[c + 1] ~= nil then
  ttl, decision, prefix = tonumber(ARGV[c + 1]), ARGV[c + 2], ARGV[c + 3]
  if ARGV[c + 4] ~= '' then lease = cjson.decode(ARGV[c + 4]) end
end

-- Spend, forecast and lease operations as tables (their helpers take them), kept in ops
-- with the counters' states; rate operations are read straight from ARGV where they are
-- answered. A rate-only call makes none of these: every table and closure a call makes
-- is garbage for Redis's Lua to collect.
local parse_op, ops, states
if has_tables then
  ops, states = {}, {}
  parse_op = function(t, b)
    local op = {t = t}
    if t == 'sp' then
      op.limit, op.amount = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
      op.ws, op.wms, op.label = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6]), ARGV[b + 7]
      op.span = tonumber(ARGV[b + 8])
    elseif t == 'fc' then
      op.lookback, op.budget, op.label = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), ARGV[b + 5]
      op.span = 1
    else
      op.max, op.resource = tonumber(ARGV[b + 3]), ARGV[b + 4]
      op.by, op.values = cjson.decode(ARGV[b + 5]), cjson.decode(ARGV[b + 6])
    end
    return op
  end
end

-- The spend machinery exists only in calls that need it: defining its functions and
-- tables on every call would cost a rate-only decision about as much as its own work.
local DAY = 86400000
local num, each_batch, spend, write_spend, commit_spend, retry_after, SPEND_FIELDS, BOUNDS
if has_spend then
  num = function(x) if x == false or x == nil then return nil end return tonumber(x) end

  -- Spend counters keep running sums in KEY:m (esum: recorded events still in KEY:ev;
  -- folded: events that fell out of every window; rsum: live reservations), so a check
  -- costs O(1) amortised whatever the traffic. KEY:m also holds bounds that spare the
  -- common path any range query: elow, the time of the oldest event; rexp, at most the
  -- earliest expiry of a live reservation; rlow, at most the time of the oldest one;
  -- lx, when the counter's keys lapse (their lifetimes are refreshed from it); and after
  -- a period turns while reservations are live, bsum, the sum of those made before bws
  -- (kept as they are recorded or expire, so the turn is paid for once); and span, the
  -- span within which recorded spend is one to the counter's windows (absent: 1), which
  -- record.lua reads to keep such spend as one event.
  SPEND_FIELDS = {'esum', 'folded', 'rsum', 'elow', 'rexp', 'rlow', 'lx', 'bws', 'bsum', 'span'}

  -- Calls f with the members of zset `key` scored in [min, max], a thousand at a time
  -- (Lua's unpack takes no more than a few thousand values), removing each batch after
  -- f when `remove`.
  each_batch = function(key, min, max, remove, f)
    local offset = 0
    while true do
      local batch = redis.call('ZRANGEBYSCORE', key, min, max, 'LIMIT', offset, 1000)
      if #batch == 0 then return end
      f(batch)
      if remove then redis.call('ZREM', key, unpack(batch)) else offset = offset + #batch end
      if #batch < 1000 then return end
    end
  end

  -- Reads a spend counter's sums (one HMGET) and answers spend since ws (nil: all of it):
  -- recorded events before a finite window are folded, expired reservations dropped.
  -- Returns the amount in use and the counter's state for the commit.
  spend = function(key, ws, reservations)
    local m = key .. ':m'
    local h = redis.call('HMGET', m, unpack(SPEND_FIELDS))
    local st = {esum = num(h[1]) or 0, folded = num(h[2]) or 0, rsum = num(h[3]) or 0,
      elow = num(h[4]), rexp = num(h[5]), rlow = num(h[6]), lx = num(h[7]),
      bws = num(h[8]), bsum = num(h[9]), span = num(h[10]) or 1,
      new = h[1] == false and h[2] == false and h[3] == false}
    if ws ~= nil and st.elow ~= nil and st.elow < ws then
      each_batch(key .. ':ev', '-inf', '(' .. ws, true, function(old)
        local folded = 0
        for _, d in ipairs(redis.call('HMGET', key .. ':am', unpack(old))) do folded = folded + (num(d) or 0) end
        st.folded = st.folded + folded
        st.esum = st.esum - folded
        redis.call('HDEL', key .. ':am', unpack(old))
      end)
      local first = redis.call('ZRANGE', key .. ':ev', 0, 0, 'WITHSCORES')
      st.elow = tonumber(first[2])
      st.dirty = true
    end
    local total = st.esum
    if ws == nil then total = total + st.folded end
    if not reservations then return total, st end
    if st.rexp ~= nil and st.rexp <= now then
      each_batch(key .. ':rv', '-inf', now, true, function(expired)
        local gone = 0
        local amounts = redis.call('HMGET', key .. ':ra', unpack(expired))
        for _, a in ipairs(amounts) do gone = gone + (num(a) or 0) end
        st.rsum = st.rsum - gone
        if st.bws ~= nil then
          for j, at in ipairs(redis.call('ZMSCORE', key .. ':rat', unpack(expired))) do
            if num(at) ~= nil and num(at) < st.bws then st.bsum = st.bsum - (num(amounts[j]) or 0) end
          end
        end
        redis.call('ZREM', key .. ':rat', unpack(expired))
        redis.call('HDEL', key .. ':ra', unpack(expired))
      end)
      local first = redis.call('ZRANGE', key .. ':rv', 0, 0, 'WITHSCORES')
      st.rexp = tonumber(first[2])
      if st.rexp == nil then st.rlow, st.bws, st.bsum = nil, nil, nil end
      st.dirty = true
    end
    total = total + st.rsum
    if ws ~= nil and st.rlow ~= nil and st.rlow < ws then
      -- Reservations from before the window (a period that just turned) do not count.
      -- Only those made since the last start looked at are read: nothing live is older
      -- than rlow, and bsum already holds those before bws.
      local from = st.rlow
      if st.bws ~= nil and st.bws <= ws then from = st.bws else st.bsum = 0 end
      if st.bws ~= ws then
        each_batch(key .. ':rat', from, '(' .. ws, false, function(before)
          for _, a in ipairs(redis.call('HMGET', key .. ':ra', unpack(before))) do
            st.bsum = st.bsum + (num(a) or 0)
          end
        end)
        st.bws, st.dirty = ws, true
      end
      if st.bsum <= 0 then
        -- none is left from before the window: stop looking
        st.rlow, st.bws, st.bsum, st.dirty = ws, nil, nil, true
      else
        total = total - st.bsum
      end
    end
    return total, st
  end

  -- Writes a spend counter's sums and bounds (one HSET, and an HDEL for bounds that no
  -- longer hold), with `extra` fields.
  BOUNDS = {'elow', 'rexp', 'rlow', 'bws', 'bsum'}
  write_spend = function(key, st, extra)
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
  commit_spend = function(key, op, st, reserve)
    local fresh_reservations = false
    if reserve then
      if st.rsum == 0 then
        -- no live reservation: the reservation keys are gone, and so are their bounds
        fresh_reservations, st.rexp, st.rlow, st.bws, st.bsum, st.dirty = true, nil, nil, nil, nil, true
      end
      st.rsum = st.rsum + op.amount
      local exp = now + ttl
      if st.rexp == nil or exp < st.rexp then st.rexp = exp end
      if st.rlow == nil or now < st.rlow then st.rlow = now end
    end
    local extra = {}
    local window = op.wms or op.lookback
    local life = nil
    if window ~= nil then
      -- A windowed counter lapses once nothing in it can count any more (a late record
      -- within twice the reservation TTL included); a `total` one never does.
      life = window + 2 * math.max(ttl, 60000) + 1000
      if st.lx == nil or st.lx - now < life - life / 10 then
        st.lx = now + life
        extra = {'label', op.label, 'lx', int(st.lx)}
      else
        life = nil
      end
    elseif st.new then
      extra = {'label', op.label}
    end
    if op.span ~= st.span then
      extra[#extra + 1] = 'span'
      extra[#extra + 1] = int(op.span)
    end
    write_spend(key, st, extra)
    st.dirty = false
    if reserve then
      redis.call('ZADD', key .. ':rv', now + ttl, decision)
      redis.call('ZADD', key .. ':rat', now, decision)
      redis.call('HSET', key .. ':ra', decision, op.amount)
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

  -- The members of zset zkey scored from ws up, oldest first, as {score, amount in hkey},
  -- read a hundred at a time by rank (so a long walk costs no more per item).
  local function oldest_first(zkey, hkey, ws)
    local rank = redis.call('ZCOUNT', zkey, '-inf', '(' .. ws)
    local page, i, done = {}, 1, false
    return function()
      if i > #page then
        if done then return nil end
        local found = redis.call('ZRANGE', zkey, rank, rank + 99, 'WITHSCORES')
        rank, done = rank + #found / 2, #found < 200
        if #found == 0 then return nil end
        local members = {}
        for k = 1, #found, 2 do members[#members + 1] = found[k] end
        local amounts = redis.call('HMGET', hkey, unpack(members))
        page, i = {}, 1
        for k = 1, #members do page[k] = {tonumber(found[2 * k]), num(amounts[k]) or 0} end
      end
      i = i + 1
      return page[i - 1]
    end
  end

  -- When enough spend leaves a trailing window for `amount` to fit (only on a refusal):
  -- events and reservations in the window merged oldest first, read only as far as
  -- needed (a refused check on a busy counter does not read the whole window).
  retry_after = function(key, ws, wms, used, amount, limit)
    local next_event = oldest_first(key .. ':ev', key .. ':am', ws)
    local next_reservation = oldest_first(key .. ':rat', key .. ':ra', ws)
    local e, r = next_event(), next_reservation()
    local left = used
    while e ~= nil or r ~= nil do
      local it
      if r == nil or (e ~= nil and e[1] <= r[1]) then
        it, e = e, next_event()
      else
        it, r = r, next_reservation()
      end
      left = left - it[2]
      if left < limit and left + amount <= limit then return math.max(1, it[1] + wms + 1 - now) end
    end
    return -1
  end
end

-- Results are flat, four numbers per operation: granted (1/0), used, remaining, retry
-- after in ms (-1: none), answered as one string. What a granted rate operation writes
-- when committed is flat too, in fx at the same places (one table for the call, not one
-- per operation).
local results, fx = {}, {}
local blocked = false
for i = 1, n do
  local b = at[i]
  local t = ARGV[b + 1]
  local enforcing = ARGV[b + 2] == '1'
  local key = KEYS[i]
  local r = 4 * (i - 1)
  local granted, used, remaining, retry = false, 0, 0, -1
  if t == 'tb' or t == 'fw' then
    local a, b2, deadline, need
    granted, used, remaining, retry, a, b2, deadline, need = answer_rate(key, t, b)
    if granted then fx[r + 1], fx[r + 2], fx[r + 3], fx[r + 4] = a, b2, deadline, need end
  elseif t == 'sw' then
    local limit, per = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - per))
    local taken = redis.call('ZCARD', key)
    used = taken
    if taken < limit then
      granted = true
      remaining = limit - taken - 1
      fx[r + 1] = per
    else
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      retry = math.max(1, tonumber(oldest[2]) + per - now + 1)
    end
  elseif t == 'sp' then
    local op = parse_op(t, b)
    ops[i] = op
    local ws = op.ws
    used, states[i] = spend(key, ws, true)
    local refused = used >= op.limit or used + op.amount > op.limit
    granted = not refused
    local reserves = (not refused) or (not enforcing)
    remaining = math.max(0, op.limit - used - (reserves and op.amount or 0))
    if refused and ws ~= nil and op.wms ~= nil then
      retry = retry_after(key, ws, op.wms, used, op.amount, op.limit)
    end
  elseif t == 'fc' then
    local op = parse_op(t, b)
    ops[i] = op
    local spent
    spent, states[i] = spend(key, now - op.lookback, false)
    granted = spent * 30 * DAY < op.budget * op.lookback
    used = math.floor(spent * 30 * DAY / op.lookback)
    remaining = math.max(0, op.budget - used)
  elseif t == 'ls' then
    local op = parse_op(t, b)
    -- A counter seen for the first time starts from the live leases of its resource
    -- and subject (a quota added after engines were provisioned counts them).
    if redis.call('EXISTS', key .. ':s') == 0 then
      local index = redis.call('HGETALL', prefix .. ':lr:' .. op.resource)
      for j = 1, #index, 2 do
        local id, entry = index[j], cjson.decode(index[j + 1])
        local exp = tonumber(entry.e)
        local live = exp == -1 or exp > now
        local matches = true
        for k, dim in ipairs(op.by) do
          local v = (dim == 'resource') and op.resource or entry.s[dim]
          if v ~= op.values[k] then matches = false end
        end
        if live and matches then
          redis.call('ZADD', key, exp == -1 and '+inf' or exp, id)
          local record = prefix .. ':l:' .. id
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
  end
  if enforcing and not granted then blocked = true end
  results[r + 1], results[r + 2], results[r + 3], results[r + 4] = granted and 1 or 0, used, remaining, retry
end

if commit and not blocked then
  local sinks = has_spend and {} or nil
  local lease_keys = lease and {} or nil
  for i = 1, n do
    local key, t, r = KEYS[i], ARGV[at[i] + 1], 4 * (i - 1)
    if (t == 'tb' or t == 'fw') and fx[r + 1] ~= nil then
      set_counter(key, fx[r + 1], fx[r + 2], fx[r + 3], fx[r + 4])
    elseif t == 'sw' and fx[r + 1] ~= nil then
      redis.call('ZADD', key, now, now .. ':' .. decision .. ':' .. i)
      redis.call('PEXPIRE', key, fx[r + 1] + 1000)
    elseif t == 'sp' or t == 'fc' then
      commit_spend(key, ops[i], states[i], t == 'sp' and ops[i].amount > 0)
      table.insert(sinks, key)
    elseif t == 'ls' and lease then
      if results[r + 1] == 1 or ARGV[at[i] + 2] == '0' then
        redis.call('ZADD', key, lease.exp or '+inf', lease.id)
        table.insert(lease_keys, key)
      end
    end
  end
  if has_spend and #sinks > 0 then
    local record = KEYS[n + 1]
    redis.call('HSET', record, 'at', now, 'sinks', cjson.encode(sinks), 'recorded', 0)
    redis.call('PEXPIRE', record, 2 * math.max(ttl, 60000))
  end
  if lease then
    local exp = lease.exp or -1
    redis.call('HSET', KEYS[#KEYS], 'keys', cjson.encode(lease_keys), 'exp', exp, 'res', lease.resource)
    redis.call('HSET', prefix .. ':lr:' .. lease.resource, lease.id, cjson.encode({s = lease.subject, e = exp}))
  end
end
-- Folds and expiries made while answering are kept even when nothing was committed.
if has_spend then
  for i, st in pairs(states) do
    if st.dirty then write_spend(KEYS[i], st, {}) end
  end
end
-- One string of numbers, not an array of them: a client reads an array element by element,
-- which cost it more than the script costs Redis.
for i = 1, #results do results[i] = int(results[i]) end
return table.concat(results, ' ')
