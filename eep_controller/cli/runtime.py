"""Bringing one controller replica up and down: etcd (embedded or external), API, election."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from eep_controller.api.app import BackgroundFactory, create_app
from eep_controller.api.auth import TokenAuth
from eep_controller.api.context import ControllerContext
from eep_controller.config import Settings
from eep_controller.httpserver import EmbeddedServer, make_server
from eep_controller.operations.reconciler import Reconciler
from eep_controller.store import (
    EmbeddedEtcd,
    EtcdStore,
    KeySpace,
    LeaderElection,
    connection_from_settings,
    free_port,
)
from eep_controller.tasks import ShutdownWatchdog

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve an unauthenticated API beyond loopback unless told ``--insecure``."""
    if settings.auth.token_roles() or settings.server.insecure or is_loopback(settings.server.host):
        return
    raise SystemExit(
        f"refusing to listen on {settings.server.host} without auth tokens: set "
        "EEP_AUTH_TOKENS='token:admin,...' or pass --insecure"
    )


@dataclass
class ControllerRuntime:
    """Owns the embedded etcd (if any), the store, the election and the HTTP server."""

    settings: Settings
    background: list[BackgroundFactory] = field(default_factory=list)
    embedded: EmbeddedEtcd | None = None
    on_ready: Callable[[str], None] | None = None
    _server: EmbeddedServer | None = None
    _watchdog: ShutdownWatchdog | None = None

    def _start_etcd(self) -> list[str]:
        if self.settings.etcd.endpoints:
            return list(self.settings.etcd.endpoints)
        self.embedded = EmbeddedEtcd(self.settings.etcd.resolved_data_dir())
        self.embedded.start()
        log.warning(
            "no etcd endpoints configured: started the embedded etcd %s (data in %s). "
            "Fine for one machine; run production on an external etcd cluster (EEP_ETCD_ENDPOINTS).",
            self.embedded.endpoint,
            self.embedded.data_dir,
        )
        return [self.embedded.endpoint]

    def _hard_stop(self) -> None:
        log.error(
            "shutdown did not finish within %ss; stopping hard",
            self.settings.server.shutdown_timeout_s,
        )
        try:
            if self.embedded is not None:
                self.embedded.stop(timeout_s=5)
        finally:
            os._exit(3)

    def request_stop(self) -> None:
        """Ask the HTTP server to shut down gracefully (``run`` then returns)."""
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        check_exposure(self.settings)
        endpoints = self._start_etcd()
        try:
            await self._serve(endpoints)
        finally:
            if self.embedded is not None:
                self.embedded.stop()
                log.info("embedded etcd stopped")

    async def _serve(self, endpoints: list[str]) -> None:
        s = self.settings
        store = EtcdStore(connection_from_settings(s.etcd, endpoints), KeySpace(s.etcd.prefix))
        if s.server.port == 0:
            s.server.port = free_port(s.server.host)
        replica_id = s.election.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        address = f"http://{s.server.host}:{s.server.port}"
        election = LeaderElection(store, replica_id, address, ttl=s.election.lease_ttl_s)
        ctx = ControllerContext(settings=s, store=store, election=election, auth=TokenAuth(s.auth))
        ctx.extras["etcd_endpoints"] = endpoints
        reconciler = Reconciler(
            store=store, settings=s, metrics=ctx.metrics, is_leader=lambda: election.is_leader
        )
        ctx.extras["reconciler"] = reconciler

        async def reconcile(_: ControllerContext) -> None:
            await reconciler.run()

        app = create_app(ctx, [reconcile, *self.background])
        server = make_server(app, s.server.host, s.server.port)
        self._server = server
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if server.should_exit:
                return
            server.should_exit = True
            # a shutdown must never hang: show where it is stuck (threads and tasks), then
            # stop hard
            self._watchdog = ShutdownWatchdog(
                loop, s.server.shutdown_timeout_s, self._hard_stop, log
            )

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop)
        try:
            task = await server.start_in_background()
        except BaseException:
            await store.close()
            raise
        url = f"http://{s.server.host}:{server.bound_port}"
        election.address = url
        log.info("eep controller %s serving %s (etcd %s)", replica_id, url, ",".join(endpoints))
        if self.on_ready is not None:
            self.on_ready(url)
        try:
            await task
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), 5)
