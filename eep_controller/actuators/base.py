"""The one seam through which a plan reaches the serving side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from eep_controller.protocol import Ack, Operation, OpState


@runtime_checkable
class Actuator(Protocol):
    """Drives the serving side through an operation's phases and reports what it saw.

    Every call must be safe to repeat: the reconciler may call again after a restart, and it
    calls ``observe`` before it acts so that nothing whose outcome is unknown is re-sent.
    """

    name: str

    async def observe(self, op: Operation) -> Mapping[OpState, Mapping[int, Ack]]:
        """Acks per phase per participant, as far as they are known."""
        ...

    async def enter_phase(self, op: Operation) -> None:
        """``op`` (already stored) has entered ``op.state``: make the serving side act on it."""
        ...

    async def aborted(self, op: Operation) -> None:
        """``op`` (already stored) was aborted: make the serving side drop what it prepared."""
        ...
