"""No host read in a steady-state call on the path a GPU takes (docs/DESIGN.md §13).

The calls run on meta tensors (no values: a read of one is recorded by
:class:`bench.host_syncs.HostReads`, and a data-dependent size raises), after an eager
warm-up call on CPU. W = 4 runs in torch's fake process group, in a subprocess so that
the group does not outlive the test.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from bench import host_syncs
from bench.host_syncs import reads_of
from dist_ohem import kselect

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
STRATEGIES = ("gather", "bracket", "auto")
RULES = (
    {"keep": 0.1},
    {"top_k": 7, "min_kept": 2},
    {"loss_thresh": 0.5, "min_kept": 3},
    {"neg_pos_ratio": 3.0},
)
SCOPES = ("global", "random", "local", "all")
#: The floors, per-group rules and the quota, on the default strategy and scope.
EXTRA_RULES = (
    {"keep": 0.1, "min_kept": 2, "min_kept_per": "example", "min_kept_fraction": 0.1},
    {"top_k": 7, "min_kept": 1, "min_kept_per": "rank"},
    {"neg_pos_ratio": 3.0, "per_group": True},
    {"top_k": 16, "per_group": True, "pos_fraction": 0.25, "neg_pos_ub": 3.0},
)


def selector_grid() -> dict[str, list[str]]:
    """Reads of a steady-state call for every strategy x rule x scope (100k instances)."""
    reads = {}
    for strategy, rule, scope in itertools.product(STRATEGIES, RULES, SCOPES):
        name = f"{strategy}-{rule}-{scope}"
        reads[name] = []
        host_syncs.selector_reads(
            META,
            strategy,
            100_000,
            lambda call, name=name: reads[name].extend(reads_of(call)),
            scope=scope,
            **rule,
        )
    for rule in EXTRA_RULES:
        name = f"gather-{rule}-global"
        reads[name] = []
        host_syncs.selector_reads(
            META,
            "gather",
            100_000,
            lambda call, name=name: reads[name].extend(reads_of(call)),
            **rule,
        )
    reads["ohemloss"] = []
    host_syncs.ohemloss_reads(META, lambda call: reads["ohemloss"].extend(reads_of(call)))
    name = "ohemloss-probability-instances"
    reads[name] = []
    host_syncs.ohemloss_reads(
        META,
        lambda call: reads[name].extend(reads_of(call)),
        prob_thresh=0.7,
        min_kept=3,
        normalizer="instances",
    )
    return reads


def test_no_read_in_a_steady_state_call_one_rank():
    reads = selector_grid()
    assert reads == {name: [] for name in reads}


def test_no_read_in_a_steady_state_call_four_ranks_fake_group():
    script = (
        "import json; from bench.host_syncs import init_fake_group; "
        "init_fake_group(4); from tests.test_host_reads import selector_grid; "
        "print(json.dumps(selector_grid()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reads = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(reads) == len(STRATEGIES) * len(RULES) * len(SCOPES) + len(EXTRA_RULES) + 2
    assert reads == {name: [] for name in reads}


def test_a_read_put_back_is_caught():
    """The proof can fail: one ``.item()`` in the selection shows up as one read."""
    original = kselect.top_m_sorted

    def reading(hard, m, *args):
        m.item()
        return original(hard, m, *args)

    with mock.patch.object(kselect, "top_m_sorted", reading):
        reads = []
        host_syncs.selector_reads(META, "gather", 256, lambda call: reads.extend(reads_of(call)))
    assert reads == ["item"]


def test_a_data_sized_op_on_the_device_path_raises():
    with host_syncs.HostReads() as recorder, pytest.raises((RuntimeError, NotImplementedError)):
        torch.rand(8, device=META).nonzero()
    assert recorder.reads == ["nonzero"]


@pytest.mark.parametrize("case", ["ohem_step_default", "ohem_step_capacity"])
def test_ohem_step_with_capacity_reads_once_after_the_backward(case):
    reads = []
    host_syncs.step_reads(
        META, host_syncs.STEP_CASES[case], lambda call: reads.extend(reads_of(call))
    )
    assert reads == ["tolist"]  # the overflow check, after the training backward
