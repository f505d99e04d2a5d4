"""Micro-batching across requests: every bid request ready in one event-loop turn shares one ORT call.

A handler that has candidate rows to score calls ``Batcher.submit`` and awaits the future it gets.
The first submission of a turn schedules ``flush`` with ``loop.call_soon``: it runs after every task
step already queued for this turn, so the requests whose bodies completed together are scored
together, and a lone request waits for nothing but the end of its own turn (no timer). The batch
function sees a list of requests and settles each one's future on its own: a request that fails
fails alone.

``ThreadBatcher`` is the same for work that waits on a file or the network (the notices' dedup store): the batch
runs in a thread of its own, one batch at a time, while the event loop goes on serving; what is submitted meanwhile
waits for the batch in flight and goes as the next one. ``EagerBatcher`` offers each turn's batch to a function that
answers at once when it can (the dedup store's commit without a lock to wait for) and hands what it cannot answer to
a ``ThreadBatcher``.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["Batcher", "EagerBatcher", "ThreadBatcher"]


def _settle(futures: list[asyncio.Future], results: Sequence[Any]) -> None:
    """Hand each waiting handler its result, or raise its exception there."""
    for future, result in zip(futures, results):
        if future.done():  # the handler was cancelled (client went away)
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


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
        self._deliver(items, futures, results)

    def _deliver(self, items: list[Any], futures: list[asyncio.Future], results: Sequence[Any]) -> None:
        _settle(futures, results)


class ThreadBatcher:
    """``Batcher`` whose ``process(items)`` runs in one thread named ``name``, off the event loop: a batch waiting on
    a disk's fsync or on a network round trip holds up no other request. One batch is in flight at a time; the items
    submitted meanwhile are the next batch, sent when it returns (the busier the routes, the larger the batches)."""

    def __init__(self, process: Callable[[Sequence[Any]], Sequence[Any]], name: str):
        self._process = process
        self._items: list[Any] = []
        self._futures: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def submit(self, item: Any) -> asyncio.Future:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._items and not self._busy:
            loop.call_soon(self._send)
        self._items.append(item)
        self._futures.append(future)
        return future

    def _send(self) -> None:
        if self._busy or not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        self._busy = True
        job = self._loop.run_in_executor(self._executor, self._process, items)
        job.add_done_callback(lambda done: self._returned(done, futures))

    def _returned(self, job: asyncio.Future, futures: list[asyncio.Future]) -> None:
        self._busy = False
        error = job.exception()  # a bug in process: every item of the batch gets it, none waits forever
        _settle(futures, [error] * len(futures) if error is not None else job.result())
        self._send()

    def close(self) -> None:
        """Wait for the batch in flight (nothing else is sent after this)."""
        self._executor.shutdown(wait=True)


class EagerBatcher(Batcher):
    """``Batcher`` whose ``attempt(items)`` runs at the end of the loop's turn and answers (a result per item), or
    returns None when it would have to wait; those items then go to ``fallback`` and get its results. A thread's
    round trip costs more than the dedup store's own work, in two handoffs of the GIL beside a busy event loop."""

    def __init__(self, attempt: Callable[[Sequence[Any]], Sequence[Any] | None], fallback: ThreadBatcher):
        super().__init__(attempt)
        self.fallback = fallback
        self.deferred = 0  # batches handed to the fallback

    def _deliver(self, items: list[Any], futures: list[asyncio.Future], results: Sequence[Any] | None) -> None:
        if results is not None:
            _settle(futures, results)
            return
        self.deferred += 1
        for item, future in zip(items, futures):
            self.fallback.submit(item).add_done_callback(
                lambda done, future=future: _settle([future], [done.exception() or done.result()]))

    def close(self) -> None:
        self.fallback.close()
