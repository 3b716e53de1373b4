-- Atomically commit a new global adapter version together with the consumed Kafka offsets.
-- KEYS: 1 latest, 2 head, 3 adapter:new, 4 meta:new, 5 offsets, 6 seen (legacy set, read only),
--       7 retained, 8 stats, 9 optimizer, 10 accountant, 11 events, 12 pinned,
--       13 seen window (zset member -> lineage depth of its base version), 14 depths (hash version -> depth)
-- ARGV: 1 expected_latest ('' = must not exist), 2 expected_head ('' = must not exist), 3 new version,
--       4 blob, 5 meta json, 6 optimizer blob ('' = delete), 7 accountant json ('' = keep), 8 keep_n,
--       9 adapter key prefix, 10 event json, 11 n_offsets, then n_offsets (field, value) pairs,
--       then n_ids, (seen member client_id/update_id, base version) pairs...,
--       then n_stats, (field, increment) pairs..., then max_staleness ('' = keep every seen member).
--
-- The seen window: a version's depth is its parent's + 1 (v0: 0). A member is scored with the depth of
-- its update's base version. Every later latest descends from a version retained now (a new version's
-- parent is the latest; a rollback target is retained), and an update is refused when its base is more
-- than max_staleness versions up that lineage, so a member whose base depth is below
-- min(depth of the retained versions) - max_staleness can never be accepted again: it is dropped.
-- Versions without a depth (committed before depths existed) switch the pruning off.
local function get_or_empty(key)
  local v = redis.call('GET', key)
  if v == false then return '' end
  return v
end
if get_or_empty(KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('CONFLICT latest is ' .. get_or_empty(KEYS[1]) .. ', expected ' .. ARGV[1])
end
if get_or_empty(KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('CONFLICT head is ' .. get_or_empty(KEYS[2]) .. ', expected ' .. ARGV[2])
end
local i = 11
local n_offsets = tonumber(ARGV[i]); i = i + 1
local offset_args = {}
for _ = 1, n_offsets do
  local field, value = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[5], field)
  if old ~= false and tonumber(old) > tonumber(value) then
    return redis.error_reply('OFFSET_REGRESSION ' .. field .. ' ' .. old .. ' > ' .. value)
  end
  table.insert(offset_args, field); table.insert(offset_args, value)
  i = i + 2
end
local n_ids = tonumber(ARGV[i]); i = i + 1
local scored = {}
for _ = 1, n_ids do
  local member, base = ARGV[i], ARGV[i + 1]
  if redis.call('ZSCORE', KEYS[13], member) ~= false or redis.call('SISMEMBER', KEYS[6], member) == 1 then
    return redis.error_reply('DUPLICATE ' .. member)
  end
  local depth = redis.call('HGET', KEYS[14], base)
  table.insert(scored, depth ~= false and depth or '+inf'); table.insert(scored, member)
  i = i + 2
end
local n_stats = tonumber(ARGV[i]); i = i + 1
local version = ARGV[3]
redis.call('SET', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5])
redis.call('SET', KEYS[1], version)
redis.call('SET', KEYS[2], version)
if #offset_args > 0 then redis.call('HSET', KEYS[5], unpack(offset_args)) end
if #scored > 0 then redis.call('ZADD', KEYS[13], unpack(scored)) end
for _ = 1, n_stats do
  redis.call('HINCRBY', KEYS[8], ARGV[i], ARGV[i + 1]); i = i + 2
end
local max_staleness = ARGV[i]
local parent_depth = redis.call('HGET', KEYS[14], ARGV[1])
if parent_depth ~= false then redis.call('HSET', KEYS[14], version, tonumber(parent_depth) + 1) end
if ARGV[6] == '' then redis.call('DEL', KEYS[9]) else redis.call('SET', KEYS[9], ARGV[6]) end
if ARGV[7] ~= '' then redis.call('SET', KEYS[10], ARGV[7]) end
redis.call('ZADD', KEYS[7], tonumber(version), version)
redis.call('XADD', KEYS[11], 'MAXLEN', '~', '1000', '*', 'event', ARGV[10])
-- Retention: keep the newest keep_n blobs, plus pinned versions and the latest pointer.
local keep = tonumber(ARGV[8])
local old = redis.call('ZRANGE', KEYS[7], 0, -(keep + 1))
for _, v in ipairs(old) do
  if redis.call('SISMEMBER', KEYS[12], v) == 0 and v ~= version then
    redis.call('DEL', ARGV[9] .. v)
    redis.call('ZREM', KEYS[7], v)
  end
end
if max_staleness ~= nil and max_staleness ~= '' then
  local floor = nil
  for _, v in ipairs(redis.call('ZRANGE', KEYS[7], 0, -1)) do
    local d = redis.call('HGET', KEYS[14], v)
    if d == false then floor = nil; break end
    d = tonumber(d)
    if floor == nil or d < floor then floor = d end
  end
  if floor ~= nil and floor - tonumber(max_staleness) > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[13], '-inf', '(' .. (floor - tonumber(max_staleness)))
  end
end
return tonumber(version)
