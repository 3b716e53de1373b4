-- Move the latest pointer to a retained version; never rewrites a blob.
-- KEYS: 1 latest, 2 retained, 3 optimizer, 4 events. ARGV: 1 target version, 2 event json
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false then
  return redis.error_reply('NOT_RETAINED ' .. ARGV[1])
end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '1000', '*', 'event', ARGV[2])
return previous
