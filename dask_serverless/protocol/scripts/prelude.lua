-- Shared by every script of dask-serverless: prepended to each when it is loaded
-- (`python -m dask_serverless.protocol.scripts NAME` prints a whole script, ready for
-- `redis-cli --eval`).

-- A run is alive while its record exists. Every write of a worker checks this first, so
-- nothing is written after the run finished, failed, timed out or was purged (I-4).
local function alive(record_key)
  return redis.call('EXISTS', record_key) == 1
end

-- Milliseconds on the Redis server's clock: leases never depend on a worker's clock.
local function now_ms()
  local now = redis.call('TIME')
  return now[1] * 1000 + math.floor(now[2] / 1000)
end

-- Append one batch of events to the run's stream; every run key carries the run's TTL.
local function append_events(events_key, batch, ttl)
  redis.call('XADD', events_key, '*', 'e', batch)
  redis.call('EXPIRE', events_key, ttl)
end

-- Wake a client that sleeps in BLPOP on the run's signal list.
local function signal(signal_key, what, ttl)
  redis.call('RPUSH', signal_key, what)
  redis.call('EXPIRE', signal_key, ttl)
end

-- The field of a fan-in inbox that marks its node as claimed by one worker (I-3).
local CLAIMED = '!'
