"""What ohem_step needs to know about the engine wrapping the model, and the contexts of
its passes: unwrapping, gradient synchronisation, norm statistics in the scoring pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from dist_ohem.batches import Batch, batch_leaves

__all__ = [
    "forward_communicates",
    "frozen_norm_statistics",
    "gradient_sync",
    "is_ddp",
    "is_deepspeed_engine",
    "scoring_context",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / a DeepSpeed engine (both keep it as ``.module``), else ``model``.

    Forwarding the inner module skips the wrapper's gradient-sync bookkeeping and
    DDP's buffer broadcast, which the no-grad scoring pass must not trigger.
    """
    return model.module if is_ddp(model) or is_deepspeed_engine(model) else model


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


def is_deepspeed_engine(model: nn.Module) -> bool:
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def forward_communicates(model: nn.Module) -> bool:
    """True for engines whose forward gathers parameters: DeepSpeed ZeRO-3 and FSDP."""
    if is_deepspeed_engine(model):
        return model.zero_optimization_stage() == 3
    return any(
        cls.__name__ in ("FullyShardedDataParallel", "FSDPModule")
        for submodule in model.modules()
        for cls in type(submodule).__mro__
    )


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Let the backward inside synchronise gradients (``sync``), or defer it to a later one.

    DDP: ``no_sync()``. DeepSpeed: the engine's accumulation boundary is forced off and
    restored after (stages that communicate in every backward still do; every rank runs
    the same chunks, and averaging is linear, so the result is the same). Other models
    synchronise in every backward, if at all, with the same result.
    """
    if sync:
        yield
    elif is_ddp(model):
        with model.no_sync():
            yield
    elif is_deepspeed_engine(model):
        # The override is an attribute of the engine (None = follow the micro-step count);
        # restoring it keeps the user's own accumulation schedule intact.
        saved = model._is_gradient_accumulation_boundary
        model.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            model._is_gradient_accumulation_boundary = saved
    else:
        yield


@contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm / InstanceNorm layers in train mode normalize with the batch's
    statistics and leave their running statistics (and ``num_batches_tracked``) alone.

    Their ``track_running_stats`` is switched off and back: in train mode that is
    exactly "use the batch, update nothing" (``_BatchNorm.forward``), with no tensor
    copied, which a save-and-restore of every buffer would cost on a GPU.
    """
    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


@contextmanager
def scoring_context(module: nn.Module, score_mode: str, inputs: Batch) -> Iterator[None]:
    """What BatchNorm and dropout do in the scoring pass (``score_mode``, see ohem_step)."""
    if score_mode == "eval":
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            yield
        finally:
            for m, was_training in modes:
                m.training = was_training
        return
    devices = sorted({t.device.index for t in batch_leaves(inputs) if t.is_cuda})
    with frozen_norm_statistics(module), torch.random.fork_rng(devices=devices):
        yield
