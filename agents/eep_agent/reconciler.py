"""Keeps this node's workers in line with etcd: acts on operation phases, undoes aborted ones,
and keeps one worker per committed rank on this node (and none beyond).

``reconcile_once`` only decides and starts tasks; the tasks do the slow work. Each
(op, phase, participant) is started at most once per agent process, and not at all when its
ack is already in etcd (an agent that restarts does not redo what it acked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from eep_agent.op_driver import OpDriver, fenced
from eep_agent.worker_pool import WorkerHandle
from eep_controller.protocol import ACKED_PHASES, Operation, OpState
from eep_controller.store.audit import record_event
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 5.0


def exit_text(code: int | None) -> str:
    """How a worker process ended: "exited (code 1)", "was killed (SIGKILL)"."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed (signal {-code})"
    return f"exited (code {code})"


class NodeReconciler:
    def __init__(self, driver: OpDriver) -> None:
        self.driver = driver
        self.view = driver.view
        self.pool = driver.pool
        self.node_id = driver.node.node_id
        self._tasks: dict[tuple[Any, ...], asyncio.Task[None]] = {}
        self._started: set[tuple[str, str, int]] = set()
        self._aborted: set[str] = set()
        self._last_restart: dict[tuple[str, int], float] = {}
        # per device: the last restart error, and where and why its worker went down
        self._failed: dict[tuple[str, int], str] = {}
        self._down: dict[tuple[str, int], tuple[str, str]] = {}

    def _spawn(self, key: tuple[Any, ...], coro: Coroutine[Any, Any, None]) -> None:
        if key in self._tasks:
            coro.close()
            return
        task = asyncio.create_task(coro, name="/".join(map(str, key)))
        self._tasks[key] = task
        task.add_done_callback(lambda t, k=key: self._done(k, t))  # type: ignore[misc]

    def _done(self, key: tuple[Any, ...], task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %s", key, task.exception())

    async def _abort(self, op: Operation, acts: list[asyncio.Task[None]]) -> None:
        """Undo this node's part of ``op`` once none of its phase actions still runs."""
        await cancel_and_wait(acts)
        await self.driver.abort(op)

    def busy(self, deployment: str, device_index: int) -> bool:
        return any(
            k[1:3] == (deployment, device_index) for k in self._tasks if k[0] in ("stop", "restart")
        )

    def reconcile_once(self) -> None:
        deployments = set(self.view.deployments())
        for deployment in deployments:
            self._reconcile_deployment(deployment)
        for handle in self.pool.all():
            d = handle.identity.deployment
            if d not in deployments or self.view.spec(d) is None:
                self._stop(d, handle, "its deployment is gone")

    def _mine(self, op: Operation) -> list[int]:
        if op.plan is None:
            return []
        return [i for i, p in enumerate(op.plan.participants) if p.node_id == self.node_id]

    def _reconcile_deployment(self, deployment: str) -> None:
        committed = self.view.committed_generation(deployment)
        layout = self.view.layout(deployment)
        committed_by = None if layout is None else layout.op_id
        involved: set[int] = set()
        for op in self.view.ops(deployment):
            mine = self._mine(op)
            if not mine:
                continue
            assert op.plan is not None
            if op.state is OpState.ABORTED:
                if op.id not in self._aborted and committed != op.to_generation:
                    self._aborted.add(op.id)
                    acts = [t for k, t in self._tasks.items() if k[0] == "act" and k[1] == op.id]
                    self._spawn(("abort", op.id), self._abort(op, acts))
                continue
            if op.state.terminal:
                continue
            # Its workers are spoken for while the op is about the committed generation: planned
            # from it, or the one that committed it (the layout may be seen a moment before the
            # op's SWITCHING state). An op fenced out that way can never act and holds nothing.
            about_committed = op.from_generation == committed or (
                op.to_generation == committed and committed_by in (None, op.id)
            )
            if not about_committed:
                continue
            involved.update(op.plan.participants[i].device_index for i in mine)
            if op.state not in ACKED_PHASES or not fenced(op, op.state, committed, committed_by):
                continue
            for index in mine:
                once = (op.id, op.state.value, index)
                if once in self._started or self.view.has_ack(
                    deployment, op.id, op.state.value, index
                ):
                    continue
                self._started.add(once)
                self._spawn(
                    ("act", op.id, op.state.value, index), self.driver.act(op, op.state, index)
                )
        self._keep_committed_workers(deployment, involved)

    def _keep_committed_workers(self, deployment: str, involved: set[int]) -> None:
        layout = self.view.layout(deployment)
        committed = (
            {r.device_index for r in layout.ranks if r.node_id == self.node_id}
            if layout is not None
            else set()
        )
        for handle in self.pool.all():
            if handle.identity.deployment != deployment:
                continue
            index = handle.identity.device_index
            if index in involved:
                continue
            if index not in committed:
                self._stop(
                    deployment, handle, "it holds no committed rank and takes part in no operation"
                )
            elif not handle.alive:
                self._restart(deployment, index)
            elif handle.record.op_id is not None:
                stale = self.view.op(deployment, handle.record.op_id)
                if stale is None or stale.state is OpState.ABORTED:
                    op_id = handle.record.op_id
                    handle.record.op_id = None
                    self._spawn(
                        ("forget", deployment, index, op_id),
                        self._forget(handle.identity.device_index, deployment, op_id),
                    )
        for index in committed - involved:
            if self.pool.get(deployment, index) is None:
                self._restart(deployment, index)

    async def _forget(self, index: int, deployment: str, op_id: str) -> None:
        from eep_agent.runtime.commands import Abort

        handle = self.pool.get(deployment, index)
        if handle is not None and handle.alive:
            with contextlib.suppress(Exception):
                await handle.call(Abort(op_id), 60.0)

    def _stop(self, deployment: str, handle: WorkerHandle, why: str) -> None:
        index = handle.identity.device_index
        if self.busy(deployment, index):
            return
        log.info("stopping worker %s/%d: %s", deployment, index, why)
        # out of the pool now, not when the task runs: an operation starting a worker on
        # the device meanwhile must neither reuse this one nor have its own stopped
        victim = self.pool.detach(deployment, index, handle)
        if victim is not None:
            self._spawn(("stop", deployment, index), asyncio.to_thread(victim.stop))

    def _restart(self, deployment: str, index: int) -> None:
        key = (deployment, index)
        now = time.monotonic()
        if (
            self.busy(deployment, index)
            or now - self._last_restart.get(key, -1e9) < RESTART_BACKOFF_S
        ):
            return
        self._last_restart[key] = now
        log.warning(
            "worker for committed rank on device %d of %s is not running; starting it",
            index,
            deployment,
        )
        self._spawn(("restart", deployment, index), self._restart_task(deployment, index))

    async def _restart_task(self, deployment: str, index: int) -> None:
        key = (deployment, index)
        handle = self.pool.get(deployment, index)
        if handle is not None and not handle.alive:
            # kept until a restart succeeds, so retries and their events name the first cause
            where = f"device {index} of {self.node_id}"
            if handle.record.rank is not None:
                where = f"rank {handle.record.rank} ({where})"
            self._down[key] = (where, f"its worker (pid {handle.pid}) {exit_text(handle.exitcode)}")
            await self.pool.stop(deployment, index, handle)
        where, cause = self._down.get(
            key,
            (f"device {index} of {self.node_id}", "the agent started without its worker"),
        )
        try:
            loaded = await self.driver.load_committed(deployment, index)
        except Exception as exc:
            # retried every RESTART_BACKOFF_S: recorded once per distinct error, not per try
            if self._failed.get(key) != str(exc):
                self._failed[key] = str(exc)
                await self._record(
                    deployment,
                    "worker.restart_failed",
                    f"{where}: {cause}; starting another from the checkpoint failed: {exc}",
                    {"node_id": self.node_id, "device_index": index, "error": str(exc)},
                )
            raise
        self._failed.pop(key, None)
        self._down.pop(key, None)
        if loaded is None:
            return
        rank, generation = loaded
        await self.driver.mark_groupless(deployment, generation, rank, index)
        await self._record(
            deployment,
            "worker.restarted",
            f"rank {rank} (device {index} of {self.node_id}): {cause}; restarted from the "
            f"checkpoint at generation {generation}",
            {"node_id": self.node_id, "device_index": index, "rank": rank,
             "generation": generation},
        )  # fmt: skip

    async def _record(
        self, deployment: str, type_: str, message: str, data: dict[str, Any]
    ) -> None:
        """An audit event for what only this node saw; a failure to write it is logged, and
        the restart it records stands."""
        try:
            await record_event(self.driver.store, deployment, type_, message, data)
        except Exception as exc:
            log.warning("could not record %s for %s: %s", type_, deployment, exc)

    async def shutdown(self) -> None:
        await cancel_and_wait(list(self._tasks.values()))
