-- Take every lapsed lease (its worker died) with its restart point, so that exactly one
-- watcher re-invokes it; the invocations named in ARGV (their instance is known to have
-- died) are taken at once, without waiting for their lease to lapse.
-- Returns a flat list: id, tasks (JSON), id, tasks, ...
-- KEYS: record, leases, restart.  ARGV: invocation...
if not alive(KEYS[1]) then return {} end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms())
for _, id in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[2], id) then lapsed[#lapsed + 1] = id end
end
local out = {}
for _, id in ipairs(lapsed) do
  if redis.call('ZREM', KEYS[2], id) == 1 then
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', KEYS[3], id) or '[]'
    redis.call('HDEL', KEYS[3], id)
  end
end
return out
