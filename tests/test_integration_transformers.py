"""``dist_ohem.integrations.transformers.ohem_loss_func`` under the real HF Trainer.

The parity runs are one ``torchrun`` launch of 2 CPU ranks
(``tests/framework_scripts/transformers_trainer.py``) training a tiny GPT-2 for one
epoch per configuration, one SGD step: ``average_tokens_across_devices`` on and off,
gradient accumulation 1 and 2 (one rank with no valid token in a micro-batch), M = 1 (one
rank selects nothing), excess-loss ranking against a reference model, and a bare
``OHEMLoss`` that shows the Trainer's rescaling; and
an epoch of 3 micro-batches with accumulation 2, whose last optimizer step has one
micro-batch, followed by an evaluation.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.framework_scripts.launch_checks import check_parity, launch_script, record, require

pytest.importorskip("transformers")

from transformers import TrainingArguments

from dist_ohem import DistributedInputError
from dist_ohem.integrations.transformers import TrainerOHEMLoss, ohem_loss_func
from tests.framework_scripts.parity_cases import hardest_mask

#: The configurations of transformers_trainer.py, with the micro-batches each runs.
CORRECTED = {
    "avg-tokens-ga1": 1,
    "avg-tokens-ga2": 2,
    "no-avg-tokens-ga1": 1,
    "no-avg-tokens-ga2": 2,
    "avg-tokens-ga2-top1": 2,
    "avg-tokens-ga2-last-partial": 3,
    "avg-tokens-ga2-excess": 2,
}
#: Bare OHEMLoss: the update is W x too large with average_tokens_across_devices, and
#: G x more with G accumulation steps (the Trainer does not divide a compute_loss_func).
NAIVE_UPDATE_RATIO = {"naive-avg-tokens-ga1": 2.0, "naive-avg-tokens-ga2": 4.0}


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory) -> dict:
    """One torchrun of 2 CPU ranks running every Trainer configuration."""
    require("transformers")
    return launch_script(tmp_path_factory, "torchrun", "transformers_trainer.py")


@pytest.mark.parametrize("name", sorted(CORRECTED))
def test_trainer_update_and_logged_loss_match_single_process(trainer_results, name):
    result = record(trainer_results, name)
    assert result["micro_batches"] == CORRECTED[name]
    check_parity(result, name)
    assert result["update_ratio"] == pytest.approx(1.0, abs=1e-5)
    # Each step's logged loss is the mean over its micro-batches of each one's global
    # OHEM mean; eval_loss the evaluation batch's global OHEM mean (no division).
    assert result["logged_loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    assert result["eval_loss"] == pytest.approx(result["reference_eval_loss"], rel=1e-6)


def test_trainer_epoch_ends_with_a_partial_accumulation_step(trainer_results):
    """3 micro-batches per rank with G = 2: two optimizer steps, the last of one
    micro-batch (its parity is checked above), then one evaluation batch."""
    result = record(trainer_results, "avg-tokens-ga2-last-partial")
    assert (result["accumulation"], result["micro_batches"]) == (2, 3)
    assert result["optimizer_steps"] == len(result["logged_loss"]) == 2
    assert len(result["eval_loss"]) == len(result["reference_eval_loss"]) == 1


def test_trainer_cases_cover_idle_ranks(trainer_results):
    """A rank with no valid token (ga2: rank 1's 2nd micro-batch) and M = 1 both occur."""
    assert trainer_results["avg-tokens-ga2"]["selected_per_rank"][1][1] == 0
    top1 = trainer_results["avg-tokens-ga2-top1"]["selected_per_rank"]
    assert all(sorted(counts) == [0, 1] for counts in top1)


@pytest.mark.parametrize("name", sorted(NAIVE_UPDATE_RATIO))
def test_bare_ohem_loss_is_rescaled_by_the_installed_trainer(trainer_results, name):
    """Holds the Trainer behaviour that ohem_loss_func corrects (transformers as
    installed): if this fails, the Trainer's rescaling changed and so must the fix."""
    result = record(trainer_results, name)
    assert result["selected_per_rank"] == result["reference_selected_per_rank"]
    assert result["update_ratio"] == pytest.approx(NAIVE_UPDATE_RATIO[name], rel=1e-5)


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_wrong_training_args_type_is_a_clear_error():
    with pytest.raises(TypeError, match="TrainingArguments"):
        ohem_loss_func({"gradient_accumulation_steps": 1}, keep=0.5)


@pytest.mark.parametrize(
    ("outputs", "labels", "message"),
    [
        ((torch.zeros(2, 5, 7),), torch.zeros(2, 5, dtype=torch.long), "no logits"),
        ({"loss": torch.zeros(())}, torch.zeros(2, 5, dtype=torch.long), "no logits"),
        ({"logits": torch.zeros(2, 5, 7)}, None, "labels must be a tensor"),
        ({"logits": torch.zeros(2, 5, 7)}, torch.zeros(2, 4, dtype=torch.long), "shift_labels"),
    ],
)
def test_bad_model_output_is_a_clear_error(tmp_path, outputs, labels, message):
    loss_func = ohem_loss_func(training_args(tmp_path), keep=0.5)
    with pytest.raises(DistributedInputError, match=message):
        loss_func(outputs, labels, num_items_in_batch=None)


@functools.cache
def cached_training_args(accumulation: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=tempfile.gettempdir(),
        use_cpu=True,
        report_to=[],
        gradient_accumulation_steps=accumulation,
    )


def trainer_stand_in(loss_func: TrainerOHEMLoss, micro_batches: int) -> SimpleNamespace:
    """What ``attach`` and the loss read of a Trainer: its ``compute_loss_func`` and the
    micro-batches of the optimizer step being accumulated (``Trainer._run_epoch`` sets
    ``current_gradient_accumulation_steps``; the real Trainer runs are above)."""
    return SimpleNamespace(
        compute_loss_func=loss_func, current_gradient_accumulation_steps=micro_batches
    )


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 9),
    keep=st.sampled_from([0.1, 0.25, 0.4, 1.0]),
    ignore_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    shift_labels=st.booleans(),
    # (G, micro-batches of the current step; None: no Trainer attached, G = 1).
    accumulation=st.sampled_from([(1, None), (3, 3), (3, 2), (3, 1)]),
    grad=st.booleans(),
    counted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_single_process_value_is_the_ohem_mean_over_accumulation(
    batch, length, vocab, keep, ignore_fraction, shift_labels, accumulation, grad, counted, seed
):
    """W = 1: the value is mean(top-M token losses) / n for the current step's n
    micro-batches (1 with autograd disabled: evaluation), 0 with no valid token; ignored
    tokens never count; whether the Trainer counted ``num_items_in_batch`` (it then
    multiplies by W = 1) changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < ignore_fraction] = -100
    steps, micro_batches = accumulation
    loss_func = ohem_loss_func(cached_training_args(steps), keep=keep, shift_labels=shift_labels)
    if micro_batches is not None:
        loss_func.attach(trainer_stand_in(loss_func, micro_batches))
    num_items = torch.tensor(int((labels != -100).sum())) if counted else None
    with torch.set_grad_enabled(grad):
        value = loss_func({"logits": logits}, labels, num_items_in_batch=num_items)

    predicted, targets = (logits[:, :-1], labels[:, 1:]) if shift_labels else (logits, labels)
    losses = nn.functional.cross_entropy(
        predicted.reshape(-1, vocab), targets.reshape(-1), reduction="none", ignore_index=-100
    )
    valid = targets.reshape(-1) != -100
    mask = hardest_mask(losses, valid, {"keep": keep})
    assert int(mask.sum()) == (math.ceil(keep * int(valid.sum()) - 1e-9))
    assert loss_func.last.num_valid_global == int(valid.sum())
    divisor = micro_batches if grad and micro_batches is not None else 1
    expected = losses[mask].mean() / divisor if mask.any() else torch.zeros(())
    torch.testing.assert_close(value, expected.detach())
    if grad:
        value.backward()  # connected to the graph even with nothing selected


def test_accumulation_without_attached_trainer_is_a_clear_error():
    """G > 1 needs the Trainer's count for the epoch's last, possibly shorter, step;
    evaluation (autograd off) divides by nothing and needs none."""
    loss_func = ohem_loss_func(cached_training_args(3), keep=0.5)
    logits, labels = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        loss_func({"logits": logits}, labels)
    with torch.no_grad():
        assert loss_func({"logits": logits}, labels).item() == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match="compute_loss_func"):
        loss_func.attach(trainer_stand_in(ohem_loss_func(cached_training_args(3), keep=0.5), 3))


def ranked_bad_output(rank_without_logits: int) -> str:
    """On W ranks: rank ``rank_without_logits`` passes a model output without logits."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as output_dir:
        loss_func = ohem_loss_func(
            TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[]), keep=0.5
        )
    labels = torch.zeros(2, 5, dtype=torch.long)
    logits = torch.zeros(2, 5, 7)
    outputs = (logits,) if dist.get_rank() == rank_without_logits else {"logits": logits}
    try:
        loss_func(outputs, labels)
    except DistributedInputError as exc:
        return str(exc)
    return "no error"


def test_output_without_logits_on_one_rank_fails_on_every_rank(ranks):
    messages = ranks.run(2, ranked_bad_output, 1, timeout=120)
    assert messages[0] == messages[1]
    assert messages[0].startswith("rank 1: the model output has no logits")


def ranked_trainer_scaling(average_tokens: bool) -> float:
    """On W ranks: this rank's value when the Trainer counted ``num_items_in_batch``
    over the value when it did not (it multiplies the former by W when averaging)."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            use_cpu=True,
            report_to=[],
            average_tokens_across_devices=average_tokens,
        )
    loss_func = ohem_loss_func(args, top_k=3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    counted = loss_func({"logits": logits}, labels, num_items_in_batch=torch.tensor(16))
    uncounted = loss_func({"logits": logits}, labels, num_items_in_batch=None)
    return float(uncounted / counted) if loss_func.last.num_selected_local else math.nan


@pytest.mark.parametrize(("average_tokens", "ratio"), [(True, 2.0), (False, 1.0)])
def test_returned_value_undoes_the_trainer_scale_on_every_rank(ranks, average_tokens, ratio):
    ratios = ranks.run(2, ranked_trainer_scaling, average_tokens, timeout=120)
    assert any(not math.isnan(r) for r in ratios)
    assert all(math.isnan(r) or r == pytest.approx(ratio) for r in ratios)


def test_import_dist_ohem_does_not_import_the_frameworks():
    frameworks = ("transformers", "lightning", "deepspeed", "accelerate")
    code = f"import sys, dist_ohem; print([m for m in {frameworks!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_excess_loss_selects_by_training_minus_reference_token_loss(tmp_path):
    """W = 1, one step of the real Trainer: the selected tokens are the top by the
    training loss minus the reference model's loss, computed by hand, which differ from
    the top by training loss on this data."""
    from torch.utils.data import TensorDataset
    from transformers import GPT2LMHeadModel, Trainer

    from tests.framework_scripts.hf_parity import tiny_gpt2

    def model(seed: int) -> GPT2LMHeadModel:
        return tiny_gpt2(11, seed, n_positions=8, n_embd=8)

    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(5))

    def collate(rows):
        batch = torch.stack([row[0] for row in rows])
        return {"input_ids": batch, "labels": batch}

    args = training_args(
        tmp_path,
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        disable_tqdm=True,
    )
    trained, reference = model(0), model(1)
    with torch.no_grad():
        own = nn.functional.cross_entropy(
            trained(input_ids=ids).logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
            reduction="none",
        )  # fmt: skip
        ref = nn.functional.cross_entropy(
            reference(input_ids=ids).logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
            reduction="none",
        )  # fmt: skip
    loss_func = ohem_loss_func(args, keep=0.25, reference_model=reference)
    trainer = Trainer(
        model=trained,
        args=args,
        train_dataset=TensorDataset(ids),
        data_collator=collate,
        compute_loss_func=loss_func,
    )
    loss_func.attach(trainer)
    trainer.train()
    everything = torch.ones_like(own, dtype=torch.bool)
    expected = hardest_mask(own - ref, everything, {"keep": 0.25})
    assert torch.equal(loss_func.last.mask, expected)
    assert not torch.equal(hardest_mask(own, everything, {"keep": 0.25}), expected)


def test_reference_model_without_attach_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    reference = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_embd=8, n_layer=1, n_head=2))
    loss_func = ohem_loss_func(training_args(tmp_path), keep=0.5, reference_model=reference)
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        loss_func({"logits": torch.zeros(2, 5, 7)}, torch.zeros(2, 5, dtype=torch.long))
