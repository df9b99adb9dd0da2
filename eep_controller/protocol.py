"""The wire contract shared by the controller, the agents and etcd.

Every value stored in etcd and every body that crosses the HTTP boundary is one of these
pydantic models. Agents import this module and nothing else of the controller's API.

Conventions:
- A *rank* is one expert-parallel rank: one device, one worker. EP size is always
  ``dp * tp * pcp`` and is computed by :func:`ep_size` only.
- A placement ``phy2log[L, R*S]``: column ``r*S + s`` is slot ``s`` of rank ``r``; the value is
  the logical expert id held there.
- Arrays travel as :class:`EncodedArray` (zlib-compressed little-endian bytes in base64).
"""

from __future__ import annotations

import base64
import zlib
from enum import Enum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

PROTOCOL_VERSION = "v1"

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
NODE_ID_PATTERN = r"^[A-Za-z0-9]([-_.A-Za-z0-9]{0,126}[A-Za-z0-9])?$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="DNS-label style name")]
NodeId = Annotated[str, Field(pattern=NODE_ID_PATTERN)]


class StrictModel(BaseModel):
    """Base of every wire model: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def ep_size(dp: int, tp: int = 1, pcp: int = 1) -> int:
    """The expert-parallel world size of ``dp`` data-parallel ranks; the only place it is computed."""
    return dp * tp * pcp


# --------------------------------------------------------------------------- arrays


class EncodedArray(StrictModel):
    """A numpy array on the wire: dtype, shape and zlib-compressed bytes (base64)."""

    dtype: Literal["int16", "int32", "int64", "float32", "float64"]
    shape: list[Annotated[int, Field(ge=0)]]
    data: str

    @classmethod
    def encode(cls, array: np.ndarray[Any, Any]) -> EncodedArray:
        arr = np.ascontiguousarray(array)
        dtype = str(arr.dtype)
        if dtype not in ("int16", "int32", "int64", "float32", "float64"):
            raise ValueError(f"unsupported dtype for the wire: {dtype}")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        return cls(
            dtype=dtype,  # type: ignore[arg-type,unused-ignore]
            shape=list(arr.shape),
            data=base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
        )

    def decode(self) -> np.ndarray[Any, Any]:
        """The array; ValueError when the payload is not base64 of zlib data holding exactly
        the values the shape needs (decompression stops past that size, so a small payload
        cannot expand into a huge one)."""
        dtype = np.dtype(self.dtype).newbyteorder("<")
        expected = int(np.prod(self.shape, dtype=object)) if self.shape else 1
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(base64.b64decode(self.data), expected * dtype.itemsize + 1)
        except zlib.error as exc:
            raise ValueError(f"array payload is not zlib data: {exc}") from exc
        need = expected * dtype.itemsize
        if len(raw) != need:
            held = f"more than {need}" if len(raw) > need else str(len(raw))
            raise ValueError(
                f"array payload holds {held} bytes, shape {self.shape} of {self.dtype} needs {need}"
            )
        arr = np.frombuffer(raw, dtype=dtype)
        return arr.reshape(self.shape).astype(self.dtype)


# --------------------------------------------------------------------------- nodes


class DeviceKind(str, Enum):
    NPU = "npu"
    GPU = "gpu"
    CPU = "cpu"


class Device(StrictModel):
    index: Annotated[int, Field(ge=0)]
    kind: DeviceKind
    memory: Annotated[int, Field(ge=0, description="bytes; 0 when unknown")] = 0


class NodeInfo(StrictModel):
    """What an agent registers under ``nodes/{node_id}``, bound to its lease."""

    node_id: NodeId
    address: str = Field(description="base URL of the agent's HTTP endpoint")
    devices: list[Device]
    labels: dict[str, str] = Field(default_factory=dict)
    agent_version: str
    started_at: float = 0.0


# --------------------------------------------------------------------------- deployments


class MoEShape(StrictModel):
    """The shape of the MoE part of a model: what the planner needs to know."""

    num_moe_layers: Annotated[StrictInt, Field(gt=0, le=4096)]
    num_experts: Annotated[StrictInt, Field(gt=0, le=65536)]
    expert_bytes: Annotated[StrictInt, Field(gt=0, description="bytes of one expert's weights")]
    hidden_size: Annotated[StrictInt, Field(gt=0)] | None = None
    intermediate_size: Annotated[StrictInt, Field(gt=0)] | None = None
    top_k: Annotated[StrictInt, Field(gt=0)] = 8
    num_expert_groups: Annotated[StrictInt, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> MoEShape:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_expert_groups is not None and self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"num_experts ({self.num_experts}) is not divisible by "
                f"num_expert_groups ({self.num_expert_groups})"
            )
        return self


class ActuatorKind(str, Enum):
    NATIVE = "native"
    VLLM = "vllm"


class PhaseDeadlines(StrictModel):
    """Seconds each phase may take before the operation aborts (or, after commit, is forced)."""

    preparing_s: Annotated[StrictFloat, Field(gt=0, le=86400)] = 120.0
    transferring_s: Annotated[StrictFloat, Field(gt=0, le=86400)] = 600.0
    switching_s: Annotated[StrictFloat, Field(gt=0, le=86400)] = 120.0
    cleanup_s: Annotated[StrictFloat, Field(gt=0, le=86400)] = 60.0


MAX_DP = 4096


class DeploymentSpec(StrictModel):
    """A deployment as the user declares it. Its numbers are strict, as in `ScaleRequest`."""

    name: Name
    model: MoEShape
    tp: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    pcp: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    slots_per_rank: Annotated[StrictInt, Field(ge=1, le=65536)]
    min_dp: Annotated[StrictInt, Field(ge=1, le=MAX_DP)] = 1
    max_dp: Annotated[StrictInt, Field(ge=1, le=MAX_DP)]
    initial_dp: Annotated[StrictInt, Field(ge=1, le=MAX_DP)] | None = None
    actuator: ActuatorKind = ActuatorKind.NATIVE
    checkpoint: str | None = Field(
        default=None, description="checkpoint directory the reference runtime loads experts from"
    )
    vllm_url: str | None = Field(default=None, description="vLLM API server (actuator=vllm)")
    device_kind: DeviceKind | None = Field(
        default=None, description="only place ranks on devices of this kind"
    )
    deadlines: PhaseDeadlines = Field(default_factory=PhaseDeadlines)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels_small(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 64:
            raise ValueError("at most 64 labels")
        return v

    @model_validator(mode="after")
    def _check(self) -> DeploymentSpec:
        if self.min_dp > self.max_dp:
            raise ValueError(f"min_dp ({self.min_dp}) is greater than max_dp ({self.max_dp})")
        dp0 = self.initial_dp if self.initial_dp is not None else self.min_dp
        if not self.min_dp <= dp0 <= self.max_dp:
            raise ValueError(
                f"initial_dp ({dp0}) is outside [min_dp, max_dp] = [{self.min_dp}, {self.max_dp}]"
            )
        experts = self.model.num_experts
        at_max = self.slots(self.max_dp)
        if at_max < experts:
            raise ValueError(
                f"the deployment cannot hold all {experts} experts even at max_dp={self.max_dp}: "
                f"{self.ep_size(self.max_dp)} EP ranks x {self.slots_per_rank} slots = {at_max} slots"
            )
        at_min = self.slots(self.min_dp)
        if at_min < experts:
            raise ValueError(
                f"min_dp={self.min_dp} gives {at_min} expert slots for {experts} experts; "
                f"raise min_dp to at least {self.smallest_dp()}"
            )
        if self.ep_size(self.max_dp) > 65536:
            raise ValueError(f"EP size at max_dp is {self.ep_size(self.max_dp)}, above 65536")
        if self.actuator is ActuatorKind.VLLM and not self.vllm_url:
            raise ValueError("actuator 'vllm' needs vllm_url")
        return self

    @property
    def start_dp(self) -> int:
        return self.initial_dp if self.initial_dp is not None else self.min_dp

    def ep_size(self, dp: int) -> int:
        return ep_size(dp, self.tp, self.pcp)

    def slots(self, dp: int) -> int:
        return self.ep_size(dp) * self.slots_per_rank

    def smallest_dp(self) -> int:
        """The smallest dp whose slots hold every logical expert."""
        per_dp = self.ep_size(1) * self.slots_per_rank
        return max(1, -(-self.model.num_experts // per_dp))


class Rank(StrictModel):
    """Where one EP rank runs."""

    node_id: NodeId
    device_index: Annotated[int, Field(ge=0)]

    @property
    def key(self) -> str:
        return f"{self.node_id}/{self.device_index}"


class GroupEndpoint(StrictModel):
    """The TCPStore rendezvous of a process group."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    backend: Literal["gloo", "nccl", "hccl"]
    world_size: Annotated[int, Field(ge=1)]
    prefix: str


class Layout(StrictModel):
    """The committed truth of a deployment at one generation."""

    deployment: Name
    generation: Annotated[int, Field(ge=0)]
    dp_size: Annotated[int, Field(ge=0)]
    ranks: list[Rank]
    slots_per_rank: Annotated[int, Field(ge=1)]
    placement: EncodedArray | None = Field(
        default=None, description="phy2log [L, R*S]; None when empty"
    )
    group: GroupEndpoint | None = None
    op_id: str | None = None
    committed_at: float = 0.0

    def phy2log(self) -> np.ndarray[Any, Any] | None:
        return None if self.placement is None else self.placement.decode()


# --------------------------------------------------------------------------- operations


class OpKind(str, Enum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    RECOVER = "recover"
    REBALANCE = "rebalance"


class OpState(str, Enum):
    PLANNED = "PLANNED"
    PREPARING = "PREPARING"
    TRANSFERRING = "TRANSFERRING"
    SWITCHING = "SWITCHING"
    CLEANUP = "CLEANUP"
    SUCCEEDED = "SUCCEEDED"
    ABORTED = "ABORTED"

    @property
    def terminal(self) -> bool:
        return self in (OpState.SUCCEEDED, OpState.ABORTED)

    @property
    def committed(self) -> bool:
        """True once the layout of the target generation is the committed one."""
        return self in (OpState.SWITCHING, OpState.CLEANUP, OpState.SUCCEEDED)


ACKED_PHASES = (OpState.PREPARING, OpState.TRANSFERRING, OpState.SWITCHING, OpState.CLEANUP)


class ScaleRequest(StrictModel):
    """Body of ``POST /v1/deployments/{d}/scale``.

    Numbers and flags are strict: ``"5"`` or ``true`` for ``dp_size`` and ``"yes"`` for
    ``dry_run`` are errors, not silently read as 5, 1 and a dry run."""

    dp_size: Annotated[StrictInt, Field(ge=1, le=MAX_DP)]
    remove_ranks: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    drain_timeout_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = 30.0
    dry_run: StrictBool = False
    reason: Annotated[str, Field(max_length=500)] | None = None


class Participant(StrictModel):
    """One rank that takes part in an operation: in the old world, the new one, or both."""

    node_id: NodeId
    device_index: Annotated[int, Field(ge=0)]
    old_rank: int | None = None
    new_rank: int | None = None

    @property
    def joining(self) -> bool:
        return self.old_rank is None

    @property
    def leaving(self) -> bool:
        return self.new_rank is None


class PlanStats(StrictModel):
    copies: int
    lower_bound: int
    checkpoint_reloads: int
    bytes: int
    max_rank_bytes_in: int
    max_rank_bytes_out: int
    balancedness_before: float
    balancedness_after: float
    rounds: int
    est_transfer_s: float
    makespan_lower_bound_s: float


TRANSFER_COLUMNS = ("layer", "expert", "src_rank", "dst_rank", "dst_slot", "round", "tag")


class OpPlan(StrictModel):
    """What an operation will do, stored on the op record before anyone acts on it.

    ``transfers`` is int64 ``[N, 7]`` with the columns of :data:`TRANSFER_COLUMNS`:
    src in the OLD rank numbering (-1 = reload from the checkpoint), dst in the NEW one.
    ``transfer_world`` says which process group carries them: ``active`` (the old world,
    numbered by old rank: graceful scale-down) or ``standby`` (the new world).
    """

    from_dp: Annotated[int, Field(ge=0)]
    to_dp: Annotated[int, Field(ge=1)]
    participants: list[Participant]
    rank_map: list[int]
    placement: EncodedArray
    transfers: EncodedArray
    transfer_world: Literal["active", "standby"]
    stats: PlanStats

    def new_ranks(self) -> list[Rank]:
        by_new = sorted(
            (p for p in self.participants if p.new_rank is not None), key=lambda p: p.new_rank or 0
        )
        return [Rank(node_id=p.node_id, device_index=p.device_index) for p in by_new]


class PhaseRecord(StrictModel):
    phase: OpState
    started_at: float
    ended_at: float | None = None


class Operation(StrictModel):
    """A scale request made into a resource; written to etcd before anything acts on it."""

    id: str
    deployment: Name
    kind: OpKind
    state: OpState = OpState.PLANNED
    from_generation: Annotated[int, Field(ge=0)]
    to_generation: Annotated[int, Field(ge=1)]
    request: ScaleRequest
    plan: OpPlan | None = None
    created_at: float
    updated_at: float
    phase_deadline_at: float | None = None
    history: list[PhaseRecord] = Field(default_factory=list)
    error: str | None = None
    requested_by: str = "anonymous"
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    cancel_requested: bool = False
    aborted_requests: int = 0
    bytes_moved: int = 0
    rendezvous: GroupEndpoint | None = None


class AckStatus(str, Enum):
    OK = "ok"
    FAILED = "failed"


class Ack(StrictModel):
    """An agent's report for one participant in one phase (``ops/{id}/acks/{phase}/{p}``)."""

    op_id: str
    phase: OpState
    participant: Annotated[int, Field(ge=0)]
    node_id: NodeId
    status: AckStatus
    reason: str | None = None
    started_at: float
    finished_at: float
    bytes_sent: int = 0
    bytes_received: int = 0
    tensors_verified: int = 0
    checksum_failures: int = 0
    aborted_requests: int = 0
    served_requests: int = 0


class Event(StrictModel):
    """An audit event (``events/{d}/{seq}``)."""

    seq: int
    deployment: str
    time: float
    type: str
    op_id: str | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class GrouplessRank(StrictModel):
    """A rank whose worker its agent restarted from the checkpoint at `generation`
    (``deployments/{d}/groupless/{generation}/{rank}``). The new worker serves its slots but
    holds no active process group, so until an operation gives every rank a new one, copies
    cannot travel over the active world: a scale-down then carries them over the standby
    world, and the experts only leaving ranks hold are reloaded from the checkpoint. The
    commit of the next generation deletes these records."""

    deployment: Name
    generation: Annotated[int, Field(ge=1)]
    rank: Annotated[int, Field(ge=0)]
    node_id: NodeId
    device_index: Annotated[int, Field(ge=0)]
    since: float


class LoadWindow(StrictModel):
    """Tokens per logical expert seen over a window (``deployments/{d}/load``)."""

    deployment: Name
    generation: int
    load: EncodedArray = Field(description="float64 [L, E]")
    window_s: float
    updated_at: float

    def usable(self, layers: int, experts: int | None = None) -> np.ndarray[Any, Any] | None:
        """The load as float64 [layers, experts] (any width when `experts` is None), or None
        when it cannot be used to plan or score: a payload that does not decode, another
        shape, a value that is negative or not finite, or no load at all. Agents write this
        record; a bad one must not stop planning, which then assumes a uniform load."""
        try:
            arr = np.asarray(self.load.decode(), dtype=np.float64)
        except ValueError:
            return None
        if arr.ndim != 2 or arr.shape[0] != layers:
            return None
        if experts is not None and arr.shape[1] != experts:
            return None
        if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not np.any(arr > 0):
            return None
        return arr


class ForwardRequest(StrictModel):
    """A probe batch for one worker: row ``i`` asks expert ``experts[i]`` to process ``tokens[i]``."""

    generation: Annotated[int, Field(ge=0)]
    layer: Annotated[int, Field(ge=0)]
    experts: EncodedArray
    tokens: EncodedArray


class ForwardResponse(StrictModel):
    generation: int
    outputs: EncodedArray
