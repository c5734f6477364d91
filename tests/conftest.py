"""Shared fixtures: one local Ray per test session, polling with deadlines, and
reference workers as real subprocesses that are always cleaned up."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray 2.60 turns token authentication on for a local ray.init() when this is unset;
# say so explicitly, and keep it on, as a deployment would.
os.environ["RAY_AUTH_MODE"] = "token"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or condition}")
        time.sleep(interval)


async def poll(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """``wait_until`` for async tests: ``condition`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout} s: {what or condition}"
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A port that nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray for the session; yields its dashboard (job API) address."""
    import ray

    context = ray.init(
        num_cpus=2,
        include_dashboard=True,  # the job API, for `ray job submit`
        dashboard_host="127.0.0.1",
        namespace="tests",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        logging_level="WARNING",
    )
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


@pytest.fixture(scope="session")
def dbgpt_bin() -> Path:
    """The bin directory of DB-GPT 0.8.2's own virtual environment (built by the
    first test that needs it, then reused; see tests/dbgpt_env.py)."""
    from tests.dbgpt_env import ensure_venv

    return ensure_venv()


class WorkerProcess:
    """``python -m reference_worker`` as a child process."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def worker_process() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(*models: str, controller: str | None = None, port: int = 0, **flags: Any) -> WorkerProcess:
        cmd = [sys.executable, "-m", "reference_worker", "--port", str(port)]
        if controller:
            cmd += ["--controller", controller]
        for m in models:
            cmd += ["--model", m]
        for flag, value in flags.items():
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()  # "listening on host:port"
        if not line.startswith("listening on"):
            proc.kill()
            raise RuntimeError(f"reference worker did not start: {line!r}")
        wp = WorkerProcess(proc, int(line.rsplit(":", 1)[1]))
        started.append(wp)
        return wp

    yield spawn
    for wp in started:
        wp.kill()
