"""DB-GPT 0.8.2 itself, for the interoperability tests: its own virtual
environment (its pins conflict with ours) and its servers as subprocesses.

The environment is built on first use by the test setup and reused after; a
stamp records what was installed, a file lock keeps two runs from building it
at once. It is only ever created, never cleared or replaced: a directory at that
path that is not a virtual environment makes the build refuse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = "dbgpt[client,cli,simple-framework,proxy-openai]==0.8.2"
VENV = ROOT / ".venv-dbgpt"
SCRIPTS = Path(__file__).resolve().parent / "dbgpt"
#: pip installing DB-GPT with its dependencies: about a minute here.
INSTALL_TIMEOUT = 900


class DbgptEnvError(RuntimeError):
    pass


def ensure_venv(venv: Path = VENV, requirement: str = REQUIREMENT) -> Path:
    """The ``bin`` directory of a virtual environment with ``requirement``
    installed, building it if needed."""
    venv = Path(venv).resolve()
    stamp = venv / ".installed"
    with FileLock(f"{venv}.lock"):
        if stamp.is_file() and stamp.read_text() == requirement:
            return venv / "bin"
        if venv.exists() and not (venv / "pyvenv.cfg").is_file():
            raise DbgptEnvError(f"{venv} exists and is not a virtual environment; refusing to touch it")
        if not venv.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
            capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )
        if done.returncode != 0:
            raise DbgptEnvError(f"pip install {requirement} failed:\n{done.stderr[-3000:]}")
        stamp.write_text(requirement)
    return venv / "bin"


class DbgptProcess:
    """One DB-GPT server process (controller or worker manager) on loopback."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, workdir: Path, name: str) -> None:
        self.port, self.name = port, name
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "HOME": str(workdir)}  # DB-GPT writes logs under ~/.dbgpt
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready(ready_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, path: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DbgptEnvError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise DbgptEnvError(f"{self.name} did not answer {path} within {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)


def start_controller(bin_dir: Path, port: int, workdir: Path) -> DbgptProcess:
    """DB-GPT's model controller (its router and EmbeddedModelRegistry)."""
    cmd = [str(bin_dir / "python"), str(SCRIPTS / "controller.py"), str(port)]
    return DbgptProcess(cmd, port, "/api/health", workdir, f"controller-{port}")


def start_worker_manager(
    bin_dir: Path, port: int, controller: str, workdir: Path, model: str | None = "chatgpt-test",
    closed_port: int = 9, embedding: str | None = None,
) -> DbgptProcess:
    """``dbgpt start worker`` serving one proxy/openai model whose API base is a
    closed local port (start and stop never call it) — or, given an
    OpenAI-compatible server's port there (tests/openai_stub.py), a model that
    answers chats; with ``embedding`` (and ``model=None``: DB-GPT runs one model
    per worker manager in cluster mode), a proxy/openai embedding model instead."""
    config = workdir / f"worker-{port}.toml"
    section = "" if model is None else (
        "[[models.llms]]\n"
        f'name = "{model}"\n'
        'provider = "proxy/openai"\n'
        f'api_base = "http://127.0.0.1:{closed_port}/v1"\n'
        'api_key = "not-used"\n'
    )
    section += "" if embedding is None else (
        "[[models.embeddings]]\n"
        f'name = "{embedding}"\n'
        'provider = "proxy/openai"\n'
        f'api_url = "http://127.0.0.1:{closed_port}/v1/embeddings"\n'
        'api_key = "not-used"\n'
    )
    config.write_text(
        "[service.model.worker]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'controller_addr = "{controller}"\n'
        "heartbeat_interval = 1\n\n" + section
    )
    cmd = [str(bin_dir / "dbgpt"), "start", "worker", "-c", str(config)]
    return DbgptProcess(cmd, port, "/api/worker/models/supports", workdir, f"worker-{port}")


def start_apiserver(bin_dir: Path, port: int, controller: str, workdir: Path) -> DbgptProcess:
    """DB-GPT's OpenAI-compatible API server (``dbgpt start apiserver``), which
    finds its workers through ``controller`` on every request."""
    config = workdir / f"apiserver-{port}.toml"
    config.write_text(
        "[service.model.api]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'controller_addr = "{controller}"\n'
    )
    cmd = [str(bin_dir / "dbgpt"), "start", "apiserver", "-c", str(config)]
    return DbgptProcess(cmd, port, "/api/v1/models", workdir, f"apiserver-{port}")


def original_manager(bin_dir: Path, registry: str, model: str, apply_type: str | None = None) -> str:
    """Run DB-GPT's own RemoteWorkerManager against ``registry``; its JSON answer."""
    cmd = [str(bin_dir / "python"), str(SCRIPTS / "original_manager.py"), registry, model]
    done = subprocess.run([*cmd, *([apply_type] if apply_type else [])],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DbgptEnvError(f"original manager failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]
