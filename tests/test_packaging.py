"""The installable package: the wheel ``pip install .`` builds holds every
module, every file the packages read at run time (pages, styles, scripts,
data: any such file under them, present or added later), the ``coordinator``
command and the dependencies of pyproject.toml; installed into a new, clean
virtual environment (not editable, no test extras, away from the source tree)
the command, the reference worker and the packages' files work.

The build and the install ask the package index (build isolation fetches
setuptools; the install fetches the dependencies, ray among them): about 5 s
and about a minute. The install test is marked ``slow``."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_until

PACKAGES = ("coordinator", "actors", "reference_worker")
#: What the wheel is built from: what ``pip install .`` reads of the tree.
INPUTS = ("pyproject.toml", "README.md", *PACKAGES)
_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _copy_sources(into: Path) -> Path:
    """The project's build inputs in a folder of their own, so that building
    leaves nothing (build/, *.egg-info) in the source tree."""
    into.mkdir(parents=True)
    for name in INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=_JUNK)
        else:
            shutil.copy2(src, into / name)
    return into


def _build_wheel(src: Path, out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _package_files(tree: Path) -> set[str]:
    """Every file under the packages, as a path inside the wheel."""
    return {p.relative_to(tree).as_posix() for name in PACKAGES for p in (tree / name).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_copy_sources(work / "src"), work / "out")


def _dist_info(names: list[str], zf: zipfile.ZipFile, leaf: str) -> str:
    (name,) = [n for n in names if n.endswith(f".dist-info/{leaf}")]
    return zf.read(name).decode()


def test_the_wheel_holds_every_module_and_file_of_the_packages_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        content = {n for n in names if ".dist-info/" not in n}
        assert content == _package_files(ROOT)  # every module and data file; no tests, no bench
        assert {n.split("/")[0] for n in content} == set(PACKAGES)
        entry_points = _dist_info(names, zf, "entry_points.txt")
        metadata = email.parser.Parser().parsestr(_dist_info(names, zf, "METADATA"))
    assert "[console_scripts]" in entry_points
    assert "coordinator = coordinator.driver.cli:main" in entry_points
    # As requirements, not strings: the wheel may write a range's bounds in another order.
    required = {_requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert required == {_requirement(d) for d in declared}
    assert any(name == "pydantic-settings" for name, _, _ in required)


def _requirement(text: str) -> tuple[str, frozenset[str], str]:
    from packaging.requirements import Requirement

    req = Requirement(text)
    return req.name, frozenset(str(s) for s in req.specifier), ",".join(sorted(req.extras))


def test_pages_styles_scripts_and_data_anywhere_under_the_packages_go_into_the_wheel(tmp_path):
    src = _copy_sources(tmp_path / "src")
    added = ["coordinator/driver/static/fleet.html", "coordinator/driver/static/fleet.css",
             "coordinator/driver/static/js/fleet.js", "reference_worker/data/models.json",
             "actors/defaults.yaml"]
    for rel in added:  # folders without an __init__.py among them, as a static folder is
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("{}\n")
    with zipfile.ZipFile(_build_wheel(src, tmp_path / "out")) as zf:
        names = set(zf.namelist())
    assert set(added) <= names
    assert _package_files(src) <= names


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: {result.stdout}{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold install of ray from the package index, beyond the suite's 300 s
def test_installed_from_the_wheel_into_a_clean_venv_the_command_and_the_worker_work(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    # Nothing of the source tree or of the test run's environment: no
    # PYTHONPATH, no COORDINATOR_* variables, a working directory elsewhere.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.upper().startswith("COORDINATOR_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    away = tmp_path / "elsewhere"
    away.mkdir()
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], env, away, timeout=600)

    where = _run([str(python), "-c", "import coordinator, actors, reference_worker as r, sys; "
                                     "print(*(m.__file__ for m in (coordinator, actors, r)), sep='\\n')"], env, away)
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(venv.resolve()), path  # the installed copy, not the tree

    helped = _run([str(bindir / "coordinator"), "--help"], env, away)
    for command in ("start", "config", "serve", "status", "apply", "stop"):
        assert command in helped.stdout
    # Configuration from the environment works there too (pydantic-settings came along).
    shown = _run([str(bindir / "coordinator"), "config", "--set", "registries=[{kind: embedded, port: 0}]"],
                 {**env, "COORDINATOR_GATEWAY__PORT": "8211"}, away)
    assert "port: 8211" in shown.stdout

    assert "--controller" in _run([str(python), "-m", "reference_worker", "--help"], env, away).stdout

    # Every file the packages hold beside their modules is there to read.
    data = sorted(rel for rel in _package_files(ROOT) if not rel.endswith(".py"))
    check = ("import importlib.resources as r, sys\n"
             "for rel in sys.argv[1:]:\n"
             "    pkg, _, name = rel.partition('/')\n"
             "    assert r.files(pkg).joinpath(name).is_file(), rel\n")
    _run([str(python), "-c", check, *data], env, away)

    # And a reference worker serves from the installed copy.
    port = free_port()
    worker = subprocess.Popen([str(python), "-m", "reference_worker", "--port", str(port), "--model", "m"],
                              env=env, cwd=away, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().startswith("listening on")

        def supports():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/worker/models/supports", timeout=2)
            except httpx.TransportError:
                return None

        answer = wait_until(supports, timeout=30, what="the installed reference worker to answer")
        assert answer.status_code == 200
    finally:
        worker.kill()
        worker.wait(timeout=10)
