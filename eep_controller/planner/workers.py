"""Planning layers on several cores at once.

Every layer of a placement or a rescale is planned on its own, so the layers can be split
across processes with the very same result. One share stays in the calling process; the
others go to worker processes (``python -m eep_controller.planner.worker``, fresh interpreters that inherit
nothing of the caller's threads or sockets and never import the caller's main module), over
their stdin and stdout. Workers start in the background on first use and take work once they
report ready; until then, on a one-core machine, with workers switched off, while another
thread uses them, or when one fails, the caller plans every layer itself. The plan is the
same either way.

Worker count: :func:`configure_workers` (the controller passes ``planner.workers`` of its
settings), else the ``EEP_PLANNER_WORKERS`` environment variable, else one fewer than the
cores this process may use (at most MAX_AUTO_WORKERS); 0 switches them off.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import numpy.typing as npt

WORKERS_ENV = "EEP_PLANNER_WORKERS"
WORKER_MODULE = "eep_controller.planner.worker"
MAX_AUTO_WORKERS = 3
# Fewer layers than this are planned in the calling process: the round trip would cost more.
MIN_LAYERS = 8
# How long a stopping worker gets to exit on its own before it is killed.
STOP_GRACE_S = 2.0
# Workers that die before reporting ready this many times in a row are not started again.
MAX_FAILED_STARTS = 3
# How long a worker may take to start answering (its share takes well under a second).
ANSWER_TIMEOUT_S = 30.0

Out = TypeVar("Out", bound=npt.NDArray[Any])


def send_frame(stream: IO[bytes], obj: object) -> None:
    """Write one length-prefixed pickle frame."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little"))
    stream.write(data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """Read one frame written by :func:`send_frame`; EOFError when the stream ended."""
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("stream closed")
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("stream closed mid-frame")
    return pickle.loads(data)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Worker:
    """One worker process; used by one caller at a time (see `_Pool.borrow`)."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        # `python -m` puts its working directory first on the path: run it where this
        # package lives, so another `eep_controller` in the caller's directory (a checkout
        # of another version) cannot supply the worker's code
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=package_root,
        )
        self.ready = False
        self.dead = False

    def poll_ready(self) -> bool:
        """True once the worker reported ready (never blocks)."""
        if self.ready or self.dead:
            return self.ready
        out = self.proc.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], 0)
        if not readable:
            return False
        try:
            self.ready = read_frame(out) == "ready"
        except (EOFError, OSError, pickle.UnpicklingError):
            self.ready = False
        self.dead = not self.ready
        return self.ready

    def send(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        assert self.proc.stdin is not None
        send_frame(self.proc.stdin, (fn.__module__, fn.__qualname__, args))

    def receive(self, timeout: float) -> Any:
        """The result of the last `send`; raises what the call raised there, or
        ConnectionError when the worker is gone or has not begun to answer within `timeout`
        seconds (then it is stopped: a stuck worker must not hold up a plan)."""
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            self.stop()
            raise ConnectionError(f"planner worker {self.proc.pid} did not answer in {timeout} s")
        try:
            status, value = read_frame(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            self.dead = True
            raise ConnectionError(f"planner worker {self.proc.pid} is gone") from exc
        if status != "ok":
            raise RuntimeError(f"planner worker {self.proc.pid}: {value}")
        return value

    def stop(self) -> None:
        """Close its stdin (it exits on EOF), wait, kill it by pid if it lingers."""
        self.dead = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Pool:
    """The lazily started workers of this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = threading.Lock()
        self._configured: int | None = None
        self._workers: list[_Worker] = []
        self._failed = False
        self._failed_starts = 0
        self.layers_served = 0
        self.paused = 0

    def wanted(self) -> int:
        if self._configured is not None:
            return self._configured
        raw = os.environ.get(WORKERS_ENV, "").strip()
        if raw:
            try:
                return max(0, int(raw))
            except ValueError:
                raise ValueError(f"{WORKERS_ENV} must be a whole number, got {raw!r}") from None
        return max(0, min(_usable_cores() - 1, MAX_AUTO_WORKERS))

    def configure(self, workers: int | None) -> None:
        if workers is not None and workers < 0:
            raise ValueError(f"planner workers must be >= 0, got {workers}")
        self.shutdown()
        with self._lock:
            self._configured = workers
            self._failed = False
            self._failed_starts = 0

    def _start(self) -> None:
        """Start the wanted workers unless running or failed (lock held)."""
        if self._workers or self._failed:
            return
        try:
            self._workers = [_Worker() for _ in range(self.wanted())]
        except OSError:
            self._failed = True

    def borrow(self) -> list[_Worker] | None:
        """The ready workers for the caller's sole use (give back with `give_back`), or
        None: none wanted, not ready yet (they are started), or in use by another thread."""
        if self.paused or not self._busy.acquire(blocking=False):
            return None
        try:
            with self._lock:
                self._start()
                ready = [w for w in self._workers if w.poll_ready()]
                self._drop_dead()
                if ready and len(ready) == len(self._workers):
                    return ready
        except BaseException:
            self._busy.release()
            raise
        self._busy.release()
        return None

    def give_back(self) -> None:
        with self._lock:
            self._drop_dead()
        self._busy.release()

    def _drop_dead(self) -> None:
        """Stop every worker when one died (lock held); the next call starts fresh ones,
        unless workers keep dying before they report ready (then none start again until
        `configure`)."""
        if any(w.dead for w in self._workers):
            if any(w.dead and not w.ready for w in self._workers):
                self._failed_starts += 1
                self._failed = self._failed_starts >= MAX_FAILED_STARTS
            else:
                self._failed_starts = 0
            for w in self._workers:
                w.stop()
            self._workers = []

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers if not w.dead]

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            self._start()
        while time.monotonic() < deadline:
            with self._lock:
                if not self._workers:
                    return False
                for w in self._workers:
                    w.poll_ready()
                if any(w.dead for w in self._workers):
                    self._drop_dead()
                    return False
                if all(w.ready for w in self._workers):
                    return True
            time.sleep(0.01)
        return False

    def shutdown(self) -> None:
        with self._busy, self._lock:
            workers, self._workers = self._workers, []
            for w in workers:
                w.stop()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def configure_workers(workers: int | None) -> None:
    """Set how many worker processes plan layers (None = automatic, 0 = none); stops the
    running ones, the next large plan starts new ones."""
    _POOL.configure(workers)


def shutdown_workers() -> None:
    """Stop the worker processes (they start again when next needed)."""
    _POOL.shutdown()


def worker_pids() -> list[int]:
    """Pids of the running worker processes."""
    return _POOL.pids()


@contextlib.contextmanager
def planning_alone() -> Iterator[None]:
    """Within this block the calling process plans every layer itself; running workers stay
    up (for timing a plan without them, e.g. in benchmarks)."""
    with _POOL._lock:
        _POOL.paused += 1
    try:
        yield
    finally:
        with _POOL._lock:
            _POOL.paused -= 1


def layers_served() -> int:
    """How many layers workers of this process have planned so far."""
    return _POOL.layers_served


def wait_for_workers(timeout: float = 60.0) -> bool:
    """Start the workers if needed and wait until they are ready; False when they cannot
    run (none wanted, or they failed to start)."""
    return _POOL.wait(timeout)


def by_layers(
    fn: Callable[..., Out], *arrays: npt.NDArray[Any], extra: tuple[Any, ...] = ()
) -> Out:
    """``fn(*arrays, *extra)`` for a `fn` that treats every layer (index of the first axis of
    each of `arrays`) on its own, with the layers dealt round-robin to this process and the
    ready workers; `extra` goes to every call as it is.

    `fn` must be a module-level function (the worker imports it by name). Identical to the
    direct call; falls back to it while no worker is ready and when one fails.
    """
    layers = arrays[0].shape[0]
    workers = _POOL.borrow() if layers >= MIN_LAYERS else None
    if workers is None:
        return fn(*arrays, *extra)
    pending: list[_Worker] = []  # asked, answer not read yet
    try:
        parts = min(len(workers) + 1, layers)
        picks = [np.arange(k, layers, parts) for k in range(parts)]
        sent: list[tuple[int, _Worker]] = []
        for k, worker in enumerate(workers[: parts - 1], start=1):
            try:
                worker.send(fn, (*(a[picks[k]] for a in arrays), *extra))
                sent.append((k, worker))
                pending.append(worker)
            except OSError:
                worker.dead = True
        mine = fn(*(a[picks[0]] for a in arrays), *extra)
        out: Out = np.empty((layers, *mine.shape[1:]), dtype=mine.dtype)  # type: ignore[assignment]
        out[picks[0]] = mine
        done = {0}
        for k, worker in sent:
            try:
                out[picks[k]] = worker.receive(ANSWER_TIMEOUT_S)
                done.add(k)
                _POOL.layers_served += picks[k].size
            except (ConnectionError, RuntimeError):
                # gone, or fn failed there: plan these layers here (a real error re-raises)
                pass
            pending.remove(worker)
        for k, pick in enumerate(picks):
            if k not in done:
                out[pick] = fn(*(a[pick] for a in arrays), *extra)
        return out
    finally:
        # an answer left unread would be taken for the next request's: read and drop it
        for worker in pending:
            with contextlib.suppress(ConnectionError, RuntimeError):
                worker.receive(ANSWER_TIMEOUT_S)
        _POOL.give_back()
