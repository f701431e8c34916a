-- Start an invocation: nil if the run is gone, {0} for a duplicate delivery (I-3), else
-- take it out of the queued invocations, take its lease, note where to restart it from,
-- and return {1} and, when asked, the run record.
-- KEYS: record, inv, leases, restart, queued.
-- ARGV: invocation, ttl, record ('send' or 'skip'), lease_ms, tasks (JSON list).
if not alive(KEYS[1]) then return false end
if redis.call('HSETNX', KEYS[2], ARGV[1], '1') == 0 then return {0} end
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
if ARGV[3] == 'send' then return {1, redis.call('GET', KEYS[1])} end
return {1}
