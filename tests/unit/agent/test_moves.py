"""How a plan's transfer rows become one rank's sends, receives and reloads."""

from __future__ import annotations

import numpy as np
import pytest
from eep_agent.runtime.moves import (
    MoveKind,
    PlanError,
    checksum_tag_base,
    moves_for_participant,
    new_slots_of,
)

from eep_controller.protocol import Participant


def _p(old: int | None, new: int | None, device: int) -> Participant:
    return Participant(node_id="n", device_index=device, old_rank=old, new_rank=new)


# old world: ranks 0, 1, 2; new world: old 0 -> 1, old 2 -> 0, old 1 leaves, a joiner becomes 2
PARTICIPANTS = [_p(0, 1, 0), _p(1, None, 1), _p(2, 0, 2), _p(None, 2, 3)]
RANK_MAP = [1, -1, 0]


def rows(*r: tuple[int, ...]) -> np.ndarray:
    return np.asarray(r, dtype=np.int64).reshape(-1, 7)


def test_standby_world_addresses_the_source_by_its_new_rank() -> None:
    t = rows((0, 5, 0, 2, 1, 0, 0))  # old rank 0 (new 1) sends expert 5 to new rank 2, slot 1
    sender = moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 0, slots_per_rank=2)
    receiver = moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 3, slots_per_rank=2)
    (send,) = sender.moves
    (recv,) = receiver.moves
    assert (send.kind, send.peer, sender.world_rank) == (MoveKind.SEND, 2, 1)
    assert (recv.kind, recv.peer, recv.dst_slot, receiver.world_rank) == (MoveKind.RECV, 1, 1, 2)


def test_active_world_addresses_the_destination_by_its_old_rank() -> None:
    t = rows((1, 4, 1, 1, 0, 0, 0))  # leaving old rank 1 sends to new rank 1 (= old rank 0)
    sender = moves_for_participant(t, PARTICIPANTS, RANK_MAP, "active", 1, slots_per_rank=2)
    receiver = moves_for_participant(t, PARTICIPANTS, RANK_MAP, "active", 0, slots_per_rank=2)
    assert [(m.kind, m.peer) for m in sender.moves] == [(MoveKind.SEND, 0)]
    assert [(m.kind, m.peer) for m in receiver.moves] == [(MoveKind.RECV, 1)]


def test_a_leaving_source_cannot_send_in_the_standby_world() -> None:
    t = rows((0, 4, 1, 0, 0, 0, 0))
    with pytest.raises(PlanError, match="leaves"):
        moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 2, slots_per_rank=2)


def test_a_checkpoint_source_is_a_reload_for_the_destination_only() -> None:
    t = rows((1, 3, -1, 2, 0, 0, 0))
    assert [
        m.kind
        for m in moves_for_participant(
            t, PARTICIPANTS, RANK_MAP, "standby", 3, slots_per_rank=2
        ).moves
    ] == [MoveKind.RELOAD]
    assert (
        moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 0, slots_per_rank=2).moves == ()
    )


def test_a_slot_written_twice_is_rejected() -> None:
    t = rows((0, 1, 0, 2, 1, 0, 0), (0, 2, 2, 2, 1, 1, 1))
    with pytest.raises(PlanError, match="written twice"):
        moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 3, slots_per_rank=2)


@pytest.mark.parametrize(
    ("row", "participant", "message"),
    [
        ((0, 1, 0, 2, 1, 0, 0), 3, None),
        ((0, 1, 0, 2, 5, 0, 0), 3, "outside"),
        ((0, 1, 0, 7, 0, 0, 0), 0, "not a new rank"),
        ((0, 1, 0, 1, 0, 0, 0), 0, "sends to itself"),
    ],
)
def test_rows_are_validated(row: tuple[int, ...], participant: int, message: str | None) -> None:
    t = rows(row)
    if message is None:
        moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", participant, slots_per_rank=2)
    else:
        with pytest.raises(PlanError, match=message):
            moves_for_participant(
                t, PARTICIPANTS, RANK_MAP, "standby", participant, slots_per_rank=2
            )


def test_a_duplicate_tag_is_rejected() -> None:
    t = rows((0, 1, 0, 2, 0, 0, 4), (0, 2, 0, 2, 1, 1, 4))
    with pytest.raises(PlanError, match="tag 4"):
        moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 3, slots_per_rank=2)


def test_every_message_of_a_plan_gets_its_own_wire_tag() -> None:
    n = 50
    t = np.stack(
        [
            np.zeros(n),
            np.arange(n),
            np.zeros(n),
            np.full(n, 2),
            np.zeros(n),
            np.arange(n),
            np.arange(n),
        ],
        axis=1,
    )
    t = t.astype(np.int64)
    t[:, 4] = 0
    t[:, 0] = np.arange(n)  # a distinct layer per row keeps the slots distinct
    moves = moves_for_participant(t, PARTICIPANTS, RANK_MAP, "standby", 3, slots_per_rank=1)
    base = checksum_tag_base(t)
    wire = [m.tensor_tag(i) for m in moves.moves for i in range(3)] + [
        base + m.tag for m in moves.moves
    ]
    assert len(wire) == len(set(wire)) == 4 * n


def test_new_slots_are_the_ranks_columns_of_the_placement() -> None:
    placement = np.arange(12).reshape(2, 6)
    assert new_slots_of(placement, 1, 3).tolist() == [[3, 4, 5], [9, 10, 11]]
    with pytest.raises(PlanError):
        new_slots_of(placement, 2, 3)
