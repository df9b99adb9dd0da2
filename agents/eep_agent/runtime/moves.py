"""A plan's transfers as one rank sees them (numpy only, no torch).

``OpPlan.transfers`` rows are ``(layer, expert, src_rank, dst_rank, dst_slot, round, tag)``
with ``src_rank`` in the OLD numbering (-1 = read from the checkpoint) and
``dst_rank``/``dst_slot`` in the NEW one. :func:`moves_for_participant` translates both ends
into the numbering of the world that carries the transfer (docs/operation-protocol.md):

- ``standby``: the source is ``rank_map[src_rank]``, the destination ``dst_rank``;
- ``active``: the source is ``src_rank``, the destination the old rank of ``dst_rank``.

Wire tags: tensor ``i`` (0 = w1, 1 = w2, 2 = w3) of a transfer travels with ``tag * 3 + i``;
the transfer's three checksums travel with ``checksum_tag_base + tag`` where
``checksum_tag_base = 3 * (max tag + 1)``, so every message of a plan has its own tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import numpy as np

from eep_controller.protocol import Participant

World = Literal["active", "standby"]
TENSORS_PER_EXPERT = 3


class PlanError(ValueError):
    """The plan cannot be executed by this rank as written."""


class MoveKind(str, Enum):
    SEND = "send"
    RECV = "recv"
    RELOAD = "reload"  # the destination reads the expert from the checkpoint


@dataclass(frozen=True)
class ExpertMove:
    """One transfer from the point of view of one rank.

    ``peer`` is the other side's rank in the transfer world (-1 for a reload);
    ``dst_slot`` is the receiver's slot in the new generation.
    """

    kind: MoveKind
    layer: int
    expert: int
    round: int
    tag: int
    peer: int
    dst_slot: int

    def tensor_tag(self, index: int) -> int:
        return self.tag * TENSORS_PER_EXPERT + index


@dataclass(frozen=True)
class RankMoves:
    """Everything one participant does in TRANSFERRING."""

    world: World
    world_rank: int | None
    moves: tuple[ExpertMove, ...]
    checksum_tag_base: int

    @property
    def rounds(self) -> list[int]:
        return sorted({m.round for m in self.moves})


def checksum_tag_base(transfers: np.ndarray[Any, Any]) -> int:
    return 0 if transfers.shape[0] == 0 else TENSORS_PER_EXPERT * (int(transfers[:, 6].max()) + 1)


def moves_for_participant(
    transfers: np.ndarray[Any, Any],
    participants: Sequence[Participant],
    rank_map: Sequence[int],
    world: World,
    participant: int,
    *,
    slots_per_rank: int,
) -> RankMoves:
    """The sends, receives and reloads of ``participants[participant]``, validated.

    Raises :class:`PlanError` when the plan asks something this rank cannot do: a source
    that does not exist in the carrying world, a slot written twice, a slot out of range.
    """
    if transfers.ndim != 2 or (transfers.size and transfers.shape[1] != 7):
        raise PlanError(f"transfers must be [N, 7], got shape {list(transfers.shape)}")
    me = participants[participant]
    world_rank = me.old_rank if world == "active" else me.new_rank
    new_to_old = {p.new_rank: p.old_rank for p in participants if p.new_rank is not None}
    moves: list[ExpertMove] = []
    written: set[tuple[int, int]] = set()
    tags: set[int] = set()
    for row in transfers.tolist():
        layer, expert, src, dst, slot, rnd, tag = (int(v) for v in row)
        if dst not in new_to_old:
            raise PlanError(f"layer {layer} expert {expert}: destination {dst} is not a new rank")
        if tag in tags:
            raise PlanError(f"tag {tag} is used by two transfers")
        tags.add(tag)
        if src == -1:
            src_w: int | None = None
            dst_w: int | None = dst if world == "standby" else new_to_old.get(dst)
        elif world == "standby":
            if not 0 <= src < len(rank_map):
                raise PlanError(
                    f"source rank {src} is outside rank_map of {len(rank_map)} old ranks"
                )
            src_w = rank_map[src] if rank_map[src] >= 0 else None
            dst_w = dst
        else:
            src_w = src
            dst_w = new_to_old.get(dst)
        receives = me.new_rank is not None and dst == me.new_rank
        if receives:
            if not 0 <= slot < slots_per_rank:
                raise PlanError(
                    f"layer {layer} expert {expert}: slot {slot} is outside 0..{slots_per_rank - 1}"
                )
            if (layer, slot) in written:
                raise PlanError(f"layer {layer} slot {slot} of new rank {dst} is written twice")
            written.add((layer, slot))
        if src == -1:
            if receives:
                moves.append(ExpertMove(MoveKind.RELOAD, layer, expert, rnd, tag, -1, slot))
            continue
        if src_w is None:
            raise PlanError(
                f"layer {layer} expert {expert}: source rank {src} leaves and has no rank in the {world} world"
            )
        if dst_w is None:
            raise PlanError(
                f"layer {layer} expert {expert}: destination rank {dst} has no rank in the {world} world"
            )
        if src_w == dst_w:
            raise PlanError(f"layer {layer} expert {expert}: rank {src_w} sends to itself")
        if world_rank is not None and src_w == world_rank:
            moves.append(ExpertMove(MoveKind.SEND, layer, expert, rnd, tag, dst_w, slot))
        elif receives:
            moves.append(ExpertMove(MoveKind.RECV, layer, expert, rnd, tag, src_w, slot))
    return RankMoves(world, world_rank, tuple(moves), checksum_tag_base(transfers))


def new_slots_of(
    placement: np.ndarray[Any, Any], new_rank: int, slots_per_rank: int
) -> np.ndarray[Any, Any]:
    """The experts ``[L, S]`` rank ``new_rank`` holds in a placement ``phy2log[L, R*S]``."""
    lo = new_rank * slots_per_rank
    if placement.ndim != 2 or placement.shape[1] < lo + slots_per_rank:
        raise PlanError(f"placement of shape {list(placement.shape)} has no rank {new_rank}")
    return np.ascontiguousarray(placement[:, lo : lo + slots_per_rank]).astype(np.int64)
