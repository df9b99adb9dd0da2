"""What one agent is told at start-up."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from eep_controller.protocol import Device


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
