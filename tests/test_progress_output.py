"""launch/train.py's progress: a live tqdm bar on a terminal, plain lines in a file or pipe.

A live bar redraws itself with carriage returns; written to a file they pile up into one
line of thousands of segments. Off a terminal the bar is a plain log line at most every
few seconds, and one at the end.
"""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from launch.reporting import PlainProgress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_writes_at_most_a_line_per_interval_and_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    bar = PlainProgress(total=100, initial=0, desc="run", interval_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="train"):
        for step in range(1, 101):
            clock.now = 0.25 * step  # 4 steps/s: 25 s in all
            bar.set_postfix(loss=f"{1 / step:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        bar.close()  # nothing new: no second final line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "run: step 40/100 (40%), 4.0 steps/s, 00:10 elapsed, 00:15 left | loss 0.025",
        "run: step 80/100 (80%), 4.0 steps/s, 00:20 elapsed, 00:05 left | loss 0.013",
        "run: step 100/100 (100%), 4.0 steps/s, 00:25 elapsed, 00:00 left | loss 0.010",
    ]


def test_plain_progress_of_a_resumed_run_counts_from_where_it_resumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    bar = PlainProgress(total=10, initial=6, desc="", interval_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="train"):
        for step in range(7, 11):
            clock.now = step - 6.0
            bar.update(1)
        bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "step 10/10 (100%), 1.0 steps/s, 00:04 elapsed, 00:00 left"
    ]


def test_the_live_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=8, initial=0, desc="run", show=True), PlainProgress)
    hidden = progress_bar(total=8, initial=0, desc="run", show=False)  # ranks other than 0
    assert isinstance(hidden, tqdm) and hidden.disable
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as stderr, os.fdopen(controller, "rb", buffering=0):
        monkeypatch.setattr(sys, "stderr", stderr)
        live = progress_bar(total=8, initial=0, desc="run", show=True)
        assert isinstance(live, tqdm) and not live.disable
        live.close()


def test_a_run_writing_to_a_file_has_plain_lines_not_carriage_returns(
    mask_mode_run: tuple[Path, str],
) -> None:
    output = mask_mode_run[1]  # a SMALL run under torchrun, its output to a file
    assert "\r" not in output, output
    progress = [line for line in output.splitlines() if re.search(r"\brun: step \d+/8 ", line)]
    # 8 short steps: no line during them (the interval is seconds), one at the end.
    assert len(progress) == 1, output
    assert re.search(
        r"INFO run: step 8/8 \(100%\), [\d.]+ steps/s, \d\d:\d\d elapsed, 00:00 left \| "
        r"loss [\d.]+ M \d+/\d+ hard \d+/\d+ trained_per_s \d+$",
        progress[0],
    ), progress[0]
