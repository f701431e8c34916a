-- Publish a finished task: store its output, append events, count it once in every fan-in
-- child's inbox and claim the children it made ready (I-3), idempotently. The children this caller won
-- are only runnable by it now, so they join its lease's restart point — added to it when
-- the caller has other work pending (only the old point leads back to that), else
-- replacing it. A caller with nothing else to do that won nothing hands its lease back.
-- Returns the run's load (running plus queued invocations) followed by the 1-based
-- positions of the won children among the inboxes, or nil when the run is gone.
--
-- KEYS: record, events, leases, restart, queued, [output], inbox...
-- ARGV: ttl, output_mode, output, parent, events, invocation, after, (child, needed)...
--   output_mode: 'none' (no output key: nothing to store, or — on a Redis Cluster,
--     where the output has a hash slot of its own — the caller stored it just before),
--     'value' (store ARGV[3] in KEYS[6]) or 'preset' (the caller SET KEYS[6] just before,
--     in the same pipeline, so that Redis never copies a large value into Lua; nothing is
--     counted if that SET was refused, and the output is deleted again if the run is gone);
--   events: a batch to append, or '' for none;
--   after: what the caller does if it wins nothing — 'release' (its lease), 'keep'
--     (it still has work; won children join the old restart point) or 'replace' (it
--     continues with the won children only).
local ttl, mode, after = ARGV[1], ARGV[2], ARGV[7]
-- Who claims a ready child: this parent in this invocation. A client that sent the script
-- again (its reply was lost to a dropped connection or a failover) wins the same children
-- again instead of none, so no ready child is left without a worker (I-3 either way:
-- any other report of the parent is another invocation and wins nothing).
local claim = ARGV[4] .. '@' .. ARGV[6]
local first_inbox = 6
if mode ~= 'none' then first_inbox = 7 end
if not alive(KEYS[1]) then
  if mode == 'preset' then redis.call('DEL', KEYS[6]) end
  return false
end
if mode == 'preset' and redis.call('EXISTS', KEYS[6]) == 0 then
  return redis.error_reply('output ' .. KEYS[6] .. ' was not stored')
end
if mode == 'value' then redis.call('SET', KEYS[6], ARGV[3], 'EX', ttl) end
if ARGV[5] ~= '' then append_events(KEYS[2], ARGV[5], ttl) end
local won, children = {}, {}
local first_child = 8
for i = first_inbox, #KEYS do
  local inbox, position = KEYS[i], i - first_inbox + 1
  local child = ARGV[first_child + 2 * (position - 1)]
  local needed = tonumber(ARGV[first_child + 2 * (position - 1) + 1])
  redis.call('HSETNX', inbox, ARGV[4], '1')
  redis.call('EXPIRE', inbox, ttl)
  if redis.call('HLEN', inbox) >= needed then
    local owner = redis.call('HGET', inbox, CLAIMED)
    if not owner then
      redis.call('HSET', inbox, CLAIMED, claim)
      owner = claim
    end
    if owner == claim then
      won[#won + 1] = position
      children[#children + 1] = tonumber(child)
    end
  end
end
if #won > 0 then
  if after == 'keep' then
    local old = redis.call('HGET', KEYS[4], ARGV[6])
    if old then
      local seen = {}
      for _, node in ipairs(children) do seen[node] = true end
      for _, node in ipairs(cjson.decode(old)) do
        if not seen[node] then children[#children + 1] = node end
      end
    end
  end
  redis.call('HSET', KEYS[4], ARGV[6], cjson.encode(children))
elseif after == 'release' then
  redis.call('ZREM', KEYS[3], ARGV[6])
  redis.call('HDEL', KEYS[4], ARGV[6])
end
local load = redis.call('ZCARD', KEYS[3]) + redis.call('HLEN', KEYS[5])
table.insert(won, 1, load)
return won
