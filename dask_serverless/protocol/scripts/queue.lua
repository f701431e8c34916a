-- Note invocations about to be sent, so that they count in the run's load and a client
-- can send again one that never started (lost in a Redis blip). Guarded like every write:
-- nothing recreates a key of a run that is gone (I-4).
-- KEYS: record, queued.  ARGV: ttl, (invocation, payload)...
if not alive(KEYS[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
