"""Every example in README.md and docs/ that names its command runs as written.

A fenced ``python`` block whose first line is a comment giving its command, e.g.
``# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 mask_ddp.py``, is written to a fresh
folder under that file name and run there with that command, on 2 gloo CPU ranks (a
free rendezvous port is added to torchrun); it must exit 0. Any other ``python`` block
is a fragment, and the text just before it must say so.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import BIN, OUTPUT_TAIL, REPO, child_env, kill_tree

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: ``# [VAR=value ...] torchrun|python [options] file.py [args]``
COMMAND = re.compile(r"# ((?:\w+=\S+ )*)(torchrun|python) (.*?)(\w+\.py)(.*)")
#: How far before a fragment the text must call it one.
FRAGMENT_NOTE_CHARS = 400
TIMEOUT_S = 120
#: Warnings no example may print, each with a cause an example can avoid: token ids outside
#: a tiny model's vocabulary (transformers), DDP searching for unused parameters in a
#: model that has none.
AVOIDABLE_WARNINGS = ("an integer within the vocabulary", "find_unused_parameters=True was")


def blocks() -> list[tuple[Path, int, str, str]]:
    """``(page, line, code, text before it)`` of every fenced python block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((page, line, match.group(1), text[: match.start()]))
    return found


def runnable() -> list[pytest.param]:
    """The blocks that name their command, one test each."""
    params = []
    for page, line, code, _ in blocks():
        if COMMAND.fullmatch(code.splitlines()[0]):
            name = f"{page.relative_to(REPO)}:{line}"
            params.append(pytest.param(code, id=name))
    return params


def command_of(first_line: str, folder: Path) -> tuple[list[str], dict[str, str], str]:
    """argv, extra environment and file name from a block's first line."""
    match = COMMAND.fullmatch(first_line)
    assert match is not None, first_line
    env = dict(item.split("=", 1) for item in match.group(1).split())
    program, options, name = match.group(2), shlex.split(match.group(3)), match.group(4)
    if program == "torchrun":
        argv = [str(BIN / "torchrun"), "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]
    else:
        argv = [sys.executable]
    return [*argv, *options, str(folder / name), *shlex.split(match.group(5))], env, name


def test_there_are_examples_to_run() -> None:
    names = [COMMAND.fullmatch(p.values[0].splitlines()[0]).group(4) for p in runnable()]
    assert {"mask_ddp.py", "two_pass.py", "hf_trainer.py"} <= set(names)
    assert len(names) == len(set(names)), "two examples share a file name"


def test_every_other_python_block_is_called_a_fragment() -> None:
    for page, line, code, before in blocks():
        if not COMMAND.fullmatch(code.splitlines()[0]):
            note = before[-FRAGMENT_NOTE_CHARS:].lower()
            assert "fragment" in note, f"{page.relative_to(REPO)}:{line} is not called one"


@pytest.mark.parametrize("code", runnable())
def test_example_runs_as_written(code: str, tmp_path: Path) -> None:
    argv, env, name = command_of(code.splitlines()[0], tmp_path)
    (tmp_path / name).write_text(code)
    log_path = tmp_path / "output.log"
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            argv, cwd=tmp_path, env={**child_env(), **env}, stdout=log, stderr=log
        ) as proc,
    ):
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
    output = log_path.read_text()
    tail = output[-OUTPUT_TAIL:]
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{tail}"
    printed = [warning for warning in AVOIDABLE_WARNINGS if warning in output]
    assert not printed, f"{name} printed warnings it can avoid, {printed}:\n{tail}"


def test_the_api_reference_lists_every_public_name() -> None:
    import dist_ohem

    api = (REPO / "docs" / "api.md").read_text()
    missing = [name for name in dist_ohem.__all__ if f"::: dist_ohem.{name}\n" not in api]
    assert not missing, f"docs/api.md lacks {missing}"
