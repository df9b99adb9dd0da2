"""What every request handler and background task of one controller replica shares."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from eep_controller.api.auth import TokenAuth
from eep_controller.config import Settings
from eep_controller.metrics import Metrics
from eep_controller.store import EtcdStore, LeaderElection


@dataclass
class ControllerContext:
    settings: Settings
    store: EtcdStore
    election: LeaderElection
    auth: TokenAuth
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> Any:
        return self.store.keys
