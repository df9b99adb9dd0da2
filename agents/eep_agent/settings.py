"""What one agent is told at start-up."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eep_controller.protocol import Device

StartMethod = Literal["forkserver", "spawn"]
WORKER_START_METHODS: tuple[StartMethod, ...] = ("forkserver", "spawn")


def start_method(name: str) -> StartMethod:
    """``name`` as a worker start method; ValueError naming the choices otherwise."""
    if name not in WORKER_START_METHODS:
        raise ValueError(
            f"unknown worker start method {name!r}; choose one of {', '.join(WORKER_START_METHODS)}"
        )
    return name


@dataclass(frozen=True)
class AgentSettings:
    etcd_endpoints: list[str]
    node_id: str = field(default_factory=socket.gethostname)
    devices: list[Device] = field(default_factory=list)
    prefix: str = "/eep/v1"
    lease_ttl_s: int = 5
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    state_dir: Path = Path(".eep-state/agent")
    labels: dict[str, str] = field(default_factory=dict)
    load_interval_s: float = 2.0
    load_window_s: float = 60.0
    worker_log_level: str = "WARNING"
    # "text" or "json" (one object per line), for the agent and its workers alike
    log_format: str = "text"
    # how worker processes start: "forkserver" (fast) or "spawn" (see eep_agent.worker_pool)
    worker_start: StartMethod = "forkserver"
    # a shutdown that has not ended by then kills the workers by pid and exits with code 3
    shutdown_timeout_s: float = 60.0

    @property
    def public_host(self) -> str:
        """The host others use to reach this node's endpoints."""
        if self.advertise_host:
            return self.advertise_host
        return self.host if self.host not in ("0.0.0.0", "::") else socket.getfqdn()
