"""The worker process: one per rank (device), spawned and supervised by the agent.

Control channel: a ``multiprocessing`` duplex Pipe. The agent sends :class:`Request`s and
reads :class:`Reply`s (matched by id); the worker announces itself with :class:`Ready`.
The pipe doubles as the liveness signal: when the agent goes away the pipe closes and the
worker exits.

Two threads:

- the **main thread** reads the pipe and answers quick commands in order: ``Forward``,
  ``Stats``, ``HostRendezvous``, ``Switch``, ``Stop``. Because forward steps and the switch
  run on this one thread, a switch always happens between two forward steps;
- the **operation thread** runs the long commands one at a time: ``Load``,
  ``BuildStandby``, ``Transfer``, ``Cleanup``, ``Abort``. Serving continues meanwhile.

Group state changes (standby built, switched, destroyed) happen under one lock and only
after the work they describe has succeeded.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import queue
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from eep_agent.runtime.checkpoint import ExpertCheckpoint
from eep_agent.runtime.commands import (
    Abort,
    BuildStandby,
    Cleanup,
    Command,
    Forward,
    ForwardResult,
    HostRendezvous,
    Load,
    RawExchange,
    Ready,
    Reply,
    Request,
    Stats,
    Stop,
    Switch,
    Transfer,
    TransferResult,
    WorkerIdentity,
    WorkerStats,
)
from eep_agent.runtime.expert_store import ExpertStore, StaleExperts
from eep_agent.runtime.groups import (
    JoinCancelled,
    RendezvousServer,
    StatelessGroup,
    backend_for,
    torch_device,
)
from eep_agent.runtime.moves import MoveKind
from eep_agent.runtime.transfer import CorruptionSpec, execute_moves
from eep_controller.logs import setup_logging

log = logging.getLogger("eep_agent.worker")

LONG_COMMANDS = (Load, BuildStandby, Transfer, RawExchange, Cleanup, Abort)
FORWARD_DELAY_ENV = "EEP_TEST_FORWARD_DELAY_S"
"""Test hook: seconds every forward request takes, so a test can catch requests in flight."""


class CommandFailed(RuntimeError):
    pass


class Worker:
    """The state of one worker process and the handlers of its commands."""

    def __init__(self, identity: WorkerIdentity, conn: Connection) -> None:
        self.identity = identity
        self.conn = conn
        self.backend = backend_for(identity.device_kind)
        self.device = torch_device(identity.device_kind, identity.device_index)
        self._send_lock = threading.Lock()
        self._state = threading.Lock()
        self.store: ExpertStore | None = None
        self.checkpoint: ExpertCheckpoint | None = None
        self.generation = -1
        self.rank: int | None = None
        self.active: StatelessGroup | None = None
        self.standby: tuple[str, StatelessGroup] | None = None
        self.retired: tuple[str, StatelessGroup] | None = None
        self.servers: dict[str, RendezvousServer] = {}
        self.aborted: set[str] = set()
        self.served = 0
        self.forward_delay_s = float(os.environ.get(FORWARD_DELAY_ENV, "0") or 0)
        self._ops: queue.Queue[Request | None] = queue.Queue()
        self._op_thread = threading.Thread(target=self._op_loop, name="eep-worker-ops", daemon=True)

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        parent = os.getppid()
        self._op_thread.start()
        self._send(Ready(os.getpid()))
        while True:
            try:
                if not self.conn.poll(1.0):
                    if os.getppid() != parent:
                        log.warning("agent (pid %d) is gone; worker exits", parent)
                        break
                    continue
                request = self.conn.recv()
            except (EOFError, OSError):
                # the agent stops a worker with Stop: a channel that closes means it is gone
                log.warning("the agent's control channel closed; worker exits")
                break
            if not isinstance(request, Request):
                log.warning("ignoring a control message of type %s", type(request).__name__)
                continue
            if isinstance(request.command, Stop):
                self._reply(Reply(request.id, True))
                break
            if isinstance(request.command, LONG_COMMANDS):
                if isinstance(request.command, Abort):
                    self.aborted.add(request.command.op_id)
                self._ops.put(request)
                continue
            self._reply(self._handle(request))
        self._shutdown()

    def _op_loop(self) -> None:
        while True:
            request = self._ops.get()
            if request is None:
                return
            self._reply(self._handle(request))

    def _handle(self, request: Request) -> Reply:
        command = request.command
        try:
            value = self._dispatch(command)
        except StaleExperts as exc:
            return Reply(request.id, False, error=str(exc), stale=True)
        except Exception as exc:
            log.warning(
                "%s failed: %s",
                type(command).__name__,
                exc,
                exc_info=not isinstance(exc, CommandFailed),
            )
            return Reply(request.id, False, error=f"{type(command).__name__} failed: {exc}")
        return Reply(request.id, True, value)

    def _dispatch(self, command: Command) -> Any:
        if isinstance(command, Forward):
            return self.forward(command)
        if isinstance(command, Stats):
            return self.stats()
        if isinstance(command, Load):
            return self.load(command)
        if isinstance(command, HostRendezvous):
            return self.host_rendezvous(command)
        if isinstance(command, BuildStandby):
            return self.build_standby(command)
        if isinstance(command, Transfer):
            return self.transfer(command)
        if isinstance(command, RawExchange):
            return self.raw_exchange(command)
        if isinstance(command, Switch):
            return self.switch(command)
        if isinstance(command, Cleanup):
            return self.cleanup(command)
        if isinstance(command, Abort):
            return self.abort(command)
        raise CommandFailed(f"unknown command {type(command).__name__}")

    def _send(self, message: Any) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _reply(self, reply: Reply) -> None:
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            self._send(reply)

    def _shutdown(self) -> None:
        self._ops.put(None)
        self._op_thread.join(timeout=2.0)
        with self._state:
            groups = [self.active, *(g for _, g in filter(None, (self.standby, self.retired)))]
            self.active = self.standby = self.retired = None
        for group in groups:
            if group is not None:
                group.destroy()
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        with contextlib.suppress(OSError):
            self.conn.close()

    # ------------------------------------------------------------------ commands
    def _expert_store(self) -> ExpertStore:
        if self.store is None:
            raise CommandFailed("the worker has not been loaded yet")
        return self.store

    def load(self, command: Load) -> int:
        store = ExpertStore(command.shape, self.device)
        checkpoint = (
            ExpertCheckpoint(command.checkpoint, command.shape, self.device)
            if command.checkpoint
            else None
        )
        if command.slots is not None:
            if checkpoint is None:
                raise CommandFailed("slots to fill but the deployment has no checkpoint")
            for layer in range(command.shape.layers):
                for slot in range(command.shape.slots):
                    expert = int(command.slots[layer, slot])
                    if expert >= 0:
                        store.active.put(layer, slot, expert, checkpoint.expert(layer, expert))
        with self._state:
            self.store, self.checkpoint = store, checkpoint
            self.generation, self.rank = command.generation, command.rank
        return store.active.nbytes

    def host_rendezvous(self, command: HostRendezvous) -> int:
        if command.op_id in self.aborted:
            raise CommandFailed(f"operation {command.op_id} was aborted")
        server = self.servers.get(command.op_id)
        if server is None:
            server = RendezvousServer(command.host, command.world_size, command.timeout_s)
            self.servers[command.op_id] = server
        return server.port

    def build_standby(self, command: BuildStandby) -> float:
        if command.op_id in self.aborted:
            raise CommandFailed(f"operation {command.op_id} was aborted")
        with self._state:
            if self.standby is not None and self.standby[0] == command.op_id:
                return 0.0
        started = time.monotonic()
        try:
            group = StatelessGroup.join(
                command.address,
                command.rank,
                device=self.device,
                timeout_s=command.timeout_s,
                server=self.servers.get(command.op_id),
                cancelled=lambda: command.op_id in self.aborted,
            )
        except JoinCancelled:
            raise CommandFailed(
                f"operation {command.op_id} was aborted while its group was built"
            ) from None
        try:
            group.warm_up(self.device, max(0.001, command.timeout_s - (time.monotonic() - started)))
        except Exception:
            group.destroy()
            raise
        with self._state:
            if command.op_id in self.aborted:
                keep = False
            else:
                old, self.standby = self.standby, (command.op_id, group)
                keep = True
        if not keep:
            group.destroy()
            raise CommandFailed(f"operation {command.op_id} was aborted while its group was built")
        if old is not None:
            old[1].destroy()
        return time.monotonic() - started

    def transfer(self, command: Transfer) -> TransferResult:
        if command.op_id in self.aborted:
            raise CommandFailed(f"operation {command.op_id} was aborted")
        store = self._expert_store()
        deadline = time.monotonic() + command.timeout_s
        moves = command.moves
        if moves.world == "standby":
            standby = self.standby
            group = standby[1] if standby is not None and standby[0] == command.op_id else None
        else:
            group = self.active
        staged = None
        if command.new_slots is not None:
            filled = {(m.layer, m.dst_slot) for m in moves.moves if m.kind is not MoveKind.SEND}
            staged = store.stage(command.op_id, command.new_slots, filled)
        report = execute_moves(
            moves,
            group=group,
            active=store.active,
            staged=staged,
            checkpoint=self.checkpoint,
            device=self.device,
            deadline=deadline,
            corruption=CorruptionSpec.from_env(),
        )
        error = report.error
        if error is None and staged is not None:
            missing = staged.missing()
            if missing:
                layer, slot, expert = missing[0]
                error = (
                    f"{len(missing)} new slot(s) have no source: e.g. layer {layer} slot {slot} "
                    f"expert {expert} is neither held here nor transferred"
                )
        if error is not None:
            store.drop_staged()
        if report.group_broken and group is not None:
            self._discard_group(group)
        return TransferResult(
            report.bytes_sent,
            report.bytes_received,
            report.tensors_verified,
            report.checksum_failures,
            report.reloads,
            report.seconds,
            error,
        )

    def raw_exchange(self, command: RawExchange) -> float:
        standby = self.standby
        if standby is None or standby[0] != command.op_id:
            raise CommandFailed(f"no standby group built for operation {command.op_id}")
        group = standby[1]
        sends = [
            (peer, tag, torch.ones(n // 4, device=self.device)) for peer, n, tag in command.sends
        ]
        started = time.monotonic()
        # receive buffers are fresh, as in a real transfer (their first touch is part of the cost)
        works = [
            group.recv(torch.empty(n // 4, device=self.device), peer, tag)
            for peer, n, tag in command.recvs
        ]
        works += [group.send(t, peer, tag) for peer, tag, t in sends]
        for work in works:
            remaining = command.timeout_s - (time.monotonic() - started)
            work.wait(datetime.timedelta(seconds=max(0.001, remaining)))
        return time.monotonic() - started

    def _discard_group(self, group: StatelessGroup) -> None:
        """Destroy a group whose transfer failed mid-way.

        Its abandoned messages could match a later operation's tags, so it is never reused;
        destroying it also closes its connections, so peers still waiting on this rank fail
        at once instead of at their deadline.
        """
        with self._state:
            if self.standby is not None and self.standby[1] is group:
                self.standby = None
            if self.active is group:
                self.active = None
        group.destroy()
        log.warning("destroyed group %s after a failed transfer", group.prefix)

    def switch(self, command: Switch) -> int:
        store = self._expert_store()
        with self._state:
            if self.standby is None or self.standby[0] != command.op_id:
                raise CommandFailed(f"no standby group built for operation {command.op_id}")
            store.swap(command.op_id)
            old = self.active
            self.active = self.standby[1]
            self.standby = None
            if old is not None:
                self.retired = (command.op_id, old)
            self.generation, self.rank = command.generation, command.rank
            self.servers.pop(command.op_id, None)  # now owned by the active group
        return self.generation

    def cleanup(self, command: Cleanup) -> bool:
        with self._state:
            retired, self.retired = self.retired, None
        if retired is not None:
            retired[1].destroy()
        gc.collect()
        return retired is not None

    def abort(self, command: Abort) -> bool:
        with self._state:
            standby = self.standby
            if standby is not None and standby[0] == command.op_id:
                self.standby = None
            else:
                standby = None
            if self.store is not None and self.store.staged_for == command.op_id:
                self.store.drop_staged()
            server = self.servers.pop(command.op_id, None)
        if standby is not None:
            standby[1].destroy()
        if server is not None:
            server.close()
        gc.collect()
        return standby is not None

    def forward(self, command: Forward) -> ForwardResult:
        if self.forward_delay_s:
            time.sleep(self.forward_delay_s)  # test hook: a slow request to drain
        store = self._expert_store()
        tokens = torch.from_numpy(np.ascontiguousarray(command.tokens, dtype=np.float32)).to(
            self.device
        )
        with torch.no_grad():
            out = store.forward(command.layer, np.asarray(command.experts, dtype=np.int64), tokens)
        self.served += 1
        return ForwardResult(self.generation, out.cpu().numpy())

    def stats(self) -> WorkerStats:
        store = self.store
        return WorkerStats(
            generation=self.generation,
            rank=self.rank,
            served=self.served,
            load=store.take_load() if store is not None else None,
            has_active_group=self.active is not None,
            has_standby_group=self.standby is not None,
            has_retired_group=self.retired is not None,
            staged_for=store.staged_for if store is not None else None,
            cache_sizes=store.caches.sizes() if store is not None else {},
            expert_bytes=store.active.nbytes if store is not None else 0,
        )


def worker_main(
    conn: Connection, identity: WorkerIdentity, log_level: str = "WARNING", log_format: str = "text"
) -> None:
    """Entry point of the spawned process."""
    name = f"{identity.deployment}/{identity.device_kind}:{identity.device_index}"
    setup_logging(
        log_level,
        log_format,
        text_format=f"%(asctime)s %(levelname)s worker[{name}] %(message)s",
        worker=name,
    )
    torch.set_num_threads(identity.torch_threads)
    Worker(identity, conn).serve()
