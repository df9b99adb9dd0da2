"""The probe: checkpoint format, the single-process reference MoE layer, the end-to-end client.

numpy only (no torch): the controller, the demo and the tests run it without the agent extra.
"""

from eep_controller.probe.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    CheckpointReader,
    crc32,
    read_meta,
    write_synthetic,
)
from eep_controller.probe.client import ProbeClient, ProbeResult
from eep_controller.probe.reference import expert_mlp, moe_layer, probe_tokens, route

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "CheckpointReader",
    "ProbeClient",
    "ProbeResult",
    "crc32",
    "expert_mlp",
    "moe_layer",
    "probe_tokens",
    "read_meta",
    "route",
    "write_synthetic",
]
