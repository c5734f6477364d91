"""The DB-GPT environment builder only ever creates: it never clears or replaces
a directory, so a wrong path cannot cost anyone their files."""

from __future__ import annotations

import pytest

from tests.dbgpt_env import DbgptEnvError, ensure_venv


def test_refuses_a_directory_that_is_not_a_virtual_environment(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    (tmp_path / ".git").mkdir()
    with pytest.raises(DbgptEnvError, match="not a virtual environment"):
        ensure_venv(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "keep.txt"]


def test_a_stamped_environment_is_reused_without_installing(tmp_path):
    venv = tmp_path / "env"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")  # pip here would fail
    (venv / ".installed").write_text("somepkg==1.0")
    assert ensure_venv(venv, "somepkg==1.0") == venv / "bin"
