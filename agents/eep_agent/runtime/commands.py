"""What the agent tells a worker, and what the worker answers (the control channel's messages).

The channel is a ``multiprocessing`` duplex Pipe (see :mod:`eep_agent.runtime.worker`);
messages are these picklable dataclasses wrapped in :class:`Request` / :class:`Reply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eep_agent.runtime.expert_store import ExpertShape
from eep_agent.runtime.groups import GroupAddress
from eep_agent.runtime.moves import RankMoves


@dataclass(frozen=True)
class WorkerIdentity:
    deployment: str
    device_kind: str
    device_index: int
    torch_threads: int = 1


@dataclass(frozen=True)
class Load:
    """Set the model shape and fill slots from the checkpoint (``slots`` None: start empty)."""

    shape: ExpertShape
    checkpoint: str | None
    slots: np.ndarray[Any, Any] | None
    generation: int
    rank: int | None


@dataclass(frozen=True)
class HostRendezvous:
    """Start the TCPStore server of an operation's standby world; answers the port."""

    op_id: str
    host: str
    world_size: int
    timeout_s: float


@dataclass(frozen=True)
class BuildStandby:
    """Join the standby world of ``op_id`` as ``rank`` and warm it with a 1-element all-reduce."""

    op_id: str
    address: GroupAddress
    rank: int
    timeout_s: float


@dataclass(frozen=True)
class Transfer:
    """Stage the next generation's slots (``new_slots``; None when leaving) and run the moves."""

    op_id: str
    moves: RankMoves
    new_slots: np.ndarray[Any, Any] | None
    timeout_s: float


@dataclass(frozen=True)
class Switch:
    """Between two forward steps: standby group and staged experts become active."""

    op_id: str
    generation: int
    rank: int


@dataclass(frozen=True)
class Cleanup:
    """Destroy the group retired by the switch of ``op_id`` and free its buffers."""

    op_id: str


@dataclass(frozen=True)
class Abort:
    """Forget ``op_id``: destroy its standby group and rendezvous server, drop staged experts."""

    op_id: str


@dataclass(frozen=True)
class RawExchange:
    """Diagnostics: move plain float32 buffers (allocated beforehand) over the standby group of
    ``op_id``, all messages posted at once; answers the seconds until every one completed. ``sends``/``recvs`` are
    ``(peer, nbytes, tag)``. Measures the bare point-to-point bandwidth a plan's transfers get."""

    op_id: str
    sends: tuple[tuple[int, int, int], ...]
    recvs: tuple[tuple[int, int, int], ...]
    timeout_s: float


@dataclass(frozen=True)
class Forward:
    layer: int
    experts: np.ndarray[Any, Any]
    tokens: np.ndarray[Any, Any]


@dataclass(frozen=True)
class Stats:
    """Counters, and the per-expert token counts since the last Stats (the load window)."""


@dataclass(frozen=True)
class Stop:
    pass


Command = (
    Load
    | HostRendezvous
    | BuildStandby
    | Transfer
    | RawExchange
    | Switch
    | Cleanup
    | Abort
    | Forward
    | Stats
    | Stop
)


@dataclass(frozen=True)
class Request:
    id: int
    command: Command


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: str | None = None
    stale: bool = False


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class TransferResult:
    bytes_sent: int
    bytes_received: int
    tensors_verified: int
    checksum_failures: int
    reloads: int
    seconds: float
    error: str | None


@dataclass(frozen=True)
class ForwardResult:
    generation: int
    outputs: np.ndarray[Any, Any]


@dataclass(frozen=True)
class WorkerStats:
    generation: int
    rank: int | None
    served: int
    load: np.ndarray[Any, Any] | None
    has_active_group: bool
    has_standby_group: bool
    has_retired_group: bool
    staged_for: str | None
    cache_sizes: dict[str, int] = field(default_factory=dict)
    expert_bytes: int = 0
