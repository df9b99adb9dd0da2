"""Executing one rank's part of a transfer plan with point-to-point ops.

Rules kept here (see docs/operation-protocol.md and the Ascend review lessons):

- One typed op, :class:`P2POp`, for both directions.
- Every in-flight receive has its own buffer: the staged slot's fresh tensors, one per
  (layer, slot, tensor); the plan validation guarantees a slot is written once.
- Tags come from the plan: ``tag * 3 + i`` for tensor ``i``, ``checksum_tag_base + tag``
  for the transfer's three checksums (an int64 tensor sent after the data).
- Every tensor's checksum (:func:`tensor_checksum`) comes from the source: taken when the
  weights entered the source worker (loaded from the checkpoint, whose own CRC-32s were
  checked, or verified on receipt), or computed from the tensor when unknown. The destination recomputes it on what arrived and compares, so
  corruption anywhere between the source's memory and the destination's is caught.
  Mismatches are counted and fail the rank.
- Every wait has a deadline; a failed or late op fails the rank with the reason.
- Rounds run in order: all of a round's ops are posted, then waited, before the next round.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from eep_agent.runtime.checkpoint import ExpertCheckpoint
from eep_agent.runtime.checksum import tensor_checksum
from eep_agent.runtime.expert_store import ExpertWeights, SlotTable
from eep_agent.runtime.groups import StatelessGroup
from eep_agent.runtime.moves import ExpertMove, MoveKind, RankMoves

log = logging.getLogger(__name__)

CORRUPT_ENV = "EEP_TEST_CORRUPT_TRANSFER"
"""Test hook: ``layer:expert:tensor`` makes the sender corrupt that tensor after checksumming it."""
PAUSE_ENV = "EEP_TEST_TRANSFER_ROUND_PAUSE_S"
"""Test hook: seconds to pause before each round, so a test can act while a transfer is under way."""


class TransferFailed(RuntimeError):
    """This rank's part of the plan did not complete; ``str()`` is the reason for the ack."""


@dataclass(frozen=True)
class P2POp:
    """One point-to-point message, either direction. ``tensor`` is what is sent or the buffer received into."""

    kind: Literal["send", "recv"]
    peer: int
    tag: int
    tensor: torch.Tensor
    what: str

    def start(self, group: StatelessGroup) -> Any:
        if self.kind == "send":
            return group.send(self.tensor, self.peer, self.tag)
        return group.recv(self.tensor, self.peer, self.tag)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


@dataclass
class TransferReport:
    bytes_sent: int = 0
    bytes_received: int = 0
    tensors_verified: int = 0
    checksum_failures: int = 0
    reloads: int = 0
    seconds: float = 0.0
    error: str | None = None
    failures: list[str] = field(default_factory=list)
    group_broken: bool = False
    """A message failed or timed out: the group has abandoned in-flight ops and must not be reused."""


@dataclass(frozen=True)
class CorruptionSpec:
    layer: int
    expert: int
    tensor: int

    @classmethod
    def from_env(cls) -> CorruptionSpec | None:
        raw = os.environ.get(CORRUPT_ENV)
        if not raw:
            return None
        layer, expert, tensor = (int(x) for x in raw.split(":"))
        return cls(layer, expert, tensor)


@dataclass
class _Incoming:
    move: ExpertMove
    weights: ExpertWeights
    checksums: torch.Tensor


def execute_moves(
    moves: RankMoves,
    *,
    group: StatelessGroup | None,
    active: SlotTable,
    staged: SlotTable | None,
    checkpoint: ExpertCheckpoint | None,
    device: torch.device,
    deadline: float,
    corruption: CorruptionSpec | None = None,
) -> TransferReport:
    """Run every round of ``moves``. ``report.error`` is None only if everything arrived verified.

    Rounds stay in order (round k+1 is posted only after all of round k completed), but the
    CPU work around them is pipelined: while round k's messages are in flight, this rank
    prepares round k+1 (sender checksums, receive buffers, checkpoint reloads) and verifies
    what arrived in round k-1.
    """
    report = TransferReport()
    started = time.monotonic()
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    rounds = [
        sorted((m for m in moves.moves if m.round == r), key=lambda m: m.tag) for r in moves.rounds
    ]
    to_verify: list[_Incoming] = []
    try:
        upcoming = (
            _prepare_round(rounds[0], moves, active, staged, checkpoint, device, corruption, report)
            if rounds
            else None
        )
        for k in range(len(rounds)):
            current, upcoming = upcoming, None
            assert current is not None
            if pause > 0:
                time.sleep(pause)
            works = _post(current, moves, group, report)
            if k + 1 < len(rounds):
                upcoming = _prepare_round(
                    rounds[k + 1], moves, active, staged, checkpoint, device, corruption, report
                )
            for item in to_verify:
                _verify_and_stage(item, staged, report)
            _wait(works, deadline, report)
            to_verify = current.incoming
        for item in to_verify:
            _verify_and_stage(item, staged, report)
    except TransferFailed as exc:
        report.error = str(exc)
    report.seconds = time.monotonic() - started
    if report.checksum_failures and report.error is None:
        report.error = (
            f"{report.checksum_failures} tensor(s) failed checksum verification: "
            + "; ".join(report.failures[:5])
        )
    return report


@dataclass
class _Round:
    number: int
    ops: list[P2POp]
    incoming: list[_Incoming]


def _prepare_round(
    round_moves: list[ExpertMove],
    moves: RankMoves,
    active: SlotTable,
    staged: SlotTable | None,
    checkpoint: ExpertCheckpoint | None,
    device: torch.device,
    corruption: CorruptionSpec | None,
    report: TransferReport,
) -> _Round:
    """Everything a round needs before its messages go: checksummed sends, fresh receive buffers, reloads."""
    ops: list[P2POp] = []
    incoming: list[_Incoming] = []
    for move in round_moves:
        if move.kind is MoveKind.RELOAD:
            _reload(move, staged, checkpoint, report)
        elif move.kind is MoveKind.SEND:
            ops.extend(_send_ops(move, moves.checksum_tag_base, active, device, corruption))
        else:
            if staged is None:
                raise TransferFailed(
                    f"layer {move.layer} expert {move.expert}: a receive but nothing is staged"
                )
            weights = ExpertWeights.empty(staged.shape, device)
            checksums = torch.zeros(3, dtype=torch.int64, device=device)
            what = f"layer {move.layer} expert {move.expert}"
            ops.extend(
                P2POp(
                    "recv",
                    move.peer,
                    move.tensor_tag(i),
                    t,
                    f"{what} tensor {i} from rank {move.peer}",
                )
                for i, t in enumerate(weights.tensors())
            )
            ops.append(
                P2POp(
                    "recv",
                    move.peer,
                    moves.checksum_tag_base + move.tag,
                    checksums,
                    f"{what} checksums from rank {move.peer}",
                )
            )
            incoming.append(_Incoming(move, weights, checksums))
    return _Round(round_moves[0].round if round_moves else -1, ops, incoming)


def _post(
    current: _Round, moves: RankMoves, group: StatelessGroup | None, report: TransferReport
) -> list[tuple[P2POp, Any]]:
    if not current.ops:
        return []
    if group is None or not group.alive:
        raise TransferFailed(
            f"round {current.number}: no {moves.world} group to carry {len(current.ops)} messages"
        )
    works: list[tuple[P2POp, Any]] = []
    for op in current.ops:
        try:
            works.append((op, op.start(group)))
        except Exception as exc:
            report.group_broken = True
            raise TransferFailed(f"posting the {op.kind} of {op.what} failed: {exc}") from exc
    return works


def _wait(works: list[tuple[P2POp, Any]], deadline: float, report: TransferReport) -> None:
    for op, work in works:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            report.group_broken = True
            raise TransferFailed(f"deadline passed before the {op.kind} of {op.what} completed")
        try:
            work.wait(datetime.timedelta(seconds=remaining))
        except Exception as exc:
            report.group_broken = True
            raise TransferFailed(f"{op.kind} of {op.what} failed: {exc}") from exc
        if op.kind == "send":
            report.bytes_sent += op.nbytes
        else:
            report.bytes_received += op.nbytes


def _send_ops(
    move: ExpertMove,
    base: int,
    active: SlotTable,
    device: torch.device,
    corruption: CorruptionSpec | None,
) -> list[P2POp]:
    held = active.find(move.layer, move.expert)
    what = f"layer {move.layer} expert {move.expert}"
    if held is None:
        raise TransferFailed(f"{what}: asked to send an expert this rank does not hold")
    weights = held[1]
    tensors = list(weights.tensors())
    # the source's checksums: known since the weights arrived here (verified then), else computed now
    known = (
        weights.checksums
        if weights.checksums is not None
        else tuple(tensor_checksum(t) for t in tensors)
    )
    checksums = torch.tensor(list(known), dtype=torch.int64, device=device)
    if corruption is not None and (corruption.layer, corruption.expert) == (
        move.layer,
        move.expert,
    ):
        bad = tensors[corruption.tensor].clone()
        bad.view(-1)[0] += 1.0
        tensors[corruption.tensor] = bad
        log.warning(
            "test hook %s: corrupting %s tensor %d after checksumming",
            CORRUPT_ENV,
            what,
            corruption.tensor,
        )
    ops = [
        P2POp(
            "send",
            move.peer,
            move.tensor_tag(i),
            t.contiguous(),
            f"{what} tensor {i} to rank {move.peer}",
        )
        for i, t in enumerate(tensors)
    ]
    ops.append(
        P2POp(
            "send", move.peer, base + move.tag, checksums, f"{what} checksums to rank {move.peer}"
        )
    )
    return ops


def _verify_and_stage(item: _Incoming, staged: SlotTable | None, report: TransferReport) -> None:
    move = item.move
    expected = item.checksums.cpu().tolist()
    ok = True
    for i, tensor in enumerate(item.weights.tensors()):
        got = tensor_checksum(tensor)
        if got != int(expected[i]):
            ok = False
            report.checksum_failures += 1
            report.failures.append(
                f"layer {move.layer} expert {move.expert} tensor {i} from rank {move.peer}: "
                f"checksum {got:#010x}, sender said {int(expected[i]):#010x}"
            )
        else:
            report.tensors_verified += 1
    if ok and staged is not None:
        w = item.weights
        c1, c2, c3 = (int(c) for c in expected)
        staged.put(
            move.layer,
            move.dst_slot,
            move.expert,
            ExpertWeights(w.w1, w.w2, w.w3, checksums=(c1, c2, c3)),
        )


def _reload(
    move: ExpertMove,
    staged: SlotTable | None,
    checkpoint: ExpertCheckpoint | None,
    report: TransferReport,
) -> None:
    what = f"layer {move.layer} expert {move.expert}"
    if staged is None:
        raise TransferFailed(f"{what}: a checkpoint reload but nothing is staged")
    if checkpoint is None:
        raise TransferFailed(
            f"{what}: the plan reloads it from the checkpoint but the deployment has none"
        )
    try:
        weights = checkpoint.expert(move.layer, move.expert)
    except Exception as exc:
        raise TransferFailed(f"{what}: checkpoint reload failed: {exc}") from exc
    staged.put(move.layer, move.dst_slot, move.expert, weights)
    report.reloads += 1
    report.tensors_verified += 3
