-- Take every lapsed lease (its worker died) with its restart point, so that exactly one
-- watcher re-invokes it. Returns a flat list: id, tasks (JSON), id, tasks, ...
-- KEYS: record, leases, restart.
if not alive(KEYS[1]) then return {} end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms())
local out = {}
for _, id in ipairs(lapsed) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or '[]'
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return out
