"""A pool of worker processes, one per device, each holding one object built once and called many times.

    pool = WorkerPool(Reranker.from_pretrained, ("path",), {"preset": "qwen3-reranker"}, ["cuda:0", "cuda:1"])
    for item, result in pool.imap("_run_remote", batches, False):
        ...
    pool.close()

Each worker is a spawned process (CUDA cannot be forked) that calls ``factory(*args, **kwargs,
device=its_device)`` once, then runs ``getattr(obj, method)(item, *args)`` for the items sent to it. Items
go to whichever worker is free (each keeps ``depth`` in flight, so it never waits for the next one), so
faster devices take more and all finish together; results come back as they finish, with their item.

Failures are errors, never hangs: a worker that raises sends its traceback (the pool stays usable), and a
worker that dies (killed, out of memory, a crash in native code) is seen through its process sentinel at
once, the pool is closed and the error names the device, the exit code and what it was running.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import time
import traceback
import weakref
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator, List, Sequence, Tuple


class WorkerError(RuntimeError):
    """A pool worker failed: it raised (its traceback is in the message) or its process died."""


def _worker_main(conn, factory, args, kwargs, threads):
    """The worker process: build the object, say ready, then serve calls until told to stop (None)."""
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        started = time.perf_counter()
        obj = factory(*args, **kwargs)
        conn.send(("ready", time.perf_counter() - started))
    except BaseException as e:  # the parent reports it; nothing here may hang
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            # Told to stop: leave at once. The interpreter's own shutdown with torch loaded takes seconds
            # (3 s on a busy 2-core machine), and this process holds nothing that needs finalising.
            # multiprocessing's own exit step still runs: it releases the semaphores this process made (tqdm's
            # lock), which the resource tracker would otherwise report as leaked.
            multiprocessing.util._exit_function()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        method, item, call_args = message
        try:
            conn.send(("ok", getattr(obj, method)(item, *call_args)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


@contextlib.contextmanager
def _main_module_hidden():
    """Start spawned workers without re-running the caller's main script.

    A spawned child imports the parent's ``__main__`` (by path, or by name under ``python -m``) so that
    functions defined there can be unpickled; a script without an ``if __name__ == "__main__":`` guard then
    starts the pool again inside each worker and dies with multiprocessing's bootstrapping error (the
    FlagEmbedding pool's users hit this). Nothing a worker runs lives in ``__main__`` (the factory and
    every argument are fastrank's), so the main module's path and spec are hidden while the processes start.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _exit_reason(code) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Worker:
    def __init__(self, process, conn, device: str):
        self.process = process
        self.conn = conn
        self.device = device
        self.in_flight = collections.deque()
        self.load_seconds = None

    @property
    def label(self) -> str:
        return f"the worker on {self.device} (pid {self.process.pid})"


def _shutdown(workers: List[_Worker], timeout: float = 10.0) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(1.0)
        w.conn.close()


class WorkerPool:
    """One process per entry of ``devices`` (a device may repeat), each holding ``factory(*args, **kwargs,
    device=device)``.

    Args:
        factory: a picklable callable (a module-level function or a class's classmethod) that builds the object.
        args, kwargs: its arguments; ``device`` is added per worker.
        devices: the devices, e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]``.
        threads: torch threads per CPU worker (default: the cores shared evenly among the CPU workers, so
            two workers on a 2-core machine run one thread each rather than fight over both).

    Start-up waits for every worker to be ready (``startup_seconds``: the wall time, ``load_seconds``: each
    worker's own build time) and fails with the first worker's error.
    """

    def __init__(self, factory: Callable, args: Sequence, kwargs: dict, devices: Sequence[str], *, threads=None):
        if not devices:
            raise ValueError("devices: give at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu']")
        n_cpu = sum(1 for d in devices if in_cpu(d))
        if threads is None and n_cpu:
            threads = max(1, (os.cpu_count() or 1) // n_cpu)
        self.threads = threads  # torch threads of each CPU worker
        context = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        self.workers: List[_Worker] = []
        for i, device in enumerate(devices):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(theirs, factory, tuple(args), {**kwargs, "device": device}, threads if in_cpu(device) else None),
                name=f"fastrank-worker-{i}",
                daemon=True,  # never outlives the parent
            )
            with _main_module_hidden():
                process.start()
            theirs.close()
            self.workers.append(_Worker(process, ours, str(device)))
        self._finalizer = weakref.finalize(self, _shutdown, self.workers)
        self.closed = False
        try:
            for w in self.workers:
                message = self._receive(w, "starting")
                if message[0] != "ready":
                    raise WorkerError(f"{w.label} failed while starting: {message[1]}\n{message[2]}")
                w.load_seconds = message[1]
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - started

    @property
    def devices(self) -> List[str]:
        return [w.device for w in self.workers]

    def _receive(self, worker: _Worker, doing: str):
        """The next message of ``worker``; a worker that dies instead closes the pool with an error."""
        while True:
            ready = wait([worker.conn, worker.process.sentinel])
            if worker.conn in ready:
                try:
                    return worker.conn.recv()
                except EOFError:
                    pass
            self._died(worker, doing)

    def _died(self, worker: _Worker, doing: str):
        worker.process.join(5.0)
        reason = _exit_reason(worker.process.exitcode)
        self.close(timeout=0.0)  # the others are stopped at once: their results would be of no use
        raise WorkerError(f"{worker.label} {reason} while {doing}; the pool is closed: create a new one")

    def imap(self, method: str, items: Iterable, *args, depth: int = 2) -> Iterator[Tuple[Any, Any]]:
        """``(item, getattr(obj, method)(item, *args))`` for every item, in the order they finish.

        Items are taken from ``items`` only as workers free up (a generator can produce them while the
        workers run), at most ``depth`` in flight per worker. If a worker raises, nothing more is sent, the
        items in flight elsewhere are let finish, and a ``WorkerError`` carries the worker's traceback.
        """
        if self.closed:
            raise WorkerError("the pool is closed (a worker died, or close() was called): create a new one")
        source = iter(items)
        exhausted = False
        failure = None
        doing = f"running {method}"
        try:
            while True:
                for w in self.workers:
                    while not exhausted and failure is None and len(w.in_flight) < depth:
                        try:
                            item = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        w.conn.send((method, item, args))
                        w.in_flight.append(item)
                busy = [w for w in self.workers if w.in_flight]
                if not busy:
                    break
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for w in busy:
                    if w.conn not in ready:
                        if w.process.sentinel in ready:
                            self._died(w, doing)
                        continue
                    try:
                        message = w.conn.recv()
                    except EOFError:
                        self._died(w, doing)
                    item = w.in_flight.popleft()
                    if message[0] == "ok":
                        if failure is None:
                            yield item, message[1]
                    elif failure is None:
                        failure = WorkerError(f"{w.label} failed while {doing}: {message[1]}\n{message[2]}")
        finally:
            # Stopped early (an error, or the caller left the loop): let what is in flight finish, so the
            # next call does not read this call's answers.
            if not self.closed:
                for w in self.workers:
                    while w.in_flight:
                        self._receive(w, doing)
                        w.in_flight.popleft()
        if failure is not None:
            raise failure

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker; each may finish what it is running for up to ``timeout`` seconds."""
        if not self.closed:
            self.closed = True
            if self._finalizer.detach() is not None:
                _shutdown(self.workers, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def in_cpu(device) -> bool:
    return str(device).split(":")[0] == "cpu"
