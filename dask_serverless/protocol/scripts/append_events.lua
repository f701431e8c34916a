-- Append a batch of events to a live run's stream. Returns 1, or nil when the run is gone.
-- KEYS: record, events.  ARGV: ttl, batch.
if not alive(KEYS[1]) then return false end
append_events(KEYS[2], ARGV[2], ARGV[1])
return 1
