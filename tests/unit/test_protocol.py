"""The wire contract: deployment specs, EP size, arrays on the wire."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from eep_controller.protocol import DeploymentSpec, EncodedArray, ScaleRequest, ep_size


def spec(**kw: object) -> DeploymentSpec:
    base: dict[str, object] = {
        "name": "ds",
        "model": {"num_moe_layers": 4, "num_experts": 16, "expert_bytes": 1000},
        "slots_per_rank": 4,
        "min_dp": 4,
        "max_dp": 8,
    }
    base.update(kw)
    return DeploymentSpec.model_validate(base)


def test_ep_size_counts_tp_and_pcp() -> None:
    assert ep_size(3, 2, 2) == 12
    s = spec(tp=2, pcp=2, min_dp=1, max_dp=4)
    assert s.ep_size(3) == 12
    assert s.slots(3) == 48


def test_spec_that_cannot_hold_all_experts_at_max_dp_is_rejected_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="cannot hold all 16 experts even at max_dp=2"):
        spec(slots_per_rank=2, min_dp=1, max_dp=2)


def test_pcp_counts_toward_holding_experts() -> None:
    # 2 dp x 1 tp x 2 pcp = 4 EP ranks x 4 slots = 16 slots: enough only because of pcp
    assert spec(pcp=2, min_dp=2, max_dp=2).slots(2) == 16
    with pytest.raises(ValidationError):
        spec(pcp=1, min_dp=2, max_dp=2)


def test_min_dp_too_small_names_the_smallest_valid_dp() -> None:
    with pytest.raises(ValidationError, match="raise min_dp to at least 4"):
        spec(min_dp=1, max_dp=8)


def test_min_above_max_and_initial_outside_range_are_rejected() -> None:
    with pytest.raises(ValidationError, match="greater than max_dp"):
        spec(min_dp=8, max_dp=4)
    with pytest.raises(ValidationError, match="initial_dp"):
        spec(initial_dp=9)


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        spec(color="blue")


def test_vllm_actuator_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="vllm_url"):
        spec(actuator="vllm")


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "float32", "float64"])
def test_encoded_array_round_trips(dtype: str) -> None:
    arr = (np.arange(58 * 288).reshape(58, 288) % 256).astype(dtype)
    enc = EncodedArray.encode(arr)
    back = EncodedArray.model_validate_json(enc.model_dump_json()).decode()
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_deepseek_scale_placement_stays_far_below_etcd_value_limit() -> None:
    rng = np.random.default_rng(0)
    phy2log = rng.integers(0, 256, size=(58, 320 * 9)).astype(np.int64)
    assert len(EncodedArray.encode(phy2log).model_dump_json()) < 1_000_000


def test_encoded_array_with_wrong_payload_size_is_rejected() -> None:
    enc = EncodedArray.encode(np.zeros(4, dtype=np.int64))
    bad = enc.model_copy(update={"shape": [5]})
    with pytest.raises(ValueError, match="shape"):
        bad.decode()


def test_encoded_array_rejects_a_corrupt_or_oversized_payload() -> None:
    """A peer's bad payload is a ValueError (a 4xx at the edges), never another exception,
    and a small payload is not inflated past the size its shape needs."""
    import base64
    import zlib

    good = EncodedArray.encode(np.arange(6, dtype=np.int64))
    for data in ("not base64!", base64.b64encode(b"not zlib").decode(), good.data[:-6]):
        with pytest.raises(ValueError):
            good.model_copy(update={"data": data}).decode()
    bomb = base64.b64encode(zlib.compress(b"\0" * 50_000_000)).decode()  # 50 MB of zeros
    with pytest.raises(ValueError, match="more than 48 bytes"):
        good.model_copy(update={"data": bomb}).decode()


def test_scale_request_bounds() -> None:
    with pytest.raises(ValidationError):
        ScaleRequest(dp_size=0)
    with pytest.raises(ValidationError):
        ScaleRequest.model_validate({"dp_size": 2, "drain_timeout_s": -1})


@pytest.mark.parametrize(
    "body",
    [
        '{"dp_size": true}',
        '{"dp_size": "5"}',
        '{"dp_size": 5.0}',
        '{"dp_size": 5, "dry_run": "yes"}',
        '{"dp_size": 5, "dry_run": 1}',
        '{"dp_size": 5, "remove_ranks": [true]}',
        '{"dp_size": 5, "drain_timeout_s": true}',
        '{"dp_size": 5, "drain_timeout_s": "10"}',
    ],
)
def test_scale_request_does_not_coerce_types(body: str) -> None:
    """A flag or a string is not read as a number, nor a number or a word as a flag: with
    min_dp 1, ``{"dp_size": true}`` would otherwise scale to one rank."""
    with pytest.raises(ValidationError):
        ScaleRequest.model_validate_json(body)
    with pytest.raises(ValidationError):
        ScaleRequest.model_validate(json.loads(body))


def test_scale_request_takes_plain_json_numbers_and_flags() -> None:
    req = ScaleRequest.model_validate_json(
        '{"dp_size": 5, "remove_ranks": [0, 3], "drain_timeout_s": 10, "dry_run": true}'
    )
    assert (req.dp_size, req.remove_ranks, req.drain_timeout_s, req.dry_run) == (
        5,
        [0, 3],
        10.0,
        True,
    )
    assert ScaleRequest.model_validate_json(req.model_dump_json()) == req


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_dp", True), ("max_dp", "8"), ("slots_per_rank", 4.0), ("tp", False)],
)
def test_deployment_spec_does_not_coerce_numbers(field: str, value: object) -> None:
    spec: dict[str, Any] = {
        "name": "ds",
        "model": {"num_moe_layers": 2, "num_experts": 16, "expert_bytes": 1024},
        "slots_per_rank": 4,
        "min_dp": 4,
        "max_dp": 8,
    }
    assert DeploymentSpec.model_validate(spec).max_dp == 8
    with pytest.raises(ValidationError):
        DeploymentSpec.model_validate({**spec, field: value})
    with pytest.raises(ValidationError):
        DeploymentSpec.model_validate({**spec, "model": {**spec["model"], "num_experts": "16"}})


def test_load_window_is_usable_only_when_it_can_be_planned_on() -> None:
    from eep_controller.protocol import LoadWindow

    def window(arr: np.ndarray) -> LoadWindow:
        return LoadWindow(
            deployment="ds", generation=1, load=EncodedArray.encode(arr), window_s=1, updated_at=0
        )

    good = np.arange(8, dtype=np.float64).reshape(2, 4)
    usable = window(good).usable(2, 4)
    assert usable is not None and np.array_equal(usable, good)
    assert window(good).usable(2) is not None  # any width
    assert window(good).usable(3, 4) is None and window(good).usable(2, 5) is None
    for bad in (good * np.nan, -good, np.zeros((2, 4)), np.full((2, 4), np.inf)):
        assert window(bad).usable(2, 4) is None
    assert window(np.arange(4, dtype=np.float64)).usable(2, 4) is None  # not [L, E]
    corrupt = window(good)
    for data in ("not base64!", "aGVsbG8=", corrupt.load.data[:-8]):
        broken = corrupt.model_copy(update={"load": corrupt.load.model_copy(update={"data": data})})
        assert broken.usable(2, 4) is None
    short = corrupt.model_copy(update={"load": corrupt.load.model_copy(update={"shape": [2, 5]})})
    assert short.usable(2, 5) is None
