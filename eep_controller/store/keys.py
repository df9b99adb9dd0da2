"""The etcd key space of DESIGN.md §3, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeySpace:
    """Builds every key eep stores; nothing else spells a key by hand."""

    prefix: str = "/eep/v1"

    def _k(self, *parts: str | int) -> str:
        return "/".join([self.prefix, *(str(p) for p in parts)])

    # controller
    def leader(self) -> str:
        return self._k("leader")

    # nodes
    def nodes(self) -> str:
        return self._k("nodes") + "/"

    def node(self, node_id: str) -> str:
        return self._k("nodes", node_id)

    # deployments
    def deployments(self) -> str:
        return self._k("deployments") + "/"

    def deployment(self, name: str) -> str:
        return self._k("deployments", name) + "/"

    def spec(self, name: str) -> str:
        return self._k("deployments", name, "spec")

    def layout(self, name: str) -> str:
        return self._k("deployments", name, "layout")

    def lock(self, name: str) -> str:
        return self._k("deployments", name, "lock")

    def load(self, name: str) -> str:
        return self._k("deployments", name, "load")

    def groupless_all(self, name: str) -> str:
        return self._k("deployments", name, "groupless") + "/"

    def groupless(self, name: str, generation: int) -> str:
        """Ranks of `generation` whose restarted worker holds no active group."""
        return self._k("deployments", name, "groupless", generation) + "/"

    def groupless_rank(self, name: str, generation: int, rank: int) -> str:
        return self._k("deployments", name, "groupless", generation, rank)

    def ops(self, name: str) -> str:
        return self._k("deployments", name, "ops") + "/"

    def op(self, name: str, op_id: str) -> str:
        return self._k("deployments", name, "ops", op_id)

    def op_children(self, name: str, op_id: str) -> str:
        return self.op(name, op_id) + "/"

    def acks(self, name: str, op_id: str, phase: str) -> str:
        return self._k("deployments", name, "ops", op_id, "acks", phase) + "/"

    def ack(self, name: str, op_id: str, phase: str, participant: int) -> str:
        return self._k("deployments", name, "ops", op_id, "acks", phase, participant)

    def rendezvous(self, name: str, op_id: str) -> str:
        return self._k("deployments", name, "ops", op_id, "rendezvous")

    # lookups
    def op_index(self, op_id: str) -> str:
        """op id -> deployment name, so ``GET /v1/operations/{id}`` needs no scan."""
        return self._k("opindex", op_id)

    def idempotency(self, key: str) -> str:
        return self._k("idempotency", key)

    # events
    def events(self, name: str) -> str:
        return self._k("events", name) + "/"

    def events_root(self) -> str:
        return self._k("events") + "/"

    def event(self, name: str, event_id: str) -> str:
        """Event ids sort by time (see :func:`eep_controller.operations.events.new_event_id`)."""
        return self._k("events", name, event_id)

    def strip(self, key: str) -> str:
        """The key relative to the prefix (``deployments/d/spec``)."""
        return key[len(self.prefix) + 1 :] if key.startswith(self.prefix + "/") else key
