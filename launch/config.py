"""The settings of a training run: ``Config``, its parsing from YAML and ``key=value``
overrides, type coercion and validation (``ConfigError`` names the fix)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import io
import os
import tokenize
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_ohem import HardExampleSelector
from launch.tasks import TASKS


@dataclass
class Config:
    """Every setting of a run; configs/*.yaml and ``key=value`` override these."""

    run_dir: str = "runs/default"  # metrics, summary, plot and checkpoints go here
    seed: int = 0  # data, model init, data order and scope="random" draws
    task: str = "detection"  # "detection" (generated) or "digits" (scikit-learn, long-tailed)
    shard: str = "iid"  # "iid", "skewed" (hard groups on rank 0) or "sources" (launch/data.py)
    # optimization: AdamW, cosine decay from lr to min_lr over max_steps
    max_steps: int = 600  # optimizer steps
    batch_size: int = 128  # per rank: K = batch_size * world size
    # Examples of a step over all ranks, the same at any W (0: batch_size per rank instead;
    # with it a run resumes at another world size).
    global_batch_size: int = 0
    lr: float = 2e-3  # AdamW learning rate at step 1
    min_lr: float = 1e-4  # learning rate at the last step (cosine decay)
    weight_decay: float = 0.0  # AdamW weight decay
    # hard example mining (dist_ohem)
    mode: str = "two_pass"  # "two_pass" (ohem_step) or "mask" (OHEMLoss)
    scope: str = "global"  # "global", "local", "random" (same M, random) or "all" (no mining)
    rule: str = "keep"  # which of keep / top_k / loss_thresh / neg_pos_ratio sets M
    keep: float = 0.25  # rule "keep": M = ceil(keep * K)
    top_k: int = 64  # rule "top_k": M = top_k
    loss_thresh: float = 0.5  # rule "loss_thresh": every loss above it, at least min_kept
    neg_pos_ratio: float = 3.0  # rule "neg_pos_ratio": positives (class != 0) + r x negatives
    min_kept: int = 0  # every rule keeps at least this many (over all ranks)
    strategy: str = "gather"  # "gather", "bracket" or "auto"
    nan: str = "raise"  # a NaN loss: "raise" on every rank, or "ignore" the instance
    balance: bool = False  # two_pass: every rank trains floor/ceil(M/W) examples
    score_mode: str = "no_grad_train"  # two_pass scoring pass: "no_grad_train" or "eval"
    # engine
    engine: str = "auto"  # "auto" (from the launcher), "ddp", "accelerate", "deepspeed"
    device: str = "auto"  # "auto" (cuda if present), "cpu" (gloo) or "cuda" (nccl)
    deepspeed_config: str = ""  # DeepSpeed JSON; also --deepspeed_config PATH
    zero_stage: int = 0  # DeepSpeed ZeRO stage when no deepspeed_config is given
    timeout_s: float = 600.0  # a collective that waits longer fails the run on every rank
    # evaluation, logging, checkpoints
    eval_every: int = 100  # steps between evaluations (also before step 1 and at the end)
    log_every: int = 100  # steps between log lines
    checkpoint_every: int = 200  # steps between checkpoints (also at the end)
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    resume: str = "false"  # "false", "true" (newest checkpoint, must exist), "auto", or a path
    stop_at: int = 0  # stop after this step as if interrupted (0: run to max_steps)
    plot: bool = True  # draw metrics.png at the end (needs matplotlib)


CHOICES = {
    "task": TASKS,
    "shard": ("iid", "skewed", "sources"),
    "mode": ("two_pass", "mask"),
    "rule": ("keep", "top_k", "loss_thresh", "neg_pos_ratio"),
    "engine": ("auto", "ddp", "accelerate", "deepspeed"),
    "device": ("auto", "cpu", "cuda"),
    "score_mode": ("no_grad_train", "eval"),
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
#: Keys that may change on resume without changing the training that follows.
HARMLESS_ON_RESUME = ("resume", "stop_at", "plot", "log_every", "eval_every", "checkpoint_every")
HARMLESS_ON_RESUME += ("keep_checkpoints", "timeout_s")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A setting is wrong; the message says which and how to fix it."""


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the defaults, then ``--config`` YAML, then ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="Train with distributed online hard example mining.",
        usage="%(prog)s [-h] [--config FILE.yaml] [--deepspeed_config FILE.json] [key=value ...]",
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON")
    # The DeepSpeed launcher appends --local_rank=N; the LOCAL_RANK variable says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    values: dict[str, object] = {}
    if args.config:
        values.update(read_config_file(Path(args.config)))
    if args.deepspeed_config:
        values["deepspeed_config"] = args.deepspeed_config
    for arg in overrides:
        key, equals, value = arg.removeprefix("--").partition("=")
        if not equals:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like key=value")
        values[key] = coerce(key, value, f"override {arg!r}")
    if values.get("global_batch_size") and "batch_size" not in values:
        values["batch_size"] = 0  # the per-rank default gives way to an explicit global size
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def config_reference() -> list[tuple[str, str, str, str]]:
    """``(key, default, type, meaning)`` of every ``Config`` key, in order. The meaning is
    the key's comment in this file: on its own line, else the comment lines right above it.
    ``--help`` and the documentation's config reference are both made from this."""
    source = Path(__file__).read_text()
    comments = {
        token.start[0]: token.string.removeprefix("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    (config_class,) = (
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef) and node.name == Config.__name__
    )
    fields = [node for node in config_class.body if isinstance(node, ast.AnnAssign)]
    field_lines = {node.lineno for node in fields}
    rows = []
    for node in fields:
        above = node.lineno - 1
        while above in comments and above not in field_lines:
            above -= 1
        block = [comments[line] for line in range(above + 1, node.lineno)]
        meaning = comments.get(node.lineno) or " ".join(block)
        key = node.target.id  # type: ignore[attr-defined]
        default = DEFAULTS[key]
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((key, shown or '""', type(default).__name__, meaning))
    return rows


def help_epilog() -> str:
    """The part of ``--help`` after the options: every key, then an example command."""
    rows = config_reference()
    key_width = max(len(key) for key, *_ in rows)
    default_width = max(len(default) for _, default, *_ in rows)
    lines = [
        "config keys (set with key=value, or in a --config YAML file; a later one wins):",
        *(
            f"  {key:<{key_width}}  {kind:<5}  {default:<{default_width}}  {meaning}"
            for key, default, kind, meaning in rows
        ),
        "",
        "example (2 CPU ranks; configs/*.yaml name their own commands on their first line):",
        "  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 launch/train.py \\",
        "      --config configs/digits.yaml max_steps=200 seed=3 run_dir=runs/digits",
    ]
    return "\n".join(lines)


def read_config_file(path: Path) -> dict[str, object]:
    """The keys of a flat YAML config file, type-checked against ``Config``."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the configs are in configs/")
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(table, dict):
        raise ConfigError(f"{path} must be a mapping of config keys, got {type(table).__name__}")
    return {key: coerce(key, value, str(path)) for key, value in table.items()}


def coerce(key: str, value: object, source: str) -> object:
    """``value`` as the type of ``Config.<key>``; strings (command line) are parsed."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(DEFAULTS)}"
        )
    kind = type(DEFAULTS[key])
    if key == "resume" and isinstance(value, bool):  # YAML `resume: true`
        return str(value).lower()
    if isinstance(value, str) and kind is bool and value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(
            f"{key} must be of type {kind.__name__} (like {DEFAULTS[key]!r}), got {value!r} "
            f"in {source}"
        )
    return value


def check_config(cfg: Config) -> None:
    """Reject settings the run cannot use, before any process group exists."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {getattr(cfg, key)!r}")
    for key in ("max_steps", "eval_every", "log_every", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.global_batch_size < 0:
        raise ConfigError(f"global_batch_size must be >= 0 (0: off), got {cfg.global_batch_size}")
    if cfg.global_batch_size and cfg.batch_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} and global_batch_size={cfg.global_batch_size} are "
            "both set; keep one: global_batch_size counts the examples of a step over all "
            "ranks (the same data at any world size), batch_size counts them per rank. "
            "batch_size=0 drops a batch_size that a config file sets"
        )
    if not cfg.global_batch_size and cfg.batch_size < 1:
        raise ConfigError(
            f"batch_size must be >= 1 (or set global_batch_size), got {cfg.batch_size}"
        )
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    if cfg.timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {cfg.timeout_s}")
    if not 0 <= cfg.stop_at <= cfg.max_steps:
        raise ConfigError(f"stop_at must be in [0, max_steps={cfg.max_steps}], got {cfg.stop_at}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU; use device=cpu")
    if cfg.balance and cfg.mode != "two_pass":
        raise ConfigError("balance=true needs mode=two_pass (mask mode trains every example)")
    run_dir = Path(cfg.run_dir).absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(
            f"run_dir={cfg.run_dir} cannot be created or written: {existing} is "
            f"{'not a directory' if not existing.is_dir() else 'not writable'}"
        )
    if cfg.deepspeed_config and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(
            f"deepspeed_config {cfg.deepspeed_config} not found; see configs/deepspeed/"
        )
    make_selector(cfg)  # raises on a bad rule, scope or strategy


def make_selector(cfg: Config) -> HardExampleSelector:
    """The selector of ``cfg``: its rule, scope and strategy."""
    try:
        return HardExampleSelector(
            **{cfg.rule: getattr(cfg, cfg.rule)},
            min_kept=cfg.min_kept,
            scope=cfg.scope,
            strategy=cfg.strategy,
            nan=cfg.nan,
            seed=cfg.seed,
        )
    except ValueError as exc:
        raise ConfigError(f"selection settings: {exc}") from exc
