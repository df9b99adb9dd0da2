"""The agent's side of its worker processes: start, talk over the control pipe, supervise, stop.

Each :class:`WorkerHandle` owns one worker process (see `worker_context`), the agent end
of its duplex Pipe and one reader thread that matches replies to waiting calls. When the
process dies, every waiting call fails with :class:`WorkerGone` at once, never after a
timeout.

Start methods (`eep_agent.settings.WORKER_START_METHODS`): ``forkserver`` (the default) forks each worker from
one server process that imported torch and the worker module once, when the agent started
(see `WorkerPool.warm_up`); a worker is then up in tens of milliseconds, where ``spawn``
starts a fresh interpreter that imports torch again (seconds on a small host) and takes
about a second more to exit. The server runs a single thread and never touches a device,
so forking it is safe; each worker still sets up its own torch threads and process groups.
``spawn`` remains for hosts without ``fork`` and for ruling the server out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from eep_agent.runtime.commands import Command, Ready, Reply, Request, Stop, WorkerIdentity
from eep_agent.settings import StartMethod

log = logging.getLogger(__name__)

# what the fork server imports once, so that each worker forked from it has them loaded
FORKSERVER_PRELOAD = ["torch", "eep_agent.runtime.worker"]


def worker_context(method: StartMethod) -> Any:
    """The context workers are started with: the standard library's (``torch.multiprocessing``
    hands out the very same objects, and the worker module imports torch, which registers
    its tensor reductions); with ``forkserver`` its server preloads FORKSERVER_PRELOAD."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


class WorkerError(RuntimeError):
    """A command failed inside the worker; ``str()`` is the worker's reason."""

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class WorkerGone(WorkerError):
    """The worker process is not running (any more)."""


@dataclass
class WorkerRecord:
    """What the agent knows about a worker beyond its process: its place in the deployment."""

    rank: int | None = None
    generation: int = -1
    state: str = "starting"
    draining: bool = False
    inflight: int = 0
    served: int = 0
    aborted: int = 0
    op_id: str | None = None
    # whether it holds the active process group, as of its last load report (None: not yet)
    has_active_group: bool | None = None
    pending_forwards: set[concurrent.futures.Future[Any]] = field(default_factory=set)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking forward requests; wait for in-flight ones up to ``timeout_s``; abort the
        rest (their callers get a stale-layout error and retry elsewhere). Returns how many."""
        self.draining, self.state = True, "draining"
        deadline = time.monotonic() + timeout_s
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        aborted = 0
        for future in list(self.pending_forwards):
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(
                    WorkerError("request aborted: the worker left the deployment", stale=True)
                )
                aborted += 1
        self.aborted += aborted
        return aborted


class WorkerHandle:
    """One worker process and its control channel."""

    def __init__(
        self,
        identity: WorkerIdentity,
        log_level: str = "WARNING",
        method: StartMethod = "forkserver",
        log_format: str = "text",
    ) -> None:
        from eep_agent.runtime.worker import worker_main

        self.identity = identity
        ctx = worker_context(method)
        parent, child = ctx.Pipe(duplex=True)
        self._conn: Connection = parent
        self.process: BaseProcess = ctx.Process(
            target=worker_main,
            args=(child, identity, log_level, log_format),
            name=f"eep-worker-{identity.deployment}-{identity.device_index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.record = WorkerRecord()
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._closed = False
        self._stopped = False
        self._reader = threading.Thread(
            target=self._read_replies,
            name=f"eep-worker-reader-{identity.device_index}",
            daemon=True,
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        # a worker being stopped is not alive for anyone (its process object is closed after)
        return not self._stopped and not self._closed and self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        try:
            return self.process.exitcode
        except ValueError:  # stopped: the process object is closed
            return None

    def _read_replies(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Ready):
                if not self._ready.done():
                    self._ready.set_result(message.pid)
                continue
            if not isinstance(message, Reply):
                continue
            with self._lock:
                future = self._pending.pop(message.id, None)
            if future is None:
                continue
            # the waiting side may have cancelled or aborted it meanwhile
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if message.ok:
                    future.set_result(message.value)
                else:
                    future.set_exception(
                        WorkerError(message.error or "failed", stale=message.stale)
                    )
        self._fail_all()

    def _fail_all(self) -> None:
        self.process.join(timeout=1.0)
        reason = f"worker pid {self.pid} exited (code {self.process.exitcode})"
        gone = WorkerGone(reason)
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        if not self._ready.done():
            self._ready.set_exception(gone)
        for future in pending.values():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(gone)
        self.record.state = "exited"

    async def wait_ready(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._ready), timeout_s)
        except asyncio.TimeoutError:
            raise WorkerGone(f"worker pid {self.pid} did not start within {timeout_s}s") from None
        self.record.state = "idle"

    def submit(self, command: Command) -> concurrent.futures.Future[Any]:
        """Send ``command``; the future resolves with the worker's answer."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(WorkerGone(f"worker pid {self.pid} is not running"))
                return future
            request = Request(next(self._ids), command)
            self._pending[request.id] = future
        try:
            with self._send_lock:
                self._conn.send(request)
        except (OSError, EOFError, BrokenPipeError) as exc:
            with self._lock:
                self._pending.pop(request.id, None)
            if not future.done():
                future.set_exception(
                    WorkerGone(f"worker pid {self.pid}: control channel closed ({exc})")
                )
        return future

    async def call(self, command: Command, timeout_s: float) -> Any:
        """Run ``command`` and return its answer; raises WorkerError / WorkerGone / TimeoutError."""
        future = self.submit(command)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(0.01, timeout_s))
        except asyncio.TimeoutError:
            future.cancel()
            raise WorkerError(
                f"{type(command).__name__} got no answer within {timeout_s:.1f}s"
            ) from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to stop; terminate, then kill, if it does not. Blocking; joins the
        reader. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.is_alive():
            future = self.submit(Stop())
            with contextlib.suppress(Exception):
                future.result(timeout=min(timeout_s, 5.0))
            self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            log.warning("worker pid %s did not stop; terminating", self.pid)
            self.process.terminate()
            self.process.join(timeout=5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._reader.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self.process.close()
        self.record.state = "stopped"


class WorkerPool:
    """Every worker of this agent, keyed by (deployment, device index)."""

    def __init__(
        self,
        log_level: str = "WARNING",
        method: StartMethod = "forkserver",
        log_format: str = "text",
    ) -> None:
        self.log_level = log_level
        self.method = method
        self.log_format = log_format
        self._workers: dict[tuple[str, int], WorkerHandle] = {}

    def warm_up(self) -> None:
        """With ``forkserver``: start the fork server now, so that it has imported torch by
        the time the first worker is wanted. Returns at once (the server imports on its
        own); blocking only for the moment it takes to launch it."""
        if self.method == "forkserver":
            worker_context(self.method)  # sets the server's preload
            forkserver.ensure_running()

    def get(self, deployment: str, device_index: int) -> WorkerHandle | None:
        return self._workers.get((deployment, device_index))

    def all(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    async def start(self, identity: WorkerIdentity, timeout_s: float = 120.0) -> WorkerHandle:
        key = (identity.deployment, identity.device_index)
        old = self._workers.get(key)
        if old is not None and old.alive:
            return old
        if old is not None:
            await self.stop(identity.deployment, identity.device_index, old)
        started = time.monotonic()
        handle = await asyncio.to_thread(
            WorkerHandle, identity, self.log_level, self.method, self.log_format
        )
        self._workers[key] = handle
        await handle.wait_ready(timeout_s)
        log.info(
            "worker %s/%s:%d started (pid %s) in %.1fs",
            identity.deployment, identity.device_kind, identity.device_index, handle.pid, time.monotonic() - started,
        )  # fmt: skip
        return handle

    def detach(
        self, deployment: str, device_index: int, handle: WorkerHandle | None = None
    ) -> WorkerHandle | None:
        """Take the worker of (deployment, device) out of the pool and return it, to be
        stopped. With ``handle``, that worker only: one started since in its place (for a
        newer operation) stays in the pool. Synchronous, so no other task can take a worker
        between the decision to stop it and its removal."""
        key = (deployment, device_index)
        current = self._workers.get(key)
        if handle is None:
            handle = current
        if handle is not None and handle is current:
            del self._workers[key]
        return handle

    async def stop(
        self, deployment: str, device_index: int, handle: WorkerHandle | None = None
    ) -> None:
        """Stop the worker of (deployment, device), or only ``handle`` (see `detach`)."""
        victim = self.detach(deployment, device_index, handle)
        if victim is not None:
            await asyncio.to_thread(victim.stop)

    async def stop_all(self) -> None:
        handles = list(self._workers.items())
        self._workers.clear()
        await asyncio.gather(*(asyncio.to_thread(h.stop) for _, h in handles))
