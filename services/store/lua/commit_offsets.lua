-- Durably record progress of a federation that produced no new version: offsets (monotonic) and
-- stat increments (rejections), atomically. KEYS: 1 offsets, 2 stats, 3 latest
-- ARGV: 1 expected_latest, 2 n_offsets, (field, value)..., n_stats, (field, increment)...
local cur = redis.call('GET', KEYS[3])
if cur == false then cur = '' end
if cur ~= ARGV[1] then
  return redis.error_reply('CONFLICT latest is ' .. cur .. ', expected ' .. ARGV[1])
end
local i = 2
local n_offsets = tonumber(ARGV[i]); i = i + 1
local offset_args = {}
for _ = 1, n_offsets do
  local field, value = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[1], field)
  if old ~= false and tonumber(old) > tonumber(value) then
    return redis.error_reply('OFFSET_REGRESSION ' .. field .. ' ' .. old .. ' > ' .. value)
  end
  table.insert(offset_args, field); table.insert(offset_args, value)
  i = i + 2
end
local n_stats = tonumber(ARGV[i]); i = i + 1
if #offset_args > 0 then redis.call('HSET', KEYS[1], unpack(offset_args)) end
for _ = 1, n_stats do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2
end
return 1
