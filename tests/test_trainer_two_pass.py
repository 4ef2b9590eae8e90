"""``OHEMTrainer``: two-pass sequence selection inside the real ``transformers.Trainer``.

The parity runs are one ``torchrun`` launch of 2 CPU ranks
(``tests/framework_scripts/transformers_two_pass.py``) that trains a tiny GPT-2 under
DDP, FSDP2 (sharded at load time), DeepSpeed ZeRO-2 and ZeRO-3, with gradient
accumulation (an epoch whose last optimizer step is shorter), ragged micro-batches,
ignored labels and a sequence without any, a rank that selects nothing, uneven
batches, and excess-loss scores against a reference model; each against a single
process on the concatenated batches. The single-process tests below run the pieces
and the Trainer in-process (W = 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.framework_scripts.launch_checks import check_parity, launch_script, record, require

pytest.importorskip("transformers")

from torch.utils.data import Dataset
from transformers import GPT2LMHeadModel, TrainingArguments

from dist_ohem import DistributedInputError
from dist_ohem.integrations.lm import (
    ReferenceModel,
    concat_batches,
    sequence_losses,
    token_losses,
)
from dist_ohem.integrations.transformers import OHEMTrainer, SkippedMicroBatch
from tests.framework_scripts.hf_parity import tiny_gpt2
from tests.framework_scripts.parity_cases import hardest_mask

#: Every run of transformers_two_pass.py: engine/config -> micro-batches per rank.
RUNS = {
    "ddp/ga2-last-partial": 3,
    "ddp/ga2-top1": 2,
    "ddp/ga2-excess": 2,
    "ddp/ga1-uneven": 2,
    "fsdp/ga2-last-partial": 3,
    "zero2/ga2-last-partial": 3,
    "zero3/ga2-last-partial": 3,
    "zero3/ga2-top1": 2,
}
WRAPPERS = {
    "ddp": "DistributedDataParallel",
    "fsdp": "FSDPGPT2LMHeadModel",
    "zero2": "DeepSpeedEngine",
    "zero3": "DeepSpeedEngine",
}


@pytest.fixture(scope="module")
def two_pass_results(tmp_path_factory) -> dict:
    """One torchrun of 2 CPU ranks running every engine and configuration."""
    require("deepspeed")
    return launch_script(tmp_path_factory, "torchrun", "transformers_two_pass.py")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_pass_update_matches_single_process(two_pass_results, name):
    result = record(two_pass_results, name)
    assert result["micro_batches"] == RUNS[name]
    check_parity(result, name)
    # The logged loss of each step is the mean token loss over the selected sequences;
    # the evaluation is the Trainer's own, over every token.
    assert result["logged_loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    assert result["eval_loss"] == pytest.approx(result["reference_eval_loss"], rel=1e-6)
    assert len(result["eval_loss"]) == 1


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_pass_ran_on_the_engine(two_pass_results, name):
    """Each engine really wrapped (and, for ZeRO-3 and FSDP, sharded) the model."""
    result = record(two_pass_results, name)
    engine = name.split("/")[0]
    assert result["wrapper"] == WRAPPERS[engine]
    if engine == "zero3":
        assert result["local_numel"] == 0
    elif engine == "fsdp":
        assert 0 < result["local_numel"] < result["numel"]
    else:
        assert result["local_numel"] == result["numel"]


def test_two_pass_cases_cover_the_edges(two_pass_results):
    """A short last step, a rank with nothing selected, uneven batches."""
    partial = record(two_pass_results, "ddp/ga2-last-partial")
    assert (partial["micro_batches"], partial["optimizer_steps"]) == (3, 2)
    assert any(
        0 in counts for counts in record(two_pass_results, "ddp/ga2-top1")["selected_per_rank"]
    )
    uneven = record(two_pass_results, "ddp/ga1-uneven")
    assert uneven["rows_per_rank"][0] != uneven["rows_per_rank"][1]


def test_a_failing_score_fn_on_one_rank_fails_every_rank(two_pass_results):
    messages = [m for (m,) in record(two_pass_results, "ddp/failing-score-fn")["messages"]]
    assert messages[0] == messages[1]
    assert "rank 1" in messages[0] and "this score_fn fails on rank 1" in messages[0]


VOCAB = 11


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    return tiny_gpt2(VOCAB, seed, n_positions=12, n_embd=8)


class FixedRows(Dataset):
    def __init__(self, rows: int, length: int = 6, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (rows, length), generator=gen)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def trainer_args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "optim": "sgd",
        "learning_rate": 0.1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
    }
    return TrainingArguments(**(defaults | kwargs))


def test_one_process_trains_only_the_selected_sequences(tmp_path):
    """W = 1, G = 2: each step scores 8 sequences, selects ceil(0.25 * 8) = 2 and trains
    them in one micro-batch; the other slot is skipped."""
    seen: list[int] = []

    class Counting(OHEMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(len(inputs["input_ids"]))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Counting(
        model=tiny_model(),
        args=trainer_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=FixedRows(16),
        keep=0.25,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert seen == [2, 2]
    assert trainer.last_selection.num_valid_global == 8
    assert trainer.last_selection.num_selected_global == 2


def test_skipped_slots_come_first_and_train_nothing(tmp_path):
    trainer = OHEMTrainer(
        model=tiny_model(),
        args=trainer_args(tmp_path, gradient_accumulation_steps=3),
        train_dataset=FixedRows(12),
        top_k=1,
    )
    samples = [trainer.train_dataset[i] for i in range(12)]
    micro_batches = [
        {key: torch.stack([s[key] for s in samples[i : i + 4]]) for key in samples[0]}
        for i in range(0, 12, 4)
    ]
    iterator = iter(micro_batches)
    slots, num_items = trainer.get_batch_samples(iterator, 3, torch.device("cpu"))
    assert num_items is None
    assert [isinstance(slot, SkippedMicroBatch) for slot in slots] == [True, True, False]
    assert len(slots[2]["input_ids"]) == 1
    skipped = trainer.training_step(trainer.model, slots[0])
    assert skipped.item() == 0.0 and not skipped.requires_grad


def test_selector_keywords_and_bad_combinations_are_clear(tmp_path):
    args = trainer_args(tmp_path)
    trainer = OHEMTrainer(
        model=tiny_model(), args=args, train_dataset=FixedRows(4), keep=0.5, scope="local"
    )
    assert trainer.selector.scope == "local"
    with pytest.raises(ValueError, match="reference_model= or score_fn="):
        OHEMTrainer(
            model=tiny_model(),
            args=args,
            reference_model=tiny_model(1),
            score_fn=lambda losses, batch: losses,
            keep=0.5,
        )
    with pytest.raises(ValueError, match="computes its own loss"):
        OHEMTrainer(model=tiny_model(), args=args, compute_loss_func=lambda *a, **k: 0, keep=0.5)
    with pytest.raises(ValueError, match="label_smoothing_factor=0"):
        OHEMTrainer(
            model=tiny_model(),
            args=trainer_args(tmp_path, label_smoothing_factor=0.1),
            keep=0.5,
        )
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        OHEMTrainer(model=tiny_model(), args=args, reference_model="gpt2", keep=0.5)


def test_bad_score_fn_is_a_distributed_input_error(tmp_path):
    trainer = OHEMTrainer(
        model=tiny_model(),
        args=trainer_args(tmp_path),
        train_dataset=FixedRows(4),
        score_fn=lambda losses, batch: losses[:1],
        keep=0.5,
    )
    with pytest.raises(DistributedInputError, match="score_fn's return value has shape"):
        trainer.train()


def test_excess_loss_ranks_by_training_minus_reference_loss(tmp_path):
    """The selected sequences are the top by (training - reference) mean token loss,
    computed by hand."""
    model, reference = tiny_model(0), tiny_model(1)
    data = FixedRows(8, seed=3)
    trainer = OHEMTrainer(
        model=model,
        args=trainer_args(tmp_path, per_device_train_batch_size=8),
        train_dataset=data,
        reference_model=reference,
        keep=0.25,
    )
    batch = {"input_ids": data.input_ids, "labels": data.input_ids}
    with torch.no_grad():
        excess = hand_sequence_loss(model, batch) - hand_sequence_loss(reference, batch)
    slots, _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    expected = hardest_mask(excess, torch.ones(8, dtype=torch.bool), {"keep": 0.25})
    assert torch.equal(trainer.last_selection.mask, expected)
    assert torch.equal(slots[0]["input_ids"], data.input_ids[expected])
    # The plain top-loss choice differs on this data: the test tells the two apart.
    with torch.no_grad():
        losses = hand_sequence_loss(model, batch)
    assert not torch.equal(
        hardest_mask(losses, torch.ones(8, dtype=torch.bool), {"keep": 0.25}), expected
    )


def hand_sequence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of each row, written out."""
    logits = model(input_ids=batch["input_ids"]).logits
    log_probs = logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(1)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    rows=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_concatenated_micro_batches_are_right_padded(lengths, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [
        {
            "input_ids": torch.randint(1, VOCAB, (n, length), generator=gen),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": torch.randint(0, VOCAB, (n, length), generator=gen),
        }
        for n, length in zip(rows, lengths, strict=False)
    ]
    out = concat_batches(batches)
    longest = max(batch["input_ids"].shape[1] for batch in batches)
    assert out["input_ids"].shape == (sum(len(b["input_ids"]) for b in batches), longest)
    start = 0
    for batch in batches:
        n, length = batch["input_ids"].shape
        for key in batch:
            assert torch.equal(out[key][start : start + n, :length], batch[key])
        assert (out["labels"][start : start + n, length:] == -100).all()
        assert (out["attention_mask"][start : start + n, length:] == 0).all()
        start += n


def test_concatenating_mismatched_batches_is_a_clear_error():
    a = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="different keys"):
        concat_batches([a, {"labels": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(TypeError, match="needs every entry"):
        concat_batches([{"input_ids": [[1, 2]]}])


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 6),
    ignore_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    shift=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sequence_losses_are_means_over_targets(batch, length, ignore_fraction, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < ignore_fraction] = -100
    losses, kept = token_losses(logits, labels, shift_labels=shift)
    means, targets = sequence_losses(losses, kept)
    predicted, wanted = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
    for row in range(batch):
        valid = wanted[row] != -100
        assert int(targets[row]) == int(valid.sum())
        if valid.any():
            expected = nn.functional.cross_entropy(predicted[row][valid], wanted[row][valid])
            assert math.isclose(float(means[row]), float(expected), rel_tol=1e-5, abs_tol=1e-6)
        else:
            assert float(means[row]) == 0.0


def test_reference_model_is_frozen_and_placed_like_the_training_model():
    reference = ReferenceModel(tiny_model(1).train())
    like = torch.zeros((), dtype=torch.float64)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 5))}
    losses = reference.token_losses(inputs, inputs["input_ids"], like)
    assert losses.shape == (2, 4) and not losses.requires_grad
    assert not reference.module.training
    assert all(
        not p.requires_grad and p.dtype == torch.float64 for p in reference.module.parameters()
    )


def test_score_fn_ranks_the_sequences(tmp_path):
    """score_fn = minus the loss: the easiest quarter, by hand, is what gets trained."""
    model = tiny_model(0)
    data = FixedRows(8, seed=4)
    trainer = OHEMTrainer(
        model=model,
        args=trainer_args(tmp_path, per_device_train_batch_size=8),
        train_dataset=data,
        score_fn=lambda losses, batch: -losses,
        keep=0.25,
    )
    batch = {"input_ids": data.input_ids, "labels": data.input_ids}
    with torch.no_grad():
        easiest = hardest_mask(
            -hand_sequence_loss(model, batch), torch.ones(8, dtype=torch.bool), {"keep": 0.25}
        )
    slots, _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert torch.equal(trainer.last_selection.mask, easiest)
    assert torch.equal(slots[0]["input_ids"], data.input_ids[easiest])
