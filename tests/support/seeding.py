"""Putting etcd into a known state for API tests that run without agents.

Node records here are written the way an agent writes them (lease-bound ``NodeInfo``); the
layout is written the way the reconciler commits one. Nothing acts on operations, so an
operation created in such a test stays where the test wants it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from eep_controller.planner import plan_placement
from eep_controller.protocol import (
    DeploymentSpec,
    Device,
    DeviceKind,
    EncodedArray,
    Layout,
    NodeInfo,
    Rank,
)
from eep_controller.store import EtcdConnection, EtcdStore, KeySpace


async def _seed(
    etcd: str, prefix: str, spec: DeploymentSpec, nodes: dict[str, int], dp: int
) -> dict[str, int]:
    store = EtcdStore(EtcdConnection([etcd]), KeySpace(prefix))
    leases: dict[str, int] = {}
    try:
        for node_id, count in nodes.items():
            info = NodeInfo(
                node_id=node_id, address="http://127.0.0.1:9",
                devices=[Device(index=i, kind=DeviceKind.CPU) for i in range(count)], agent_version="seed",
            )  # fmt: skip
            lease = await store.grant_lease(3600)
            leases[node_id] = lease
            await store.put(store.keys.node(node_id), info, lease=lease)
        ranks = [Rank(node_id=n, device_index=i) for n, c in nodes.items() for i in range(c)][
            : spec.ep_size(dp)
        ]
        load = np.ones((spec.model.num_moe_layers, spec.model.num_experts))
        placement = plan_placement(load, len(ranks), spec.slots_per_rank)
        await store.put(store.keys.spec(spec.name), spec)
        await store.put(
            store.keys.layout(spec.name),
            Layout(
                deployment=spec.name,
                generation=1,
                dp_size=dp,
                ranks=ranks,
                slots_per_rank=spec.slots_per_rank,
                placement=EncodedArray.encode(placement.phy2log.astype(np.int64)),
                committed_at=time.time(),
            ),
        )
    finally:
        await store.close()
    return leases


def seed_serving_deployment(
    etcd: str, prefix: str, spec: dict[str, Any], nodes: dict[str, int], dp: int
) -> dict[str, int]:
    """A deployment already serving at ``dp`` on the first devices of ``nodes`` (generation 1).

    Returns each node's lease id, so a test can make a node vanish (revoke its lease).
    """
    parsed = DeploymentSpec.model_validate(spec)
    return asyncio.run(_seed(etcd, prefix, parsed, nodes, dp))


def revoke_lease(etcd: str, lease: int) -> None:
    async def go() -> None:
        store = EtcdStore(EtcdConnection([etcd]), KeySpace("/eep"))
        try:
            await store.revoke_lease(lease)
        finally:
            await store.close()

    asyncio.run(go())
