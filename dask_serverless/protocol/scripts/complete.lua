-- Publish a finished task: store its output, append events, count it once in every fan-in
-- child's inbox and claim the children it made ready (I-3). The children this caller won
-- are only runnable by it now, so they join its lease's restart point — added to it when
-- the caller has other work pending (only the old point leads back to that), else
-- replacing it. A caller with nothing else to do that won nothing hands its lease back.
-- Returns the run's load (running plus queued invocations) followed by the 1-based
-- positions of the won children among the inboxes, or nil when the run is gone.
--
-- KEYS: record, events, output, leases, restart, queued, inbox...
-- ARGV: ttl, output_mode, output, parent, events, invocation, after, (child, needed)...
--   output_mode: 'none' (nothing to store), 'value' (store ARGV[3]) or 'preset' (the
--     caller SET the output just before, so that Redis never copies a large value into
--     Lua; it is deleted again if the run is gone meanwhile);
--   events: a batch to append, or '' for none;
--   after: what the caller does if it wins nothing — 'release' (its lease), 'keep'
--     (it still has work; won children join the old restart point) or 'replace' (it
--     continues with the won children only).
local ttl, mode, after = ARGV[1], ARGV[2], ARGV[7]
if not alive(KEYS[1]) then
  if mode == 'preset' then redis.call('DEL', KEYS[3]) end
  return false
end
if mode == 'value' then redis.call('SET', KEYS[3], ARGV[3], 'EX', ttl) end
if ARGV[5] ~= '' then append_events(KEYS[2], ARGV[5], ttl) end
local won, children = {}, {}
local first_child = 8
for i = 7, #KEYS do
  local inbox, position = KEYS[i], i - 6
  local child = ARGV[first_child + 2 * (position - 1)]
  local needed = tonumber(ARGV[first_child + 2 * (position - 1) + 1])
  redis.call('HSETNX', inbox, ARGV[4], '1')
  redis.call('EXPIRE', inbox, ttl)
  if redis.call('HLEN', inbox) >= needed and redis.call('HSETNX', inbox, CLAIMED, '1') == 1 then
    won[#won + 1] = position
    children[#children + 1] = tonumber(child)
  end
end
if #won > 0 then
  if after == 'keep' then
    local old = redis.call('HGET', KEYS[5], ARGV[6])
    if old then
      for _, node in ipairs(cjson.decode(old)) do children[#children + 1] = node end
    end
  end
  redis.call('HSET', KEYS[5], ARGV[6], cjson.encode(children))
elseif after == 'release' then
  redis.call('ZREM', KEYS[4], ARGV[6])
  redis.call('HDEL', KEYS[5], ARGV[6])
end
local load = redis.call('ZCARD', KEYS[4]) + redis.call('HLEN', KEYS[6])
table.insert(won, 1, load)
return won
