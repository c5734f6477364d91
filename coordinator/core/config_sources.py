"""Where a configuration comes from, and which source wins: a file, then the
environment, then explicit settings (a command's options, ``overrides=``)::

    COORDINATOR_GATEWAY__PORT=8200                                gateway.port: 8200
    COORDINATOR_CALLER__REPORT_EVERY=2                            caller.report_every: 2
    COORDINATOR_REGISTRIES='[{"kind": "embedded", "port": 0}]'    a list: JSON, whole
    COORDINATOR_PLACEMENT__HOST_RESOURCES='{"10.0.0.7": "gpu-a"}' a mapping: JSON, or a key per variable

Every field of :class:`CoordinatorConfig` has its variable: ``COORDINATOR_``,
then the field's path with ``__`` between the levels, in any case. A list, a
mapping or a whole section is given as JSON. pydantic-settings'
``EnvSettingsSource`` reads the variables; the sources are merged here,
mappings key by key (``COORDINATOR_GATEWAY__PORT`` keeps the file's other
``gateway:`` keys), a list replacing the one below it whole.

Why ``CoordinatorConfig`` is not itself a ``BaseSettings``: a settings model
reads the environment each time it is built, in whatever process builds it.
Every ``CoordinatorConfig(...)`` in a driver, a test or an actor would take
the variables of its own process. Here the environment is read once, on the
driver, where a caller asks for it (:func:`load_config`, the command line).
What results is a plain model. It travels to the actors as it is, pickled,
with its secrets' values, and nothing there reads the environment again: an
actor's own ``COORDINATOR_*`` variables change nothing. A config built in
Python (``CoordinatorConfig(...)``, a dict given to ``coordinator.start``) is
taken as written.

A ``COORDINATOR_*`` variable that names no setting is an error that names it
(and the nearest setting's variable). A typo must not leave a setting quietly
at its default. The variables Kubernetes sets for a Service whose name starts
with ``coordinator`` (``COORDINATOR_SERVICE_HOST``, ``COORDINATOR_PORT=tcp://…``)
are not settings, and are skipped.

Secrets stay references in the environment too:
``COORDINATOR_GATEWAY__API_KEYS='[{"env": "GATEWAY_KEYS"}]'``. A literal is
refused, and not echoed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_settings import EnvSettingsSource, SettingsError

from coordinator.core.config import CoordinatorConfig, read_config_file
from coordinator.core.secrets import Secret

ENV_PREFIX = "COORDINATOR_"
#: Between the levels of a nested setting's variable name.
NESTED = "__"

#: Kubernetes' service links for a Service named ``coordinator…``: its host,
#: its port numbers, and ``…_PORT`` (a URL) with its ``…_PORT_<n>_<PROTO>`` parts.
_SERVICE_HOST_OR_PORT = re.compile(r"^COORDINATOR(_[A-Z0-9_]+)?_SERVICE_(HOST|PORT(_[A-Z0-9_]+)?)$")
_SERVICE_PORT_PARTS = re.compile(r"^COORDINATOR(_[A-Z0-9_]+)?_PORT_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?$")
_SERVICE_PORT_URL = re.compile(r"^COORDINATOR(_[A-Z0-9_]+)?_PORT$")


def _is_service_link(name: str, value: str) -> bool:
    if NESTED in name:  # a setting's path, never a link
        return False
    if _SERVICE_HOST_OR_PORT.match(name) or _SERVICE_PORT_PARTS.match(name):
        return True
    # COORDINATOR_GATEWAY_PORT=8200 is a typo of a setting; a link's bare
    # _PORT holds a URL (tcp://10.0.0.1:8100).
    return bool(_SERVICE_PORT_URL.match(name)) and value.startswith(("tcp://", "udp://", "sctp://"))


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation allows (Optional and unions spread out, Annotated removed)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _mapping_values(annotation: Any) -> Any | None:
    for t in _unwrap(annotation):
        if typing.get_origin(t) is dict or t is dict:
            args = typing.get_args(t)
            return args[1] if args else Any
    return None


def _json_only(annotation: Any) -> bool:
    """Whether a value for this annotation can only be given as JSON (no scalar
    fits). A secret given as a plain value is left to say itself why not."""
    kinds = [t for t in _unwrap(annotation) if t is not type(None)]
    return bool(kinds) and Secret not in kinds and all(
        (isinstance(t, type) and issubclass(t, BaseModel)) or typing.get_origin(t) in (list, dict) or t in (list, dict)
        for t in kinds
    )


def _variables(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterable[str]:
    """Every setting's variable name, sections and their fields (not mapping keys)."""
    for name, field in model.model_fields.items():
        here = (*path, name)
        yield ENV_PREFIX + NESTED.join(here).upper()
        for sub in _models(field.annotation):
            if sub is not model:
                yield from _variables(sub, here)


_KNOWN = sorted(set(_variables(CoordinatorConfig)))


def _check_variable(name: str, value: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless it sets a field of the config
    (or a key of a mapping in it) with a value that can be read."""
    parts = name[len(ENV_PREFIX):].split(NESTED)
    annotation: Any = CoordinatorConfig
    for depth, part in enumerate(parts):
        above = ENV_PREFIX + NESTED.join(parts[:depth]).upper()
        if models := _models(annotation):
            fields = [f for m in models for n, f in m.model_fields.items() if n == part.lower()]
            if not fields:
                near = difflib.get_close_matches(name.upper(), _KNOWN, n=1, cutoff=0.75)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ValueError(f"environment variable {name} sets nothing: the config has no setting "
                                 f"{'.'.join(p.lower() for p in parts[:depth + 1])}{hint}")
            annotation = fields[0].annotation
        elif (values := _mapping_values(annotation)) is not None:
            if part != part.lower():
                raise ValueError(f"environment variable {name}: a key inside a mapping loses its case in a "
                                 f"variable's name; give the whole mapping as JSON in {above}")
            annotation = values
        else:
            raise ValueError(f"environment variable {name} sets nothing: {above} is one value (a list is "
                             f"given whole, as JSON)")
    if _json_only(annotation):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:  # its message quotes no part of the value
            raise ValueError(f"environment variable {name} is not JSON ({exc.msg}, column {exc.colno}): "
                             f"a list, a mapping or a section is given as JSON") from None


def environment_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings ``COORDINATOR_*`` variables give, as nested data (not yet
    validated). ``environ``: the variables to read (default: this process's).
    Raises ``ValueError`` naming a variable that sets nothing or cannot be read."""
    environ = os.environ if environ is None else environ
    ours = {name: value for name, value in environ.items()
            if name.upper().startswith(ENV_PREFIX) and not _is_service_link(name.upper(), value)}
    for name, value in sorted(ours.items()):
        _check_variable(name, value)
    source = EnvSettingsSource(CoordinatorConfig, env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED,
                               case_sensitive=False)
    source.env_vars = {name.lower(): value for name, value in ours.items()}
    try:
        return source()
    except SettingsError as exc:  # names the field, never the value
        raise ValueError(f"the COORDINATOR_ environment variables: {exc}") from None


def merge(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """``below`` with ``above`` over it: mappings merged key by key, anything
    else (a value, a list) replaced."""
    out = dict(below)
    for key, value in above.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_data(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The file's data (if any), the environment's over it, ``overrides`` over
    both: merged, not yet validated."""
    data = read_config_file(path) if path is not None else {}
    return merge(merge(data, environment_settings(environ)), overrides or {})


def load_config(path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> CoordinatorConfig:
    """The config from a file (YAML or JSON, optional), the ``COORDINATOR_*``
    environment variables over it and ``overrides`` (nested like the file)
    over both; validated once, after merging, so a file may leave out what
    the environment gives (registries, API keys). Raises ``ValueError`` naming
    a variable that sets nothing, ``pydantic.ValidationError`` naming a field."""
    return CoordinatorConfig.model_validate(config_data(path, overrides, environ), context={"environ": environ})


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """``section.key=value`` pairs (``--set gateway.port=8200``) as nested data;
    values are read as YAML (numbers, booleans, lists, mappings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(f"{key.strip()!r} is not key=value with a dotted key (gateway.port=8200)")
        try:
            leaf = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ValueError(f"{key.strip()}: {value!r} is not a YAML value ({problem})") from None
        out = merge(out, _nest(path, leaf))
    return out


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    return {path[0]: _nest(path[1:], value) if len(path) > 1 else value}
