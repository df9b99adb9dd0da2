"""How eepctl shows a span of time, a size, a change of balance."""

from __future__ import annotations

import pytest

from eep_controller.cli.output import balance_change, byte_size, duration


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0.0 ms"),
        (0.004030464, "4.0 ms"),
        (0.9994, "999.4 ms"),
        (0.99996, "1.00 s"),
        (1.0, "1.00 s"),
        (2.345, "2.35 s"),
        (59.99, "59.99 s"),
        (59.999, "1 min 0 s"),
        (60.0, "1 min 0 s"),
        (185.4, "3 min 5 s"),
        (3600.0, "1 h 0 min"),
        (7385.0, "2 h 3 min"),
    ],
)
def test_duration_picks_the_unit(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


def test_balance_change_has_no_before_for_a_bring_up() -> None:
    assert balance_change(
        {"from_dp": 2, "balancedness_before": 0.9626, "balancedness_after": 1.0}
    ) == ("0.963 -> 1.000")
    assert balance_change(
        {"from_dp": 0, "balancedness_before": 0.0, "balancedness_after": 1.0}, 4
    ) == ("- -> 1.0000")
    # a recover after every rank was lost: nothing served before it either
    assert balance_change(
        {"from_dp": 2, "balancedness_before": 0.0, "balancedness_after": 1.0}
    ) == ("- -> 1.000")


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (3_700_000, "3.7 MB"), (44_040_192 * 9, "396.4 MB"),
     (1.05e12, "1.1 TB"), (2e15, "2.0 PB")],
)  # fmt: skip
def test_byte_size_uses_decimal_units(n: float, shown: str) -> None:
    assert byte_size(n) == shown
