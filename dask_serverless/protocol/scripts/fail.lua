-- Record the first error of a run (later ones do not replace it) and tell the client.
-- KEYS: record, events, error, signal.  ARGV: ttl, error, events.
if not alive(KEYS[1]) then return false end
redis.call('SET', KEYS[3], ARGV[2], 'NX', 'EX', ARGV[1])
append_events(KEYS[2], ARGV[3], ARGV[1])
signal(KEYS[4], 'error', ARGV[1])
return 1
