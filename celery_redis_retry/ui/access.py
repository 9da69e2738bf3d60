"""Who may use the operator page: loopback is open, anything else needs the token.

The rules (docs/security.md):

- bound to a loopback address (``127.0.0.1``, ``::1``, ``localhost``), the page needs no
  token unless one is given;
- bound to any other address it refuses to start without a token, read-only or not: the
  page shows DLQ records, which name keys and can show values;
- with a token, every request must carry it: ``Authorization: Bearer <token>``, or the
  cookie that opening the page once with ``?token=<token>`` sets; anything else gets 401;
- actions are POSTs and must come from the page itself: their ``Origin`` (or ``Referer``)
  must be the page's own host, else 403 (a cross-site form cannot replay records);
- without a token, a request must name a loopback host (``Host: 127.0.0.1:8600``), else
  403: a site whose name an attacker points at 127.0.0.1 (DNS rebinding) would otherwise be
  "the page's own host" and could read and act through the visitor's browser.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from celery_redis_retry.errors import ConfigurationError

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

#: The cookie a ``?token=`` visit sets.
COOKIE = "crr_ui_token"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    return host in LOOPBACK or host.startswith("127.")


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind address reachable from other machines without a token."""
    if not token and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve the operator page on {host} without a token: other machines could "
            "read and replay the dead-letter topic. Give --token (or CRR_UI_TOKEN), or bind to 127.0.0.1"
        )


def token_matches(token: str, headers_authorization: str | None, cookie: str | None, query: str | None) -> bool:
    """Whether a request carries ``token`` (Bearer header, cookie or ``?token=``), compared in constant time."""
    offered = [query, cookie]
    if headers_authorization and headers_authorization.lower().startswith("bearer "):
        offered.append(headers_authorization[7:].strip())
    return any(o is not None and hmac.compare_digest(o.encode(), token.encode()) for o in offered)


def loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine (``127.0.0.1:8600``, ``localhost``, ``[::1]:8600``)."""
    if not host:
        return False
    name = urlsplit(f"//{host}").hostname or ""
    return is_loopback(name)


def same_origin(host: str | None, origin: str | None, referer: str | None) -> bool:
    """Whether a POST comes from the page itself: its Origin (else Referer) names the ``Host`` it was sent to."""
    source = origin or referer
    if not host or not source or source == "null":
        return False
    return urlsplit(source).netloc == host
