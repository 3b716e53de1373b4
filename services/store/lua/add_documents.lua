-- Add (or replace) documents of one user's retrieval store, atomically, within the user's limits.
-- KEYS[1] the user's documents hash   KEYS[2] the user's document-order zset
-- KEYS[3] the federation's document-generation counter
-- ARGV[1] max chunks per user   ARGV[2] max stored bytes per user   ARGV[3] number of documents D
-- then per document: id, record (JSON with "chunks" and "bytes"), n (chunks), then n chunk texts,
-- then n embeddings (float32 bytes).
-- Returns {generation, chunks, bytes} written, or {-1, chunks} / {-2, bytes} (over a limit: nothing
-- written).
local max_chunks = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local chunks = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
local docs = {}
local pos = 4
for _ = 1, count do
  local id, record, n = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2])
  local new = cjson.decode(record)
  local old_raw = redis.call('HGET', KEYS[1], 'd:' .. id)
  local old_chunks = 0
  if old_raw then
    local old = cjson.decode(old_raw)
    old_chunks = tonumber(old['chunks'])
    chunks = chunks - old_chunks
    bytes = bytes - tonumber(old['bytes'])
  end
  chunks = chunks + n
  bytes = bytes + tonumber(new['bytes'])
  docs[#docs + 1] = {id, record, n, pos + 3, old_chunks}
  pos = pos + 3 + 2 * n
end
if chunks > max_chunks then return {-1, chunks} end
if bytes > max_bytes then return {-2, bytes} end
for _, doc in ipairs(docs) do
  local id, record, n, first, old_chunks = doc[1], doc[2], doc[3], doc[4], doc[5]
  for i = 0, old_chunks - 1 do
    redis.call('HDEL', KEYS[1], 't:' .. id .. ':' .. i, 'v:' .. id .. ':' .. i)
  end
  for i = 0, n - 1 do
    redis.call('HSET', KEYS[1], 't:' .. id .. ':' .. i, ARGV[first + i], 'v:' .. id .. ':' .. i, ARGV[first + n + i])
  end
  redis.call('HSET', KEYS[1], 'd:' .. id, record)
  redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[1], 's', 1), id)
end
local g = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'n', chunks, 'b', bytes, 'g', g)
return {g, chunks, bytes}
