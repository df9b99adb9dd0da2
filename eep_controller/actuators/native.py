"""The native actuator: eep's own agents, which watch the op record in etcd and ack there."""

from __future__ import annotations

from collections.abc import Mapping

from eep_controller.protocol import Ack, Operation, OpState
from eep_controller.store import EtcdStore


async def read_acks(store: EtcdStore, op: Operation) -> dict[OpState, dict[int, Ack]]:
    """Every ack written for ``op``, by phase and participant."""
    prefix = store.keys.op_children(op.deployment, op.id) + "acks/"
    out: dict[OpState, dict[int, Ack]] = {}
    for item in await store.list(prefix, Ack):
        ack = item.value
        if ack.op_id == op.id:
            out.setdefault(ack.phase, {})[ack.participant] = ack
    return out


class NativeActuator:
    """Agents read the phase from the op record itself, so entering a phase sends nothing;
    observing reads the acks under ``ops/{id}/acks/``."""

    name = "native"

    def __init__(self, store: EtcdStore) -> None:
        self.store = store

    async def observe(self, op: Operation) -> Mapping[OpState, Mapping[int, Ack]]:
        return await read_acks(self.store, op)

    async def enter_phase(self, op: Operation) -> None:
        return None

    async def aborted(self, op: Operation) -> None:
        return None
