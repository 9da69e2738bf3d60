"""The operator page's web application: the page, its JSON API, and the access rules of :mod:`.access`.

Routes: ``GET /`` the page; ``GET /static/...`` its script and style; ``GET /api/figures``
the latest figures of :class:`~celery_redis_retry.ui.feed.Feed`; ``GET /api/dlq`` pending
DLQ records (``reason``, ``outcome``, ``page``, ``size``); ``GET /api/dlq/record?ref=``
one record (``values=1`` shows its values); ``POST /api/dlq/replay`` and
``POST /api/dlq/purge`` with ``{"refs": [...]}`` (not with ``--read-only``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import click
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from celery_redis_retry.dlq.admin import DeadLetterQueue, StoredLetter
from celery_redis_retry.kafka import KafkaException, TopicMissingError
from celery_redis_retry.message import dumps
from celery_redis_retry.ui.access import COOKIE, loopback_host, same_origin, token_matches
from celery_redis_retry.ui.feed import Feed
from celery_redis_retry.ui.records import detail, filtered, page_of


@dataclass(frozen=True)
class PageConfig:
    """How the page is served: its token (None: open) and whether actions are off."""

    token: str | None
    read_only: bool


def create_app(feed: Feed, queue: DeadLetterQueue, config: PageConfig) -> Starlette:
    """The Starlette application of the page (``feed`` started by the caller)."""
    static = resources.files("celery_redis_retry.ui") / "static"
    views = _Views(feed, queue, config, (static / "index.html").read_text())
    app = Starlette(exception_handlers={KafkaException: _kafka_failed, TopicMissingError: _kafka_failed}, routes=[
        Route("/", views.page),
        Route("/api/figures", views.figures),
        Route("/api/reasons", views.reasons),
        Route("/api/dlq", views.dlq_page),
        Route("/api/dlq/record", views.dlq_record),
        Route("/api/dlq/replay", views.replay, methods=["POST"]),
        Route("/api/dlq/purge", views.purge, methods=["POST"]),
        Route("/api/dlq/preview", views.preview, methods=["POST"]),
        Route("/api/targets/pause", views.pause, methods=["POST"]),
        Route("/api/targets/resume", views.resume, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ])
    app.add_middleware(_Guard, config=config)
    return app


async def _kafka_failed(_request: Request, exc: Exception) -> Response:
    """Kafka did not answer, or a topic is missing: 503 with what went wrong, for the page to show."""
    return _json({"error": f"Kafka: {exc}"}, 503)


def _json(document: Any, status_code: int = 200) -> Response:
    # dumps: bytes values of ops, and integers past 64 bits, which JSONResponse cannot write.
    return Response(dumps(document), status_code=status_code, media_type="application/json")


class _Views:
    def __init__(self, feed: Feed, queue: DeadLetterQueue, config: PageConfig, html: str) -> None:
        self.feed, self.queue, self.config, self.html = feed, queue, config, html

    async def page(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None and self.config.token:
            # Once, from a link: keep the token in a cookie and drop it from the address bar.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        return HTMLResponse(self.html)

    def figures(self, _request: Request) -> Response:
        return _json({**self.feed.snapshot(), "read_only": self.config.read_only})

    def reasons(self, _request: Request) -> Response:
        from celery_redis_retry.dlq.record import REASONS

        return _json(sorted(REASONS))

    def dlq_page(self, request: Request) -> Response:
        query = request.query_params
        try:
            page, size = max(0, int(query.get("page", "0"))), min(500, max(1, int(query.get("size", "50"))))
        except ValueError:
            return _json({"error": "page and size must be whole numbers"}, 400)
        settings = self.queue.settings
        try:
            chosen = filtered(self._pending(), dict(query), targets=list(settings.targets),
                              scripts=list(settings.scripts))
        except click.BadParameter as exc:
            return _json({"error": exc.format_message()}, 400)
        return _json(page_of(chosen, page=page, size=size))

    def dlq_record(self, request: Request) -> Response:
        ref = request.query_params.get("ref", "")
        found = [s for s in self.queue.read(include_handled=True) if s.matches(ref)]
        if not found:
            return _json({"error": f"no record {ref!r} in {self.queue.topic}"}, 404)
        return _json(detail(found[0], values=request.query_params.get("values") == "1"))

    async def replay(self, request: Request) -> Response:
        return await self._act(request, self._replay)

    async def purge(self, request: Request) -> Response:
        return await self._act(request, self._purge)

    async def preview(self, request: Request) -> Response:
        return await self._act(request, self._preview, writes=False)

    async def pause(self, request: Request) -> Response:
        return await self._on_target(request, paused=True)

    async def resume(self, request: Request) -> Response:
        return await self._on_target(request, paused=False)

    async def _on_target(self, request: Request, *, paused: bool) -> Response:
        """Pause or resume a target, as ``redis-retry target pause|resume`` does."""
        from starlette.concurrency import run_in_threadpool

        from celery_redis_retry import control
        from celery_redis_retry.errors import UnknownTargetNameError

        if self.config.read_only:
            return _json({"error": "the page is read-only (--read-only)"}, 403)
        try:
            body = await request.json()
            name, reason = str(body["target"]), str(body.get("reason", ""))
        except (ValueError, KeyError, TypeError):
            return _json({"error": 'the body must be JSON: {"target": NAME, "reason": TEXT}'}, 400)
        settings = self.queue.settings
        by = f"{control.who()} (operator page)"
        try:
            if paused:
                record = await run_in_threadpool(control.pause, settings, name, reason=reason, by=by)
            else:
                record = await run_in_threadpool(control.resume, settings, name, by=by)
        except UnknownTargetNameError as exc:
            return _json({"error": str(exc)}, 400)
        except Exception as exc:  # noqa: BLE001 - Kafka did not take it: say so, nothing changed
            return _json({"error": f"not {'paused' if paused else 'resumed'}: {exc}"}, 503)
        return _json({"target": name, "state": record.describe()})

    async def _act(
        self, request: Request, action: Callable[[list[str]], dict[str, Any]], *, writes: bool = True,
    ) -> Response:
        from starlette.concurrency import run_in_threadpool

        if writes and self.config.read_only:
            return _json({"error": "the page is read-only (--read-only)"}, 403)
        try:
            body = await request.json()
            refs = [str(ref) for ref in body["refs"]]
        except (ValueError, KeyError, TypeError):
            return _json({"error": 'the body must be JSON: {"refs": ["PARTITION:OFFSET", ...]}'}, 400)
        if not refs:
            return _json({"error": "no record named"}, 400)
        return _json(await run_in_threadpool(action, refs))

    def _pending(self) -> list[StoredLetter]:
        return [s for s in self.queue.read() if not s.handled]

    def _chosen(self, refs: list[str]) -> tuple[list[StoredLetter], list[StoredLetter], list[str]]:
        records = self.queue.read()
        chosen = [s for s in records if not s.handled and any(s.matches(r) for r in refs)]
        unknown = [r for r in refs if not any(s.matches(r) for s in chosen)]
        return records, chosen, unknown

    def _replay(self, refs: list[str]) -> dict[str, Any]:
        records, chosen, unknown = self._chosen(refs)
        result, left = self.queue.replay(records, chosen)
        return {"replayed": [{"ref": s.ref, "op_id": new_id} for s, new_id in result.republished],
                "refused": [{"ref": s.ref, "why": why} for s, why in result.refused],
                "unknown": unknown, "pending": left}

    def _preview(self, refs: list[str]) -> dict[str, Any]:
        """What replaying these records would do now (``dlq replay --dry-run``): reads only."""
        from celery_redis_retry.dlq.preview import preview

        _records, chosen, unknown = self._chosen(refs)
        verdicts = preview(self.queue.settings, chosen)
        return {"preview": [{"ref": s.ref, "verdict": verdict, "detail": detail} for s, verdict, detail in verdicts],
                "unknown": unknown}

    def _purge(self, refs: list[str]) -> dict[str, Any]:
        records, chosen, unknown = self._chosen(refs)
        left = self.queue.advance(records, chosen) if chosen else None
        return {"purged": [s.ref for s in chosen], "unknown": unknown, "pending": left}


class _Guard:
    """ASGI middleware: 401 without the token (when one is set), 403 for a POST from another origin."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: PageConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        token = self.config.token
        if token and not token_matches(token, request.headers.get("authorization"), request.cookies.get(COOKIE),
                                       request.query_params.get("token")):
            return PlainTextResponse("401: this page needs its token (Authorization: Bearer, or open it once "
                                     "with ?token=)", status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if not token and not loopback_host(request.headers.get("host")):
            return PlainTextResponse("403: without a token the page answers only to a loopback Host "
                                     "(127.0.0.1, localhost, [::1])", status_code=403)
        if request.method not in ("GET", "HEAD") and not same_origin(
            request.headers.get("host"), request.headers.get("origin"), request.headers.get("referer")
        ):
            return JSONResponse({"error": "actions must come from the page itself (Origin)"}, status_code=403)
        return None
