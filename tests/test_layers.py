"""The house's rooms and the arrows between them (README, "How it is built"):
every import points down, never up or sideways into a room above.

    coordinator.driver    the driver's face: client, CLI, RayWorkerManager, router
    coordinator.control   the coordinator actor and its rooms
    actors                watchers, sources, proxies, the embedded registry
    coordinator.plumbing  metrics, the HTTP transport, process facts
    coordinator.core      vocabulary and pure decisions (no ray, no httpx, no I/O)

``reference_worker`` (a simulator for tests, examples and benchmarks) sits
beside them: it may use the rooms, and none of them may use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

RANK = {"coordinator.core": 0, "coordinator.plumbing": 1, "actors": 2, "coordinator.control": 3,
        "coordinator.driver": 4, "coordinator": 5}
#: What the pure core may not import, even lazily.
NOT_IN_CORE = {"ray", "httpx", "fastapi", "starlette", "uvicorn", "aiohttp"}


def room(module: str) -> str | None:
    """The room a project module belongs to (the longest matching prefix)."""
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    if module == "reference_worker" or module.startswith("reference_worker."):
        return "reference_worker"
    return None


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in ("coordinator", "actors", "reference_worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            found.append((name, path))
    return found


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return out


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_every_import_points_down(name, path):
    mine = room(name)
    for target in imports(path):
        theirs = room(target)
        if theirs is None:
            if mine == "coordinator.core":
                assert target.split(".")[0] not in NOT_IN_CORE, f"{name} (pure core) imports {target}"
            continue
        if mine == "reference_worker":
            continue  # the simulator may use anything of the project
        assert theirs != "reference_worker", f"{name} imports the reference worker ({target})"
        if mine == "coordinator":  # the package's own face re-exports from every room
            continue
        assert RANK[theirs] <= RANK[mine], f"{name} ({mine}) imports {target} ({theirs}), a room above it"


def test_the_actors_never_import_the_driver_api_or_the_coordinator_itself():
    for name, path in modules():
        if room(name) == "actors":
            above = [t for t in imports(path) if room(t) in ("coordinator.control", "coordinator.driver")]
            assert not above, f"{name} imports {above}"


def test_modules_stay_small_or_say_why():
    for name, path in modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines > 420:
            head = text[:3000].lower()
            assert "why this module is long" in head, f"{name}: {lines} lines and no reason at its top"
