-- Replay an op at most once, if its guard holds, and only where no newer write is
-- stamped (celery_redis_retry). This file defines apply_once(KEYS, ARGV) for one op;
-- apply_batch.lua, appended to it, runs it for each op of a batch in one script call.
-- The stamps are written by write_stamped.lua, which sends the application's own
-- writes, and by this script for what it applies.
--
-- The op's KEYS and ARGV (its own, not the script call's):
-- KEYS[1]   the op's dedupe marker (any key of the slot when ARGV[1] is 0: no marker)
-- KEYS[2]   the guard's key (KEYS[1] again when the op has no guard)
-- KEYS[3..] the write-stamp keys, then the op's own keys; the marker, guard and stamps
--           share the op's Redis Cluster slot, and so do all the ops of one script call
-- ARGV[1]   marker TTL in milliseconds, 0 for no marker
-- ARGV[2]   guard kind: '' (none), 'value', 'absent' or 'version'
-- ARGV[3]   guard hash field, '' to guard the key itself
-- ARGV[4]   the expected value (value guard) or the op's version (version guard)
-- ARGV[5]   'r': each command applied where it is not superseded;
--           't': applied whole or not at all (a transaction)
-- ARGV[6]   the write's stamp, microseconds since the epoch at issue ('' for no stamps)
-- ARGV[7]   stamp TTL in milliseconds
-- ARGV[8]   number of commands, then for each command: its item count, its write kind
--           ('=' overwrites, '+' builds on what is there), its number of stamp units,
--           each unit as (index of its stamp key in KEYS, unit name: '' for the whole
--           key or '.'..field, first item it covers, item count; 0 0 for the whole
--           command), then the command's items
--
-- Returns {0} when the marker exists (applied before: nothing runs), {2} when
-- the guard fails or every command is superseded (nothing is written), else
-- {1, r1, r2, ...}: r is 1 for a command that ran, 2 for one superseded by a newer
-- write, or the error of one that failed. Like MULTI/EXEC, a failing command does not
-- stop the others, and the step is atomic: no client sees it half done.
-- Stamps per key: '=' last overwrite of the whole key, '+' last write of any kind to
-- it, '=.f' / '+.f' the same for one field or member. An overwrite is superseded by any
-- newer write to what it overwrites; a write that builds on the value (INCRBY, LPUSH)
-- only by a newer overwrite, so increments made before and after an outage all count.
-- The helpers are made once per script call, not per op: they read the op's stamp here.
local stamp, stamp_arg, stamp_ttl

local function newer(key, name)
  local seen = redis.call('HGET', key, name)
  return seen and tonumber(seen) > stamp
end

local function superseded(unit, write_kind)
  if unit.name ~= '' and newer(unit.key, '=') then return true end
  if write_kind == '=' then return newer(unit.key, '+' .. unit.name) end
  return newer(unit.key, '=' .. unit.name)
end

local function raise(key, name)
  local seen = redis.call('HGET', key, name)
  if not seen or tonumber(seen) < stamp then redis.call('HSET', key, name, stamp_arg) end
end

local function record(unit, write_kind)
  if unit.name == '' and write_kind == '=' and not newer(unit.key, '+') then
    -- A whole-key overwrite makes every older field stamp meaningless: start afresh.
    redis.call('DEL', unit.key)
    redis.call('HSET', unit.key, '=', stamp_arg, '+', stamp_arg)
  else
    raise(unit.key, '+' .. unit.name)
    if write_kind == '=' then raise(unit.key, '=' .. unit.name) end
    if unit.name ~= '' then raise(unit.key, '+') end
  end
  redis.call('PEXPIRE', unit.key, stamp_ttl)
end

local function apply_once(KEYS, ARGV)
  local marker_ttl, kind, field, condition = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
  local mode = ARGV[5]
  stamp_arg, stamp_ttl = ARGV[6], ARGV[7]
  stamp = tonumber(stamp_arg)

  if marker_ttl > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
    return {0}
  end

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

  -- Read the commands and their stamp units.
  local commands = {}
  local at = 9
  for i = 1, tonumber(ARGV[8]) do
    local count, write_kind, unit_count = tonumber(ARGV[at]), ARGV[at + 1], tonumber(ARGV[at + 2])
    local units = {}
    at = at + 3
    for u = 1, unit_count do
      units[u] = { key = KEYS[tonumber(ARGV[at])], name = ARGV[at + 1], first = tonumber(ARGV[at + 2]),
                   count = tonumber(ARGV[at + 3]) }
      at = at + 4
    end
    commands[i] = { first = at, count = count, kind = write_kind, units = units }
    at = at + count
  end

  -- Decide, per command, which items still run: all, some (fields superseded), or none.
  local runs, any_runs = {}, false
  for i, command in ipairs(commands) do
    local keep = { units = {}, dropped = {} }
    local whole_superseded, partial_left = false, false
    for _, unit in ipairs(command.units) do
      if stamp and superseded(unit, command.kind) then
        if unit.first == 0 then
          whole_superseded = true
        else
          for p = unit.first, unit.first + unit.count - 1 do keep.dropped[p] = true end
        end
      else
        keep.units[#keep.units + 1] = unit
        if unit.first ~= 0 then partial_left = true end
      end
    end
    local has_partial_units = #command.units > 0 and command.units[1].first ~= 0
    if whole_superseded or (has_partial_units and not partial_left) then
      keep = nil
    else
      any_runs = true
    end
    runs[i] = keep
  end

  if not any_runs then return {2} end
  if mode == 't' then
    for i = 1, #commands do
      if not runs[i] then return {2} end
    end
  end

  if marker_ttl > 0 then redis.call('SET', KEYS[1], '1', 'PX', marker_ttl) end

  local results = {1}
  for i, command in ipairs(commands) do
    local keep = runs[i]
    if not keep then
      results[#results + 1] = 2
    else
      local items
      if next(keep.dropped) == nil then
        items = { unpack(ARGV, command.first, command.first + command.count - 1) }
      else
        items = {}
        for p = 1, command.count do
          if not keep.dropped[p] then items[#items + 1] = ARGV[command.first + p - 1] end
        end
      end
      local reply = redis.pcall(unpack(items))
      local failed = type(reply) == 'table' and reply.err
      -- SET NX/XX that did not set, SETNX, HSETNX... that found the key: nothing was written.
      local unwritten = reply == false or (reply == 0 and string.sub(items[1], -2) == 'NX')
      if not failed and not unwritten and stamp then
        for _, unit in ipairs(keep.units) do record(unit, command.kind) end
      end
      results[#results + 1] = failed and reply.err or 1
    end
  end

  if kind == 'version' then
    -- Versions only grow: the next stale replay of this key is refused.
    if field == '' then redis.call('SET', KEYS[2], condition, 'KEEPTTL') else redis.call('HSET', KEYS[2], field, condition) end
  end
  return results
end
