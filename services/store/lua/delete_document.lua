-- Delete one document of a user's retrieval store, atomically; the last one takes both keys with it.
-- KEYS[1] the user's documents hash   KEYS[2] the user's document-order zset
-- KEYS[3] the federation's document-generation counter
-- ARGV[1] document id
-- Returns the user's new generation (0: no documents left, keys deleted), or -1 if there was no such
-- document (nothing changed).
local id = ARGV[1]
local raw = redis.call('HGET', KEYS[1], 'd:' .. id)
if not raw then return -1 end
local rec = cjson.decode(raw)
local n = tonumber(rec['chunks'])
for i = 0, n - 1 do
  redis.call('HDEL', KEYS[1], 't:' .. id .. ':' .. i, 'v:' .. id .. ':' .. i)
end
redis.call('HDEL', KEYS[1], 'd:' .. id)
redis.call('ZREM', KEYS[2], id)
redis.call('INCR', KEYS[3])
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
local g = redis.call('GET', KEYS[3])
redis.call('HINCRBY', KEYS[1], 'n', -n)
redis.call('HINCRBY', KEYS[1], 'b', -tonumber(rec['bytes']))
redis.call('HSET', KEYS[1], 'g', g)
return tonumber(g)
