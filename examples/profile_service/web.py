"""The HTTP API. Writes go through ``celery_redis_retry.wrap()``: when Redis is down they are
captured for replay, and the handler answers 202 Accepted instead of failing.

    PUT  /users/<id>          {"name": ..., "email": ..., "plan": ...}: profile hash, cache entry, index invalidated
    POST /users/<id>/visits   count a visit
    GET  /users/<id>          the profile (from the cache when it is there) and its visit count

Run it with ``flask --app profile_service.web run``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from flask import Flask, request
from redis.backoff import NoBackoff
from redis.retry import Retry

import celery_redis_retry
from profile_service.celery_app import app as celery_app  # noqa: F401 - install() configures the producer

CACHE_TTL = 300


def create_app(redis_url: str | None = None) -> Flask:
    url = redis_url or os.environ.get("PROFILE_REDIS_URL", "redis://127.0.0.1:6391/0")
    # Fail fast: redis-py 8 would otherwise retry a dead server for ~3 s inside the request.
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    store = celery_redis_retry.wrap(client)
    web = Flask(__name__)

    def accepted_or_done(result: Any, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        # wrap() returns None for a write it captured: it is not applied yet, it will be.
        if result is None:
            return {**body, "status": "accepted", "detail": "Redis is unavailable; the write will be replayed"}, 202
        return {**body, "status": "done"}, 200

    @web.put("/users/<int:user_id>")
    def put_user(user_id: int) -> tuple[dict[str, Any], int]:
        profile = {k: str(v) for k, v in (request.get_json(force=True) or {}).items() if k in ("name", "email", "plan")}
        if not profile:
            return {"error": "send name, email and/or plan"}, 400
        # One transaction: replayed as one op, all or nothing.
        with store.pipeline(transaction=True) as pipe:
            pipe.hset(f"user:{user_id}", mapping=profile)
            pipe.set(f"cache:user:{user_id}", json.dumps(profile), ex=CACHE_TTL)
            pipe.delete("cache:users:index")
            result = pipe.execute()
        return accepted_or_done(result, {"user": user_id})

    @web.post("/users/<int:user_id>/visits")
    def add_visit(user_id: int) -> tuple[dict[str, Any], int]:
        # INCRBY is not idempotent: its replay runs exactly once, behind a dedupe marker.
        return accepted_or_done(store.incrby(f"visits:{user_id}", 1), {"user": user_id})

    @web.get("/users/<int:user_id>")
    def get_user(user_id: int) -> tuple[dict[str, Any], int]:
        try:
            cached = client.get(f"cache:user:{user_id}")
            profile = json.loads(cached) if cached else {
                k.decode(): v.decode() for k, v in client.hgetall(f"user:{user_id}").items()
            }
            visits = int(client.get(f"visits:{user_id}") or 0)
        except redis.ConnectionError:
            # Reads are never captured: there is nothing to replay.
            return {"error": "Redis is unavailable"}, 503
        if not profile:
            return {"error": "no such user"}, 404
        return {"user": user_id, "profile": profile, "visits": visits}, 200

    return web


app = create_app()
