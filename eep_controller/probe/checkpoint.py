"""The expert checkpoint on disk: safetensors, one file per MoE layer, plus ``eep-checkpoint.json``.

Layout of a checkpoint directory::

    eep-checkpoint.json          CheckpointMeta (shape, seed, format version)
    layer-0000.safetensors       gate [E, H]; experts.{e}.w1 [I, H], .w2 [H, I], .w3 [I, H]
    layer-0001.safetensors       ...

Every tensor is float32. Each file's safetensors metadata holds the CRC-32 of every tensor
(``eep.crc32``: a JSON object, tensor name -> CRC), so a reader verifies what it loads. This module is numpy only: the
controller reads checkpoints without torch; the agent's runtime wraps it to fill its slots.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

META_FILE = "eep-checkpoint.json"
FORMAT_VERSION = 1
EXPERT_TENSORS = ("w1", "w2", "w3")
CRC_KEY = "eep.crc32"

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


class CheckpointError(RuntimeError):
    """The checkpoint is missing, malformed, or a tensor does not match its recorded CRC."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The shape of the MoE part a checkpoint holds."""

    layers: int
    experts: int
    hidden: int
    inter: int
    top_k: int
    seed: int
    format_version: int = FORMAT_VERSION

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's three float32 matrices."""
        return 3 * self.hidden * self.inter * 4

    def tensor_shape(self, index: int) -> tuple[int, int]:
        """Shape of tensor ``index`` (0 = w1, 1 = w2, 2 = w3) of one expert."""
        return (self.hidden, self.inter) if index == 1 else (self.inter, self.hidden)


def layer_file(directory: Path, layer: int) -> Path:
    return directory / f"layer-{layer:04d}.safetensors"


def tensor_name(expert: int, index: int) -> str:
    return f"experts.{expert}.{EXPERT_TENSORS[index]}"


def crc32(array: np.ndarray[Any, Any]) -> int:
    """CRC-32 of an array's bytes (C order): the one checksum of expert tensors in eep."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).data) & 0xFFFFFFFF


def write_synthetic(
    directory: Path,
    *,
    layers: int,
    experts: int,
    hidden: int,
    inter: int,
    seed: int,
    top_k: int = 2,
) -> CheckpointMeta:
    """Write a deterministic random checkpoint: the same arguments give the same bytes.

    Layer ``l`` draws from ``numpy.random.default_rng([seed, l])``; weights are scaled so
    an expert's output stays O(1) for O(1) inputs.
    """
    for name, value in (
        ("layers", layers),
        ("experts", experts),
        ("hidden", hidden),
        ("inter", inter),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be between 1 and experts ({experts}), got {top_k}")
    meta = CheckpointMeta(layers, experts, hidden, inter, top_k, seed)
    directory.mkdir(parents=True, exist_ok=True)
    for layer in range(layers):
        rng = np.random.default_rng([seed, layer])
        tensors: dict[str, FloatArray] = {
            "gate": rng.standard_normal((experts, hidden), dtype=np.float32)
            / np.float32(np.sqrt(hidden))
        }
        for e in range(experts):
            for i in range(3):
                fan_in = hidden if i != 1 else inter
                w = rng.standard_normal(meta.tensor_shape(i), dtype=np.float32)
                tensors[tensor_name(e, i)] = w / np.float32(np.sqrt(fan_in))
        # one metadata entry: safetensors writes its metadata map in no fixed order
        crcs = json.dumps({name: crc32(t) for name, t in tensors.items()}, sort_keys=True)
        save_file(tensors, str(layer_file(directory, layer)), metadata={CRC_KEY: crcs})
    (directory / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta


def read_meta(directory: Path) -> CheckpointMeta:
    path = Path(directory) / META_FILE
    try:
        raw = json.loads(path.read_text())
        meta = CheckpointMeta(**raw)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {directory}: {META_FILE} is missing") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid checkpoint description: {exc}") from exc
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {meta.format_version}, expected {FORMAT_VERSION}"
        )
    return meta


class CheckpointReader:
    """Reads tensors of one checkpoint lazily, verifying each against its recorded CRC-32."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)

    def _read(self, layer: int, names: list[str]) -> list[FloatArray]:
        if not 0 <= layer < self.meta.layers:
            raise CheckpointError(
                f"layer {layer} is outside the checkpoint's {self.meta.layers} layers"
            )
        path = layer_file(self.directory, layer)
        try:
            with safe_open(str(path), framework="numpy") as f:
                crcs = json.loads((f.metadata() or {}).get(CRC_KEY, "{}"))
                out: list[FloatArray] = []
                for name in names:
                    arr = f.get_tensor(name)
                    recorded = crcs.get(name)
                    if recorded is None or int(recorded) != crc32(arr):
                        raise CheckpointError(
                            f"{path}: tensor {name} does not match its recorded CRC-32"
                        )
                    out.append(arr)
                return out
        except (OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"cannot read {names} from {path}: {exc}") from exc

    def gate(self, layer: int) -> FloatArray:
        """The router gate of ``layer``: float32 [E, H]."""
        return self._read(layer, ["gate"])[0]

    def expert(self, layer: int, expert: int) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Expert ``expert`` of ``layer``: (w1 [I, H], w2 [H, I], w3 [I, H])."""
        if not 0 <= expert < self.meta.experts:
            raise CheckpointError(
                f"expert {expert} is outside the checkpoint's {self.meta.experts} experts"
            )
        w1, w2, w3 = self._read(layer, [tensor_name(expert, i) for i in range(3)])
        return w1, w2, w3
