"""etcd with user/password auth and with TLS: the store connects with the right options only."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eep_controller.protocol import Device, DeviceKind, NodeInfo
from eep_controller.store import EmbeddedEtcd, EtcdConnection, EtcdStore, KeySpace, free_port
from eep_controller.store.embedded import etcd_binary

NODE = NodeInfo(
    node_id="n",
    address="http://x",
    devices=[Device(index=0, kind=DeviceKind.CPU)],
    agent_version="t",
)


def etcdctl(endpoint: str, *args: str) -> str:
    ctl = etcd_binary().parent / "etcdctl"
    out = subprocess.run(
        [str(ctl), "--endpoints", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


async def test_user_and_password_are_used_and_required(private_etcd: EmbeddedEtcd) -> None:
    ep = private_etcd.endpoint
    etcdctl(ep, "user", "add", "root:rootpw")
    etcdctl(ep, "user", "add", "eep:eep-secret")
    etcdctl(ep, "role", "add", "eep-role")
    etcdctl(ep, "role", "grant-permission", "eep-role", "--prefix=true", "readwrite", "/sec/")
    etcdctl(ep, "user", "grant-role", "eep", "eep-role")
    etcdctl(ep, "auth", "enable")

    good = EtcdStore(EtcdConnection([ep], username="eep", password="eep-secret"), KeySpace("/sec"))
    await good.put(good.keys.node("n"), NODE)
    got = await good.get(good.keys.node("n"), NodeInfo)
    assert got is not None and got.value == NODE
    await good.close()

    anonymous = EtcdStore(EtcdConnection([ep]), KeySpace("/sec"))
    with pytest.raises(Exception, match=r"(?i)user|auth|permission"):
        await anonymous.get(anonymous.keys.node("n"), NodeInfo)
    await anonymous.close()
    wrong = EtcdStore(EtcdConnection([ep], username="eep", password="nope"), KeySpace("/sec"))
    with pytest.raises(Exception, match=r"(?i)auth|password|user"):
        await wrong.get(wrong.keys.node("n"), NodeInfo)
    await wrong.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=eep-test-ca", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=tmp_path)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "san.cnf", cwd=tmp_path)  # fmt: skip
    port, peer = free_port(), free_port()
    endpoint = f"https://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(etcd_binary()), "--name", "tls", "--data-dir", str(tmp_path / "data"),
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
            "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ctl = etcd_binary().parent / "etcdctl"
        deadline = time.monotonic() + 20
        while subprocess.run(
            [str(ctl), "--endpoints", endpoint, "--cacert", str(tmp_path / "ca.pem"), "endpoint", "health"],
            capture_output=True, timeout=10,
        ).returncode:  # fmt: skip
            assert time.monotonic() < deadline, "TLS etcd did not come up"
            time.sleep(0.2)
        yield endpoint, tmp_path / "ca.pem"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_tls_endpoint_with_the_ca_works_and_without_it_fails(
    tls_etcd: tuple[str, Path],
) -> None:
    endpoint, ca = tls_etcd
    store = EtcdStore(EtcdConnection([endpoint], ca_cert=ca, timeout_s=5), KeySpace("/tls"))
    await store.put(store.keys.node("n"), NODE)
    got = await store.get(store.keys.node("n"), NodeInfo)
    assert got is not None and got.value == NODE
    await store.close()
    from eep_controller.store import StoreUnavailable

    untrusted = EtcdStore(EtcdConnection([endpoint], timeout_s=2), KeySpace("/tls"))
    with pytest.raises(StoreUnavailable):
        await untrusted.get(untrusted.keys.node("n"), NodeInfo)
    await untrusted.close()
