"""``wrap()`` for redis-py's asyncio clients: ``redis.asyncio.Redis``, its Sentinel clients and ``RedisCluster``.

The same :class:`~celery_redis_retry.capture.capturing.Capture` decides what is captured
and builds the ops; these mixins only await where the synchronous ones call. Nothing on
the capture path blocks the event loop: the op is handed to librdkafka inline (a few
microseconds), a publish that may wait (durable mode, the spool) runs in a thread
(:meth:`~celery_redis_retry.capture.producer.RetryProducer.publish_async`), and the
markers of confirmed writes are unlinked by a task of the loop, not by the write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery_redis_retry.capture import wrapping
from celery_redis_retry.capture.capturing import Capture
from celery_redis_retry.stamps import WRITE_STAMPED

logger = logging.getLogger(__name__)

# Unlinking tasks in flight: the loop holds tasks weakly.
_unlinking: set[asyncio.Task[None]] = set()


class AsyncCapturingClient(wrapping.WrappedClient):
    """Mixed in before an asyncio client's own class: capture around ``execute_command``."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        capture = self._crr_capture
        write = capture.stamped_write(args)
        try:
            if write is None:
                reply = await super().execute_command(*args, **options)  # type: ignore[misc]
                capture.succeeded(args)
                return reply
            reply = await write.run_async(super().execute_command, self, options)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - failed_op raises what is not retryable
            return await capture.captured_async(wrapping.failed_op(capture, args, write, exc), exc)
        if write.op_id is not None and (markers := capture.confirmed(write.keys[-1])):
            task = asyncio.get_running_loop().create_task(_unlink(markers, self._crr_plain))
            _unlinking.add(task)
            task.add_done_callback(_unlinking.discard)
        capture.succeeded()
        return reply

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)  # type: ignore[misc]
        mixin = _ClusterPipeline if hasattr(pipe, "_execution_strategy") else _Pipeline
        return wrapping.capturing_pipeline(pipe, self._crr_capture, mixin)

    async def _split_command_across_slots(self, command: str, *keys: Any) -> Any:
        # As the synchronous cluster client: keys of one slot go through execute_command, stamped.
        groups = wrapping.slot_groups(keys)
        if len(groups) == 1:
            return await self.execute_command(command, *keys)
        try:
            with wrapping.splitting():
                return await super()._split_command_across_slots(command, *keys)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - split_failed_op raises what cannot be captured
            return await self._crr_capture.captured_async(
                wrapping.split_failed_op(self._crr_capture, command, groups, exc), exc
            )

    def client(self) -> Any:
        return wrapping.copy_with_capture(self._crr_plain.client(), self._crr_capture, AsyncCapturingClient)

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        # The pool belongs to the wrapped client: closing the copy closes it.
        await self._crr_plain.aclose(*args, **kwargs)

    async def close(self, *args: Any, **kwargs: Any) -> None:
        await self.aclose(*args, **kwargs)


async def _unlink(markers: list[bytes], client: Any) -> None:
    """Unlink a batch of confirmed writes' markers; a batch that fails is left to their TTL."""
    try:
        pipe = client.pipeline(transaction=False)
        for key in markers:
            pipe.unlink(key)
        await pipe.execute(raise_on_error=False)
    except Exception as exc:  # noqa: BLE001 - the markers expire on their own
        logger.debug("could not unlink %d confirmed write markers: %s", len(markers), exc)


class _Pipeline:
    """Mixed in before a ``redis.asyncio`` pipeline's own class: capture around ``execute``."""

    _crr_capture: Capture
    command_stack: list[Any]

    async def execute(self, raise_on_error: bool = True) -> Any:
        stack, watched, transaction = wrapping.pipeline_mode(self)
        capture = self._crr_capture
        stamped = None if watched else capture.stamp_stack(self.command_stack)
        try:
            if stamped is None:
                replies = await super().execute(raise_on_error)  # type: ignore[misc]
                capture.succeeded()
                return replies
            if transaction:
                # A transaction cannot be re-run in part: make sure the server has the script.
                self.scripts.add(capture.apply_script(self))  # type: ignore[attr-defined]
            replies = await super().execute(False)  # type: ignore[misc]
            if not transaction and (missing := stamped.missing_script(replies)):
                # The server lost its scripts (a restart): those writes did not run. Send them again.
                await self.immediate_execute_command("SCRIPT LOAD", WRITE_STAMPED)  # type: ignore[attr-defined]
                again = wrapping.pipeline_requeue(self, stack, stamped, missing)
                for index, reply in zip(again, await super().execute(False), strict=True):  # type: ignore[misc]
                    replies[index] = reply
        except Exception as exc:  # noqa: BLE001 - pipeline_failed_op raises what cannot be captured
            op = wrapping.pipeline_failed_op(
                capture, stack, exc, transaction=transaction, stamped=stamped, watched=watched
            )
            return await capture.captured_async(op, exc)
        return wrapping.pipeline_replies(self, stack, stamped, replies, raise_on_error)


class _ClusterPipeline:
    """Mixed in before a ``redis.asyncio.cluster`` pipeline's class: capture around ``execute``.

    Its commands are sent as they are (not stamped): the pipeline splits them per node
    itself. A failed one is captured as one pipeline op of its writes.
    """

    _crr_capture: Capture
    _execution_strategy: Any

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        strategy = self._execution_strategy
        stack = [(command.args, command.kwargs) for command in strategy._command_queue]
        transaction = type(strategy).__name__ == "TransactionStrategy"
        # A pipeline of a split DEL/UNLINK raises: the split command is captured whole.
        watched = bool(getattr(strategy, "_watching", False)) or wrapping.SPLITTING.get()
        capture = self._crr_capture
        try:
            replies = await super().execute(raise_on_error, allow_redirections)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - pipeline_failed_op raises what cannot be captured
            op = wrapping.pipeline_failed_op(
                capture, stack, exc, transaction=transaction, stamped=None, watched=watched
            )
            return await capture.captured_async(op, exc)
        capture.succeeded()
        return replies
