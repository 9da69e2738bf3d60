"""Signing of wire messages: HMAC-SHA256 over the canonical bytes, with rotatable keys.

See :mod:`celery_redis_retry.message` for where the signature sits in a message.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from celery_redis_retry.errors import SignatureError

_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_SIG_TAIL = re.compile(rb',"sig":\{"kid":"([A-Za-z0-9._-]{1,64})","mac":"([0-9a-f]{64})"\}\}\Z')


class Signer:
    """HMAC-SHA256 signing and verification with a set of keys (key id -> secret).

    The first key signs; every key verifies, so a key can be rotated by putting the
    new one first and removing the old one once no message signed with it remains.
    """

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        for key_id in keys:
            if not _KEY_ID.match(key_id):
                raise ValueError(f"signing key id {key_id!r} must match [A-Za-z0-9._-]{{1,64}}")
        self._keys = dict(keys)
        self.key_id = next(iter(self._keys))

    def _mac(self, key_id: str, canonical: bytes) -> bytes:
        return hmac.new(self._keys[key_id], canonical, hashlib.sha256).hexdigest().encode("ascii")

    def sign(self, raw: bytes) -> bytes:
        """``raw`` (an unsigned message) with its signature appended as the last member."""
        mac = self._mac(self.key_id, raw)
        return b"%s,\"sig\":{\"kid\":\"%s\",\"mac\":\"%s\"}}" % (raw[:-1], self.key_id.encode(), mac)

    def verify(self, raw: bytes) -> None:
        """Check the signature of ``raw``; :class:`SignatureError` unless it is valid."""
        start = raw.rfind(b',"sig":{')
        tail = _SIG_TAIL.match(raw, start) if start > 0 else None
        if tail is None:
            raise SignatureError("message is not signed (signing keys are configured)")
        key_id = tail.group(1).decode("ascii")
        if key_id not in self._keys:
            raise SignatureError(f"message is signed with unknown key id {key_id!r}")
        expected = self._mac(key_id, raw[:start] + b"}")
        if not hmac.compare_digest(expected, tail.group(2)):
            raise SignatureError(f"bad signature (key id {key_id!r})")


__all__ = ["Signer"]
