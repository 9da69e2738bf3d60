"""The HTTP API, on ``redis.asyncio`` wrapped with ``celery_redis_retry.wrap()``: when Redis is
down a write is captured for replay and the handler answers 202 Accepted instead of failing.

    PUT  /sessions/{id}          {"user": ..., ...}: the session, kept 30 minutes, and its user's index
    POST /counters/{name}/incr   count one (INCRBY: replayed exactly once)
    GET  /sessions/{id}, GET /counters/{name}: reads (never captured: 503 while Redis is down)
    GET  /stall                  the event loop's longest stall so far, in milliseconds
    POST /stall/reset            start measuring again

Run it with ``uvicorn fastapi_service.web:app`` from examples/.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import celery_redis_retry
from fastapi_service.celery_app import app as celery_app  # noqa: F401 - install() configures the producer

SESSION_TTL = 1800
TICK = 0.001


class StallMeter:
    """How late the event loop wakes a task that sleeps 1 ms: the longest time any step held the loop."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            self.longest = max(self.longest, time.perf_counter() - before - TICK)


def _client() -> redis.asyncio.Redis:
    url = os.environ.get("SESSIONS_REDIS_URL", "redis://127.0.0.1:6393/0")
    # Fail fast: redis-py would otherwise retry a dead server for seconds inside the request.
    plain = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                         retry=Retry(NoBackoff(), 0))
    return celery_redis_retry.wrap(plain)


@asynccontextmanager
async def lifespan(web: FastAPI) -> AsyncIterator[None]:
    web.state.store = _client()
    web.state.stall = StallMeter()
    meter = asyncio.get_running_loop().create_task(web.state.stall.run())
    yield
    meter.cancel()
    await web.state.store.aclose()
    celery_redis_retry.default_producer().close(5)


app = FastAPI(lifespan=lifespan)


def accepted_or_done(result: Any, body: dict[str, Any]) -> JSONResponse:
    # wrap() returns None for a write it captured: it is not applied yet, it will be.
    if result is None:
        return JSONResponse({**body, "status": "accepted"}, status_code=202)
    return JSONResponse({**body, "status": "done"})


@app.put("/sessions/{session_id}")
async def put_session(session_id: str, session: dict[str, Any], request: Request) -> JSONResponse:
    user = str(session.get("user", ""))
    if not user:
        return JSONResponse({"error": "send the session's user"}, status_code=400)
    # One transaction: replayed as one op, all or nothing.
    async with request.app.state.store.pipeline(transaction=True) as pipe:
        pipe.set(f"session:{session_id}", json.dumps(session), ex=SESSION_TTL)
        pipe.sadd(f"user:{user}:sessions", session_id)
        result = await pipe.execute()
    return accepted_or_done(result, {"session": session_id})


@app.post("/counters/{name}/incr")
async def increment(name: str, request: Request) -> JSONResponse:
    # INCRBY is not idempotent: its replay runs exactly once, behind a dedupe marker.
    return accepted_or_done(await request.app.state.store.incrby(f"counter:{name}", 1), {"counter": name})


@app.exception_handler(redis.RedisError)
async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Reads are never captured: a read while Redis is down fails, as it would unwrapped.
    return JSONResponse({"error": f"Redis is unavailable: {exc}"}, status_code=503)


@app.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> JSONResponse:
    raw = await request.app.state.store.get(f"session:{session_id}")
    if raw is None:
        return JSONResponse({"error": "no such session"}, status_code=404)
    return JSONResponse(json.loads(raw))


@app.get("/counters/{name}")
async def get_counter(name: str, request: Request) -> JSONResponse:
    value = await request.app.state.store.get(f"counter:{name}")
    return JSONResponse({"counter": name, "value": int(value or 0)})


@app.get("/stall")
async def stall(request: Request) -> dict[str, float]:
    return {"longest_ms": round(request.app.state.stall.longest * 1000, 3)}


@app.post("/stall/reset")
async def reset_stall(request: Request) -> dict[str, float]:
    request.app.state.stall.longest = 0.0
    return {"longest_ms": 0.0}
