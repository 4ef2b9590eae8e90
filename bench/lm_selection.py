"""Run: ``python bench/lm_selection.py`` (full study, about 15 min on 2 cores) or ``--quick``.

Which selection helps a language model, and when? A tiny GPT (2 layers, 64 wide, vocab
32, sequence length 32; built from a config, nothing downloaded) is trained on a generated
corpus of three kinds of sequences, BOS then 16 pairs ``a_i b_i`` with a label (a scored
target) at every ``b_i`` only:

- ``learnable`` (hard): ``a_i`` uniform in 0..7, ``b_i = (a_i + a_{i-1}) mod 8`` (``a_0 = 0``):
  a rule the model must find (attend two tokens back, add mod 8); its loss sits near
  ln 8 = 2.08 nats until the rule is learned, then falls towards 0. 8^16 sequences: the
  held-out ones are new.
- ``easy``: a repetitive pattern, counting up from a random start with every token doubled
  (``a_i = a_1 + i - 1 mod 16``, ``b_i = a_i``): learned within a few dozen steps.
- ``noise``: uniformly random tokens in 0..15: unlearnable, loss >= ln 16 = 2.77 nats.

Every global batch holds exactly ``round(noise x B)`` noise sequences, the rest half
learnable, half easy. It is split over W = 4 simulated ranks (one process; rank r holds
the r-th contiguous quarter of the global batch): ``iid`` (the global batch in random
order) or ``skewed`` (the same sequences with the noise first, so that it fills rank 0,
then rank 1). Noise shares 0, 10% and 30%; at 0% both shardings are the same, so only iid
is trained.

Variants (``VARIANTS``), all at keep = 1/4 of the global batch except plain:

- ``all``: plain training on every sequence (one forward+backward over B).
- ``random``: a uniformly random quarter of the global batch (dist_ohem's ``random_keys``
  and ``top_m_mask``, keyed by the sequence's place in the iid order); no scoring pass.
- ``global`` / ``local``: top-loss, two-pass: score all B sequences without grad (score =
  mean token loss over the labels), then forward+backward the selected ones only;
  ``select_mask(scores, SelectionRule(keep=1/4))`` over the concatenated global batch
  (global) or over each rank's shard (local, per rank).
- ``excess_global`` / ``excess_local``: the same with the excess loss as the score:
  training model's loss minus a reference model's loss (RHO-LOSS). The reference is the
  same tiny GPT trained briefly on a small clean held-out set (learnable + easy, no
  noise), once per seed, and reused by every cell.

The loss trained on is the mean over the selected sequences of their mean token loss.
Constant learning rate (AdamW), the same for every variant; the same initial weights and
the same global batch at step s for every variant of a seed.

Compute: forward FLOPs = 2 x parameters x tokens, backward = 2 x forward. A plain step
costs 3F(B), random 3F(B/4), top-loss F(B) + 3F(B/4), excess-loss 2F(B) + 3F(B/4) (the
scoring forward and the reference's forward are counted). Every variant gets the same
FLOP budget, plain's ``--steps`` steps, and runs as many steps as fit (so random 4x,
top-loss 1.7x, excess-loss 1.09x plain's). Held-out losses are compared at equal steps
(step ``--steps``) and at equal FLOPs (the budget); wall and CPU seconds of training are
recorded too (they depend on the machine's load, recorded in the JSON). 5 seeds; paired
differences vs plain of the same seed.

In a skewed cell the variants whose selection does not depend on which rank holds which
sequence (plain, random, top-loss global, excess-loss global) are the iid cell's runs: the
skewed sharding only reorders the same global batch over the ranks. Only the per-rank
variants are trained again.

Writes ``lm_selection.{json,md,png}`` to ``bench/results/`` (``lm_selection_quick.*`` with
``--quick``, a tiny configuration for the smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/lm_selection.py` puts bench/ first on sys.path

from bench.common import VARIANT_COLORS, markdown_table, run_meta, write_report  # noqa: E402
from dist_ohem.selection import SelectionRule, random_keys, select_mask, top_m_mask  # noqa: E402

logger = logging.getLogger("bench.lm_selection")

VARIANTS = {
    "all": "plain (all sequences)",
    "random": "random 1/4",
    "global": "top-loss global",
    "local": "top-loss per rank",
    "excess_global": "excess-loss global",
    "excess_local": "excess-loss per rank",
}
#: Variants whose selection depends on the sharding (trained again in skewed cells).
PER_RANK = ("local", "excess_local")
#: Plot colours: bench/common's where the meaning is the same (no mining, random, local
#: and global OHEM by loss); the excess-loss variants in colours no other plot uses.
COLORS = {
    **{v: VARIANT_COLORS[v] for v in ("all", "random", "global", "local")},
    "excess_global": "tab:orange",
    "excess_local": "tab:pink",
}
KINDS = ("learnable", "easy", "noise")
KEPT_ORDER = ("noise", "learnable", "easy")  # the order of the markdown's "kept" column
KEEP = 0.25
#: Where runs are compared: plain's last step (equal steps), the end of the FLOP budget
#: (equal FLOPs), and the last evaluation within plain's training CPU seconds of the same
#: seed (equal CPU s; conservative: evaluations are 1/eval_points of the budget apart).
POINTS = ("equal_steps", "equal_flops", "equal_cpu")
POINT_LABELS = {
    "equal_steps": "equal steps",
    "equal_flops": "equal FLOPs",
    "equal_cpu": "equal CPU s",
}

# The corpus: BOS, then PAIRS pairs (a_i, b_i); labels at the b_i.
VOCAB = 32
SEQ_LEN = 32  # input tokens (the sequence has SEQ_LEN + 1 tokens: inputs and targets)
PAIRS = SEQ_LEN // 2
ALPHABET = 16  # tokens 0..15 carry data
MODULUS = 8  # the learnable rule's modulus (its a_i are in 0..7)
BOS = 16
IGNORE = -100


@dataclass(frozen=True)
class Config:
    """The study's sizes. ``steps`` is plain training's step count: the FLOP budget of
    every variant; the global batch ``batch`` is split over ``world_size`` ranks."""

    seeds: int = 5
    world_size: int = 4
    batch: int = 64
    steps: int = 150
    lr: float = 6e-3
    reference_steps: int = 300
    reference_batch: int = 32  # 300 x 32 sequences: the FLOPs of plain's 150 x 64
    reference_set: int = 512
    eval_learnable: int = 256
    eval_easy: int = 64
    eval_points: int = 8  # evaluations at k/eval_points of the FLOP budget
    noise: tuple[float, ...] = (0.0, 0.1, 0.3)

    @property
    def cells(self) -> list[tuple[float, str]]:
        """(noise share, sharding) of every cell: skewed only where there is noise."""
        return [(q, s) for q in self.noise for s in ("iid", "skewed") if q > 0 or s == "iid"]


#: The smoke test's configuration (``--quick``): seconds, not minutes.
QUICK = Config(
    seeds=2,
    batch=16,
    steps=4,
    reference_steps=3,
    reference_batch=8,
    reference_set=16,
    eval_learnable=16,
    eval_easy=8,
    eval_points=2,
    noise=(0.0, 0.3),
)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = VOCAB
    seq_len: int = SEQ_LEN
    width: int = 64
    layers: int = 2
    heads: int = 4


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = config.width
        self.heads = config.heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A nanoGPT-style decoder with tied input/output embeddings."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab, config.width)
        self.pos = nn.Embedding(config.seq_len, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln = nn.LayerNorm(config.width)
        self.register_buffer("positions", torch.arange(config.seq_len), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(self.positions[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_model(seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig())


def sequence_loss(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """(N,) mean token loss of each sequence over its labels (the b_i; the rest ignored)."""
    inputs, targets = sequences[:, :-1], sequences[:, 1:].clone()
    targets[:, 0::2] = IGNORE  # targets 0, 2, ... are the a_i: not labels
    logits = model(inputs)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    valid = (targets != IGNORE).to(losses.dtype)
    return (losses * valid).sum(1) / valid.sum(1)


# ----------------------------------------------------------------------------- corpus


def generate(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, SEQ_LEN + 1) sequences of one kind: BOS a_1 b_1 ... a_16 b_16."""
    if kind == "learnable":
        a = torch.randint(0, MODULUS, (count, PAIRS), generator=generator)
        previous = torch.cat([torch.zeros(count, 1, dtype=a.dtype), a[:, :-1]], dim=1)
        b = (a + previous) % MODULUS
    elif kind == "easy":
        start = torch.randint(0, ALPHABET, (count, 1), generator=generator)
        a = (start + torch.arange(PAIRS)) % ALPHABET
        b = a
    elif kind == "noise":
        a = torch.randint(0, ALPHABET, (count, PAIRS), generator=generator)
        b = torch.randint(0, ALPHABET, (count, PAIRS), generator=generator)
    else:
        raise ValueError(kind)
    sequences = torch.empty(count, SEQ_LEN + 1, dtype=torch.long)
    sequences[:, 0] = BOS
    sequences[:, 1::2] = a
    sequences[:, 2::2] = b
    return sequences


def kind_counts(batch: int, noise: float) -> dict[str, int]:
    """Sequences of each kind in one global batch."""
    num_noise = round(noise * batch)
    learnable = (batch - num_noise + 1) // 2
    return {"learnable": learnable, "easy": batch - num_noise - learnable, "noise": num_noise}


def global_batch(
    seed: int, noise: float, step: int, batch: int, shard: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: sequences, kinds (index into KINDS) and each
    sequence's place in the iid order (the same for both shardings), in rank-major order.

    ``iid``: a random order. ``skewed``: the same sequences, noise first (a stable sort
    of the iid order), so that the noise fills rank 0, then rank 1, ...
    """
    generator = torch.Generator().manual_seed((seed << 40) + (round(1000 * noise) << 24) + step)
    counts = kind_counts(batch, noise)
    sequences = torch.cat([generate(k, counts[k], generator) for k in KINDS])
    kinds = torch.cat([torch.full((counts[k],), i) for i, k in enumerate(KINDS)])
    order = torch.randperm(batch, generator=generator)  # the iid order
    iid_place = torch.empty_like(order)
    iid_place[order] = torch.arange(batch)
    if shard == "skewed":
        is_noise = (kinds[order] == KINDS.index("noise")).long()
        order = order[torch.sort(is_noise, descending=True, stable=True).indices]
    elif shard != "iid":
        raise ValueError(shard)
    return sequences[order], kinds[order], iid_place[order]


def held_out(seed: int, config: Config) -> dict[str, torch.Tensor]:
    """Held-out evaluation sets (learnable, easy) and the reference's clean training set."""
    generator = torch.Generator().manual_seed(2**31 - 1 - seed)
    half = config.reference_set // 2
    return {
        "learnable": generate("learnable", config.eval_learnable, generator),
        "easy": generate("easy", config.eval_easy, generator),
        "reference_train": torch.cat(
            [
                generate("learnable", half, generator),
                generate("easy", config.reference_set - half, generator),
            ]
        ),
    }


# ----------------------------------------------------------------------------- training


def forward_flops_per_sequence(params: int) -> int:
    """Forward FLOPs of one sequence: 2 x parameters x tokens."""
    return 2 * params * SEQ_LEN


def num_selected(batch: int) -> int:
    """M: sequences kept of a global batch of ``batch`` (ceil(keep x B), the library's)."""
    return int(SelectionRule(keep=KEEP).num_candidates_to_select(batch, 0, batch, 0))


def step_flops(variant: str, batch: int, params: int) -> int:
    """FLOPs of one training step: forward F, backward 2F, over the sequences each pass
    sees (the scoring forward over B for top-loss; and the reference's for excess-loss)."""
    f = forward_flops_per_sequence(params)
    if variant == "all":
        return 3 * f * batch
    train = 3 * f * num_selected(batch)
    scoring = {"random": 0, "global": 1, "local": 1, "excess_global": 2, "excess_local": 2}
    return scoring[variant] * f * batch + train


def schedule(config: Config, variant: str, params: int) -> tuple[int, list[int]]:
    """(steps, evaluation steps) of ``variant``: as many steps as fit in plain's FLOPs,
    evaluated at step 0, at plain's last step (equal steps) and at k/eval_points of the
    budget (the last: equal FLOPs)."""
    budget = config.steps * step_flops("all", config.batch, params)
    cost = step_flops(variant, config.batch, params)
    steps = budget // cost
    points = {0, config.steps}
    points |= {budget * k // (config.eval_points * cost) for k in range(1, config.eval_points + 1)}
    return steps, sorted(points)


def select(
    variant: str,
    model: nn.Module,
    reference: nn.Module | None,
    sequences: torch.Tensor,
    iid_place: torch.Tensor,
    world_size: int,
    seed: int,
    step: int,
) -> torch.Tensor:
    """Bool mask of the sequences of the global batch that ``variant`` trains on.

    The selection is dist_ohem's pure selection: ``select_mask`` over the concatenated
    global batch (global) or over each rank's contiguous shard (local), and
    ``random_keys`` + ``top_m_mask`` for the random subset.
    """
    batch = sequences.shape[0]
    if variant == "all":
        return torch.ones(batch, dtype=torch.bool)
    rule = SelectionRule(keep=KEEP)
    if variant == "random":
        keys = random_keys(iid_place, seed, step)
        return top_m_mask(keys, torch.ones(batch, dtype=torch.bool), num_selected(batch))
    with torch.no_grad():
        scores = sequence_loss(model, sequences)
        if variant.startswith("excess"):
            assert reference is not None
            scores = scores - sequence_loss(reference, sequences)
    if variant.endswith("global"):
        return select_mask(scores, rule)
    return torch.cat([select_mask(s, rule) for s in scores.split(batch // world_size)])


def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out mean token loss on the learnable and the easy sequences."""
    with torch.no_grad():
        return {
            kind: float(sequence_loss(model, data[kind]).mean()) for kind in ("learnable", "easy")
        }


def _optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )


def train_reference(config: Config, seed: int) -> dict[str, Any]:
    """The reference model of ``seed``: the tiny GPT trained on the small clean held-out
    set (learnable + easy, no noise). Its state and held-out losses."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = held_out(seed, config)
    model = make_model(10_000 + seed)
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(seed)
    pool = data["reference_train"]
    for _ in range(config.reference_steps):
        index = torch.randint(0, pool.shape[0], (config.reference_batch,), generator=generator)
        loss = sequence_loss(model, pool[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    noise = generate("noise", config.eval_learnable, torch.Generator().manual_seed(seed + 1))
    losses = evaluate(model, data)
    with torch.no_grad():
        losses["noise"] = float(sequence_loss(model, noise).mean())
    params = num_params(model)
    return {
        "seed": seed,
        "steps": config.reference_steps,
        "flops": 3
        * forward_flops_per_sequence(params)
        * config.reference_steps
        * config.reference_batch,
        "held_out": losses,
        "wall_s": time.perf_counter() - started,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def train_run(
    config: Config,
    seed: int,
    noise: float,
    shard: str,
    variant: str,
    reference_state: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Train one (noise, sharding, variant, seed) to the FLOP budget; its learning curve
    (held-out losses at the evaluation steps, with the FLOPs, wall and CPU seconds of
    training so far) and what the selection kept."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = held_out(seed, config)
    model = make_model(seed)
    reference = None
    if variant.startswith("excess"):
        reference = make_model(10_000 + seed)
        reference.load_state_dict(reference_state)
        reference.eval()
    optimizer = _optimizer(model, config)
    params = num_params(model)
    steps, eval_steps = schedule(config, variant, params)
    cost = step_flops(variant, config.batch, params)
    kept = torch.zeros(len(KINDS), dtype=torch.long)
    seen = torch.zeros(len(KINDS), dtype=torch.long)
    noise_kept_by_rank = torch.zeros(config.world_size, dtype=torch.long)
    train_wall = train_cpu = 0.0
    curve = []
    for step in range(steps + 1):
        if step in eval_steps:
            point = {"step": step, "flops": step * cost, "train_wall_s": train_wall}
            curve.append(point | {"train_cpu_s": train_cpu} | evaluate(model, data))
        if step == steps:
            break
        sequences, kinds, iid_place = global_batch(seed, noise, step, config.batch, shard)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        mask = select(
            variant, model, reference, sequences, iid_place, config.world_size, seed, step
        )
        loss = sequence_loss(model, sequences[mask]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_wall += time.perf_counter() - wall0
        train_cpu += time.process_time() - cpu0
        kept += torch.bincount(kinds[mask], minlength=len(KINDS))
        seen += torch.bincount(kinds, minlength=len(KINDS))
        is_noise = (kinds == KINDS.index("noise")) & mask
        noise_kept_by_rank += is_noise.view(config.world_size, -1).sum(1)
    if not math.isfinite(curve[-1]["learnable"]):
        raise RuntimeError(f"{variant} seed {seed} noise {noise} {shard}: loss is not finite")
    by_step = {point["step"]: point for point in curve}
    return {
        "seed": seed,
        "noise": noise,
        "shard": shard,
        "variant": variant,
        "steps": steps,
        "step_flops": cost,
        "equal_steps": by_step[config.steps],
        "equal_flops": curve[-1],
        "curve": curve,
        # What the selection trained on: each kind's share of the selected sequences,
        # and the share of each kind's sequences that were selected.
        "kept_share": {k: int(kept[i]) / max(1, int(kept.sum())) for i, k in enumerate(KINDS)},
        "kept_of_seen": {k: int(kept[i]) / max(1, int(seen[i])) for i, k in enumerate(KINDS)},
        "noise_kept_by_rank": noise_kept_by_rank.tolist(),
        "job_wall_s": time.perf_counter() - started,
    }


def _init_worker() -> None:
    torch.set_num_threads(1)


def _reference_job(args: tuple[Config, int]) -> dict[str, Any]:
    return train_reference(*args)


def _run_job(args: tuple) -> dict[str, Any]:
    return train_run(*args)


def jobs(config: Config, references: dict[int, dict[str, Any]]) -> list[tuple]:
    """Every (config, seed, noise, shard, variant, reference state) to train: all variants
    in iid cells, the per-rank ones in skewed cells; the longest first."""
    todo = []
    for seed in range(config.seeds):
        for noise, shard in config.cells:
            for variant in VARIANTS if shard == "iid" else PER_RANK:
                state = references[seed]["state"] if variant.startswith("excess") else None
                todo.append((config, seed, noise, shard, variant, state))
    order = ["random", "all", "global", "local", "excess_global", "excess_local"]
    return sorted(todo, key=lambda job: order.index(job[4]))


def run_study(config: Config, workers: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Train the references, then every run; (references, runs, load samples)."""
    started = time.perf_counter()
    loads: list[dict[str, float]] = []

    def note_load() -> None:
        loads.append({"t_s": round(time.perf_counter() - started, 1), "load1": os.getloadavg()[0]})

    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_init_worker) if workers > 1 else None
    try:
        mapper = pool.imap_unordered if pool else map
        references = {}
        for reference in mapper(_reference_job, [(config, s) for s in range(config.seeds)]):
            references[reference["seed"]] = reference
            note_load()
            logger.info(
                "reference seed %d: held-out learnable %.3f, easy %.3f, noise %.3f (%.1f s)",
                reference["seed"],
                *reference["held_out"].values(),
                reference["wall_s"],
            )
        todo = jobs(config, references)
        runs = []
        for run in mapper(_run_job, todo):
            runs.append(run)
            note_load()
            logger.info(
                "[%d/%d] noise %.0f%% %s %s seed %d: %d steps, held-out learnable %.3f at "
                "equal steps, %.3f at equal FLOPs (%.1f s; load %.2f)",
                len(runs),
                len(todo),
                100 * run["noise"],
                run["shard"],
                run["variant"],
                run["seed"],
                run["steps"],
                run["equal_steps"]["learnable"],
                run["equal_flops"]["learnable"],
                run["job_wall_s"],
                loads[-1]["load1"],
            )
    finally:
        if pool:
            pool.close()
            pool.join()
    for reference in references.values():
        del reference["state"]
    return [references[s] for s in sorted(references)], runs, loads


# ----------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below two values), count and the values."""
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def cell_name(noise: float, shard: str) -> str:
    """``noise 30% skewed``."""
    return f"noise {100 * noise:.0f}% {shard}"


def cell_runs(runs: list[dict], noise: float, shard: str, variant: str) -> list[dict]:
    """The runs of ``variant`` in a cell, by seed: a skewed cell's rank-independent
    variants are the iid cell's runs (the same global batches, selections and updates)."""
    trained_in = shard if variant in PER_RANK else "iid"
    mine = [
        r
        for r in runs
        if r["noise"] == noise and r["shard"] == trained_in and r["variant"] == variant
    ]
    return sorted(mine, key=lambda r: r["seed"])


def add_equal_cpu(runs: list[dict]) -> None:
    """Write each run's ``equal_cpu`` point: its last evaluation whose training CPU seconds
    are within plain's (same noise share and seed) at the end of the budget."""
    plain = {(r["noise"], r["seed"]): r for r in runs if r["variant"] == "all"}
    for run in runs:
        limit = plain[run["noise"], run["seed"]]["equal_flops"]["train_cpu_s"]
        run["equal_cpu"] = [p for p in run["curve"] if p["train_cpu_s"] <= limit][-1]


def paired(a: list[dict], b: list[dict], point: str, metric: str = "learnable") -> dict[str, Any]:
    """``a`` minus ``b`` of the same seed at ``point`` (one of ``POINTS``):
    mean ± std over seeds, and the seeds where ``a`` is lower (better) and higher."""
    by_seed = {r["seed"]: r[point][metric] for r in b}
    differences = [r[point][metric] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    return {
        **mean_std(differences),
        "lower": sum(d < 0 for d in differences),
        "higher": sum(d > 0 for d in differences),
    }


def aggregate(config: Config, runs: list[dict]) -> list[dict]:
    """One row per (cell, variant): held-out losses at equal steps and at equal FLOPs,
    mean ± std over seeds, paired differences vs plain, what the selection kept, cost."""
    rows = []
    for noise, shard in config.cells:
        plain = cell_runs(runs, noise, shard, "all")
        for variant in VARIANTS:
            mine = cell_runs(runs, noise, shard, variant)
            rows.append(
                {
                    "cell": cell_name(noise, shard),
                    "noise": noise,
                    "shard": shard,
                    "variant": variant,
                    "trained_in": shard if variant in PER_RANK else "iid",
                    "seeds": [r["seed"] for r in mine],
                    "steps": mine[0]["steps"],
                    **{
                        point: {
                            metric: mean_std([r[point][metric] for r in mine])
                            for metric in (
                                "learnable",
                                "easy",
                                "flops",
                                "train_wall_s",
                                "train_cpu_s",
                            )
                        }
                        for point in POINTS
                    },
                    "minus_plain": {point: paired(mine, plain, point) for point in POINTS},
                    "kept_share": {k: mean_std([r["kept_share"][k] for r in mine]) for k in KINDS},
                    "noise_kept_by_rank": [
                        statistics.fmean(r["noise_kept_by_rank"][i] for r in mine)
                        for i in range(config.world_size)
                    ],
                }
            )
    return rows


#: The comparisons the rule paragraph reads: (label, variant a, variant b, shardings).
COMPARISONS = (
    ("top-loss global - plain", "global", "all", ("iid",)),
    ("excess-loss global - plain", "excess_global", "all", ("iid",)),
    ("excess-loss global - top-loss global", "excess_global", "global", ("iid",)),
    ("random 1/4 - plain", "random", "all", ("iid",)),
    ("top-loss global - random 1/4", "global", "random", ("iid",)),
    ("excess-loss global - random 1/4", "excess_global", "random", ("iid",)),
    ("top-loss global - top-loss per rank", "global", "local", ("iid", "skewed")),
    (
        "excess-loss global - excess-loss per rank",
        "excess_global",
        "excess_local",
        ("iid", "skewed"),
    ),
)


def comparisons(config: Config, runs: list[dict]) -> list[dict]:
    """The paired differences the rule paragraph states (held-out learnable loss, a - b
    of the same seed; negative: a is better), per cell and at both points."""
    out = []
    for label, a, b, shards in COMPARISONS:
        for noise, shard in config.cells:
            if shard not in shards:
                continue
            first, second = (cell_runs(runs, noise, shard, v) for v in (a, b))
            out.append(
                {
                    "comparison": label,
                    "a": a,
                    "b": b,
                    "cell": cell_name(noise, shard),
                    "noise": noise,
                    "shard": shard,
                    **{p: paired(first, second, p) for p in POINTS},
                }
            )
    return out


def verdict(stat: dict[str, Any]) -> str:
    """``a better`` if a is lower on every seed, ``a worse`` if higher on every seed,
    ``mixed`` otherwise (the sign test at 5 seeds: 2 x 1/32 = 0.06)."""
    if stat["n"] and stat["lower"] == stat["n"]:
        return "better"
    if stat["n"] and stat["higher"] == stat["n"]:
        return "worse"
    return "mixed"


# ----------------------------------------------------------------------------- markdown


def fmt(stat: dict[str, Any], spec: str = ".3f") -> str:
    """``mean ± std`` (``-`` when empty)."""
    if stat["mean"] is None:
        return "-"
    std = "" if stat["std"] is None else f" ± {stat['std']:{spec.lstrip('+')}}"
    return f"{stat['mean']:{spec}}{std}"


def fmt_diff(stat: dict[str, Any]) -> str:
    """``+0.123 ± 0.045 (4/5 lower)``."""
    return f"{fmt(stat, '+.3f')} ({stat['lower']}/{stat['n']} lower)"


def main_table(report: dict[str, Any]) -> str:
    """Held-out learnable loss at equal FLOPs, a column per cell, and Δ vs plain."""
    cells = [cell_name(q, s) for q, s in report["cells"]]
    rows = {(r["cell"], r["variant"]): r for r in report["rows"]}
    body = []
    for variant, label in VARIANTS.items():
        line = [label]
        for cell in cells:
            row = rows[cell, variant]
            text = fmt(row["equal_flops"]["learnable"])
            if variant != "all":
                text += f" (Δ {fmt_diff(row['minus_plain']['equal_flops'])})"
            line.append(text)
        body.append(line)
    return markdown_table(["variant", *cells], body)


def cell_table(report: dict[str, Any], cell: str) -> str:
    """Every variant of one cell: both points, Δ vs plain, what was kept, cost."""
    headers = [
        "variant",
        "steps",
        "learnable @ equal steps",
        "Δ vs plain",
        "learnable @ equal FLOPs",
        "Δ vs plain",
        "learnable @ equal CPU s (share of budget)",
        "Δ vs plain",
        "easy @ equal FLOPs",
        "kept: noise / learnable / easy",
        "noise kept by rank",
        "train wall s",
        "train CPU s",
    ]
    body = []
    for row in report["rows"]:
        if row["cell"] != cell:
            continue
        plain = row["variant"] == "all"
        body.append(
            [
                VARIANTS[row["variant"]] + ("" if row["trained_in"] == row["shard"] else " ¹"),
                str(row["steps"]),
                fmt(row["equal_steps"]["learnable"]),
                "-" if plain else fmt_diff(row["minus_plain"]["equal_steps"]),
                fmt(row["equal_flops"]["learnable"]),
                "-" if plain else fmt_diff(row["minus_plain"]["equal_flops"]),
                f"{fmt(row['equal_cpu']['learnable'])} "
                f"({row['equal_cpu']['flops']['mean'] / report['flop_budget']:.2f})",
                "-" if plain else fmt_diff(row["minus_plain"]["equal_cpu"]),
                fmt(row["equal_flops"]["easy"]),
                " / ".join(f"{row['kept_share'][k]['mean']:.2f}" for k in KEPT_ORDER),
                " / ".join(f"{x:.0f}" for x in row["noise_kept_by_rank"]),
                fmt(row["equal_flops"]["train_wall_s"], ".1f"),
                fmt(row["equal_flops"]["train_cpu_s"], ".1f"),
            ]
        )
    return markdown_table(headers, body)


def comparison_lines(report: dict[str, Any]) -> list[str]:
    """Every comparison's paired difference and verdict per cell, at the three points."""
    lines = []
    for label, *_ in COMPARISONS:
        found = [c for c in report["comparisons"] if c["comparison"] == label]
        parts = []
        for c in found:
            points = ", ".join(
                f"{POINT_LABELS[p]} {fmt(c[p], '+.3f')} {verdict(c[p])}" for p in POINTS
            )
            parts.append(f"{c['cell']}: {points}")
        lines.append(f"- **{label}**: " + "; ".join(parts) + ".")
    return lines


WORDS = {
    "better": "lower on every seed",
    "worse": "higher on every seed",
    "mixed": "no consistent sign",
}


def verdicts(report: dict[str, Any], label: str, point: str, shards: tuple[str, ...]) -> str:
    """``lower on every seed in noise 0% iid (-0.15); no consistent sign in ...``: the
    cells of one comparison grouped by verdict at ``point``."""
    groups: dict[str, list[str]] = {key: [] for key in WORDS}
    for c in report["comparisons"]:
        if c["comparison"] == label and c["shard"] in shards:
            groups[verdict(c[point])].append(f"{c['cell']} ({c[point]['mean']:+.2f})")
    return "; ".join(f"{WORDS[k]} in {', '.join(v)}" for k, v in groups.items() if v)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The rule paragraph: what the paired differences show, in words (every verdict and
    number is read from the report, none is written in by hand)."""
    rows = {(r["cell"], r["variant"]): r for r in report["rows"]}
    config = report["config"]
    per_rank = config["batch"] // config["world_size"]
    noisy = [q for q, s in report["cells"] if q > 0 and s == "iid"]

    def kept_noise(variant: str, noise: float, shard: str = "iid") -> str:
        share = rows[cell_name(noise, shard), variant]["kept_share"]["noise"]["mean"]
        return f"{100 * share:.0f}%"

    def steps(variant: str) -> int:
        return rows[cell_name(*report["cells"][0]), variant]["steps"]

    cpu = {
        v: statistics.fmean(
            r["equal_flops"]["train_cpu_s"]["mean"] for r in report["rows"] if r["variant"] == v
        )
        for v in VARIANTS
    }
    iid, skewed = ("iid",), ("skewed",)
    flops = "equal_flops"
    lines = [
        "Held-out learnable loss, paired by seed (a - b < 0: a is better), 'lower/higher on "
        "every seed' or 'no consistent sign' over the seeds; equal FLOPs unless said.",
        "",
        "- **Top-loss vs plain.** top-loss global - plain: "
        f"{verdicts(report, 'top-loss global - plain', flops, iid)}; at equal steps: "
        f"{verdicts(report, 'top-loss global - plain', 'equal_steps', iid)}. Noise is "
        + " / ".join(kept_noise("global", q) for q in noisy)
        + " of what top-loss global trains on at "
        + " / ".join(f"{100 * q:.0f}%" for q in noisy)
        + " noise in the batch.",
        "- **Excess loss.** excess-loss global - top-loss global: "
        f"{verdicts(report, 'excess-loss global - top-loss global', flops, iid)}; "
        "excess-loss global - plain: "
        f"{verdicts(report, 'excess-loss global - plain', flops, iid)}. Noise is "
        + " / ".join(kept_noise("excess_global", q) for q in noisy)
        + " of what it trains on. Its two scoring forwards leave it "
        f"{steps('excess_global')} steps of the budget against top-loss's "
        f"{steps('global')}; at equal steps excess-loss global - top-loss global: "
        f"{verdicts(report, 'excess-loss global - top-loss global', 'equal_steps', iid)}.",
        "- **Global vs per rank.** top-loss global - per rank: "
        f"iid: {verdicts(report, 'top-loss global - top-loss per rank', flops, iid)}; "
        f"skewed: {verdicts(report, 'top-loss global - top-loss per rank', flops, skewed)}. "
        "excess-loss global - per rank: iid: "
        f"{verdicts(report, 'excess-loss global - excess-loss per rank', flops, iid)}; "
        "skewed: "
        f"{verdicts(report, 'excess-loss global - excess-loss per rank', flops, skewed)}. "
        f"Skewed, rank 0 holds "
        + " / ".join(f"{min(per_rank, round(q * config['batch']))}" for q in noisy)
        + f" noise sequences of its {per_rank} and per-rank selection takes "
        f"{per_rank // 4} of every rank: noise is "
        + " / ".join(kept_noise("local", q, "skewed") for q in noisy)
        + " of what top-loss per rank trains on (global: "
        + " / ".join(kept_noise("global", q) for q in noisy)
        + "), "
        + " / ".join(kept_noise("excess_local", q, "skewed") for q in noisy)
        + " of excess-loss per rank's (global: "
        + " / ".join(kept_noise("excess_global", q) for q in noisy)
        + ").",
        "- **Which compute.** random 1/4 - plain: "
        f"{verdicts(report, 'random 1/4 - plain', flops, iid)}; at equal steps: "
        f"{verdicts(report, 'random 1/4 - plain', 'equal_steps', iid)}; at equal CPU s: "
        f"{verdicts(report, 'random 1/4 - plain', 'equal_cpu', iid)}. A random quarter takes "
        f"{steps('random')} steps in plain's {steps('all')} steps' FLOPs; its budget costs "
        f"{cpu['random'] / cpu['all']:.2f}x plain's CPU seconds (top-loss "
        f"{cpu['global'] / cpu['all']:.2f}x, excess-loss {cpu['excess_global'] / cpu['all']:.2f}x"
        "). Against random 1/4: top-loss global "
        f"{verdicts(report, 'top-loss global - random 1/4', flops, iid)}; excess-loss global "
        f"{verdicts(report, 'excess-loss global - random 1/4', flops, iid)}; at equal CPU s, "
        f"top-loss global {verdicts(report, 'top-loss global - random 1/4', 'equal_cpu', iid)}"
        "; excess-loss global "
        f"{verdicts(report, 'excess-loss global - random 1/4', 'equal_cpu', iid)}.",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report: setup, the rule, the main table, a table per cell."""
    meta, config = report["meta"], report["config"]
    references = report["references"]
    ref_learnable = mean_std([r["held_out"]["learnable"] for r in references])
    ref_noise = mean_std([r["held_out"]["noise"] for r in references])
    budget = report["flop_budget"]
    loads = [x["load1"] for x in meta["load_samples"]] or [float("nan")]
    parts = [
        "# Which selection helps a language model, and when?",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}; {meta['workers']} worker processes, one "
        "thread each",
        f"- machine: {meta['machine']}; load average (1 min) {meta['load_start'][0]} at start, "
        f"{min(loads):.2f}-{max(loads):.2f} during, {meta['load_end'][0]} at end; wall time "
        f"of the study {meta['wall_s'] / 60:.1f} min",
        *(
            [
                f"- tables, markdown and plot rebuilt from the JSON's runs (nothing retrained) "
                f"by `{meta['report_command']}` on {meta['report_date']}"
            ]
            if "report_command" in meta
            else []
        ),
        f"- model: tiny GPT (nanoGPT-style, in the script), {config['layers']} layers, width "
        f"{config['width']}, {config['heads']} heads, vocab {VOCAB}, sequence length {SEQ_LEN}, "
        f"{report['params']:,} parameters; AdamW, constant lr {config['lr']}, the same for "
        "every variant",
        f"- corpus: learnable (pairs a, b = a + previous a mod {MODULUS}: loss ≈ ln {MODULUS} = "
        f"{math.log(MODULUS):.2f} until the rule is learned), easy (doubled counting), noise "
        f"(uniform tokens: loss ≥ ln {ALPHABET} = {math.log(ALPHABET):.2f}); labels at the b's. "
        f"Global batch B = {config['batch']} over W = {config['world_size']} simulated ranks "
        f"({config['batch'] // config['world_size']} per rank), exactly round(noise x B) noise "
        "sequences, the rest half learnable, half easy; skewed: the noise first (rank 0, "
        "then rank 1)",
        f"- variants: {', '.join(VARIANTS.values())}; keep = {KEEP} (M = "
        f"{num_selected(config['batch'])}); top-loss and excess-loss are two-pass (score all B "
        "without grad, forward+backward the M selected), selected by dist_ohem's "
        "`select_mask` over the global batch (global) or each rank's shard (per rank)",
        f"- compute: forward 2 x params x tokens, backward 2 x forward; scoring forwards and "
        f"the reference's forwards counted. Budget {budget / 1e9:.1f} GFLOP = plain's "
        f"{config['steps']} steps; every variant runs as many steps as fit (steps column). "
        f"Equal steps: step {config['steps']}; equal FLOPs: the end of the budget",
        f"- reference (excess loss): the same GPT trained {config['reference_steps']} steps "
        f"(batch {config['reference_batch']}) on {config['reference_set']} clean held-out "
        f"sequences (learnable + easy), once per seed, shared by every cell: "
        f"{references[0]['flops'] / budget:.2f} x the budget, not charged to the excess-loss "
        f"runs; its held-out learnable loss {fmt(ref_learnable)}, noise {fmt(ref_noise)}",
        f"- {len(report['seeds'])} seeds ({report['seeds']}): same initial weights and the "
        "same global batch at step s for every variant of a seed; mean ± sample std over "
        "seeds; Δ vs plain = the variant's held-out learnable loss minus plain's of the same "
        "seed (negative = better), with the seeds where it is lower",
        "- ¹ in a skewed cell, plain, random and the global variants are the iid cell's runs "
        "(the skewed sharding only reorders the same global batch over the ranks, which "
        "those selections do not see)",
        "",
        "## Rule",
        "",
        *summary_lines(report),
        "",
        "## All comparisons",
        "",
        "a - b of the same seed, mean ± std over seeds, at equal steps, equal FLOPs and equal "
        "CPU s; better/worse: lower/higher on every seed, mixed: otherwise (the sign test at "
        "5 seeds: p = 2/32 = 0.06).",
        "",
        *comparison_lines(report),
        "",
    ]
    parts += [
        "## Held-out learnable loss at equal FLOPs (Δ vs plain, same seed)",
        "",
        main_table(report),
        "",
    ]
    for noise, shard in report["cells"]:
        parts += [
            f"## {cell_name(noise, shard)}",
            "",
            cell_table(report, cell_name(noise, shard)),
            "",
        ]
    parts += [
        "Columns: held-out learnable loss at equal steps, at equal FLOPs and at equal CPU s "
        "(the last evaluation within plain's training CPU seconds of the same seed, with the "
        "share of the FLOP budget it had spent; evaluations are 1/"
        f"{config['eval_points']} of the budget apart, so this point is conservative); easy "
        "held-out loss; the kinds' shares of the selected sequences; noise sequences each "
        "rank had selected over the whole run (mean over seeds); training seconds to the "
        "budget (wall, and CPU of the worker process; data generation and evaluation "
        "excluded).",
        "",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    """Held-out learnable loss against training FLOPs, a panel per cell, a colour per
    variant (mean over seeds, min-max band); the hollow marker is the equal-steps point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    columns = min(3, len(cells))
    rows = math.ceil(len(cells) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False, constrained_layout=True
    )
    steps = report["config"]["steps"]
    for index, (noise, shard) in enumerate(cells):
        ax = axes[index // columns][index % columns]
        for variant, label in VARIANTS.items():
            runs = cell_runs(report["runs"], noise, shard, variant)
            # The evaluations after step 0 (the untrained model's loss is off the scale).
            points = list(zip(*(r["curve"][1:] for r in runs), strict=True))
            x = [p[0]["flops"] / 1e9 for p in points]
            mean = [statistics.fmean(q["learnable"] for q in p) for p in points]
            style = "--" if variant in PER_RANK else "-"
            color = COLORS[variant]
            ax.plot(x, mean, style, marker=".", color=color, label=label)
            low = [min(q["learnable"] for q in p) for p in points]
            high = [max(q["learnable"] for q in p) for p in points]
            ax.fill_between(x, low, high, color=color, alpha=0.12)
            at = [i for i, p in enumerate(points) if p[0]["step"] == steps]
            if at:
                ax.plot(x[at[0]], mean[at[0]], "o", mfc="none", color=color, markersize=8)
        ax.axhline(math.log(MODULUS), color="gray", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(cell_name(noise, shard))
        ax.set_xlabel("training GFLOPs (scoring, reference forwards incl.)")
        ax.set_ylabel("held-out learnable loss (nats)")
        ax.grid(alpha=0.3)
    for index in range(len(cells), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    spare = axes[-1][-1] if len(cells) < rows * columns else axes[0][0]
    spare.legend(handles, labels, fontsize=8, loc="center" if spare is not axes[0][0] else "best")
    figure.suptitle(
        f"Held-out learnable loss vs compute (mean over {len(report['seeds'])} seeds, band: "
        f"min-max over seeds; o: equal steps = step {steps}; dotted: ln {MODULUS})"
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--seeds", type=int, help="seeds (default 5; --quick 2)")
    parser.add_argument("--steps", type=int, help="plain's steps = the FLOP budget (default 150)")
    parser.add_argument("--workers", type=int, help="worker processes (default 2; --quick 1)")
    parser.add_argument(
        "--machine",
        default="not stated",
        help="a note for the report: was the machine quiet or shared with other jobs?",
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG from the JSON in --output-dir"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the tables, markdown and PNG from the runs in --output-dir's JSON, "
        "training nothing",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.seeds is not None:
        config = dataclasses.replace(config, seeds=args.seeds)
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    if config.seeds < 1 or config.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    args.config = config
    if args.workers is None:
        args.workers = 1 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every cell x variant x seed, then print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stem = "lm_selection_quick" if args.quick else "lm_selection"
    if args.replot:
        report = json.loads((args.output_dir / f"{stem}.json").read_text())
        plot(report, args.output_dir / f"{stem}.png")
        return report
    if args.report_only:
        report = json.loads((args.output_dir / f"{stem}.json").read_text())
        config = Config(**{f.name: report["config"][f.name] for f in dataclasses.fields(Config)})
        config = dataclasses.replace(config, noise=tuple(config.noise))
        report["meta"]["report_command"] = shlex.join(["python", *sys.argv])
        report["meta"]["report_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        references, runs = report["references"], report["runs"]
        meta = report["meta"]
    else:
        config = args.config
        torch.set_num_threads(1)
        started, load_start = time.perf_counter(), os.getloadavg()
        references, runs, loads = run_study(config, args.workers)
        meta = {
            **run_meta(started, load_start, ("dist_ohem/selection.py", "bench/lm_selection.py")),
            "machine": args.machine,
            "workers": args.workers,
            "load_samples": loads,
        }
    add_equal_cpu(runs)
    params = num_params(make_model(0))
    report = {
        "meta": meta,
        "config": {**asdict(config), **asdict(GPTConfig())},
        "keep": KEEP,
        "params": params,
        "flop_budget": config.steps * step_flops("all", config.batch, params),
        "seeds": list(range(config.seeds)),
        "cells": config.cells,
        "references": references,
        "comparisons": comparisons(config, runs),
        "rows": aggregate(config, runs),
        "runs": sorted(
            runs,
            key=lambda r: (r["noise"], r["shard"], list(VARIANTS).index(r["variant"]), r["seed"]),
        ),
    }
    write_report(report, render_markdown(report), args.output_dir, stem)
    plot(report, args.output_dir / f"{stem}.png")
    logger.info("wrote %s/%s.png", args.output_dir, stem)
    return report


if __name__ == "__main__":
    main()
