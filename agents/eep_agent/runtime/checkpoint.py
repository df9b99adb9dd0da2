"""Filling slots from the on-disk checkpoint (format: :mod:`eep_controller.probe.checkpoint`).

A worker loads its slots from the checkpoint when it starts for a committed rank, and reads
single experts from it when a transfer's source is ``-1`` (no live copy survives). Every
tensor read is verified against the CRC-32 recorded in the file, and gets its transfer
checksum (:func:`tensor_checksum`) computed once, here, so senders never compute it again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from eep_agent.runtime.checksum import tensor_checksum
from eep_agent.runtime.expert_store import ExpertShape, ExpertWeights
from eep_controller.probe.checkpoint import CheckpointError, CheckpointReader, FloatArray


class ExpertCheckpoint:
    """A checkpoint opened for one worker's shape and device."""

    def __init__(self, directory: Path | str, shape: ExpertShape, device: torch.device) -> None:
        self.reader = CheckpointReader(directory)
        meta = self.reader.meta
        expected = (shape.layers, shape.experts, shape.hidden, shape.inter)
        found = (meta.layers, meta.experts, meta.hidden, meta.inter)
        if found != expected:
            raise CheckpointError(
                f"checkpoint {directory} holds (layers, experts, hidden, inter) = {found}, "
                f"the deployment needs {expected}"
            )
        self.shape = shape
        self.device = device

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's weights on the device; raises CheckpointError on a CRC mismatch."""
        w1, w2, w3 = (self._to_device(a) for a in self.reader.expert(layer, expert))
        checksums = (tensor_checksum(w1), tensor_checksum(w2), tensor_checksum(w3))
        return ExpertWeights(w1, w2, w3, checksums=checksums)

    def _to_device(self, array: FloatArray) -> torch.Tensor:
        # the reader's arrays may be read-only views of the file; copy into memory we own
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).to(self.device)
