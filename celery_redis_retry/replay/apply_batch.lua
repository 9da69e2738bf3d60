
-- Run apply_once for each op of a batch: one script call instead of one per op.
--
-- KEYS[1]  a key of the slot every op of the batch lives in (Redis Cluster routes the
--          call by it; each op's own keys share that slot, so the step stays atomic)
-- ARGV[1]  the ops as MessagePack: an array of [KEYS, ARGV] pairs, each what apply_once
--          takes for one op, every item a string
--
-- Returns one reply per op, in order: what apply_once returned for it (an op whose guard
-- finds a non-number gets its error reply in its place; the others still run).
local replies = {}
for i, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  replies[i] = apply_once(op[1], op[2])
end
return replies
