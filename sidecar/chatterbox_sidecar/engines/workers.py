"""Crash-contained engine workers: child processes the event loop supervises.

Native code behind an engine (espeak-ng's phonemizer, onnxruntime) can crash the process that
runs it. A :class:`WorkerPool` runs such work in child processes, one job at a time each: a
worker that dies (a segfault, SIGKILL, the OOM killer) fails only the job it held with
:class:`WorkerCrashed`, and a fresh worker takes its place at once. A job that runs past its
deadline has its worker killed the same way.

The child runs ``target(conn, *args)`` (a module-level function, for the ``spawn`` start method):
it sends ``("ready", pid, *details)`` once loaded, then answers each job it receives with any
number of ``("item", value)`` messages and one ``("done",)`` or ``("error", text)``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from loguru import logger

from chatterbox_sidecar.engines.base import EngineError

READY_TIMEOUT_S = 120.0  # a worker's load and warm-up
RESTART_BACKOFF_S = (0.0, 0.5, 2.0, 5.0)  # waits before successive failed restarts

_CRASHED = object()  # the reader's marker: the worker's pipe closed


class WorkerCrashed(EngineError):
    """The worker running a job died; only that job fails."""

    caused_by_input = True


class WorkerTimeout(EngineError):
    """A job outran its deadline; its worker was killed."""

    caused_by_input = True


@dataclass(eq=False)
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    ready: bool = False  # loaded; only a ready worker's death is a crash to replace
    dead: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid


def _exit_description(process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class WorkerPool:
    """A fixed number of supervised worker processes, each running one job at a time."""

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: tuple = (),
        size: int = 1,
        job_timeout_s: float = 60.0,
    ):
        """Initialize the pool (no process starts until :meth:`start`).

        Args:
            name: Name for logs and process titles (``piper``).
            target: Module-level function run in each child as ``target(conn, *args)``.
            args: Picklable arguments for ``target``.
            size: Worker processes.
            job_timeout_s: Longest a job may run before its worker is killed.
        """
        self.name = name
        self.size = size
        self.job_timeout_s = job_timeout_s
        self.crashes = 0  # workers that died while running a job or idle
        self.restarts = 0  # replacement workers started
        self._target = target
        self._args = args
        self._mp = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: dict[int, _Worker] = {}
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        # What the last worker to start said after its pid in ``ready`` (what it can do).
        self.ready_details: tuple = ()

    @property
    def live_workers(self) -> int:
        """Returns: workers loaded and not dead."""
        return sum(1 for w in self._workers.values() if w.ready and not w.dead)

    @property
    def pids(self) -> list[int]:
        """Returns: the process ids of the live workers."""
        return [w.pid for w in self._workers.values() if not w.dead and w.pid is not None]

    async def start(self) -> None:
        """Start every worker and wait until each has loaded.

        Raises:
            EngineError: If a worker fails to start.
        """
        self._loop = asyncio.get_running_loop()
        workers = await asyncio.gather(*(self._spawn(i) for i in range(self.size)))
        for worker in workers:
            self._idle.put_nowait(worker)
        logger.info(f"{self.name}: {self.size} worker processes ready (pids {self.pids})")

    async def _spawn(self, index: int) -> _Worker:
        assert self._loop is not None
        parent, child = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=self._target,
            args=(child, *self._args),
            name=f"{self.name}-worker-{index}",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        child.close()
        worker = _Worker(index, process, parent)
        self._workers[index] = worker
        threading.Thread(
            target=self._read,
            args=(worker, self._loop),
            name=f"{self.name}-reader-{index}",
            daemon=True,
        ).start()
        try:
            first = await asyncio.wait_for(worker.inbox.get(), READY_TIMEOUT_S)
        except TimeoutError:
            self._kill(worker)
            raise EngineError(f"{self.name} worker {index} did not start in time") from None
        if first is _CRASHED or first[0] != "ready":
            await asyncio.to_thread(process.join, 5)
            detail = first[1] if first is not _CRASHED and first[0] == "error" else ""
            raise EngineError(
                f"{self.name} worker {index} failed to start "
                f"({_exit_description(process)}){': ' + detail if detail else ''}"
            )
        worker.ready = True
        self.ready_details = tuple(first[2:])
        return worker

    def _read(self, worker: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: forward every message of one worker to its inbox, then its death."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            try:
                loop.call_soon_threadsafe(worker.inbox.put_nowait, message)
            except RuntimeError:  # the loop is closed: the server is gone
                return
        try:
            loop.call_soon_threadsafe(self._on_exit, worker)
        except RuntimeError:
            return

    def _on_exit(self, worker: _Worker) -> None:
        worker.inbox.put_nowait(_CRASHED)
        if not worker.ready or worker.dead or self._closing:
            return
        worker.dead = True
        self.crashes += 1
        self._spawn_task(self._replace(worker))

    async def _replace(self, dead: _Worker) -> None:
        await asyncio.to_thread(dead.process.join, 5)
        logger.error(
            f"{self.name} worker {dead.index} (pid {dead.pid}) died: "
            f"{_exit_description(dead.process)}; starting a replacement"
        )
        dead.conn.close()
        index = dead.index
        for attempt in range(1_000_000):
            await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
            if self._closing:
                return
            try:
                worker = await self._spawn(index)
            except EngineError as e:
                logger.error(f"{e}; retrying")
                continue
            self.restarts += 1
            self._idle.put_nowait(worker)
            logger.info(f"{self.name} worker {index} replaced (pid {worker.pid})")
            return

    def _spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kill(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()

    async def _acquire(self) -> _Worker:
        while True:
            worker = await self._idle.get()
            if not worker.dead:
                return worker

    async def run(self, job: Any, label: str = "?") -> AsyncIterator[Any]:
        """Run one job on a free worker, yielding what it sends as it arrives.

        Closing the iterator early (a cancelled context) leaves the job to finish in the
        background; its worker takes the next job afterwards.

        Args:
            job: The job, picklable.
            label: What the job belongs to (a context id), for logs.

        Yields:
            The worker's items.

        Raises:
            WorkerCrashed: The worker died while running the job.
            WorkerTimeout: The job outran ``job_timeout_s``.
            EngineError: The worker reported an exception.
        """
        worker = await self._acquire()
        finished = False
        try:
            worker.conn.send(job)
            deadline = time.monotonic() + self.job_timeout_s
            while True:
                try:
                    message = await asyncio.wait_for(
                        worker.inbox.get(), max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError:
                    finished = True  # the worker is killed; nothing comes back to drain
                    logger.error(
                        f"{self.name} worker {worker.index} ran over "
                        f"{self.job_timeout_s:g} s on {label}; killing it"
                    )
                    self._kill(worker)
                    raise WorkerTimeout("the engine took too long on this text") from None
                if message is _CRASHED:
                    finished = True
                    logger.error(f"{self.name} worker {worker.index} crashed on {label}")
                    logger.debug(f"{label}: the job that crashed it: {job!r:.500}")
                    raise WorkerCrashed("the engine worker crashed on this text")
                kind = message[0]
                if kind == "item":
                    yield message[1]
                elif kind == "done":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    raise EngineError(message[1])
        except (BrokenPipeError, OSError) as e:
            finished = True
            raise WorkerCrashed("the engine worker crashed on this text") from e
        finally:
            if finished:
                if not worker.dead and worker.process.is_alive():
                    self._idle.put_nowait(worker)
            else:
                self._spawn_task(self._drain(worker))

    async def _drain(self, worker: _Worker) -> None:
        """Wait for an abandoned job to end, then give its worker back."""
        deadline = time.monotonic() + self.job_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(
                    worker.inbox.get(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                self._kill(worker)
                return
            if message is _CRASHED:
                return
            if message[0] in ("done", "error"):
                if not worker.dead:
                    self._idle.put_nowait(worker)
                return

    async def close(self) -> None:
        """Stop every worker."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for worker in self._workers.values():
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers.values():
            await asyncio.to_thread(worker.process.join, 2)
            self._kill(worker)
            worker.conn.close()
