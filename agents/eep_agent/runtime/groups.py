"""Stateless process groups: built from a TCPStore rendezvous, never through torch's WORLD.

A :class:`StatelessGroup` is ``ProcessGroup<Backend>(PrefixStore(prefix, TCPStore), rank,
size)``: no ``init_process_group``, no default group, so several groups (the active world
and the standby world of an operation) live side by side in one process. The backend
follows the device: gloo on CPU, NCCL on CUDA GPUs, HCCL on Ascend NPUs (``torch_npu`` is
imported only then). ``destroy()`` drops the backend and the store so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore

log = logging.getLogger(__name__)

Backend = Literal["gloo", "nccl", "hccl"]
BACKEND_BY_DEVICE: dict[str, Backend] = {"cpu": "gloo", "gpu": "nccl", "npu": "hccl"}


# How often a rank waiting for the rendezvous host or for the other ranks checks whether it
# should give up, and how long one plain TCP probe of the host may take.
ARRIVAL_POLL_S = 0.05
CONNECT_ATTEMPT_S = 1.0
ARRIVED_KEY = "eep-arrived"


class UnsupportedBackend(ValueError):
    """The device kind has no process-group backend eep knows how to build."""


class JoinCancelled(RuntimeError):
    """The caller gave up on a group (its operation ended) before every rank had joined."""


def backend_for(device_kind: str) -> Backend:
    try:
        return BACKEND_BY_DEVICE[device_kind]
    except KeyError:
        raise UnsupportedBackend(
            f"no process-group backend for device kind {device_kind!r}; "
            f"supported: {', '.join(f'{k} -> {v}' for k, v in BACKEND_BY_DEVICE.items())}"
        ) from None


def torch_device(device_kind: str, index: int) -> torch.device:
    """The torch device of one of this node's devices (CPU devices all map to ``cpu``)."""
    if device_kind == "cpu":
        return torch.device("cpu")
    if device_kind == "gpu":
        return torch.device("cuda", index)
    if device_kind == "npu":
        import torch_npu  # noqa: F401  (registers the npu device type)

        return torch.device("npu", index)
    raise UnsupportedBackend(f"unknown device kind {device_kind!r}")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, seconds))


class RendezvousServer:
    """The TCPStore server of one group, bound by us to ``host`` on a free port.

    The listening socket is created here (so it binds exactly ``host``) and handed to the
    store, which owns it from then on.
    """

    def __init__(self, host: str, world_size: int, timeout_s: float) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(max(128, world_size))
            self.port = int(sock.getsockname()[1])
        except OSError:
            sock.close()
            raise
        self.host = host
        self.store: TCPStore | None = TCPStore(
            host,
            self.port,
            world_size,
            True,
            timeout=_timedelta(timeout_s),
            wait_for_workers=False,
            master_listen_fd=sock.detach(),
            use_libuv=False,
        )

    def close(self) -> None:
        self.store = None


@dataclass(frozen=True)
class GroupAddress:
    """Where a group rendezvouses: what ``GroupEndpoint`` says, minus the wire model."""

    host: str
    port: int
    backend: Backend
    world_size: int
    prefix: str


class StatelessGroup:
    """One process group of ``size`` ranks, independent of torch's default group."""

    def __init__(
        self,
        backend_impl: Any,
        *,
        backend: Backend,
        rank: int,
        size: int,
        prefix: str,
        store: Any,
        server: RendezvousServer | None,
    ) -> None:
        self._pg: Any = backend_impl
        self.backend = backend
        self.rank = rank
        self.size = size
        self.prefix = prefix
        self._store: Any = store
        self._server = server

    @classmethod
    def join(
        cls,
        address: GroupAddress,
        rank: int,
        *,
        device: torch.device,
        timeout_s: float,
        server: RendezvousServer | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> StatelessGroup:
        """Rendezvous at ``address`` as ``rank``; blocks until every rank has joined.

        Raises TimeoutError (naming the ranks missing) after ``timeout_s``, and JoinCancelled
        as soon as ``cancelled()`` is true while ranks are still missing: a worker whose
        operation was aborted must not sit in a dead rendezvous until the deadline, with the
        next operation's commands queued behind it."""
        if not 0 <= rank < address.world_size:
            raise ValueError(f"rank {rank} is outside a world of {address.world_size}")
        timeout = _timedelta(timeout_s)
        deadline = time.monotonic() + timeout_s
        give_up = cancelled if cancelled is not None else (lambda: False)
        if server is not None and server.store is not None:
            base: Any = server.store
        else:
            base = _connect(address, timeout, deadline, give_up)
        store = PrefixStore(address.prefix, base)
        _await_arrivals(store, rank, address.world_size, deadline, give_up, address.prefix)
        impl = _make_backend(address.backend, store, rank, address.world_size, timeout, device)
        return cls(
            impl,
            backend=address.backend,
            rank=rank,
            size=address.world_size,
            prefix=address.prefix,
            store=base,
            server=server,
        )

    @property
    def alive(self) -> bool:
        return self._pg is not None

    def _impl(self) -> Any:
        if self._pg is None:
            raise RuntimeError(f"group {self.prefix} was destroyed")
        return self._pg

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return self._impl().send([tensor], peer, tag)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        return self._impl().recv([tensor], peer, tag)

    def warm_up(self, device: torch.device, timeout_s: float) -> None:
        """A one-element all-reduce over the group; raises unless every rank took part."""
        probe = torch.ones(1, device=device)
        work = self._impl().allreduce([probe])
        work.wait(_timedelta(timeout_s))
        if int(probe.item()) != self.size:
            raise RuntimeError(
                f"warm-up all-reduce of group {self.prefix} gave {probe.item()}, expected {self.size}"
            )

    def destroy(self) -> None:
        """Free the backend's connections and threads and the rendezvous store. Idempotent."""
        pg, self._pg = self._pg, None
        if pg is not None and self.backend != "gloo":
            shutdown = getattr(pg, "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):
                    shutdown()
        del pg
        self._store = None
        if self._server is not None:
            self._server.close()
            self._server = None
        gc.collect()


def _connect(
    address: GroupAddress,
    timeout: datetime.timedelta,
    deadline: float,
    cancelled: Callable[[], bool],
) -> Any:
    """A TCPStore client of the rendezvous host; its operations time out after ``timeout``.

    The host is first probed with plain TCP connects, so a cancel is noticed while it is not
    listening yet (or any more); torch's own connect retries until its timeout and logs a
    stack trace for every failed try."""
    while True:
        try:
            with socket.create_connection((address.host, address.port), timeout=CONNECT_ATTEMPT_S):
                break
        except OSError:
            if cancelled():
                raise JoinCancelled(f"group {address.prefix}: cancelled while connecting") from None
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"group {address.prefix}: rendezvous host {address.host}:{address.port} "
                    "was not reachable in time"
                ) from None
            time.sleep(ARRIVAL_POLL_S)
    base = TCPStore(
        address.host,
        address.port,
        address.world_size,
        False,
        timeout=_timedelta(deadline - time.monotonic()),
        use_libuv=False,
    )
    base.set_timeout(timeout)
    return base


def _await_arrivals(
    store: Any,
    rank: int,
    size: int,
    deadline: float,
    cancelled: Callable[[], bool],
    prefix: str,
) -> None:
    """Mark ``rank`` as arrived and poll until all ``size`` ranks have, so the backend's own
    rendezvous (which cannot be interrupted) starts only once every rank is there."""
    store.set(f"{ARRIVED_KEY}/{rank}", "1")
    keys = [f"{ARRIVED_KEY}/{r}" for r in range(size)]
    while not store.check(keys):
        if cancelled():
            raise JoinCancelled(f"group {prefix}: cancelled while waiting for the other ranks")
        if time.monotonic() >= deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise TimeoutError(f"group {prefix}: ranks {missing} did not join in time")
        time.sleep(ARRIVAL_POLL_S)


def _make_backend(
    backend: Backend,
    store: Any,
    rank: int,
    size: int,
    timeout: datetime.timedelta,
    device: torch.device,
) -> Any:
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    if backend == "hccl":
        import torch_npu  # noqa: F401
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL

        npu = getattr(torch, "npu")  # noqa: B009 - attribute added by torch_npu at import
        npu.set_device(device)
        options = ProcessGroupHCCL.Options()
        options._timeout = timeout
        return ProcessGroupHCCL(store, rank, size, options)
    raise UnsupportedBackend(f"unsupported process-group backend {backend!r}")
