"""Cross-request batching: the work of concurrent requests merged into token-budget batches.

Each request submits its items (pairs to score, texts to embed) with the tokens the model computes for them and the
options they are computed with; one worker task per model takes the waiting submissions, up to ``max_batch_tokens``,
whenever the model is free (after at most ``max_wait_ms`` more for company, 0 by default: the batch is what queued
while the model was busy, so a lone request never waits), runs them in a worker thread (one forward at a time per
executor), and hands each request its own results in its own order. The queue is bounded by tokens: a submission
that would overfill it raises ``Overloaded`` at once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence


class Overloaded(Exception):
    """The queue holds ``max_queue_tokens`` already: try again after ``retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int = 1):
        super().__init__(f"the queue is full ({queued} of max_queue_tokens={limit} tokens waiting); retry later")
        self.retry_after = retry_after


class TooLarge(Exception):
    """One submission bigger than the whole queue: it can never be accepted."""


class _Submission:
    __slots__ = ("items", "tokens", "options", "future", "enqueued")

    def __init__(self, items, tokens, options, future):
        self.items, self.tokens, self.options, self.future = items, tokens, options, future
        self.enqueued = time.perf_counter()


class Batcher:
    """Merge submissions of concurrent requests into batches for ``run(items, options) -> results``.

    ``run`` is called in ``executor`` (a thread), with the items of every submission of one batch that share
    ``options``, and returns one result per item in order. ``on_batch(n_items, n_tokens, seconds)`` is called after
    each run (metrics). ``batching=False`` runs every submission alone (the baseline the benchmark compares with).
    """

    def __init__(
        self,
        run: Callable[[list, Hashable], Sequence],
        *,
        executor,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 0.0,
        max_queue_tokens: int = 262144,
        batching: bool = True,
        on_batch: Optional[Callable[[int, int, float], None]] = None,
    ):
        self.run = run
        self.executor = executor
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue_tokens = int(max_queue_tokens)
        self.batching = bool(batching)
        self.on_batch = on_batch
        self.queued_tokens = 0  # waiting or running: released when the batch that holds them is done
        self.queued_requests = 0
        self._pending: collections.deque = collections.deque()
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop = None

    def _ensure_worker(self):
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._worker())

    async def submit(self, items: list, tokens: int, options: Hashable = None) -> list:
        """The results of ``items`` (in order), computed in a batch with other requests' items; ``tokens``: what the
        model computes for them, counted against ``max_batch_tokens`` and ``max_queue_tokens``.

        Raises ``Overloaded`` when the queue is full and ``TooLarge`` when ``items`` alone exceed the queue bound;
        cancelling the awaiting task drops the submission if its batch has not started."""
        total = int(tokens)
        if total > self.max_queue_tokens:
            raise TooLarge(
                f"the request has {total} tokens, more than the server's max_queue_tokens={self.max_queue_tokens}"
            )
        if self.queued_tokens + total > self.max_queue_tokens:
            raise Overloaded(self.queued_tokens, self.max_queue_tokens)
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        sub = _Submission(list(items), total, options, future)
        self.queued_tokens += total
        self.queued_requests += 1
        self._pending.append(sub)
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # the worker skips it (and releases its tokens) if it is still waiting
            raise

    def _release(self, sub: _Submission):
        self.queued_tokens -= sub.tokens
        self.queued_requests -= 1

    def _take(self) -> List[_Submission]:
        """The next batch from the waiting submissions: whole submissions, first come first served, up to the budget
        (always at least one); cancelled ones are dropped on the way."""
        batch, tokens = [], 0
        while self._pending:
            sub = self._pending[0]
            if sub.future.done():  # cancelled: its client is gone
                self._pending.popleft()
                self._release(sub)
                continue
            if batch and (not self.batching or tokens + sub.tokens > self.max_batch_tokens):
                break
            self._pending.popleft()
            batch.append(sub)
            tokens += sub.tokens
            if not self.batching:
                break
        return batch

    def _waiting_tokens(self) -> int:
        return sum(s.tokens for s in self._pending if not s.future.done())

    async def _worker(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batching and self.max_wait > 0 and self._waiting_tokens() < self.max_batch_tokens:
                # Wait for company, at most max_wait after the oldest submission arrived.
                deadline = self._pending[0].enqueued + self.max_wait
                while self._waiting_tokens() < self.max_batch_tokens:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            groups: Dict[Hashable, List[_Submission]] = {}
            for sub in batch:
                groups.setdefault(sub.options, []).append(sub)
            for options, subs in groups.items():
                items = [item for sub in subs for item in sub.items]
                start = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.executor, self.run, items, options)
                    results = list(results)
                    if len(results) != len(items):
                        raise RuntimeError(f"the model returned {len(results)} results for {len(items)} items")
                except Exception as e:  # noqa: BLE001 -- the requests of this batch get the error, the worker lives
                    for sub in subs:
                        self._release(sub)
                        if not sub.future.done():
                            sub.future.set_exception(e)
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(items), sum(s.tokens for s in subs), time.perf_counter() - start)
                cursor = 0
                for sub in subs:
                    mine = results[cursor : cursor + len(sub.items)]
                    cursor += len(sub.items)
                    self._release(sub)
                    if not sub.future.done():
                        sub.future.set_result(mine)

    async def close(self):
        """Stop the worker (after the server has drained its requests); anything still waiting is cancelled."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        while self._pending:
            sub = self._pending.popleft()
            self._release(sub)
            sub.future.cancel()
