"""The agent's copy of ``deployments/``: specs, layouts, operations, acks, rendezvous endpoints.

One :class:`~eep_controller.store.PrefixWatch` feeds it; values are parsed once per
``mod_revision``. Waiters (:meth:`DeploymentView.wait_until`) wake on every change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from eep_controller.protocol import DeploymentSpec, GroupEndpoint, Layout, Operation
from eep_controller.store import KeySpace, Resync, WatchEvent

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class DeploymentView:
    """What etcd says about every deployment, as far as this agent has seen."""

    def __init__(self, keys: KeySpace) -> None:
        self.keys = keys
        self._raw: dict[str, tuple[bytes, int]] = {}
        self._parsed: dict[str, tuple[int, BaseModel | None]] = {}
        self._changed = asyncio.Condition()
        self.revision = 0
        self.synced = asyncio.Event()

    async def apply(self, item: WatchEvent | Resync) -> None:
        if isinstance(item, Resync):
            self._raw = dict(item.snapshot)
            self._parsed = {k: v for k, v in self._parsed.items() if k in self._raw}
            self.revision = item.revision
            self.synced.set()
        elif item.value is None:
            self._raw.pop(item.key, None)
            self._parsed.pop(item.key, None)
            self.revision = max(self.revision, item.mod_revision)
        else:
            if self._is_load(item.key):
                return  # the load window is written by agents and read by the controller only
            self._raw[item.key] = (item.value, item.mod_revision)
            self.revision = max(self.revision, item.mod_revision)
        async with self._changed:
            self._changed.notify_all()

    def _is_load(self, key: str) -> bool:
        parts = self.keys.strip(key).split("/")
        return len(parts) == 3 and parts[2] == "load"

    async def wait_until(self, probe: Callable[[], T | None], timeout_s: float) -> T | None:
        """Wait until ``probe()`` returns something other than None, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while True:
                value = probe()
                if value is not None:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return probe()

    async def wait_change(self, timeout_s: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                return

    # ------------------------------------------------------------------ typed reads
    def _get(self, key: str, model: type[M]) -> M | None:
        raw = self._raw.get(key)
        if raw is None:
            return None
        value, rev = raw
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == rev:
            return cached[1] if isinstance(cached[1], model) else None
        try:
            parsed: M | None = model.model_validate_json(value)
        except ValidationError as exc:
            log.warning("ignoring %s: not a valid %s (%s)", key, model.__name__, exc.errors()[:1])
            parsed = None
        self._parsed[key] = (rev, parsed)
        return parsed

    def deployments(self) -> list[str]:
        names: set[str] = set()
        root = self.keys.deployments()
        for key in self._raw:
            if key.startswith(root):
                names.add(key[len(root) :].split("/", 1)[0])
        return sorted(names)

    def spec(self, deployment: str) -> DeploymentSpec | None:
        return self._get(self.keys.spec(deployment), DeploymentSpec)

    def layout(self, deployment: str) -> Layout | None:
        return self._get(self.keys.layout(deployment), Layout)

    def committed_generation(self, deployment: str) -> int:
        """The committed generation; 0 (the empty generation) before the first commit."""
        layout = self.layout(deployment)
        return 0 if layout is None else layout.generation

    def ops(self, deployment: str) -> list[Operation]:
        root = self.keys.ops(deployment)
        out: list[Operation] = []
        for key in sorted(self._raw):
            if key.startswith(root) and "/" not in key[len(root) :]:
                op = self._get(key, Operation)
                if op is not None:
                    out.append(op)
        return out

    def op(self, deployment: str, op_id: str) -> Operation | None:
        return self._get(self.keys.op(deployment, op_id), Operation)

    def has_ack(self, deployment: str, op_id: str, phase: str, participant: int) -> bool:
        return self.keys.ack(deployment, op_id, phase, participant) in self._raw

    def rendezvous(self, deployment: str, op_id: str) -> GroupEndpoint | None:
        return self._get(self.keys.rendezvous(deployment, op_id), GroupEndpoint)
