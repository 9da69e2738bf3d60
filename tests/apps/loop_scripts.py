"""The Lua scripts the loop tests register (``redis_retry_scripts``), shared by the app and the tests."""

SCRIPTS = {
    "bump": "return redis.call('INCRBY', KEYS[1], ARGV[1])",
    "set_pair": "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[2]); return 1",
    # Records when the op was applied, by the server's clock: capture-to-applied latency.
    "stamp": "local t = redis.call('TIME'); "
             "return redis.call('SET', KEYS[1], string.format('%d.%06d', t[1], t[2]))",
}
