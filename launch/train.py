"""Train a detector with online hard example mining chosen across all ranks.

The training loop, top to bottom: parse the config, set up the engine, build the task,
model and selector, resume, then per step batch -> forward_backward -> optimizer step ->
metrics line -> eval -> checkpoint, and the summary at the end. Every launcher runs it:

    python launch/train.py                                      # 1 process, no process group
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 launch/train.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no launch/train.py --config configs/accelerate.yaml
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/train.py \
        --config configs/deepspeed.yaml --deepspeed_config configs/deepspeed/zero2.json

(``launch/*.sh`` wrap these with a free port and multi-node variables.)

Settings: the ``Config`` defaults in launch/config.py (they equal configs/default.yaml),
then a YAML file (``--config``), then ``key=value`` overrides. An unknown key or a wrong
type is an error. Outputs go to ``run_dir``: ``metrics.jsonl`` (one line per optimizer
step, plus eval lines), ``summary.json``, ``metrics.png``, ``checkpoints/step_*.pt``.
``resume=auto`` continues from the newest checkpoint: same step, data order and selection.
The helpers live next to this file: config, engines, data, checkpoints, reporting.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm.contrib.logging import logging_redirect_tqdm

# `python launch/train.py` puts launch/ first on sys.path; the helpers live in launch.*.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from dist_ohem import DistributedInputError, OHEMLoss, SelectionResult, ohem_step
from dist_ohem.comm import all_gather_uneven
from dist_ohem.step import unwrap_model
from launch.checkpoints import (
    CheckpointError,
    check_resumable,
    checkpoint_dir,
    needs_universal_load,
    rank_stream_seed,
    read_checkpoint,
    restore_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from launch.config import Config, ConfigError, make_selector, parse_args
from launch.data import batch_indices, check_batches, examples_per_step
from launch.engines import (
    Engine,
    all_reduce_sum,
    detect_launcher,
    engine_name,
    launcher_world_size,
    setup_engine,
)
from launch.reporting import (
    collective_failure_hint,
    open_metrics,
    parameter_digest,
    plot_metrics,
    print_summary,
    progress_bar,
    report,
    summarize,
    train_record,
    write_eval,
    write_json,
)
from launch.tasks import Task, make_task

log = logging.getLogger("train")


def lr_factor(cfg: Config, steps_done: int) -> float:
    """Cosine decay from ``lr`` (first step) to ``min_lr`` (last step), as a factor of lr."""
    progress = min(steps_done, cfg.max_steps - 1) / max(1, cfg.max_steps - 1)
    return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))) / cfg.lr


@torch.no_grad()
def evaluate(module: nn.Module, task: Task, eng: Engine) -> dict[str, float]:
    """The task's test metrics; each rank scores a shard, the logits are gathered."""
    was_training = module.training
    module.eval()
    shard = task.x_test.tensor_split(eng.world_size)[eng.rank].to(eng.device)
    logits = torch.cat(all_gather_uneven(module(shard).float())).cpu()
    module.train(was_training)
    return task.metrics(logits)


def main(argv: list[str] | None = None) -> None:
    """Parse the config, train, evaluate, checkpoint, summarize, plot."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    launcher = detect_launcher(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    # Every rank checks the same things before any process group: they fail alike, at once.
    task = make_task(cfg.task, cfg.seed)
    world_size = launcher_world_size()
    check_batches(cfg, task, world_size)
    resume_from = resume_checkpoint(cfg)  # raises when resume names no usable checkpoint
    resumed, load_universal = None, False
    if resume_from is not None:
        resumed = read_checkpoint(resume_from, cfg)
        check_resumable(resume_from, resumed, cfg, world_size)
        engine = engine_name(cfg, launcher)
        load_universal = needs_universal_load(resumed, resume_from, engine, world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # On the torch optimizer, before an engine wraps it: every engine steps these groups.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    eng = setup_engine(cfg, launcher, model, optimizer, load_universal)
    torch.manual_seed(rank_stream_seed(cfg.seed, 0, eng.rank))  # per-rank dropout streams
    selector = make_selector(cfg)
    criterion = nn.CrossEntropyLoss()
    ohem_loss = OHEMLoss(criterion, selector=selector)

    out = Path(cfg.run_dir)
    if eng.rank == 0:  # the other ranks write here only after the first step's collectives
        if resume_from is None and checkpoint_dir(cfg).exists():
            log.warning("starting %s afresh: deleting its checkpoints (resume=auto continues)", out)
            shutil.rmtree(checkpoint_dir(cfg))
        checkpoint_dir(cfg).mkdir(parents=True, exist_ok=True)
    start = 0
    if resumed is not None:
        start = restore_checkpoint(resume_from, resumed, cfg, eng, scheduler, selector)
    end = cfg.stop_at or cfg.max_steps
    metrics: TextIO | None = None
    if eng.rank == 0:
        metrics = open_metrics(out / "metrics.jsonl", keep_through_step=start)
        log.info(
            "%s: launcher=%s engine=%s W=%d task=%s K=%d/step mode=%s scope=%s %s=%s, steps %d..%d",
            out,
            launcher,
            eng.name,
            eng.world_size,
            cfg.task,
            examples_per_step(cfg, eng.world_size),
            cfg.mode,
            cfg.scope,
            cfg.rule,
            getattr(cfg, cfg.rule),
            start + 1,
            end,
        )
    if start == 0:
        write_eval(metrics, 0, evaluate(unwrap_model(eng.model), task, eng), eng)

    # A first SIGINT/SIGTERM finishes the current step, checkpoints and exits; a second kills.
    interrupted = []

    def request_stop(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)

    started, step = time.perf_counter(), start
    bar = progress_bar(total=end, initial=start, desc=out.name, show=eng.rank == 0)
    with logging_redirect_tqdm():
        for step in range(start + 1, end + 1):
            index = batch_indices(cfg, task, step, eng.rank, eng.world_size)
            x, y = task.x_train[index].to(eng.device), task.y_train[index].to(eng.device)
            tick = time.perf_counter()
            selection, mean_loss, trained, phase_s = forward_backward(
                cfg, eng, x, y, criterion, ohem_loss
            )
            tock = time.perf_counter()
            eng.step()
            scheduler.step()
            phase_s["optimizer"] = time.perf_counter() - tock
            step_time = time.perf_counter() - tick

            # One all-reduce: stop flags, hard-example counts, per-rank stats.
            hard = torch.isin(task.group_train[index], torch.tensor(task.hard_groups))
            stats = torch.zeros(3 + 2 * eng.world_size, dtype=torch.float64)
            stats[0] = float(bool(interrupted))
            stats[1] = hard.sum().item()
            stats[2] = (selection.mask.cpu() & hard).sum().item()
            stats[3 + eng.rank] = trained
            stats[3 + eng.world_size + eng.rank] = step_time
            stats = all_reduce_sum(stats, eng.device)
            record = train_record(step, scheduler, eng, selection, mean_loss, stats, phase_s)
            if eng.rank == 0:  # the line first: a checkpoint never runs ahead of the log
                metrics.write(json.dumps(record) + "\n")
                report(cfg, record, bar)
            if step % cfg.eval_every == 0 or step == end:
                write_eval(metrics, step, evaluate(unwrap_model(eng.model), task, eng), eng)
            if eng.rank == 0:
                metrics.flush()
            stop = stats[0] > 0  # some rank got a signal: all stop after this step
            if step % cfg.checkpoint_every == 0 or step == end or stop:
                save_checkpoint(cfg, eng, scheduler, selector, task, step)
            if stop:
                log.warning("stopped by a signal after step %d; resume=auto continues", step)
                break
    bar.close()
    # Deferred checks (the default on GPUs) raise a bad last step here, on every rank.
    selector.check()

    digests = [parameter_digest(unwrap_model(eng.model))] * eng.world_size
    if dist.is_initialized():
        dist.all_gather_object(digests, digests[0])
    if eng.rank == 0:
        metrics.close()
        summary = summarize(out / "metrics.jsonl", cfg, task, launcher, eng)
        summary["wall_s_this_launch"] = time.perf_counter() - started
        summary["parameter_sha256_per_rank"] = digests
        if len(set(digests)) > 1:
            log.error("the ranks ended with different parameters: %s", digests)
        write_json(summary, out / "summary.json")
        print_summary(summary)
        if cfg.plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png", task)
        log.info("outputs in %s: metrics.jsonl, summary.json%s", out, ", metrics.png" * cfg.plot)
    eng.close()


def forward_backward(
    cfg: Config,
    eng: Engine,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    ohem_loss: OHEMLoss,
) -> tuple[SelectionResult, float, int, dict[str, float]]:
    """Select and back-propagate one batch in the configured mode (no optimizer step).

    Returns the selection, the global mean loss of the selected examples, the number of
    examples this rank trained on and the seconds of each phase.
    """
    positive = y != 0 if cfg.rule == "neg_pos_ratio" else None
    if cfg.mode == "two_pass":
        out = ohem_step(
            eng.model,
            x,
            y,
            criterion,
            ohem_loss.selector,
            backward=eng.backward,
            balance=cfg.balance,
            score_mode=cfg.score_mode,
            positive=positive,
        )
        return out.selection, out.mean_loss, out.num_trained_local, dict(out.timings)
    started = time.perf_counter()
    logits = eng.model(x)
    forwarded = time.perf_counter()
    loss = ohem_loss(logits, y, positive)
    selected = time.perf_counter()
    eng.backward(loss)
    phase_s = {
        "forward": forwarded - started,
        "selection": selected - forwarded,
        "backward": time.perf_counter() - selected,
    }
    return ohem_loss.last, ohem_loss.last_mean_loss, ohem_loss.last.num_selected_local, phase_s


def record_cause(message: str) -> bool:
    """Hand ``message`` to the launcher as this process's error, without a traceback.

    torchrun (and ``accelerate launch``, built on it) name a file in
    ``TORCHELASTIC_ERROR_FILE`` and show what a failed rank wrote there in the "Root
    Cause" section of its failure report, the last thing it prints. False when no
    launcher asked for the file.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    stamp = str(int(time.time()))
    data = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": stamp}}
    }
    Path(path).write_text(json.dumps(data))
    return True


@record  # an unexpected exception's traceback goes to the launcher's "Root Cause" section
def run() -> int:
    """``main`` with errors a person can act on, no traceback spam, exit code 1.

    An error every rank raises alike (config, checkpoint, a selector's collective input
    check) is reported once, by rank 0: as the root cause of torchrun's failure report
    (what the user reads last), or on stderr without such a launcher. A failed
    collective differs per rank (the rank that waited timed out, the others lost their
    peer): each rank says what it saw.
    """
    rank = int(os.environ.get("RANK", "0"))
    try:
        main()
    except (ConfigError, CheckpointError, DistributedInputError) as exc:
        if rank == 0:
            if not record_cause(f"error: {exc}"):
                print(f"error: {exc}", file=sys.stderr, flush=True)
        else:  # a launcher stops every rank once one exits: let rank 0 fail first
            time.sleep(2)
        return 1
    except RuntimeError as exc:
        hint = collective_failure_hint(str(exc))
        if hint is None:
            raise
        first_line = str(exc).strip().splitlines()[0]
        print(f"error on rank {rank}: {hint}\n  ({first_line})", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
