-- Store a new version of a user's personal adapter and announce it, atomically (one federation's slot).
-- KEYS[1] the user's adapter hash {version, blob, meta}   KEYS[2] user-events stream
-- KEYS[3] user-generations hash (user digest -> generation)
-- ARGV[1] blob   ARGV[2] meta (JSON, without the version)   ARGV[3] user digest   ARGV[4] blob digest
-- ARGV[5] the stream's approximate MAXLEN
-- Returns {version, generation} written.
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'blob', ARGV[1], 'meta', ARGV[2])
local g = redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'op', 'put', 'user', ARGV[3], 'version', v,
  'digest', ARGV[4], 'generation', g)
return {v, g}
