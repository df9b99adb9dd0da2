"""The checkpoint format, the router and the single-process reference (numpy, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eep_controller.probe import (
    CheckpointError,
    CheckpointReader,
    expert_mlp,
    moe_layer,
    route,
    write_synthetic,
)
from eep_controller.probe.checkpoint import layer_file
from eep_controller.probe.client import _Pending, _route_to_ranks
from eep_controller.protocol import EncodedArray, Layout, Rank


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_synthetic(tmp_path / name, layers=2, experts=4, hidden=8, inter=16, seed=11)
    for layer in range(2):
        assert (
            layer_file(tmp_path / "a", layer).read_bytes()
            == layer_file(tmp_path / "b", layer).read_bytes()
        )
    write_synthetic(tmp_path / "c", layers=2, experts=4, hidden=8, inter=16, seed=12)
    assert layer_file(tmp_path / "a", 0).read_bytes() != layer_file(tmp_path / "c", 0).read_bytes()


def test_a_tensor_that_does_not_match_its_crc_is_refused(tmp_path: Path) -> None:
    write_synthetic(tmp_path, layers=1, experts=2, hidden=8, inter=16, seed=1)
    path = layer_file(tmp_path, 0)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # a bit of the last tensor in the file: the gate (names are stored sorted)
    path.write_bytes(bytes(raw))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="CRC"):
        reader.gate(0)
    reader.expert(0, 1)  # untouched tensors still read fine


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointReader(tmp_path)


def test_the_router_picks_the_top_k_logits_and_softmaxes_them() -> None:
    gate = np.eye(4, dtype=np.float32)
    tokens = np.array([[0.1, 3.0, 2.0, -1.0], [1.0, 1.0, 0.0, 0.0]], dtype=np.float32)
    experts, weights = route(tokens, gate, 2)
    assert experts.tolist() == [[1, 2], [0, 1]]  # a tie keeps the lower id first
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[0], np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum(), rtol=1e-6)


def test_the_reference_layer_is_the_weighted_sum_of_the_chosen_experts(tmp_path: Path) -> None:
    write_synthetic(tmp_path, layers=1, experts=4, hidden=8, inter=16, seed=2, top_k=2)
    reader = CheckpointReader(tmp_path)
    tokens = np.random.default_rng(0).standard_normal((5, 8), dtype=np.float32)
    experts, weights = route(tokens, reader.gate(0), 2)
    expected = np.zeros_like(tokens)
    for t in range(5):
        for k in range(2):
            expected[t] += (
                weights[t, k]
                * expert_mlp(tokens[t : t + 1], *reader.expert(0, int(experts[t, k])))[0]
            )
    np.testing.assert_allclose(moe_layer(reader, 0, tokens), expected, atol=1e-6)


def _layout(phy2log: np.ndarray, slots: int) -> Layout:
    n = phy2log.shape[1] // slots
    return Layout(
        deployment="d", generation=3, dp_size=n, ranks=[Rank(node_id="n", device_index=i) for i in range(n)],
        slots_per_rank=slots, placement=EncodedArray.encode(phy2log),
    )  # fmt: skip


def test_pairs_go_to_holders_spread_over_replicas_and_avoid_failed_ranks() -> None:
    # expert 0 on ranks 0 and 1, expert 1 only on rank 1
    layout = _layout(np.array([[0, 2, 0, 1]], dtype=np.int64), 2)
    pending = _Pending(
        np.arange(4, dtype=np.int64),
        np.zeros(4, dtype=np.int64),
        np.array([0, 0, 1, 3], dtype=np.int64),
    )
    batches, missing = _route_to_ranks(layout, 0, pending, set())
    assert sorted(batches[0].tolist() + batches[1].tolist()) == [0, 1, 2]
    assert batches[0].size == 1 and 2 in batches[1].tolist()
    assert missing.tolist() == [3]
    batches, _ = _route_to_ranks(layout, 0, pending, {("n", 1)})
    assert list(batches) == [0] and batches[0].tolist() == [0, 1]


def test_the_probe_and_checkpoint_reader_import_without_torch() -> None:
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import eep_controller.probe\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
