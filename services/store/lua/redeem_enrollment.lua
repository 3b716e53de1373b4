-- Redeem an enrollment token and register the new client, atomically (one federation's slot).
-- KEYS[1] enrollment hash {sha256, uses, expires_at}   KEYS[2] clients hash   KEYS[3] clients epoch
-- ARGV[1] sha256 hex of the presented secret   ARGV[2] now (unix seconds)
-- ARGV[3] client_id   ARGV[4] the new client's record (JSON)
-- Returns {code, uses_left}: 1 ok; -1 unknown or expired; -2 bad secret; -3 no uses left;
-- -4 the client id is taken (no use is consumed).
local token = redis.call('HMGET', KEYS[1], 'sha256', 'uses', 'expires_at')
if not token[1] then return {-1, 0} end
local expires = tonumber(token[3])
if expires == nil or tonumber(ARGV[2]) >= expires then return {-1, 0} end
if token[1] ~= ARGV[1] then return {-2, 0} end
local uses = tonumber(token[2]) or 0
if uses <= 0 then return {-3, 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {-4, uses} end
uses = redis.call('HINCRBY', KEYS[1], 'uses', -1)
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('INCR', KEYS[3])
return {1, uses}
