"""The worker runtime's pieces on real torch: expert slots, stateless gloo groups, verified transfers.

Two ranks run as two threads of this process, each with its own gloo group: real sockets,
real messages, no processes to spawn.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eep_agent.runtime.checkpoint import ExpertCheckpoint  # noqa: E402
from eep_agent.runtime.checksum import tensor_checksum  # noqa: E402
from eep_agent.runtime.expert_store import ExpertShape, ExpertStore, ExpertWeights, StaleExperts  # noqa: E402
from eep_agent.runtime.groups import (  # noqa: E402
    GroupAddress,
    JoinCancelled,
    RendezvousServer,
    StatelessGroup,
    UnsupportedBackend,
    backend_for,
)
from eep_agent.runtime.moves import ExpertMove, MoveKind, RankMoves  # noqa: E402
from eep_agent.runtime.transfer import CorruptionSpec, execute_moves  # noqa: E402

from eep_controller.probe import CheckpointReader, expert_mlp, write_synthetic  # noqa: E402

pytestmark = pytest.mark.torch
T = TypeVar("T")
SHAPE = ExpertShape(layers=2, experts=4, slots=2, hidden=8, inter=16)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    write_synthetic(out, layers=2, experts=4, hidden=8, inter=16, seed=5)
    return out


def _store(checkpoint: Path, experts: list[list[int]]) -> ExpertStore:
    store = ExpertStore(SHAPE, CPU)
    ck = ExpertCheckpoint(checkpoint, SHAPE, CPU)
    for layer, row in enumerate(experts):
        for slot, expert in enumerate(row):
            store.active.put(layer, slot, expert, ck.expert(layer, expert))
    return store


def on_two_ranks(fn: Callable[[int], T]) -> list[T]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, range(2)))


def two_rank_groups(prefix: str, timeout_s: float = 10.0) -> list[StatelessGroup]:
    server = RendezvousServer("127.0.0.1", 2, timeout_s)
    address = GroupAddress("127.0.0.1", server.port, "gloo", 2, prefix)
    return on_two_ranks(
        lambda r: StatelessGroup.join(
            address, r, device=CPU, timeout_s=timeout_s, server=server if r == 0 else None
        )
    )


# ---------------------------------------------------------------------------- expert slots


def test_forward_applies_each_rows_expert_like_the_numpy_reference(checkpoint: Path) -> None:
    store = _store(checkpoint, [[0, 2], [1, 3]])
    reader = CheckpointReader(checkpoint)
    tokens = np.random.default_rng(1).standard_normal((5, 8), dtype=np.float32)
    experts = np.array([3, 1, 3, 3, 1])
    out = store.forward(1, experts, torch.from_numpy(tokens)).numpy()
    for i, e in enumerate(experts):
        np.testing.assert_allclose(
            out[i], expert_mlp(tokens[i : i + 1], *reader.expert(1, int(e)))[0], atol=1e-6
        )
    assert store.take_load()[1].tolist() == [0, 2, 0, 3]
    assert store.take_load().sum() == 0


def test_forward_for_an_expert_not_held_is_stale(checkpoint: Path) -> None:
    store = _store(checkpoint, [[0, 2], [1, 3]])
    with pytest.raises(StaleExperts, match="expert 1"):
        store.forward(0, np.array([1]), torch.zeros(1, 8))


def test_staging_keeps_held_experts_without_copying_and_swap_clears_generation_caches(
    checkpoint: Path,
) -> None:
    store = _store(checkpoint, [[0, 2], [1, 3]])
    store.forward(0, np.array([0, 2]), torch.zeros(2, 8))
    assert store.caches.sizes()["fused_w13"] == 2
    # next generation: slot 0 of layer 0 gets expert 2 (held, in slot 1), slot 1 gets expert 3 (received)
    staged = store.stage("op", np.array([[2, 3], [1, 3]]), filled_elsewhere={(0, 1)})
    assert staged.weights(0, 0) is store.active.weights(0, 1)  # no copy
    assert staged.missing() == [(0, 1, 3)]
    with pytest.raises(RuntimeError, match="hold no weights"):
        store.swap("op")
    ck = ExpertCheckpoint(checkpoint, SHAPE, CPU)
    staged.put(0, 1, 3, ck.expert(0, 3))
    store.swap("op")
    assert (
        store.caches.sizes()["fused_w13"] == 0
    )  # slot 0 now holds another expert: its fused cache is gone
    reader = CheckpointReader(checkpoint)
    x = np.ones((1, 8), dtype=np.float32)
    np.testing.assert_allclose(
        store.forward(0, np.array([3]), torch.from_numpy(x)).numpy()[0],
        expert_mlp(x, *reader.expert(0, 3))[0],
        atol=1e-6,
    )
    with pytest.raises(StaleExperts):
        store.forward(0, np.array([0]), torch.from_numpy(x))


def test_checkpoint_shape_must_match_the_deployment(checkpoint: Path) -> None:
    from eep_controller.probe import CheckpointError

    with pytest.raises(CheckpointError, match="needs"):
        ExpertCheckpoint(
            checkpoint, ExpertShape(layers=2, experts=4, slots=2, hidden=8, inter=32), CPU
        )


# ---------------------------------------------------------------------------- groups


def test_backends_follow_the_device_and_unknown_kinds_are_refused() -> None:
    assert [backend_for(k) for k in ("cpu", "gpu", "npu")] == ["gloo", "nccl", "hccl"]
    with pytest.raises(UnsupportedBackend, match="tpu"):
        backend_for("tpu")


def test_two_groups_over_the_same_ranks_work_side_by_side_and_destroy_frees_their_sockets() -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    active, standby = two_rank_groups("active"), two_rank_groups("standby")
    for groups in (active, standby):
        on_two_ranks(lambda r, g=groups: g[r].warm_up(CPU, 10.0))  # type: ignore[misc]
    assert len(os.listdir("/proc/self/fd")) > fds_before
    for g in active + standby:
        g.destroy()
        assert not g.alive
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def _cancelled_after(seconds: float) -> Callable[[], bool]:
    at = time.monotonic() + seconds
    return lambda: time.monotonic() >= at


def test_a_rank_waiting_for_peers_that_never_come_gives_up_as_soon_as_it_is_cancelled() -> None:
    """An operation aborted in PREPARING left its live workers in the standby rendezvous until
    the phase deadline (60 s in a soak run), with the next operation queued behind them."""
    server = RendezvousServer("127.0.0.1", 2, 30.0)
    address = GroupAddress("127.0.0.1", server.port, "gloo", 2, "abandoned")
    started = time.monotonic()
    with pytest.raises(JoinCancelled, match="waiting for the other ranks"):
        StatelessGroup.join(
            address, 0, device=CPU, timeout_s=30.0, server=server, cancelled=_cancelled_after(0.3)
        )
    assert time.monotonic() - started < 5.0
    server.close()


def test_a_rank_whose_rendezvous_host_is_not_listening_gives_up_when_cancelled() -> None:
    free = RendezvousServer("127.0.0.1", 2, 1.0)
    port = free.port
    free.close()  # nobody listens there any more
    address = GroupAddress("127.0.0.1", port, "gloo", 2, "hostless")
    started = time.monotonic()
    with pytest.raises(JoinCancelled, match="connecting"):
        StatelessGroup.join(address, 1, device=CPU, timeout_s=30.0, cancelled=_cancelled_after(0.3))
    assert time.monotonic() - started < 5.0


def test_a_rendezvous_that_times_out_names_the_ranks_that_never_joined() -> None:
    server = RendezvousServer("127.0.0.1", 3, 10.0)
    address = GroupAddress("127.0.0.1", server.port, "gloo", 3, "short")

    def join(rank: int) -> str:
        try:
            StatelessGroup.join(
                address, rank, device=CPU, timeout_s=1.0, server=server if rank == 0 else None
            )
        except TimeoutError as exc:
            return str(exc)
        return "joined"

    assert on_two_ranks(join) == ["group short: ranks [2] did not join in time"] * 2
    server.close()


# ---------------------------------------------------------------------------- transfers


def _swap_moves(base: int) -> list[RankMoves]:
    """Rank 0 sends (layer 0, expert 0) and rank 1 sends (layer 0, expert 1) to each other, slot 1."""
    send0 = ExpertMove(MoveKind.SEND, 0, 0, 0, 0, 1, 1)
    recv1 = ExpertMove(MoveKind.RECV, 0, 0, 0, 0, 0, 1)
    send1 = ExpertMove(MoveKind.SEND, 0, 1, 0, 1, 0, 1)
    recv0 = ExpertMove(MoveKind.RECV, 0, 1, 0, 1, 1, 1)
    return [
        RankMoves(
            "standby", 0, (recv0, send0), base
        ),  # posted recv-first on one side, send-first on the other
        RankMoves("standby", 1, (send1, recv1), base),
    ]


def _run_swap(
    checkpoint: Path, corruption: CorruptionSpec | None = None, deadline_s: float = 10.0
) -> tuple[list[Any], list[ExpertStore]]:
    stores = [_store(checkpoint, [[0, 2], [1, 3]]), _store(checkpoint, [[1, 3], [0, 2]])]
    staged = [
        s.stage(
            "op", np.array([[0, 1], [1, 3]]) if r == 0 else np.array([[1, 0], [0, 2]]), {(0, 1)}
        )
        for r, s in enumerate(stores)
    ]
    groups = two_rank_groups("xfer")
    moves = _swap_moves(base=6)
    try:
        reports = on_two_ranks(
            lambda r: execute_moves(
                moves[r],
                group=groups[r],
                active=stores[r].active,
                staged=staged[r],
                checkpoint=None,
                device=CPU,
                deadline=time.monotonic() + deadline_s,
                corruption=corruption if r == 0 else None,
            )
        )
    finally:
        for g in groups:
            g.destroy()
    return reports, stores


def test_a_swap_moves_both_experts_into_fresh_buffers_with_verified_checksums(
    checkpoint: Path,
) -> None:
    reports, stores = _run_swap(checkpoint)
    reader = CheckpointReader(checkpoint)
    for r, report in enumerate(reports):
        assert report.error is None, report
        assert report.tensors_verified == 3 and report.checksum_failures == 0
        expert = 1 if r == 0 else 0
        staged = stores[r].staged
        assert staged is not None
        got = staged.weights(0, 1)
        assert got is not None
        for i, t in enumerate(got.tensors()):
            np.testing.assert_array_equal(t.numpy(), reader.expert(0, expert)[i])
        # the received tensors are new buffers, not the sender's (same process) or any slot's
        sent = stores[1 - r].active.weights(0, 0)
        assert sent is not None
        assert all(t.data_ptr() != u.data_ptr() for t in got.tensors() for u in sent.tensors())


def test_a_tensor_corrupted_after_its_checksum_is_caught_and_not_staged(checkpoint: Path) -> None:
    reports, stores = _run_swap(checkpoint, corruption=CorruptionSpec(layer=0, expert=0, tensor=2))
    assert reports[0].error is None
    bad = reports[1]
    assert bad.checksum_failures == 1 and bad.tensors_verified == 2
    assert bad.error is not None and "layer 0 expert 0 tensor 2 from rank 0" in bad.error
    assert not bad.group_broken  # every message arrived: the group itself is fine
    assert stores[1].staged.weights(0, 1) is None  # type: ignore[union-attr]


def test_a_receive_whose_sender_never_sends_fails_at_the_deadline_with_the_reason(
    checkpoint: Path,
) -> None:
    stores = [_store(checkpoint, [[0, 2], [1, 3]]), _store(checkpoint, [[1, 3], [0, 2]])]
    staged = stores[1].stage("op", np.array([[1, 0], [0, 2]]), {(0, 1)})
    groups = two_rank_groups("late")
    recv = RankMoves("standby", 1, (ExpertMove(MoveKind.RECV, 0, 0, 0, 0, 0, 1),), 3)
    started = time.monotonic()
    try:
        report = execute_moves(
            recv, group=groups[1], active=stores[1].active, staged=staged, checkpoint=None,
            device=CPU, deadline=time.monotonic() + 1.0,
        )  # fmt: skip
    finally:
        for g in groups:
            threading.Thread(target=g.destroy).start()
    assert time.monotonic() - started < 5.0
    assert report.group_broken
    assert (
        report.error is not None and "recv of layer 0 expert 0 tensor 0 from rank 0" in report.error
    )


def test_checksums_cover_every_byte() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    before = tensor_checksum(t)
    t[2, 3] = torch.nextafter(t[2, 3], torch.tensor(100.0))
    assert tensor_checksum(t) != before


def test_checksums_see_blocks_swapped_and_sizes_that_are_not_whole_words() -> None:
    big = torch.randn(4 * 4096)  # four 16 KiB blocks
    swapped = torch.cat([big[4096:8192], big[:4096], big[8192:]])
    assert tensor_checksum(big) != tensor_checksum(swapped)
    odd = torch.arange(7, dtype=torch.float32)
    assert tensor_checksum(odd) != tensor_checksum(torch.arange(6, dtype=torch.float32))
    changed = odd.clone()
    changed[6] = 0.5
    assert tensor_checksum(odd) != tensor_checksum(changed)
    assert ExpertWeights.empty(SHAPE, CPU).w2.shape == (8, 16)
