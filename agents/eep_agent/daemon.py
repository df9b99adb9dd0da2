"""The agent daemon: node registration, its HTTP endpoint, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time

from eep_agent import __version__
from eep_agent.http_api import build_app
from eep_agent.registration import NodeRegistration
from eep_agent.settings import AgentSettings
from eep_controller.httpserver import EmbeddedServer, make_server
from eep_controller.protocol import NodeInfo
from eep_controller.store import EtcdConnection, EtcdStore, KeySpace

log = logging.getLogger(__name__)


class AgentDaemon:
    """One per node. ``run()`` returns after SIGTERM/SIGINT with everything stopped."""

    def __init__(self, settings: AgentSettings) -> None:
        if not settings.devices:
            raise ValueError(
                "the agent has no devices: pass --devices cpu:N or run where torch sees GPUs/NPUs"
            )
        self.settings = settings
        self.store = EtcdStore(EtcdConnection(settings.etcd_endpoints), KeySpace(settings.prefix))
        self.registration: NodeRegistration | None = None
        self.stopping = asyncio.Event()
        self._server: EmbeddedServer | None = None

    @property
    def registered(self) -> bool:
        return self.registration is not None and self.registration.registered.is_set()

    async def _start_http(self) -> str:
        self._server = make_server(build_app(self), self.settings.host, self.settings.port)
        self._http_task = await self._server.start_in_background()
        host = self.settings.advertise_host or (
            self.settings.host if self.settings.host not in ("0.0.0.0", "::") else socket.getfqdn()
        )
        return f"http://{host}:{self._server.bound_port}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)
        address = await self._start_http()
        info = NodeInfo(
            node_id=self.settings.node_id,
            address=address,
            devices=self.settings.devices,
            labels=self.settings.labels,
            agent_version=__version__,
            started_at=time.time(),
        )
        self.registration = NodeRegistration(self.store, info, self.settings.lease_ttl_s)
        while not self.stopping.is_set():
            try:
                await self.registration.start()
                break
            except Exception as exc:
                log.warning("cannot register with etcd yet: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
        log.info(
            "agent %s serving at %s with %d device(s)", info.node_id, address, len(info.devices)
        )
        print(f"eep-agent {info.node_id} ready at {address}", flush=True)
        await self.stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("agent %s stopping", self.settings.node_id)
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.stop()
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._http_task
        await self.store.close()
