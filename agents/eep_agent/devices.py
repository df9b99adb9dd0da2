"""Which devices this node has: NPUs via torch_npu, GPUs via torch.cuda, else what the user says."""

from __future__ import annotations

import importlib.util
import logging
import re

from eep_controller.protocol import Device, DeviceKind

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(cpu|gpu|npu):(\d+)$")


def parse_devices(spec: str) -> list[Device]:
    """``cpu:4`` -> four CPU devices (indices 0..3). Raises ValueError on anything else."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"--devices must look like cpu:N, gpu:N or npu:N, got {spec!r}")
    count = int(m.group(2))
    if not 1 <= count <= 1024:
        raise ValueError(f"device count must be between 1 and 1024, got {count}")
    return [Device(index=i, kind=DeviceKind(m.group(1))) for i in range(count)]


def detect_devices() -> list[Device]:
    """NPUs if torch_npu imports, else CUDA GPUs if torch sees any, else an empty list."""
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch
            import torch_npu  # noqa: F401  (registers torch.npu)

            npu = getattr(torch, "npu")  # noqa: B009 - attribute added by torch_npu at import
            n = int(npu.device_count())
            if n:
                return [
                    Device(
                        index=i,
                        kind=DeviceKind.NPU,
                        memory=int(npu.get_device_properties(i).total_memory),
                    )
                    for i in range(n)
                ]
        except Exception as exc:  # a broken NPU stack must not stop a CPU agent
            log.warning("torch_npu present but unusable: %s", exc)
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                return [
                    Device(
                        index=i,
                        kind=DeviceKind.GPU,
                        memory=int(torch.cuda.get_device_properties(i).total_memory),
                    )
                    for i in range(torch.cuda.device_count())
                ]
        except Exception as exc:
            log.warning("torch.cuda unusable: %s", exc)
    return []
