-- Revoke a client of a federation's registry, atomically (one federation's slot).
-- KEYS[1] clients hash (client_id -> JSON record)   KEYS[2] clients epoch
-- ARGV[1] client_id   ARGV[2] now (unix seconds)
-- Returns the new record's JSON, or false when the client is unknown or already revoked.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local rec = cjson.decode(raw)
if rec['status'] == 'revoked' then return false end
rec['status'] = 'revoked'
rec['revoked_at'] = tonumber(ARGV[2])
local out = cjson.encode(rec)
redis.call('HSET', KEYS[1], ARGV[1], out)
redis.call('INCR', KEYS[2])
return out
