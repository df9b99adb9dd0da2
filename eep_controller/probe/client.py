"""End-to-end probe: run a batch through the deployed MoE layers and compare with the reference.

For every layer, each (token, expert) pair chosen by the router goes to a rank that holds
that expert in the committed layout (``POST {agent}/v1/deployments/{d}/devices/{i}/forward``);
the outputs are combined with the router weights and compared with :func:`moe_layer`.
A ``409`` (stale layout, draining) makes the client re-read the layout and retry; a rank
that errors or cannot be reached is avoided for the rest of the probe when another replica
exists. Every retry loop is bounded by ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from eep_controller.probe.checkpoint import CheckpointReader
from eep_controller.probe.reference import FloatArray, moe_layer, probe_tokens, route
from eep_controller.protocol import EncodedArray, ForwardRequest, ForwardResponse, Layout

T = TypeVar("T")
LayoutSource = Callable[[], Layout | Awaitable[Layout]]
AddressSource = Callable[[], Mapping[str, str] | Awaitable[Mapping[str, str]]]

DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw. ``ok``: every pair was served and the output matches the reference."""

    ok: bool
    max_abs_err: float
    requests: int
    failed_requests: int
    generation: int
    stale_retries: int = 0
    unserved_pairs: int = 0
    generations_seen: tuple[int, ...] = ()
    errors: tuple[str, ...] = field(default_factory=tuple)


async def _resolve(source: Callable[[], T | Awaitable[T]]) -> T:
    value = source()
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass
class _Pending:
    """Pairs of one layer still to be served: token row, top-k column, expert."""

    tokens: np.ndarray[Any, np.dtype[np.int64]]
    ks: np.ndarray[Any, np.dtype[np.int64]]
    experts: np.ndarray[Any, np.dtype[np.int64]]


class ProbeClient:
    """Probes one deployment through its agents' forward endpoints."""

    def __init__(
        self,
        layout_source: LayoutSource,
        node_addresses_source: AddressSource,
        checkpoint_dir: Path | str,
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 6,
        tolerance: float = DEFAULT_TOLERANCE,
        retry_pause_s: float = 0.2,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.layout_source = layout_source
        self.node_addresses_source = node_addresses_source
        self.reader = CheckpointReader(checkpoint_dir)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.tolerance = tolerance
        self.retry_pause_s = retry_pause_s

    async def probe(
        self, num_tokens: int = 16, seed: int = 0, layers: Sequence[int] | None = None
    ) -> ProbeResult:
        meta = self.reader.meta
        tokens = probe_tokens(num_tokens, meta.hidden, seed)
        chosen_layers = list(range(meta.layers)) if layers is None else list(layers)
        stats = _Stats()
        max_err = 0.0
        unserved = 0
        generation = -1
        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            for layer in chosen_layers:
                out, left, generation = await self._probe_layer(http, layer, tokens, stats)
                unserved += left
                if left == 0:
                    expected = moe_layer(self.reader, layer, tokens)
                    max_err = max(max_err, float(np.max(np.abs(out - expected))))
        ok = unserved == 0 and max_err <= self.tolerance
        return ProbeResult(
            ok=ok,
            max_abs_err=max_err,
            requests=stats.requests,
            failed_requests=stats.failed,
            generation=generation,
            stale_retries=stats.stale,
            unserved_pairs=unserved,
            generations_seen=tuple(sorted(stats.generations)),
            errors=tuple(stats.errors[:20]),
        )

    async def _probe_layer(
        self, http: httpx.AsyncClient, layer: int, tokens: FloatArray, stats: _Stats
    ) -> tuple[FloatArray, int, int]:
        experts, weights = route(tokens, self.reader.gate(layer), self.reader.meta.top_k)
        rows, ks = np.nonzero(np.ones_like(experts, dtype=bool))
        pending = _Pending(rows.astype(np.int64), ks.astype(np.int64), experts[rows, ks])
        out = np.zeros_like(tokens)
        avoid: set[tuple[str, int]] = set()
        generation = -1
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.retry_pause_s)
            layout = await _resolve(self.layout_source)
            addresses = await _resolve(self.node_addresses_source)
            generation = layout.generation
            batches, unroutable = _route_to_ranks(layout, layer, pending, avoid)
            if unroutable.size:
                stats.errors.append(
                    f"layer {layer}: experts {sorted(set(unroutable.tolist()))} have no reachable holder"
                )
            results = await asyncio.gather(
                *(
                    self._forward(http, layout, addresses, rank, layer, tokens, idx, pending, stats)
                    for rank, idx in batches.items()
                )
            )
            served = np.zeros(pending.tokens.size, dtype=bool)
            for (rank, idx), result in zip(batches.items(), results, strict=True):
                if isinstance(result, str):
                    if result != "stale":
                        where = layout.ranks[rank]
                        avoid.add((where.node_id, where.device_index))
                    continue
                t, k = pending.tokens[idx], pending.ks[idx]
                np.add.at(out, t, weights[t, k, None] * result)
                served[idx] = True
            pending = _Pending(
                pending.tokens[~served], pending.ks[~served], pending.experts[~served]
            )
            if pending.tokens.size == 0:
                break
        return out, int(pending.tokens.size), generation

    async def _forward(
        self,
        http: httpx.AsyncClient,
        layout: Layout,
        addresses: Mapping[str, str],
        rank: int,
        layer: int,
        tokens: FloatArray,
        idx: np.ndarray[Any, np.dtype[np.int64]],
        pending: _Pending,
        stats: _Stats,
    ) -> FloatArray | str:
        """The outputs for ``pending[idx]`` from ``rank``, or why not: "stale" or "error"."""
        where = layout.ranks[rank]
        base = addresses.get(where.node_id)
        stats.requests += 1
        if base is None:
            stats.failed += 1
            stats.errors.append(f"node {where.node_id} has no known address")
            return "error"
        body = ForwardRequest(
            generation=layout.generation,
            layer=layer,
            experts=EncodedArray.encode(pending.experts[idx]),
            tokens=EncodedArray.encode(tokens[pending.tokens[idx]]),
        )
        url = f"{base.rstrip('/')}/v1/deployments/{layout.deployment}/devices/{where.device_index}/forward"
        try:
            resp = await http.post(
                url, content=body.model_dump_json(), headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            stats.failed += 1
            stats.errors.append(f"{url}: {type(exc).__name__}: {exc}")
            return "error"
        if resp.status_code == 409:
            stats.stale += 1
            return "stale"
        if resp.status_code != 200:
            stats.failed += 1
            stats.errors.append(f"{url}: HTTP {resp.status_code}: {resp.text[:200]}")
            return "error"
        answer = ForwardResponse.model_validate_json(resp.content)
        stats.generations.add(answer.generation)
        outputs = answer.outputs.decode().astype(np.float32)
        if outputs.shape != (idx.size, tokens.shape[1]):
            stats.failed += 1
            stats.errors.append(
                f"{url}: outputs of shape {outputs.shape}, expected {(idx.size, tokens.shape[1])}"
            )
            return "error"
        return outputs


@dataclass
class _Stats:
    requests: int = 0
    failed: int = 0
    stale: int = 0
    generations: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def _route_to_ranks(
    layout: Layout, layer: int, pending: _Pending, avoid: set[tuple[str, int]]
) -> tuple[dict[int, np.ndarray[Any, np.dtype[np.int64]]], np.ndarray[Any, np.dtype[np.int64]]]:
    """Indices into ``pending`` per rank (spread over replicas), and experts nobody can serve."""
    phy2log = layout.phy2log()
    if phy2log is None or not layout.ranks:
        return {}, np.unique(pending.experts)
    slots = layout.slots_per_rank
    held = phy2log[layer].reshape(len(layout.ranks), slots)
    usable = np.array([(r.node_id, r.device_index) not in avoid for r in layout.ranks], dtype=bool)
    per_rank: dict[int, list[int]] = {}
    missing: list[int] = []
    for i, expert in enumerate(pending.experts.tolist()):
        holders = np.nonzero((held == expert).any(axis=1) & usable)[0]
        if holders.size == 0:
            missing.append(expert)
            continue
        choice = int(holders[(int(pending.tokens[i]) + int(pending.ks[i])) % holders.size])
        per_rank.setdefault(choice, []).append(i)
    batches = {rank: np.asarray(idx, dtype=np.int64) for rank, idx in per_rank.items()}
    return batches, np.asarray(missing, dtype=np.int64)
