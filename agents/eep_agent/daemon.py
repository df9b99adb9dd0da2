"""The agent daemon: node registration, the deployments watch, the workers, the HTTP endpoint.

Startup: HTTP endpoint, node registration (lease), then one :class:`PrefixWatch` over
``deployments/`` feeds the :class:`DeploymentView`; every change (and a periodic tick)
runs :meth:`NodeReconciler.reconcile_once`. An etcd restart only pauses the watch and the
lease keep-alive; the registration re-registers if the lease was lost.

Shutdown (SIGTERM/SIGINT): stop acting, stop every worker cleanly, revoke the lease (the
node key vanishes at once), stop HTTP. A shutdown still running after
``shutdown_timeout_s`` (a worker that neither stops nor dies, say) logs where it is stuck at
half that time, then kills every worker process by pid and exits with code 3, so no worker
outlives its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from eep_agent import __version__
from eep_agent.http_api import build_app
from eep_agent.load_publisher import LoadPublisher
from eep_agent.op_driver import NodeContext, OpDriver
from eep_agent.reconciler import NodeReconciler
from eep_agent.registration import NodeRegistration
from eep_agent.settings import AgentSettings
from eep_agent.view import DeploymentView
from eep_agent.worker_pool import WorkerPool
from eep_controller.httpserver import EmbeddedServer, make_server
from eep_controller.protocol import NodeInfo
from eep_controller.store import EtcdConnection, EtcdStore, KeySpace, PrefixWatch
from eep_controller.tasks import ShutdownWatchdog, cancel_and_wait

log = logging.getLogger(__name__)

RECONCILE_TICK_S = 1.0
# While etcd cannot be reached at start, registration is retried after this, doubling up to
# the max (one warning per try, not one a second for as long as etcd is down).
REGISTER_RETRY_S = 1.0
REGISTER_RETRY_MAX_S = 10.0


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
        self.pool = WorkerPool(
            settings.worker_log_level, settings.worker_start, settings.log_format
        )
        self.view = DeploymentView(self.store.keys)
        self.driver = OpDriver(
            NodeContext(settings.node_id, settings.devices, settings.host, settings.public_host),
            self.store,
            self.view,
            self.pool,
        )
        self.reconciler = NodeReconciler(self.driver)
        self.load_publisher = LoadPublisher(
            self.store,
            self.view,
            self.pool,
            interval_s=settings.load_interval_s,
            window_s=settings.load_window_s,
        )
        self._background: list[asyncio.Task[None]] = []
        self._watch: PrefixWatch | None = None
        self._watchdog: ShutdownWatchdog | None = None

    @property
    def registered(self) -> bool:
        return self.registration is not None and self.registration.registered.is_set()

    async def _start_http(self) -> str:
        self._server = make_server(build_app(self), self.settings.host, self.settings.port)
        self._http_task = await self._server.start_in_background()
        return f"http://{self.settings.public_host}:{self._server.bound_port}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # a bounded pool for blocking calls (worker start/stop): a fixed number of threads
        loop.set_default_executor(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="eep-agent-io")
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        # the fork server imports torch while the agent registers, not when a scale needs a worker
        await asyncio.to_thread(self.pool.warm_up)
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
        if await self._register():
            await self._serve(address)
        try:
            await self.shutdown()
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()

    async def _register(self) -> bool:
        """Register under a lease, retrying with backoff while etcd cannot be reached;
        False when the agent is stopped first."""
        assert self.registration is not None
        delay = REGISTER_RETRY_S
        while not self.stopping.is_set():
            try:
                await self.registration.start()
                return True
            except Exception as exc:
                log.warning("cannot register with etcd yet (retrying in %.0f s): %s", delay, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                delay = min(delay * 2, REGISTER_RETRY_MAX_S)
        return False

    async def _serve(self, address: str) -> None:
        """Act on operations until the agent is told to stop."""
        assert self.registration is not None
        info = self.registration.info
        self._background = [
            asyncio.create_task(self._watch_deployments(), name="watch-deployments"),
            asyncio.create_task(self._reconcile_forever(), name="reconcile"),
            asyncio.create_task(self.load_publisher.run(self.stopping), name="load-window"),
        ]
        log.info(
            "agent %s serving at %s with %d device(s)", info.node_id, address, len(info.devices)
        )
        print(f"eep-agent {info.node_id} ready at {address}", flush=True)
        await self.stopping.wait()

    def _on_signal(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._watchdog = ShutdownWatchdog(
            asyncio.get_running_loop(), self.settings.shutdown_timeout_s, self._hard_stop, log
        )

    def _hard_stop(self) -> None:
        # runs on the watchdog's thread: whatever happens here, the process ends
        try:
            children = multiprocessing.active_children()
            log.error(
                "shutdown did not finish within %ss; killing %d worker process(es) %s and "
                "stopping hard",
                self.settings.shutdown_timeout_s,
                len(children),
                [c.pid for c in children],
            )
            for child in children:
                if child.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(child.pid, signal.SIGKILL)
        finally:
            os._exit(3)

    async def _watch_deployments(self) -> None:
        self._watch = PrefixWatch(self.store, self.store.keys.deployments())
        async for item in self._watch:
            await self.view.apply(item)

    async def _reconcile_forever(self) -> None:
        await self.view.synced.wait()
        while not self.stopping.is_set():
            try:
                self.reconciler.reconcile_once()
            except Exception:
                log.exception("reconcile failed")
            await self.view.wait_change(RECONCILE_TICK_S)

    async def shutdown(self) -> None:
        log.info("agent %s stopping", self.settings.node_id)
        self.stopping.set()
        if self._watch is not None:
            self._watch.close()
        await cancel_and_wait(self._background)
        await self.reconciler.shutdown()
        await self.pool.stop_all()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.stop()
        if self._server is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._http_task
        await self.store.close()
