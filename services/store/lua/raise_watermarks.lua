-- Monotonically raise a federation's partition watermarks (fields of its offsets hash, its slot).
-- KEYS: 1 offsets. ARGV: (field, value) pairs. A lower value never overwrites a higher one.
for i = 1, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old == false or tonumber(old) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
