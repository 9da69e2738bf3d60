-- Send one write as the application issued it, and stamp what it wrote (celery_redis_retry).
-- The direct-write half of apply_once.lua, kept lean: it runs on every wrapped write.
--
-- KEYS      the write-stamp keys, then the command's own keys (so that Redis Cluster routes
--           the script to their slot), then the dedupe marker when ARGV[3] is not 0
-- ARGV[1]   the write's stamp, microseconds since the epoch at issue ('' for no stamps)
-- ARGV[2]   stamp TTL in milliseconds
-- ARGV[3]   marker TTL in milliseconds, 0 for no marker
-- ARGV[4]   write kind: '=' overwrites, '+' builds on what is there
-- ARGV[5]   number of stamp units, then each as (index of its stamp key in KEYS, unit name:
--           '' for the whole key or '.'..field), then the command's items
--
-- Returns the command's reply as Redis gave it (errors included). The stamps follow the
-- rules of apply_once.lua; a write that wrote nothing (SET NX that found the key) stamps
-- nothing. With a marker, the reply is stored in it, and a second run of the same write
-- (a client retrying after a lost reply) returns that reply without running again.
local stamp_arg, stamp_ttl, marker_ttl, kind = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local first = 6 + 2 * tonumber(ARGV[5])
local marker = KEYS[#KEYS]

if marker_ttl > 0 then
  local seen = redis.call('GET', marker)
  if seen then
    local tag, body = string.sub(seen, 1, 1), string.sub(seen, 2)
    if tag == 'i' then return tonumber(body) end
    if tag == 'b' then return body end
    if tag == 's' then return redis.status_reply(body) end
    if tag == 'j' then return cjson.decode(body) end
    return false
  end
end

local reply = redis.pcall(unpack(ARGV, first))
if type(reply) == 'table' and reply.err then return reply end

local wrote = reply ~= false and not (reply == 0 and string.sub(ARGV[first], -2) == 'NX')
if stamp_arg ~= '' and wrote then
  local stamp = tonumber(stamp_arg)
  local function raise(key, name)
    local seen = redis.call('HGET', key, name)
    if not seen or tonumber(seen) < stamp then redis.call('HSET', key, name, stamp_arg) end
  end
  for at = 6, first - 1, 2 do
    local key, unit = KEYS[tonumber(ARGV[at])], ARGV[at + 1]
    if unit == '' and kind == '=' then
      local plus = redis.call('HGET', key, '+')
      if not plus or tonumber(plus) <= stamp then
        -- A whole-key overwrite makes every older field stamp meaningless: start afresh.
        if redis.call('HLEN', key) > 2 then redis.call('DEL', key) end
        redis.call('HSET', key, '=', stamp_arg, '+', stamp_arg)
      else
        raise(key, '=')
      end
    else
      raise(key, '+' .. unit)
      if kind == '=' then raise(key, '=' .. unit) end
      if unit ~= '' then raise(key, '+') end
    end
    redis.call('PEXPIRE', key, stamp_ttl)
  end
end

if marker_ttl > 0 then
  local stored
  local t = type(reply)
  if t == 'number' then stored = 'i' .. reply
  elseif t == 'string' then stored = 'b' .. reply
  elseif t == 'table' and reply.ok then stored = 's' .. reply.ok
  elseif t == 'table' then stored = 'j' .. cjson.encode(reply)
  else stored = 'n' end
  redis.call('SET', marker, stored, 'PX', marker_ttl)
end
return reply
