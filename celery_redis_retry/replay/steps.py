"""The Lua steps a replay runs, and their arguments.

``apply_once.lua`` applies one op at most once, under its guard, where no newer write is
stamped; ``apply_batch.lua`` runs it for each op of a batch in one script call, the ops
packed as one MessagePack argument (:func:`packed`) instead of one EVALSHA of twenty-odd
arguments each, which redis-py would encode one by one. A registered script runs inside
a wrapper that adds its dedupe marker (:func:`wrap_user_script`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from celery_redis_retry.ops import Arg

_HERE = Path(__file__).parent


#: The Lua step replays run: ``apply_once.lua`` applies one op, ``apply_batch.lua`` runs it
#: for each op of a batch (a single op is a batch of one).
APPLY = (_HERE / "apply_once.lua").read_text() + (_HERE / "apply_batch.lua").read_text()


#: Ops in one Lua step at most. Redis serves no other client while a script runs: a step
#: of a few hundred ops takes about a millisecond, no longer than one slow command.
STEP_OPS = 200


# A registered script runs inside this wrapper, which adds the dedupe marker as the last
# key and its TTL as the last argument, then calls the user's code with the rest.
SCRIPT_WRAPPER = """\
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', ARGV[#ARGV]) then
  return redis.status_reply('CRR-ALREADY-APPLIED')
end
local keys, argv = {}, {}
for i = 1, #KEYS - 1 do keys[i] = KEYS[i] end
for i = 1, #ARGV - 1 do argv[i] = ARGV[i] end
local user_script = function(KEYS, ARGV)
%s
end
return user_script(keys, argv)
"""


@dataclass(frozen=True)
class Call:
    """One Lua step to run: which script, its keys and its arguments."""

    script: str  # "apply_once" or "user:<name>"
    source: str
    keys: list[Arg]
    args: list[Arg]
    commands: int  # how many of the op's commands it applies (for the per-command outcome)


def packed(calls: list[Call]) -> bytes:
    """The ``apply_batch.lua`` argument for ``calls``: their KEYS and ARGV, MessagePack.

    Lua reads numbers as doubles: every value of the op (command items, guard) is a
    string already (see :func:`strings`); the numbers of the step itself (counts, TTLs,
    the stamp, at most 2**53 microseconds) are exact as they are.
    """
    # Redis's cmsgpack reads no "bin" type: bytes go as the raw (string) type it does read.
    blob: bytes = msgpack.packb([[call.keys, call.args] for call in calls], use_bin_type=False)
    return blob


def strings(items: Sequence[Arg]) -> list[Any]:
    """``items`` as redis-py would send them: numbers as their repr, so that Lua gets them exact."""
    return [item if type(item) in _AS_IS else repr(item) for item in items]


_AS_IS = frozenset((str, bytes))


def sha(source: str) -> str:
    """The SHA1 digest Redis knows ``source`` by (computed once per source)."""
    return _shas.get(source) or _shas.setdefault(source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


_shas: dict[str, str] = {}


def wrap_user_script(source: str) -> str:
    """A registered script's ``source`` inside :data:`SCRIPT_WRAPPER`."""
    # A "#!lua flags=..." shebang must stay on the first line.
    if source.startswith("#!"):
        shebang, _, body = source.partition("\n")
        return shebang + "\n" + SCRIPT_WRAPPER % body
    return SCRIPT_WRAPPER % source
