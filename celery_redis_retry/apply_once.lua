-- Apply the commands of one op at most once, if its guard holds (celery_redis_retry).
--
-- KEYS[1]   the op's dedupe marker
-- KEYS[2]   the guard's key (KEYS[1] again when the op has no guard)
-- KEYS[3..] the op's own keys, declared so that Redis Cluster routes the script to
--           their slot (the marker and the guard key share it)
-- ARGV[1]   marker TTL in milliseconds
-- ARGV[2]   guard kind: '' (none), 'value', 'absent' or 'version'
-- ARGV[3]   guard hash field, '' to guard the key itself
-- ARGV[4]   the expected value (value guard) or the op's version (version guard)
-- ARGV[5]   number of commands, then for each command: its item count, its name and
--           its arguments
--
-- Returns {0} when the marker exists (applied before: nothing runs), {2} when the guard
-- fails (superseded: nothing is written), else {1, r1, r2, ...}: r is 1 for a command
-- that succeeded, or the error of one that failed. Like MULTI/EXEC, a failing command
-- does not stop the others, and the step is atomic: no client sees it half done.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end

local kind, field, condition = ARGV[2], ARGV[3], ARGV[4]
if kind == 'absent' then
  local present
  if field == '' then present = redis.call('EXISTS', KEYS[2]) else present = redis.call('HEXISTS', KEYS[2], field) end
  if present == 1 then return {2} end
elseif kind ~= '' then
  local current
  if field == '' then current = redis.call('GET', KEYS[2]) else current = redis.call('HGET', KEYS[2], field) end
  if kind == 'value' then
    if current ~= condition then return {2} end
  elseif current then
    local stored = tonumber(current)
    if not stored then
      return redis.error_reply('ERR celery_redis_retry version guard: ' .. KEYS[2] .. ' does not hold a number')
    end
    if stored >= tonumber(condition) then return {2} end
  end
end

redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
local results = {1}
local at = 6
for _ = 1, tonumber(ARGV[5]) do
  local count = tonumber(ARGV[at])
  local reply = redis.pcall(unpack(ARGV, at + 1, at + count))
  if type(reply) == 'table' and reply.err then
    results[#results + 1] = reply.err
  else
    results[#results + 1] = 1
  end
  at = at + count + 1
end

if kind == 'version' then
  -- Versions only grow: the next stale replay of this key is refused.
  if field == '' then redis.call('SET', KEYS[2], condition, 'KEEPTTL') else redis.call('HSET', KEYS[2], field, condition) end
end
return results
