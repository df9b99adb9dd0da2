"""Expert placement planner: pure numpy, no I/O, deterministic.

`plan_placement` plans from scratch; `plan_rescale` plans a migration-aware move to a new
rank count (or a rebalance at the same count); `schedule_transfers` groups the copies into
rounds with per-rank limits and unique tags.
"""

from eep_controller.planner.placement import Placement, balancedness, plan_placement
from eep_controller.planner.rescale import (
    RescalePlan,
    Transfer,
    apply_transfers,
    choose_removed_ranks,
    copy_lower_bound,
    plan_rescale,
)
from eep_controller.planner.schedule import (
    TransferSchedule,
    schedule_transfers,
    tensor_tag,
    transfer_tag,
)

__all__ = [
    "Placement",
    "RescalePlan",
    "Transfer",
    "TransferSchedule",
    "apply_transfers",
    "balancedness",
    "choose_removed_ranks",
    "copy_lower_bound",
    "plan_placement",
    "plan_rescale",
    "schedule_transfers",
    "tensor_tag",
    "transfer_tag",
]
