"""The operator page (``redis-retry ui``): its access rules over real HTTP, and a real browser on a real stack."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.cli import redis_retry
from celery_redis_retry.testing import CeleryCommand, free_port, wait_until
from celery_redis_retry.ui.access import loopback_host, same_origin, token_matches

#: The screenshot in docs/operations.md, rewritten only when asked (CRR_UPDATE_SCREENSHOT=1), so
#: that a test run leaves the checkout as it was.
SCREENSHOT = Path(__file__).parent.parent / "docs" / "operator-page.png"


def _start_ui(stack: LoopStack, *args: str) -> tuple[CeleryCommand, str]:
    port = free_port()
    page = CeleryCommand("loop_app", ["redis-retry", "ui", "--port", str(port), *args],
                         env=stack.env_for("operator"), cwd=str(stack.workdir), log_dir=stack.workdir)
    stack.bridges.append(page)  # stopped with the stack
    page.start(ready_pattern=r"Uvicorn running on", timeout=60)
    return page, f"http://127.0.0.1:{port}"


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)  # noqa: S310 - our own server
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, dict(exc.headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


def test_a_public_bind_without_a_token_is_refused() -> None:
    result = CliRunner().invoke(redis_retry, ["ui", "--bind", "0.0.0.0"], env={"CRR_UI_TOKEN": ""})
    assert result.exit_code == 2, result.output
    assert "refusing to serve the operator page on 0.0.0.0 without a token" in result.output
    assert "--token" in result.output


def test_without_the_ui_extra_the_command_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: import raises ImportError
    result = CliRunner().invoke(redis_retry, ["ui"])
    assert result.exit_code == 3, result.output
    assert "pip install 'celery-redis-retry[ui]'" in result.output


def test_tokens_and_origins_are_checked_as_given() -> None:
    assert token_matches("s3cret", "Bearer s3cret", None, None)
    assert token_matches("s3cret", None, "s3cret", None)
    assert token_matches("s3cret", None, None, "s3cret")
    assert not token_matches("s3cret", "Bearer wrong", "wrong", None)
    assert not token_matches("s3cret", "Basic s3cret", None, None)
    assert same_origin("127.0.0.1:8600", "http://127.0.0.1:8600", None)
    assert same_origin("127.0.0.1:8600", None, "http://127.0.0.1:8600/")
    assert not same_origin("127.0.0.1:8600", "http://evil.example", None)
    assert not same_origin("127.0.0.1:8600", None, None)
    assert loopback_host("127.0.0.1:8600")
    assert loopback_host("localhost")
    assert loopback_host("[::1]:8600")
    assert not loopback_host("rebound.example:8600")  # a name pointed at 127.0.0.1
    assert not loopback_host(None)


@pytest.mark.slow
def test_with_a_token_requests_without_it_get_401(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    _page, base = _start_ui(stack, "--token", "s3cret")
    bearer = {"Authorization": "Bearer s3cret"}
    for path in ("/", "/api/figures", "/api/dlq", "/static/page.js"):
        assert _get(base + path)[0] == 401, path
        assert _get(base + path, {"Authorization": "Bearer nope"})[0] == 401, path
        assert _get(base + path, bearer)[0] == 200, path
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirected:  # the page drops ?token= from the address bar
        opener.open(base + "/?token=s3cret", timeout=30)
    assert redirected.value.code == 303
    cookie = redirected.value.headers["set-cookie"].split(";")[0]
    redirected.value.close()
    assert _get(base + "/api/figures", {"Cookie": cookie})[0] == 200
    body = b'{"refs": ["0:0"]}'
    assert _get(base + "/api/dlq/purge", bearer, body)[0] == 403  # no Origin: not from the page
    assert _get(base + "/api/dlq/purge", {**bearer, "Origin": "http://evil.example"}, body)[0] == 403
    assert _get(base + "/api/dlq/purge", {"Origin": base}, body)[0] == 401

    _page, read_only = _start_ui(stack, "--read-only")  # loopback: no token needed
    request = urllib.request.Request(read_only + "/api/dlq/purge", data=body, headers={"Origin": read_only})  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)  # noqa: S310
    assert refused.value.code == 403
    assert "read-only" in json.load(refused.value)["error"]  # not the Origin check: the page's own Origin
    refused.value.close()
    with urllib.request.urlopen(read_only + "/api/figures", timeout=30) as response:  # noqa: S310
        assert json.load(response)["read_only"] is True
    assert _get(read_only + "/api/figures", {"Host": "rebound.example"})[0] == 403  # DNS rebinding


# -- the page in a real browser -------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CRR_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is missing and CRR_REQUIRE_BROWSER=1 (.ci/services installs it)")
        pytest.skip("chromium is missing (Debian: apt-get install chromium; .ci/services installs it)")
    return path


@pytest.fixture
def browser_page() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1400})
        finally:
            browser.close()


def _number(page: Any, selector: str) -> int:
    text = page.text_content(selector) or ""
    return int(text) if text.isdigit() else -1


@pytest.mark.slow
def test_the_page_shows_a_backlog_draining_and_replays_a_dead_op(
    make_loop: Callable[..., LoopStack], browser_page: Any,
) -> None:
    stack = make_loop()
    with stack.client() as r:
        r.set("a-string", "x")
    stack.publish_all([ops.set(f"k{i}", i) for i in range(3000)])
    dead = [ops.sadd("a-string", f"member-{i}") for i in range(3)]
    stack.publish_all(dead)
    _page, base = _start_ui(stack)
    page = browser_page
    page.goto(base)
    page.wait_for_function("document.getElementById('lag').textContent === '3003'", timeout=30_000)
    assert _number(page, "#applied") == 0

    stack.start_worker()
    stack.start_bridge()
    # Read from the page at two times: the backlog drained, and every op counted applied.
    page.wait_for_function("Number(document.getElementById('lag').textContent) === 0", timeout=60_000)
    page.wait_for_function("document.getElementById('applied').textContent === '3000'", timeout=60_000)
    assert _number(page, "#lag") == 0
    assert page.get_attribute("#lag-trend polyline", "points")  # the trend was drawn
    assert float(page.text_content("#applied-rate") or "x") >= 0
    stack.wait_for(lambda: len(stack.dead_letters(count=3)) == 3, 60, "3 dead letters")

    page.select_option("#dlq-filters select[name=reason]", "wrong_type")
    page.click("#dlq-filters button")
    page.wait_for_function("document.querySelectorAll('#records tbody tr').length === 3", timeout=30_000)
    page.click("#records tbody tr:first-child td:nth-child(2)")
    page.wait_for_selector("#detail:not([hidden])")
    detail = page.text_content("#detail-body") or ""
    assert "a-string" in detail
    assert "SADD" in detail
    assert "member-" not in detail
    assert "<8 bytes>" in detail
    shot = page.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("CRR_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(shot)

    ref = page.get_attribute("#records tbody tr:first-child", "data-ref")
    with stack.client() as r:
        r.delete("a-string")  # the cause fixed, as an operator would before a replay
    page.check("#records tbody tr:first-child .pick")
    page.click("#preview")  # reads the target: the key is gone now, so the SADD would apply
    page.wait_for_function("document.getElementById('action-result').textContent.includes('would apply')",
                           timeout=30_000)
    assert ref in (page.text_content("#action-result") or "")
    page.click("#replay")
    page.wait_for_selector("#confirm[open]")
    assert ref in (page.text_content("#confirm-text") or "")
    page.click("#confirm-ok")
    page.wait_for_function("document.getElementById('action-result').textContent.includes('replayed')",
                           timeout=30_000)
    with stack.client() as r:
        member = wait_until(lambda: r.smembers("a-string"), 60, what="the replayed SADD in Redis")
    assert len(member) == 1
    assert next(iter(member)).startswith(b"member-")

    # Pause the target from the page: new ops wait in Kafka, the key stays unset, until resumed.
    page.fill("#pause-reason", "maintenance")
    page.click("button.target-action[data-target=default]")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-ok")
    page.wait_for_function("document.querySelector('span[data-target=default]').textContent === 'paused'",
                           timeout=30_000)
    assert "maintenance" in (page.text_content("#targets tbody") or "")
    held = ops.set("held", "v")
    stack.publish_all([held])
    time.sleep(3)
    with stack.client() as r:
        assert r.get("held") is None, "an op of a paused target was applied"
    page.wait_for_function("document.querySelector('button.target-action[data-target=default]').textContent"
                           " === 'resume'", timeout=30_000)
    page.click("button.target-action[data-target=default]")
    page.wait_for_selector("#confirm[open]")
    page.click("#confirm-ok")
    with stack.client() as r:
        wait_until(lambda: r.get("held") == b"v", 60, what="the held op applied after the resume")
    page.wait_for_function("document.querySelector('span[data-target=default]').textContent !== 'paused'",
                           timeout=30_000)
