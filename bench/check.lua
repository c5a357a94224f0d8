-- The load benches' /v1/check request: 100,000 users over 100 teams, with labels and an
-- estimate that every rule of bench/policy-10-rules.yaml reads. The trivial request is the
-- same script with only the method and path changed (the same client cost per request).
-- Each wrk thread starts at its own user, so threads do not send the same user in lockstep.
local threads = 0
setup = function(thread)
  thread:set("first", threads * 50000)
  threads = threads + 1
end

local n = 0
init = function(args)
  n = first or 0
end

request = function()
  n = n + 1
  local body = string.format('{"subject":{"user":"u%d","team":"t%d","agent":"analyst"},"model":"gpt-4o","labels":{"input":"public","plan":"pro"},"estimate":{"cost_usd":"0.00001","input_tokens":1000}}', n % 100000, n % 100)
  return wrk.format("POST", "/v1/check", {["Content-Type"] = "application/json"}, body)
end
