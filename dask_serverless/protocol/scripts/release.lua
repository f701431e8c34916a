-- Hand back a lease: the invocation ended without leaving work only it could do.
-- KEYS: leases, restart.  ARGV: invocation.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
