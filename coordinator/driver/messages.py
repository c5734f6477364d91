"""What the command line says when the input is wrong, in the user's terms:
validation errors naming the file, the entry and the option rather than
pydantic's locations; close names when a model is not found; plurals.

Plain functions of their inputs, tested without Ray.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

#: The worker manager's own registry entry, never a model a user means.
_NOT_MODELS = {"WorkerManager"}


def plural(n: int, word: str) -> str:
    """``1 replica``, ``2 replicas``, ``0 instances``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _msg(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _path(loc: Sequence[Any]) -> str:
    """``registries, entry 1, port`` for ``('registries', 0, 'port')``."""
    parts = [f"entry {p + 1}" if isinstance(p, int) else str(p) for p in loc]
    return ", ".join(parts) or "the file"


def config_problems(exc: ValidationError, file: str) -> list[str]:
    """A coordinator config file's validation errors, one line each."""
    return [f"{file}: {_path(e['loc'])}: {_msg(e)}" for e in exc.errors()]


def fleet_problems(exc: ValidationError, file: str, entries: Sequence[Any]) -> list[str]:
    """A fleet file's validation errors, naming the deployment by its number
    and model: ``fleet.yaml: deployment 2 (embed-small): replicas: …``."""
    lines = []
    for e in exc.errors():
        loc = list(e["loc"])
        if loc and isinstance(loc[0], int):
            i = loc.pop(0)
            entry = entries[i] if i < len(entries) else None
            model = entry.get("model") if isinstance(entry, dict) else None
            where = f"deployment {i + 1}" + (f" ({model})" if model else "")
        else:
            where = "deployments"
        field = f"{_path(loc)}: " if loc else ""
        lines.append(f"{file}: {where}: {field}{_msg(e)}")
    return lines


def option_problems(exc: ValidationError, options: Mapping[str, str]) -> list[str]:
    """Validation errors of a request built from command-line options, naming
    the option: ``--port: …`` (``options`` maps a field to its option)."""
    lines = []
    for e in exc.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and (loc[0] == "req" or isinstance(loc[0], int)):  # the call's argument, not the field
            loc.pop(0)
        name = options.get(str(loc[0])) if loc else None
        lines.append(f"{name or _path(loc)}: {_msg(e)}")
    return lines


def model_hint(model: str, worker_type: str, listed: Iterable[str]) -> str | None:
    """When no registry lists ``model@worker_type``: the worker types the model
    is listed under, or names close to it (``listed`` are ``model@type``
    keys). None when there is nothing to suggest."""
    pairs = {tuple(key.rsplit("@", 1)) for key in listed if "@" in key}
    types = sorted(t for m, t in pairs if m == model and t != worker_type)
    if types:
        as_ = " and ".join(f"{model}@{t}" for t in types)
        return f"{model} is listed as {as_}: add --worker-type {types[0]}"
    names = sorted({m for m, _ in pairs if m not in _NOT_MODELS})
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return None


def worker_facing_url(url: str, node_ip: str | None) -> str:
    """The address a worker can use as ``controller_addr`` for a registry
    serving at ``url``: a wildcard bind (``0.0.0.0``, ``::``) becomes the IP of
    the node it runs on (``node_ip``, when known); any other host is kept."""
    scheme, sep, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    if sep and host in ("0.0.0.0", "[::]", "::") and node_ip:
        return f"{scheme}://{f'[{node_ip}]' if ':' in node_ip else node_ip}:{port}"
    return url
