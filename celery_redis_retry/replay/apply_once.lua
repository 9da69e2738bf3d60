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
-- Each stamp unit reads every stamp it needs in one HMGET (unit.seen) and writes what it
-- raises in one HSET, so a plain op costs five calls: SET NX of its marker, HMGET, the
-- command, HSET and PEXPIRE of its stamps.
local stamp, stamp_arg, stamp_ttl

-- A stamp read from Redis: a number, or nil when there is none.
local function stamp_of(value)
  if value then return tonumber(value) end
  return nil
end

-- Read the stamps of the units of one stamp key (`group`) in one HMGET: '=' and '+' of
-- the whole key (unit.key_eq, unit.key_plus), and of the unit's field or member when it
-- has one (unit.eq, unit.plus; else the whole key's).
local function read_group(key, group)
  local values
  if #group == 1 and group[1].name == '' then
    values = redis.call('HMGET', key, '=', '+')
  else
    local names = {'=', '+'}
    for _, unit in ipairs(group) do
      if unit.name ~= '' then
        names[#names + 1] = unit.eq_name
        names[#names + 1] = unit.plus_name
      end
    end
    values = redis.call('HMGET', key, unpack(names))
  end
  local key_eq, key_plus, at = stamp_of(values[1]), stamp_of(values[2]), 3
  for _, unit in ipairs(group) do
    unit.key_eq, unit.key_plus, unit.eq, unit.plus = key_eq, key_plus, key_eq, key_plus
    if unit.name ~= '' then
      unit.eq, unit.plus = stamp_of(values[at]), stamp_of(values[at + 1])
      at = at + 2
    end
  end
end

-- Units by stamp key: the keys in order, and each key's units.
local function by_key(units)
  local groups, keys = {}, {}
  for _, unit in ipairs(units) do
    local group = groups[unit.key]
    if not group then
      group = {}
      groups[unit.key] = group
      keys[#keys + 1] = unit.key
    end
    group[#group + 1] = unit
  end
  return keys, groups
end

-- Read the stamps the decisions and records of a command's units need: one HMGET per
-- stamp key (a command of many fields, like HSET, has one stamp key for all of them).
local function read_stamps(units)
  for _, unit in ipairs(units) do
    if unit.name == '' then
      unit.eq_name, unit.plus_name = '=', '+'
    else
      unit.eq_name, unit.plus_name = '=' .. unit.name, '+' .. unit.name
    end
  end
  if #units == 1 then return read_group(units[1].key, units) end
  local keys, groups = by_key(units)
  for _, key in ipairs(keys) do read_group(key, groups[key]) end
end

local function newer(seen)
  return seen ~= nil and seen > stamp
end

local function older(seen)
  return seen == nil or seen < stamp
end

-- Whether a newer write supersedes the unit (its stamps are read already).
local function superseded(unit, write_kind)
  if unit.name ~= '' and newer(unit.key_eq) then return true end
  if write_kind == '=' then return newer(unit.plus) end
  return newer(unit.eq)
end

local function raise(fields, name)
  fields[#fields + 1] = name
  fields[#fields + 1] = stamp_arg
end

-- Raise the stamps of the units of one stamp key (`group`) that a command wrote: one
-- HSET and one PEXPIRE. Stamps read before this op's own earlier commands wrote theirs
-- can only be older than or equal to the op's stamp, so deciding from them raises
-- nothing a fresh read would not.
local function record_group(key, group, write_kind)
  local unit = group[1]
  if #group == 1 and unit.name == '' and write_kind == '=' and not newer(unit.key_plus) then
    -- A whole-key overwrite makes every older field stamp meaningless: start afresh.
    redis.call('DEL', key)
    redis.call('HSET', key, '=', stamp_arg, '+', stamp_arg)
    redis.call('PEXPIRE', key, stamp_ttl)
    return
  end
  local fields, key_plus_raised = {}, false
  for _, unit in ipairs(group) do
    if unit.name == '' and write_kind == '=' and not newer(unit.key_plus) then
      -- The same, for a key a command names more than once (MSET k 1 k 2).
      redis.call('DEL', key)
      raise(fields, '=')
      raise(fields, '+')
    else
      if older(unit.plus) then raise(fields, unit.plus_name) end
      if write_kind == '=' and older(unit.eq) then raise(fields, unit.eq_name) end
      if unit.name ~= '' and not key_plus_raised and older(unit.key_plus) then
        raise(fields, '+')
        key_plus_raised = true
      end
    end
  end
  if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
  redis.call('PEXPIRE', key, stamp_ttl)
end

local function record(units, write_kind)
  if #units == 1 then return record_group(units[1].key, units, write_kind) end
  local keys, groups = by_key(units)
  for _, key in ipairs(keys) do record_group(key, groups[key], write_kind) end
end

-- A command's result for apply_once, once it ran: 1, or its error. What it wrote is
-- stamped; SET NX/XX that did not set, SETNX, HSETNX... that found the key wrote nothing.
local function ran(reply, name, units, write_kind)
  local failed = type(reply) == 'table' and reply.err
  if failed then return reply.err end
  local unwritten = reply == false or (reply == 0 and string.sub(name, -2) == 'NX')
  if not unwritten and stamp then
    record(units, write_kind)
  end
  return 1
end

-- The common op: one command and no guard. Same rules and replies as the general path
-- below, without building its tables (they were half of a replay's time in Redis).
-- Returns nil, having written nothing, when a newer write supersedes some of the
-- command's fields but not all: the general path then drops those.
local function apply_plain(KEYS, ARGV, marked)
  local count, write_kind, unit_count = tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11])
  local items_at = 12 + 4 * unit_count
  local units = {}
  if stamp and unit_count > 0 then
    for u = 1, unit_count do
      local at = 8 + 4 * u
      units[u] = { key = KEYS[tonumber(ARGV[at])], name = ARGV[at + 1], first = tonumber(ARGV[at + 2]) }
    end
    local read, failure = pcall(read_stamps, units)
    if not read then
      if marked then redis.call('DEL', KEYS[1]) end
      error(failure)
    end
    for _, unit in ipairs(units) do
      if superseded(unit, write_kind) then
        if unit_count > 1 and unit.first ~= 0 then return nil end
        if marked then redis.call('DEL', KEYS[1]) end
        return {2}
      end
    end
  end
  local reply = redis.pcall(unpack(ARGV, items_at, items_at + count - 1))
  return {1, ran(reply, ARGV[items_at], units, write_kind)}
end

-- What runs: {reply = r} when nothing does (r is what apply_once returns), else the
-- commands and, per command, the items and stamp units that still run. Reads only.
local function decide(KEYS, ARGV)
  local kind, field, condition, mode = ARGV[2], ARGV[3], ARGV[4], ARGV[5]

  if kind == 'absent' then
    local present
    if field == '' then present = redis.call('EXISTS', KEYS[2]) else present = redis.call('HEXISTS', KEYS[2], field) end
    if present == 1 then return {reply = {2}} end
  elseif kind ~= '' then
    local current
    if field == '' then current = redis.call('GET', KEYS[2]) else current = redis.call('HGET', KEYS[2], field) end
    if kind == 'value' then
      if current ~= condition then return {reply = {2}} end
    elseif current then
      local stored = tonumber(current)
      if not stored then
        return {reply = redis.error_reply('ERR celery_redis_retry version guard: ' .. KEYS[2]
                                          .. ' does not hold a number')}
      end
      if stored >= tonumber(condition) then return {reply = {2}} end
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
    if stamp then read_stamps(command.units) end
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

  if not any_runs then return {reply = {2}} end
  if mode == 't' then
    for i = 1, #commands do
      if not runs[i] then return {reply = {2}} end
    end
  end
  return {commands = commands, runs = runs}
end

local function apply_once(KEYS, ARGV)
  local marker_ttl, kind, field, condition = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
  stamp_arg, stamp_ttl = ARGV[6], ARGV[7]
  stamp = tonumber(stamp_arg)

  -- The marker is taken first, in the call that also tells whether it was there; an op
  -- that then runs nothing (or meets an error before any command) gives it back, so the
  -- marker exists exactly when the op's commands ran.
  local marked = marker_ttl > 0
  if marked and not redis.call('SET', KEYS[1], '1', 'NX', 'PX', marker_ttl) then return {0} end
  if kind == '' and tonumber(ARGV[8]) == 1 then
    local reply = apply_plain(KEYS, ARGV, marked)
    if reply then return reply end
  end
  local read, decision = pcall(decide, KEYS, ARGV)
  if not read or decision.reply then
    if marked then redis.call('DEL', KEYS[1]) end
    if not read then error(decision) end
    return decision.reply
  end
  local commands, runs = decision.commands, decision.runs

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
      results[#results + 1] = ran(redis.pcall(unpack(items)), items[1], keep.units, command.kind)
    end
  end

  if kind == 'version' then
    -- Versions only grow: the next stale replay of this key is refused.
    if field == '' then redis.call('SET', KEYS[2], condition, 'KEEPTTL') else redis.call('HSET', KEYS[2], field, condition) end
  end
  return results
end
