"""Typed async access to etcd: pydantic values, mod_revision compare-and-swap, endpoints failover."""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.rpc as etcd_rpc
import grpc
from aetcd import exceptions as etcd_errors
from pydantic import BaseModel, ValidationError

from eep_controller.store.keys import KeySpace

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def closed_under_us() -> bool:
    """In an `except asyncio.CancelledError`: True when nobody cancelled this task.

    Every task shares one etcd client. When a call of one task fails and it rotates to the
    next endpoint, closing the old client cancels the calls in flight on it, and each raises
    CancelledError in a task nobody cancelled. That is a transport failure of the call, not
    a cancellation: taken as one, it ended an API request with a 500 "No response
    returned." and could end a background loop.
    """
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.InternalError,
    grpc.aio.AioRpcError,
    asyncio.TimeoutError,
    ConnectionError,
)


class StoreUnavailable(RuntimeError):
    """etcd could not be reached (after trying every endpoint)."""


class CorruptValue(RuntimeError):
    """A stored value did not parse as the model its key holds."""


@dataclass(frozen=True)
class Versioned(Generic[M]):
    """A value read from etcd with the revisions a later CAS compares against."""

    key: str
    value: M
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass
class Txn:
    """A transaction under construction: compares, then puts/deletes applied atomically."""

    compares: list[Any] = field(default_factory=list)
    success: list[Any] = field(default_factory=list)
    failure: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class EtcdConnection:
    """How to reach etcd: endpoints (``http(s)://host:port``), TLS material and credentials."""

    endpoints: Sequence[str]
    username: str | None = None
    password: str | None = None
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout_s: float = 5.0


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client with TLS: aetcd itself only opens insecure channels."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials | None, **kw: Any):
        super().__init__(*args, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        original = etcd_rpc.insecure_channel
        creds = self._credentials

        def secure(target: str, options: Any = None) -> Any:
            return etcd_rpc.secure_channel(target, creds, options=options)

        aetcd.client.rpc.insecure_channel = secure
        try:
            await super().connect()
        finally:
            aetcd.client.rpc.insecure_channel = original


def _credentials(conn: EtcdConnection) -> grpc.ChannelCredentials | None:
    if not any((conn.ca_cert, conn.cert, conn.key)) and not any(
        e.startswith("https://") for e in conn.endpoints
    ):
        return None

    def read(path: Path | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(conn.ca_cert),
        private_key=read(conn.key),
        certificate_chain=read(conn.cert),
    )


class EtcdStore:
    """The one door to etcd. Values are pydantic models serialised as JSON."""

    def __init__(self, conn: EtcdConnection, keys: KeySpace) -> None:
        if not conn.endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.conn = conn
        self.keys = keys
        self._credentials = _credentials(conn)
        self._endpoint_index = 0
        self._client: _Client | None = None
        self._connect_lock = asyncio.Lock()
        # whether etcd answered the last call (None before the first); a controller keeps
        # its election lease alive, so it calls every few seconds and this stays current
        self.reachable: bool | None = None

    # ------------------------------------------------------------------ connection
    def _make_client(self, endpoint: str) -> _Client:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        return _Client(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 2379,
            username=self.conn.username,
            password=self.conn.password,
            timeout=self.conn.timeout_s,
            credentials=self._credentials,
        )

    async def client(self) -> _Client:
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                client = self._make_client(self.conn.endpoints[self._endpoint_index])
                await client.connect()
                self._client = client
        return self._client

    async def _rotate(self) -> None:
        """Move to the next endpoint after a transport failure."""
        async with self._connect_lock:
            old, self._client = self._client, None
            self._endpoint_index = (self._endpoint_index + 1) % len(self.conn.endpoints)
        if old is not None:
            try:
                await old.close()
            except Exception:  # closing a broken channel may raise; it is gone either way
                log.debug("closing a failed etcd client raised", exc_info=True)

    async def _call(self, fn_name: str, *args: Any, **kw: Any) -> Any:
        """Run one client call, trying each endpoint once on transport failure."""
        last: BaseException | None = None
        for _ in range(len(self.conn.endpoints)):
            client = await self.client()
            try:
                result = await asyncio.wait_for(
                    getattr(client, fn_name)(*args, **kw), self.conn.timeout_s
                )
            except UNAVAILABLE_ERRORS as exc:
                last = exc
                await self._rotate()
                continue
            except asyncio.CancelledError as exc:
                if not closed_under_us():
                    raise  # this task is being cancelled
                last = exc
                continue
            self.reachable = True
            return result
        self.reachable = False
        raise StoreUnavailable(f"etcd unreachable at {list(self.conn.endpoints)}: {last}") from last

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ping(self) -> int:
        """The current cluster revision; raises StoreUnavailable if etcd does not answer."""
        got = await self._call("get", b"\x00eep-ping")
        if got is not None:
            return int(got.header.revision)
        status = await self._call("status")
        return int(getattr(status, "raft_index", 0))

    async def revision(self) -> int:
        res = await self._call("get_prefix", self.keys.prefix.encode(), keys_only=True)
        return int(res.header.revision)

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _parse(key: str, raw: bytes, model: type[M]) -> M:
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptValue(f"value at {key} is not a valid {model.__name__}: {exc}") from exc

    async def get(self, key: str, model: type[M]) -> Versioned[M] | None:
        got = await self._call("get", key.encode())
        if got is None:
            return None
        return Versioned(
            key,
            self._parse(key, got.value, model),
            got.mod_revision,
            got.create_revision,
            got.lease,
        )

    async def get_raw(self, key: str) -> tuple[bytes, int] | None:
        got = await self._call("get", key.encode())
        return None if got is None else (bytes(got.value), int(got.mod_revision))

    async def list(self, prefix: str, model: type[M]) -> builtins.list[Versioned[M]]:
        """Every value under a prefix, in key order; unparsable values are logged and skipped."""
        res = await self._call("get_prefix", prefix.encode(), sort_order="ascend")
        out: builtins.list[Versioned[M]] = []
        for kv in res:
            key = kv.key.decode()
            try:
                value = self._parse(key, kv.value, model)
            except CorruptValue as exc:
                log.warning("%s", exc)
                continue
            out.append(Versioned(key, value, kv.mod_revision, kv.create_revision, kv.lease))
        return out

    async def list_keys(self, prefix: str) -> builtins.list[str]:
        res = await self._call("get_prefix", prefix.encode(), keys_only=True)
        return [kv.key.decode() for kv in res]

    async def snapshot(self, prefix: str) -> tuple[int, dict[str, tuple[bytes, int]]]:
        """Raw values under a prefix and the revision they were read at."""
        res = await self._call("get_prefix", prefix.encode())
        return int(res.header.revision), {
            kv.key.decode(): (bytes(kv.value), int(kv.mod_revision)) for kv in res
        }

    # ------------------------------------------------------------------ writes
    async def put(self, key: str, value: BaseModel, *, lease: int | None = None) -> int:
        res = await self._call("put", key.encode(), value.model_dump_json().encode(), lease=lease)
        return int(res.header.revision)

    async def delete(self, key: str) -> bool:
        res = await self._call("delete", key.encode())
        return bool(res)

    async def delete_prefix(self, prefix: str) -> int:
        res = await self._call("delete_prefix", prefix.encode())
        return int(res.deleted)

    # ------------------------------------------------------------------ transactions
    def txn(self) -> Txn:
        return Txn()

    _txns: Any = aetcd.client.Transactions()

    def require_revision(self, txn: Txn, key: str, mod_revision: int) -> None:
        """Succeed only if ``key`` still has ``mod_revision`` (0 = the key must not exist)."""
        t = self._txns
        txn.compares.append(t.mod(key.encode()) == mod_revision)

    def require_absent(self, txn: Txn, key: str) -> None:
        self.require_revision(txn, key, 0)

    def require_value(self, txn: Txn, key: str, raw: bytes) -> None:
        t = self._txns
        txn.compares.append(t.value(key.encode()) == raw)

    def put_op(
        self, txn: Txn, key: str, value: BaseModel | bytes, *, lease: int | None = None
    ) -> None:
        raw = value if isinstance(value, bytes) else value.model_dump_json().encode()
        txn.success.append(self._txns.put(key.encode(), raw, lease=lease))

    def delete_op(self, txn: Txn, key: str, *, prefix: bool = False) -> None:
        t = self._txns
        if prefix:
            from aetcd import utils

            txn.success.append(
                t.delete(key.encode(), range_end=utils.prefix_range_end(key.encode()))
            )
        else:
            txn.success.append(t.delete(key.encode()))

    async def commit(self, txn: Txn) -> bool:
        """Apply the transaction; True if every compare held and the writes happened."""
        ok, _ = await self._call("transaction", txn.compares, txn.success, txn.failure)
        return bool(ok)

    async def cas_put(self, key: str, value: BaseModel, mod_revision: int) -> bool:
        """Write ``value`` only if ``key`` is still at ``mod_revision`` (0 = create)."""
        txn = self.txn()
        self.require_revision(txn, key, mod_revision)
        self.put_op(txn, key, value)
        return await self.commit(txn)

    # ------------------------------------------------------------------ leases
    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call("lease", ttl)
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh a lease; returns its new TTL (<= 0 when the lease no longer exists)."""
        reply = await self._call("refresh_lease", lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("revoke_lease", lease_id)

    async def lease_ttl(self, lease_id: int) -> int:
        info = await self._call("get_lease_info", lease_id, keys=False)
        return int(info.TTL)


def connection_from_settings(
    settings: Any, endpoints: Sequence[str] | None = None
) -> EtcdConnection:
    """An :class:`EtcdConnection` from :class:`eep_controller.config.EtcdSettings`."""
    return EtcdConnection(
        endpoints=list(endpoints if endpoints is not None else settings.endpoints),
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        ca_cert=settings.ca_cert,
        cert=settings.cert,
        key=settings.key,
        timeout_s=settings.timeout_s,
    )
