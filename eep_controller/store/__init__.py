"""etcd access: typed keys, values, leases, watches, transactions; the embedded etcd."""

from eep_controller.store.client import (
    CorruptValue,
    EtcdConnection,
    EtcdStore,
    StoreUnavailable,
    Txn,
    Versioned,
    connection_from_settings,
)
from eep_controller.store.embedded import DataDirInUse, EmbeddedEtcd, free_port
from eep_controller.store.keys import KeySpace
from eep_controller.store.leader import LeaderElection, LeaderRecord
from eep_controller.store.lease import KeptLease
from eep_controller.store.outage import RepeatedFailure
from eep_controller.store.watch import PrefixWatch, Resync, WatchEvent

__all__ = [
    "CorruptValue",
    "DataDirInUse",
    "EmbeddedEtcd",
    "EtcdConnection",
    "EtcdStore",
    "KeptLease",
    "KeySpace",
    "LeaderElection",
    "LeaderRecord",
    "PrefixWatch",
    "RepeatedFailure",
    "Resync",
    "StoreUnavailable",
    "Txn",
    "Versioned",
    "WatchEvent",
    "connection_from_settings",
    "free_port",
]
