-- Atomically create a federation: its spec and its v0 (blob, meta, pointers, retention, announcement).
-- Everything lives in the federation's slot; the name index (pfi:federations, another slot) is written
-- by the caller before this script (a name without a spec is ignored by every reader).
-- KEYS: 1 spec, 2 latest, 3 head, 4 adapter:0, 5 meta:0, 6 retained, 7 events, 8 depths
-- ARGV: 1 spec json, 2 blob, 3 meta json, 4 event json
local existing = redis.call('GET', KEYS[1])
if existing ~= false then
  -- A spec without any version (left half-created by an older release) with the same content is
  -- completed; anything else is a federation that exists.
  if existing ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
    return redis.error_reply('EXISTS federation exists')
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return redis.error_reply('EXISTS federation has versions but no spec')
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
redis.call('SET', KEYS[5], ARGV[3])
redis.call('SET', KEYS[2], '0')
redis.call('SET', KEYS[3], '0')
redis.call('ZADD', KEYS[6], 0, '0')
redis.call('HSET', KEYS[8], '0', 0)
redis.call('XADD', KEYS[7], 'MAXLEN', '~', '1000', '*', 'event', ARGV[4])
return 0
