"""What a person reads from launch/train.py: ``--help``, and a config error under torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import DEFAULTS, config_reference
from tests.launching import REPO, child_env
from tests.training import train


def test_every_config_key_has_a_type_a_default_and_a_meaning() -> None:
    rows = config_reference()
    assert [key for key, *_ in rows] == list(DEFAULTS)
    for key, default, kind, meaning in rows:
        assert kind == type(DEFAULTS[key]).__name__
        assert default and len(meaning) > 8, key


def test_help_lists_every_key_with_default_type_and_meaning_and_an_example() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--help"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    for key, default, kind, meaning in config_reference():
        (line,) = (line for line in lines if line.split()[:1] == [key])
        assert line.split()[1:3] == [kind, default] and line.endswith(meaning), line
    example = lines[lines.index(next(line for line in lines if line.startswith("example"))) + 1]
    assert "torchrun --nproc_per_node=2 launch/train.py" in example


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["keep=2"], "error: selection settings: keep must be in (0, 1]"),
        (["--config", "configs/missing.yaml"], "error: config file configs/missing.yaml not found"),
    ],
)
def test_a_config_error_under_torchrun_ends_with_its_cause(
    tmp_path: Path, args: list[str], cause: str
) -> None:
    """The cause is the root cause in torchrun's failure report, its last lines."""
    output = train("torchrun", tmp_path / "run", *args, expect_ok=False)
    last_lines = output.rstrip().splitlines()[-3:]
    assert any(cause in line for line in last_lines), output[-3000:]
    assert cause in output.split("Root Cause")[1]
    assert output.count(cause) == 1


def test_a_config_error_without_a_launcher_is_the_last_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "lrr=0.1", f"run_dir={tmp_path}"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: unknown config key 'lrr'")
