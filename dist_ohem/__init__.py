"""dist_ohem: online hard example mining with the hard examples chosen across all ranks."""

from dist_ohem.comm import DistributedInputError
from dist_ohem.loss import OHEMLoss, masked_loss, per_instance_criterion
from dist_ohem.result import SelectionResult
from dist_ohem.selection import (
    SelectionRule,
    exact_ceil,
    exact_floor,
    hardness_key,
    hardness_order,
    key_to_loss,
    kth_largest_key,
    random_keys,
    select_mask,
    top_m_mask,
)
from dist_ohem.selector import HardExampleSelector
from dist_ohem.step import StepOutput, ohem_step

__all__ = [
    "DistributedInputError",
    "HardExampleSelector",
    "OHEMLoss",
    "SelectionResult",
    "SelectionRule",
    "StepOutput",
    "exact_ceil",
    "exact_floor",
    "hardness_key",
    "hardness_order",
    "key_to_loss",
    "kth_largest_key",
    "masked_loss",
    "ohem_step",
    "per_instance_criterion",
    "random_keys",
    "select_mask",
    "top_m_mask",
]
__version__ = "0.1.0"
