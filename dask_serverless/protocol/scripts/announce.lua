-- Tell the client the result is ready — unless the client already gave up and purged it
-- (after seal the record is gone, so here the result's existence is the run's life).
-- KEYS: result, events, signal.  ARGV: ttl, events.
if not alive(KEYS[1]) then return false end
append_events(KEYS[2], ARGV[2], ARGV[1])
signal(KEYS[3], 'finished', ARGV[1])
return 1
