-- Keep a running invocation's lease; 0 tells the worker its run is gone (cancelled).
-- KEYS: record, leases.  ARGV: invocation, lease_ms.
if not alive(KEYS[1]) then return 0 end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
