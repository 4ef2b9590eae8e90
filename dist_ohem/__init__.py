"""dist_ohem: online hard example mining with the hard examples chosen across all ranks.

The names users call. The pure single-process selection (the reference the distributed
selection is tested against: ``SelectionRule``, ``select_mask``, ``hardness_key``, ...)
stays importable from :mod:`dist_ohem.selection`.
"""

from dist_ohem.comm import DistributedInputError
from dist_ohem.loss import OHEMLoss, masked_loss, per_instance_criterion
from dist_ohem.result import SelectionResult
from dist_ohem.selector import HardExampleSelector
from dist_ohem.step import StepOutput, ohem_step

__all__ = [
    "DistributedInputError",
    "HardExampleSelector",
    "OHEMLoss",
    "SelectionResult",
    "StepOutput",
    "masked_loss",
    "ohem_step",
    "per_instance_criterion",
]
__version__ = "0.1.0"
