"""Micro-batching across requests: every bid request ready in one event-loop turn shares one ORT call.

A handler that has candidate rows to score calls ``Batcher.submit`` and awaits the future it gets.
The first submission of a turn schedules ``flush`` with ``loop.call_soon``: it runs after every task
step already queued for this turn, so the requests whose bodies completed together are scored
together, and a lone request waits for nothing but the end of its own turn (no timer). The batch
function sees a list of requests and settles each one's future on its own: a request that fails
fails alone.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

__all__ = ["Batcher"]


class Batcher:
    """Collects items submitted in one loop turn and hands them to ``process`` as one list.

    ``process(items)`` returns one result per item, in order; an item's result may be an exception
    instance, which is raised in that item's awaiting handler only. If ``process`` itself raises,
    every item of that batch gets the exception (a bug must not leave handlers waiting forever).
    """

    def __init__(self, process: Callable[[Sequence[Any]], Sequence[Any]]):
        self._process = process
        self._items: list[Any] = []
        self._futures: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: Any) -> asyncio.Future:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._items:
            loop.call_soon(self.flush)
        self._items.append(item)
        self._futures.append(future)
        return future

    def flush(self) -> None:
        items, futures = self._items, self._futures
        if not items:
            return
        self._items, self._futures = [], []
        try:
            results = self._process(items)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, never lost
            results = [exc] * len(items)
        for future, result in zip(futures, results):
            if future.done():  # the handler was cancelled (client went away)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
