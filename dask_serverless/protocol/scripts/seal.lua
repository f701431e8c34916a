-- Store the result and end the run's life in one step: later writes by stragglers and
-- duplicates find no record and do nothing.
-- KEYS: record, result.  ARGV: ttl, result.
if not alive(KEYS[1]) then return false end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
redis.call('DEL', KEYS[1])
return 1
