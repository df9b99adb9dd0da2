"""The expert weights a worker holds: S slots per layer, and the slots staged for the next generation.

Indexing is one scheme everywhere: ``[layer][slot]``; ``experts[layer, slot]`` is the logical
expert in that slot (-1 = empty). A slot holds one expert's three float32 matrices on the
worker's device: ``w1 [I, H]``, ``w2 [H, I]``, ``w3 [I, H]``.

Caches tied to a generation (the fused ``w1 | w3`` matrix per slot used by the forward pass)
live in :class:`GenerationCaches`; every cache registers there when created and the whole
registry is cleared when the worker switches generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ExpertShape:
    layers: int
    experts: int
    slots: int
    hidden: int
    inter: int

    def tensor_shape(self, index: int) -> tuple[int, int]:
        return (self.hidden, self.inter) if index == 1 else (self.inter, self.hidden)

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.inter * 4


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's matrices. ``checksums``: their CRC-32s when known, taken when the weights
    entered this worker (verified against the checkpoint, or against the sender's on receipt)."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    checksums: tuple[int, int, int] | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.w1, self.w2, self.w3)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def empty(cls, shape: ExpertShape, device: torch.device) -> ExpertWeights:
        """Fresh, distinct buffers for one expert (receive targets)."""
        w1, w2, w3 = (
            torch.empty(shape.tensor_shape(i), dtype=torch.float32, device=device) for i in range(3)
        )
        return cls(w1, w2, w3)


class StaleExperts(LookupError):
    """A forward asked for an expert this worker does not hold (the caller's layout is stale)."""


class SlotTable:
    """The slots of one generation: which expert each holds and its weights."""

    def __init__(self, shape: ExpertShape, experts: np.ndarray[Any, Any] | None = None) -> None:
        self.shape = shape
        if experts is None:
            experts = np.full((shape.layers, shape.slots), -1, dtype=np.int64)
        if experts.shape != (shape.layers, shape.slots):
            raise ValueError(
                f"slot map of shape {list(experts.shape)}, expected {[shape.layers, shape.slots]}"
            )
        self.experts = experts.astype(np.int64, copy=True)
        self._weights: list[list[ExpertWeights | None]] = [
            [None] * shape.slots for _ in range(shape.layers)
        ]

    def put(self, layer: int, slot: int, expert: int, weights: ExpertWeights) -> None:
        self.experts[layer, slot] = expert
        self._weights[layer][slot] = weights

    def weights(self, layer: int, slot: int) -> ExpertWeights | None:
        return self._weights[layer][slot]

    def find(self, layer: int, expert: int) -> tuple[int, ExpertWeights] | None:
        """The first filled slot of ``layer`` holding ``expert``."""
        for slot in np.nonzero(self.experts[layer] == expert)[0].tolist():
            w = self._weights[layer][slot]
            if w is not None:
                return int(slot), w
        return None

    def missing(self) -> list[tuple[int, int, int]]:
        """(layer, slot, expert) of every slot that names an expert but holds no weights."""
        out: list[tuple[int, int, int]] = []
        for layer in range(self.shape.layers):
            for slot in range(self.shape.slots):
                expert = int(self.experts[layer, slot])
                if expert >= 0 and self._weights[layer][slot] is None:
                    out.append((layer, slot, expert))
        return out

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for row in self._weights:
            for w in row:
                if w is not None and id(w) not in seen:
                    seen.add(id(w))
                    total += w.nbytes
        return total


@dataclass
class GenerationCaches:
    """Every cache whose content is only valid for one generation, cleared at a switch."""

    _caches: dict[str, dict[Any, Any]] = field(default_factory=dict)

    def register(self, name: str) -> dict[Any, Any]:
        if name in self._caches:
            raise ValueError(f"cache {name!r} is already registered")
        cache: dict[Any, Any] = {}
        self._caches[name] = cache
        return cache

    def clear(self) -> None:
        for cache in self._caches.values():
            cache.clear()

    def sizes(self) -> dict[str, int]:
        return {name: len(c) for name, c in self._caches.items()}


class ExpertStore:
    """The active slots (serving now) and, during an operation, the staged slots of the next generation."""

    def __init__(self, shape: ExpertShape, device: torch.device) -> None:
        self.shape = shape
        self.device = device
        self.active = SlotTable(shape)
        self.staged: SlotTable | None = None
        self.staged_for: str | None = None
        self.caches = GenerationCaches()
        self._fused = self.caches.register("fused_w13")
        self.load = np.zeros((shape.layers, shape.experts), dtype=np.float64)

    def stage(
        self, op_id: str, new_experts: np.ndarray[Any, Any], filled_elsewhere: set[tuple[int, int]]
    ) -> SlotTable:
        """Start the next generation's slots: every slot not in ``filled_elsewhere`` keeps the
        weights this worker already holds for its expert (no copy)."""
        table = SlotTable(self.shape, new_experts)
        for layer in range(self.shape.layers):
            for slot in range(self.shape.slots):
                expert = int(new_experts[layer, slot])
                if expert < 0 or (layer, slot) in filled_elsewhere:
                    continue
                held = self.active.find(layer, expert)
                if held is not None:
                    table.put(layer, slot, expert, held[1])
        self.staged = table
        self.staged_for = op_id
        return table

    def drop_staged(self) -> None:
        self.staged = None
        self.staged_for = None

    def swap(self, op_id: str) -> SlotTable:
        """Make the staged slots active; returns the previous table. Clears generation caches."""
        if self.staged is None or self.staged_for != op_id:
            raise RuntimeError(
                f"no experts staged for operation {op_id} (staged for {self.staged_for})"
            )
        missing = self.staged.missing()
        if missing:
            raise RuntimeError(
                f"{len(missing)} staged slots hold no weights, e.g. (layer, slot, expert) {missing[0]}"
            )
        old, self.active = self.active, self.staged
        self.staged = None
        self.staged_for = None
        self.caches.clear()
        return old

    def forward(
        self, layer: int, experts: np.ndarray[Any, Any], tokens: torch.Tensor
    ) -> torch.Tensor:
        """Row ``i``: expert ``experts[i]``'s SwiGLU MLP applied to ``tokens[i]``."""
        if not 0 <= layer < self.shape.layers:
            raise ValueError(f"layer {layer} is outside 0..{self.shape.layers - 1}")
        if (
            tokens.ndim != 2
            or tokens.shape[1] != self.shape.hidden
            or tokens.shape[0] != experts.shape[0]
        ):
            raise ValueError(
                f"tokens of shape {list(tokens.shape)} for {experts.shape[0]} experts and H={self.shape.hidden}"
            )
        out = torch.empty_like(tokens)
        unique = np.unique(experts)
        found: list[tuple[int, int, ExpertWeights]] = []
        for expert in unique.tolist():
            held = self.active.find(layer, int(expert))
            if held is None:
                raise StaleExperts(f"layer {layer}: expert {expert} is not held by this worker")
            found.append((int(expert), held[0], held[1]))
        inter = self.shape.inter
        for expert, slot, weights in found:
            rows = torch.from_numpy(np.nonzero(experts == expert)[0]).to(tokens.device)
            w13 = self._fused_w13(layer, slot, weights)
            h = tokens.index_select(0, rows) @ w13.T
            gate, up = h[:, :inter], h[:, inter:]
            out.index_copy_(0, rows, (torch.nn.functional.silu(gate) * up) @ weights.w2.T)
            self.load[layer, expert] += rows.numel()
        return out

    def _fused_w13(self, layer: int, slot: int, weights: ExpertWeights) -> torch.Tensor:
        key = (layer, slot)
        fused = self._fused.get(key)
        if fused is None:
            fused = torch.cat([weights.w1, weights.w3], dim=0)
            self._fused[key] = fused
        return fused

    def take_load(self) -> np.ndarray[Any, Any]:
        """Tokens per (layer, expert) since the last call."""
        out, self.load = self.load, np.zeros_like(self.load)
        return out
