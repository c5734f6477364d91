"""What a newcomer reads first: every example's and the reference worker's
``--help`` opens with a whole description, never a sentence cut at a line
break of the docstring."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

COMMANDS = [[sys.executable, str(p)] for p in sorted((ROOT / "examples").glob("*.py"))
            if "argparse" in p.read_text()] + [[sys.executable, "-m", "reference_worker"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[-1].rsplit("/", 1)[-1] for c in COMMANDS])
def test_help_description_is_whole_sentences(command):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    description = done.stdout.split("\n\n")[1]  # usage, then the description
    assert not description.startswith("options:")
    assert description.rstrip().endswith((".", ")", ":")), description
