"""The command line: ``coordinator`` (or ``python -m coordinator``).

    coordinator start --config coordinator.yaml      # detached: outlives the command
    coordinator config [--config F] [--set k=v ...]  # the config start would use (file, env, --set)
    coordinator status [--json] [--wide] [--watch [--interval S] [--count N]]
    coordinator apply chatgpt-test restart [--worker-type llm] [--param k=v ...]
    coordinator startup --host H --port P --model M [--worker-type llm] [--param k=v ...]
    coordinator shutdown --host H --port P --model M [--worker-type llm]
    coordinator supports [--json]
    coordinator deploy fleet.yaml [--dry-run] [--wait]   # the desired state, kept from then on
    coordinator deployments [--json]
    coordinator undeploy MODEL [--worker-type llm] [--shutdown]
    coordinator serve [--port 8100] [--host H] [--replicas N]   # OpenAI's API over the fleet
    coordinator stop [--forget]                          # deployments kept unless --forget

Every command takes ``--address`` (a Ray cluster; default: the one this machine
is part of), ``--namespace`` and ``--name``. Operations print one row per
instance and exit 1 when any instance failed; a mistake is one line on stderr
(exit 2), with ``--verbose`` for the traceback. Files and options are checked
before anything connects to Ray, and the cluster's GCS is asked once whether
it takes this shell's credentials before ``ray.init`` (``preflight``). Tables
fit the terminal's width (``tables``; ``--wide`` for every column); what a
mistake says is in ``messages``.

Why this module is long: one click command per function, each a few lines of
argument handling and a rich table; they share the connection context and the
table helpers, and reading them side by side is how the command line is kept
consistent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from coordinator.core.config import CoordinatorConfig, EmbeddedSource, GatewaySettings, Timeouts, read_yaml
from coordinator.core.config_sources import config_data, load_config as layered_config, merge, parse_assignments
from coordinator.core.deployments import Deployment, DeploymentStatus, check_distinct
from coordinator.core.errors import ConfigFileError, CoordinatorError, NoInstancesError
from coordinator.core.hosts import parse_endpoint
from coordinator.core.models import (Endpoint, WorkerApplyOutput, WorkerApplyRequest, WorkerStartupRequest,
                                     WorkerType)
from coordinator.core.naming import DEFAULT_NAME, DEFAULT_NAMESPACE
from coordinator.core.status import ClusterStatus
from coordinator.driver import preflight, tables
from coordinator.driver.messages import (config_problems, fleet_problems, model_hint, option_problems, plural,
                                         worker_facing_url)
from coordinator.driver.tables import Col

console = Console()
errors = Console(stderr=True)


class Context:
    def __init__(self, address: str | None, namespace: str, name: str, verbose: bool) -> None:
        self.address, self.namespace, self.name, self.verbose = address, namespace, name, verbose

    def options(self) -> str:
        """The ``--name``/``--namespace`` options that find this coordinator
        again, for the commands a message suggests."""
        out = "" if self.name == DEFAULT_NAME else f" --name {self.name}"
        return out + ("" if self.namespace == DEFAULT_NAMESPACE else f" --namespace {self.namespace}")

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
            problem = preflight.check(self.address)
            if problem is not None:
                raise UserError([problem])
            ray.init(address=self.address or "auto", namespace=self.namespace,
                     logging_level=logging.WARNING, log_to_driver=False)

    def cluster(self):
        from coordinator.driver.client import attach

        self.connect()
        return attach(self.name, namespace=self.namespace)


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; values are read as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise click.BadParameter(f"{pair!r}: the value is not YAML ({problem})", param_hint="--param") from None
    return out


OUTPUT_COLUMNS = [Col("worker", keep=True), Col("ok", keep=True), Col("seconds", 1), Col("message", keep=True, fold=True)]


def outputs_rows(outputs: list[WorkerApplyOutput]) -> list[list[str]]:
    return [[f"{o.host}:{o.port}", "[green]yes[/]" if o.success else "[red]no[/]",
             f"{o.timecost:.3f}" if o.timecost is not None and o.timecost >= 0 else "-", escape(o.message)]
            for o in outputs]


def _finish(outputs: list[WorkerApplyOutput], as_json: bool, title: str, wide: bool = False) -> None:
    if as_json:
        click.echo(json.dumps([o.model_dump(mode="json") for o in outputs], indent=2))
    else:
        tables.show(console, escape(title), OUTPUT_COLUMNS, outputs_rows(outputs), wide)
    if not all(o.success for o in outputs):
        sys.exit(1)


_wide = click.option("--wide", is_flag=True, help="every column, however wide the terminal")


class UserError(click.ClickException):
    """A mistake in what the user gave (a file, an option, a setting), said in
    their terms: one line each, exit 2."""

    exit_code = 2

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines

    def show(self, file: Any = None) -> None:
        for line in self.lines:
            errors.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


class _Group(click.Group):
    """Turns the errors a user can cause into one readable line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a bad option or argument: one line too, and where to look
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            errors.print(f"[red]error:[/] {escape(exc.format_message())} (see '{escape(where)} --help')",
                         highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except (CoordinatorError, ValidationError, ConnectionError, TimeoutError, OSError, ValueError) as exc:
            obj = ctx.obj
            if obj is not None and obj.verbose:
                raise
            message = str(exc).strip().splitlines()
            if isinstance(exc, ValidationError):  # one the commands did not check first: still in their terms
                message = option_problems(exc, _OPTIONS)
            # The project's own errors say what they are; a bare OSError's name helps.
            named = not isinstance(exc, (CoordinatorError, ConfigFileError, ValidationError))
            kind = f"{type(exc).__name__}: " if named else ""
            errors.print(f"[red]error:[/] {kind}{escape('; '.join(message))}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: auto)")
@click.option("--namespace", default=DEFAULT_NAMESPACE, show_default=True)
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="the coordinator's actor name")
@click.option("-v", "--verbose", is_flag=True, help="tracebacks instead of one-line errors")
@click.pass_context
def cli(ctx: click.Context, address: str | None, namespace: str, name: str, verbose: bool) -> None:
    """Drive a fleet of DB-GPT model workers through the Ray coordinator."""
    global console, errors
    # Made per invocation, so that each reads the terminal's width (or COLUMNS) as it is now.
    console, errors = Console(), Console(stderr=True)
    ctx.obj = Context(address, namespace, name, verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)


_CONFIG_HELP = ("a config file (YAML or JSON); COORDINATOR_* environment variables override it, "
                "and --set overrides both")
_SET_HELP = "a setting over the file's and the environment's: --set gateway.port=8200 (the value is YAML)"


def _load(config_path: str | None, assignments: tuple[str, ...]) -> CoordinatorConfig:
    """The config ``start`` uses — the file, the environment, ``--set`` — or
    one line per mistake in it, naming where."""
    try:
        return layered_config(config_path, overrides=parse_assignments(assignments))
    except ConfigFileError as exc:
        raise UserError([str(exc)]) from None
    except ValidationError as exc:
        from_env = any(name.startswith("COORDINATOR_") for name in os.environ)
        where = (config_path if config_path and not assignments and not from_env
                 else "the config (file, COORDINATOR_*, --set)")
        raise UserError(config_problems(exc, where)) from None
    except ValueError as exc:  # a COORDINATOR_* variable that sets nothing, a --set that is not key=value
        raise UserError([str(exc)]) from None


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help=_CONFIG_HELP)
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.pass_obj
def start(obj: Context, config_path: str | None, assignments: tuple[str, ...]) -> None:
    """Start the coordinator and its watchers, detached. The config is the
    file's, then the environment's (COORDINATOR_*), then --set's."""
    from coordinator.driver.install import start as start_coordinator

    config = _load(config_path, assignments)
    obj.connect()
    cluster = start_coordinator(config, name=obj.name, namespace=obj.namespace, detached=True,
                                advice=f"'coordinator{obj.options()} status' shows it as it is; "
                                       f"'coordinator{obj.options()} stop' first to start it with this config")
    console.print(f"coordinator [bold]{escape(obj.name)}[/] running in namespace [bold]{escape(obj.namespace)}[/]")
    for w in cluster.status().watchers:
        # An embedded registry's address for workers follows on its own line.
        what = f"registry {w.source}" if w.kind == "embedded" else f"{w.kind} {w.target}"
        console.print(f"  watching {escape(what)}: {plural(w.instances, 'instance')}", highlight=False)
    for source in config.registries:
        if isinstance(source, EmbeddedSource):
            url = worker_facing_url(cluster.registry_url(source.name), _registry_node_ip(obj, source.name))
            console.print(f"  registry {escape(source.name)} for workers (their controller_addr): "
                          f"[bold]{escape(url)}[/]")


def _registry_node_ip(obj: Context, source: str) -> str | None:
    """The IP of the node an embedded registry runs on (None: not found out)."""
    import ray

    from coordinator.core.naming import registry_actor

    try:
        actor = ray.get_actor(registry_actor(obj.name, source), namespace=obj.namespace)
        return ray.get(actor.__ray_call__.remote(lambda self: ray.util.get_node_ip_address()), timeout=5)
    except Exception:  # only a nicer address is lost: this node's, then
        return ray.util.get_node_ip_address()


@cli.command("config")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help=_CONFIG_HELP)
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--all", "everything", is_flag=True, help="also the settings left at their defaults")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML")
def show_config(config_path: str | None, assignments: tuple[str, ...], everything: bool, as_json: bool) -> None:
    """Print the config 'start' would use (file, environment, --set), validated.
    Secrets show where they are read from, never their values. Needs no Ray."""
    data = _load(config_path, assignments).model_dump(mode="json", exclude_unset=not everything)
    click.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False).rstrip())


def gateway_settings(config_path: str | None, **options: Any) -> GatewaySettings:
    """What ``serve`` starts: the file's ``gateway:`` section, the
    ``COORDINATOR_GATEWAY__*`` variables over it, the options given over both."""
    try:
        section = config_data(config_path).get("gateway")
    except ConfigFileError as exc:
        raise UserError([str(exc)]) from None
    except ValueError as exc:
        raise UserError([str(exc)]) from None
    if config_path is not None and section is None:
        raise click.UsageError(f"{config_path} has no gateway: section (nor COORDINATOR_GATEWAY variables)")
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return GatewaySettings.model_validate(merge(section or {}, given))
    except ValidationError as exc:
        where = f"{config_path}: gateway" if config_path else "gateway (COORDINATOR_GATEWAY__*, options)"
        raise UserError(config_problems(exc, where)) from None


@cli.command()
@click.option("--port", type=click.IntRange(0, 65535), default=None, show_default="8100",
              help="port to serve OpenAI's API on (0: any free port)")
@click.option("--host", default=None, show_default="127.0.0.1",
              help="address to serve on (a non-loopback one needs gateway.api_keys)")
@click.option("--replicas", type=click.IntRange(1, 64), default=None, show_default="1",
              help="gateway actors, spread over the Ray nodes")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a coordinator config file whose gateway: section to use (API keys, TLS, limits); "
                   "COORDINATOR_GATEWAY__* variables override it, and the options above override both")
@click.pass_obj
def serve(obj: Context, port: int | None, host: str | None, replicas: int | None, config_path: str | None) -> None:
    """Serve OpenAI's API over the fleet (the gateway), kept with the coordinator."""
    settings = gateway_settings(config_path, port=port, host=host, replicas=replicas)  # checked before Ray
    url = obj.cluster().serve(settings=settings)
    console.print(f"gateway serving OpenAI's API at [bold]{escape(url)}/v1[/] "
                  f"(and {escape(url)}/api/v1); point an OpenAI client's base_url there")


@cli.command()
@click.option("--forget", is_flag=True, help="also delete its deployments (kept by default for the next start)")
@click.pass_obj
def stop(obj: Context, forget: bool) -> None:
    """Remove the coordinator, its watchers and its embedded registries, also
    when the coordinator no longer answers. Its deployments stay kept, and the
    next start of this name takes them up again, unless --forget."""
    from coordinator.driver.install import stop as stop_coordinator

    obj.connect()
    removed = stop_coordinator(obj.name, namespace=obj.namespace, forget=forget)
    if obj.name in removed:
        console.print(f"coordinator {escape(obj.name)} stopped")
    elif removed:
        console.print(f"coordinator {escape(obj.name)} was not running; removed what was left of it: "
                      f"{escape(', '.join(removed))}")
    else:
        console.print(f"no coordinator {escape(obj.name)} in namespace {escape(obj.namespace)}: nothing to stop")
    if forget:
        console.print("its deployments are forgotten")
    elif removed:
        console.print(f"its deployments are kept: 'coordinator start' with the name {escape(obj.name)} takes them "
                      f"up again ('coordinator stop --forget' deletes them)")


def _target_lines(target: str) -> str:
    """A watcher's target, one address a line: ``ray actor 'x' (http://…)``
    and comma-separated controller URLs take two lines, never one cut."""
    return escape(target.replace(", ", "\n").replace(" (", "\n("))


INSTANCE_COLUMNS = [Col("model", keep=True), Col("type", 3), Col("worker", keep=True), Col("registry", 4),
                    Col("probe", keep=True, fold=True), Col("in flight", 1), Col("last heartbeat", 0)]
WATCHER_COLUMNS = [Col("source", keep=True), Col("kind", 1), Col("target", keep=True), Col("version", 0),
                   Col("instances", 3), Col("refused", 2, fold=True), Col("state", 4),
                   Col("last error", keep=True, fold=True)]


def status_view(st: ClusterStatus, width: int, wide: bool = False) -> list[RenderableType]:
    """What ``coordinator status`` prints, for a terminal ``width`` columns
    wide: instances, requests waiting, watchers, operations."""
    parts: list[RenderableType] = []
    if st.page_url:  # the fleet page: the same, live, in a browser
        parts.append(Text(f"fleet page: {st.page_url}"))
    reporting = f", in flight as {st.load_reporters} caller(s) report" if st.load_reporters else ""
    rows = []
    for r in sorted(st.instances, key=lambda r: (r.model, r.worker_type, r.host, r.port)):
        probe = {True: "[green]reachable[/]", False: f"[red]unreachable[/] {escape(r.probe_error or '')}",
                 None: "-"}[r.reachable]
        # Names come from registries: printed as text, never read as markup.
        rows.append([escape(r.model), escape(r.worker_type), f"{r.host}:{r.port}",
                     "[yellow]draining[/]" if r.draining else
                     "[green]healthy[/]" if r.registry_healthy else "[red]unhealthy[/]", probe, str(r.in_flight),
                     r.last_heartbeat.strftime("%H:%M:%S") if r.last_heartbeat else "-"])
    if rows:
        parts += tables.render(f"instances ({escape(st.name)}{reporting})", INSTANCE_COLUMNS, rows, width, wide)
    else:
        parts.append(Text(f"instances ({st.name}): none yet — no registry lists a worker"))
    if st.waiting:
        rows = [[escape(key), str(n)] for key, n in sorted(st.waiting.items())]
        parts += tables.render("requests waiting (for an instance, or under flow control)",
                               [Col("model", keep=True), Col("waiting", keep=True)], rows, width, wide)
    rows = []
    for w in st.watchers:
        state = "[red]stale[/]" if w.stale else ("[green]fresh[/]" if w.ready else "starting")
        refused = "\n".join([str(w.rejected_entries), *map(escape, w.rejected_examples)]) if w.rejected_entries else ""
        rows.append([escape(w.source), w.kind, _target_lines(w.target), str(w.version), str(w.instances), refused,
                     state, escape(w.last_error or "")])
    parts += tables.render("watchers", WATCHER_COLUMNS, rows, width, wide)
    if st.busy_keys:
        # one running each; the waiting ones behind it
        rows = [[escape(key), str(st.queued.get(key, 0))] for key in st.busy_keys]
        parts += tables.render("operations", [Col("model", keep=True), Col("waiting", keep=True)], rows, width, wide)
    return parts


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_wide
@click.option("--watch", is_flag=True, help="refresh in place until Ctrl-C")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, metavar="SECONDS",
              help="seconds between refreshes with --watch")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="with --watch: stop after this many refreshes")
@click.pass_obj
def status(obj: Context, as_json: bool, wide: bool, watch: bool, interval: float, count: int | None) -> None:
    """Instances with registry health and probe state; watchers with freshness."""
    if watch and as_json:
        raise click.UsageError("--watch refreshes a table; use --json without it")
    cluster = obj.cluster()
    if not watch:
        st = cluster.status()
        if as_json:
            click.echo(st.model_dump_json(indent=2))
            return
        tables.print_all(console, status_view(st, console.width, wide), wide)
        return
    shown = 0
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                view = status_view(cluster.status(), console.width, wide)
                stamp = Text(f"every {interval:g} s, last at {time.strftime('%H:%M:%S')} (Ctrl-C to stop)",
                             style="dim")
                live.update(Group(*view, stamp), refresh=True)
                shown += 1
                if count is not None and shown >= count:
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        return


_worker_type = click.option("--worker-type", type=click.Choice([t.value for t in WorkerType]), default="llm",
                            show_default=True)


@cli.command()
@click.argument("model")
@click.argument("apply_type", type=click.Choice(["start", "stop", "restart", "update_params"]))
@_worker_type
@click.option("--param", "params", multiple=True, help="key=value, repeatable (update_params)")
@click.option("--max-unavailable", type=click.IntRange(min=1),
              help="roll through batches of at most this many instances")
@click.option("--health-timeout", type=click.FloatRange(min=0, min_open=True),
              help="seconds a batch has to come back healthy")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              help="seconds each instance is drained at most before a stop, restart or update_params "
                   "(default: the config's drain.timeout; 0: no drain)")
@click.option("--dry-run", is_flag=True, help="print the plan; send nothing")
@click.option("--json", "as_json", is_flag=True)
@_wide
@click.pass_obj
def apply(obj: Context, model: str, apply_type: str, worker_type: str, params: tuple[str, ...],
          max_unavailable: int | None, health_timeout: float | None, drain_timeout: float | None, dry_run: bool,
          as_json: bool, wide: bool) -> None:
    """Apply an operation to every instance of MODEL (all at once, or rolling)."""
    kwargs = dict(worker_type=worker_type, params=_params(params) or None, max_unavailable=max_unavailable,
                  health_timeout=health_timeout, drain_timeout=drain_timeout)
    _check_request(WorkerApplyRequest, {"model": model, "apply_type": apply_type, "worker_type": worker_type,
                                        "params": kwargs["params"] or {}})
    cluster = obj.cluster()
    with _model_hints(cluster, model, worker_type):
        if dry_run:
            plan = cluster.apply(model, apply_type, dry_run=True, **kwargs)
        elif max_unavailable is None or as_json:
            result = cluster.apply(model, apply_type, **kwargs)
        else:
            result = asyncio.run(_apply_with_progress(cluster, model, apply_type, kwargs))
    if dry_run:
        if as_json:
            click.echo(plan.model_dump_json(indent=2))
            return
        rows = [[str(i), ", ".join(f"{h}:{p}" for h, p in batch)] for i, batch in enumerate(plan.batches, 1)]
        tables.show(console, f"plan: {apply_type} {escape(plan.key)}, {plural(plan.instances, 'instance')} "
                             f"(nothing sent)", [Col("batch", keep=True), Col("instances", keep=True, fold=True)],
                    rows, wide)
        return
    if apply_type == "stop":
        _note_if_deployed(cluster, model, worker_type)
    _finish(result.outputs, as_json, f"{apply_type} {model}@{worker_type}", wide)


#: The options a request's fields come from, for messages about them.
_OPTIONS = {"host": "--host", "port": "--port", "model": "the model name", "worker_type": "--worker-type",
            "params": "--param", "apply_type": "the operation"}


def _check_request(model_class: type[BaseModel], fields: dict[str, Any]) -> None:
    """Validate a request built from the options before connecting to Ray:
    a mistake is one line naming the option, exit 2."""
    try:
        model_class.model_validate(fields)
    except ValidationError as exc:
        raise UserError(option_problems(exc, _OPTIONS)) from None


@contextmanager
def _model_hints(cluster, model: str, worker_type: str) -> Iterator[None]:
    """A model no registry lists under that worker type: say which types it is
    listed under, or which names are close."""
    try:
        yield
    except NoInstancesError as exc:
        try:
            listed = {i.model_name for i in cluster.instances(healthy_only=False)}
        except CoordinatorError:
            raise exc from None
        hint = model_hint(model, worker_type, listed)
        if hint is None:
            raise
        raise CoordinatorError(f"{exc}; {hint}") from exc


def _note_if_deployed(cluster, model: str, worker_type: str) -> None:
    """After a stop or shutdown: a deployed model comes back, and the operator
    should hear it here rather than discover it later."""
    key = f"{model}@{worker_type}"
    kept = next((d for d in cluster.deployments() if d.key == key), None)
    if kept is not None and kept.replicas > 0:
        errors.print(f"note: {escape(key)} is deployed ({plural(kept.replicas, 'replica')}): the coordinator starts it "
                     f"again to keep that count. To keep it stopped: coordinator undeploy {escape(model)}"
                     f"{'' if worker_type == 'llm' else ' --worker-type ' + escape(worker_type)}", highlight=False)


async def _apply_with_progress(cluster, model: str, apply_type: str, kwargs: dict):
    """Run a rolling apply and show one progress bar, batch by batch."""
    key = f"{model}@{kwargs['worker_type']}"
    task = asyncio.ensure_future(cluster.aio.apply(model, apply_type, **kwargs))
    with Progress(console=console, transient=False) as progress:
        bar = progress.add_task(f"{apply_type} {key}", total=None)
        while not task.done():
            rollout = next((r for r in (await cluster.aio.status()).rollouts if r.key == key), None)
            if rollout is not None:
                current = ", ".join(f"{h}:{p}" for h, p in rollout.current)
                progress.update(bar, total=rollout.batches, completed=rollout.done,
                                description=f"{apply_type} {key}: {rollout.phase} [{current}]")
            await asyncio.wait([task], timeout=0.3)
        result = task.result()
        progress.update(bar, total=1, completed=1, description=f"{apply_type} {key}: done")
    return result


def _lifecycle(op: str):
    @click.option("--host", required=True)
    @click.option("--port", required=True, type=int)
    @click.option("--model", required=True)
    @_worker_type
    @click.option("--param", "params", multiple=True, help="key=value, repeatable")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def command(obj: Context, host: str, port: int, model: str, worker_type: str,
                params: tuple[str, ...], as_json: bool, drain_timeout: float | None = None) -> None:
        req = {"host": host, "port": port, "model": model, "worker_type": worker_type, "params": _params(params)}
        _check_request(WorkerStartupRequest, req)
        cluster = obj.cluster()
        output = cluster.shutdown(req, drain_timeout=drain_timeout) if op == "shutdown" else cluster.startup(req)
        if op == "shutdown":
            _note_if_deployed(cluster, model, worker_type)
        _finish([output], as_json, f"{op} {model}@{worker_type} on {host}:{port}")

    command.__doc__ = f"{op.capitalize()} a model on the worker manager at HOST:PORT."
    if op == "shutdown":
        command = click.option("--drain-timeout", type=click.FloatRange(min=0),
                               help="seconds the instance is drained at most first (default: the config's "
                                    "drain.timeout; 0: no drain)")(command)
    return cli.command(name=op)(command)


_lifecycle("startup")
_lifecycle("shutdown")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@_wide
@click.pass_obj
def supports(obj: Context, as_json: bool, wide: bool) -> None:
    """Models every healthy worker manager can run."""
    outcomes = obj.cluster().supports()
    if as_json:
        click.echo(json.dumps([o.model_dump(mode="json") for o in outcomes], indent=2))
    else:
        rows = []
        for o in outcomes:
            worker = f"{o.endpoint[0]}:{o.endpoint[1]}"
            if o.error:
                rows.append([worker, "", "", "", f"[red]{escape(o.error)}[/]"])
            for wsm in o.models:
                for m in wsm.models:
                    rows.append([worker, escape(m.model), escape(m.worker_type), escape(m.provider or ""), ""])
        cols = [Col("worker", keep=True), Col("model", keep=True), Col("type", 2), Col("provider", 1),
                Col("error", keep=True, fold=True)]
        tables.show(console, "supported models", cols, rows, wide)
        if not rows:
            console.print("no worker manager answered: no registry lists one, or none is healthy")
    if any(o.error for o in outcomes):
        sys.exit(1)


def read_deployments(path: str) -> list[Deployment]:
    """A fleet file: ``deployments: [...]`` (or a bare list), validated; a
    mistake is :class:`UserError`, one line each naming the file, the
    deployment and the field."""
    data = read_yaml_input(path)
    if isinstance(data, dict):
        data = data.get("deployments")
    if not isinstance(data, list) or not data:
        raise UserError([f"{path}: want a non-empty 'deployments:' list"])
    try:
        specs = TypeAdapter(list[Deployment]).validate_python(data)
        check_distinct(specs)
    except ValidationError as exc:
        raise UserError(fleet_problems(exc, path, data)) from None
    except ValueError as exc:
        raise UserError([f"{path}: {exc}"]) from None
    return specs


def read_yaml_input(path: str) -> object:
    try:
        return read_yaml(path)
    except ConfigFileError as exc:
        raise UserError([str(exc)]) from None


#: Seconds between two looks at the deployments while ``deploy --wait`` waits.
WAIT_POLL = 0.5


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="print the actions a round would take now; send nothing, keep nothing")
@click.option("--wait", is_flag=True,
              help="show each deployment's progress until all are ready; exit 1 if one is stuck (no eligible "
                   "worker manager) or time runs out")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help=f"seconds --wait waits (default: the coordinator's timeouts.startup, "
                   f"{Timeouts.model_fields['startup'].default:g} s unless its config says otherwise)")
@_wide
@click.pass_obj
def deploy(obj: Context, file: str, dry_run: bool, wait: bool, timeout: float | None, wide: bool) -> None:
    """Keep the deployments in FILE: N replicas of each model, healed and restored."""
    specs = read_deployments(file)
    cluster = obj.cluster()
    _note_unknown_hosts(cluster, specs)
    if dry_run:
        rows = []
        for key, decision in cluster.plan(*specs):
            for action in decision.actions:
                rows.append([escape(key), action.kind, str(action.endpoint or "every instance, rolling"),
                             escape(action.reason)])
            if not decision.actions:
                rows.append([escape(key), "-", "", escape(decision.why or f"nothing to do ({decision.state})")])
        cols = [Col("deployment", keep=True), Col("action", keep=True), Col("worker", keep=True, fold=True),
                Col("why", keep=True, fold=True)]
        tables.show(console, "plan (nothing sent)", cols, rows, wide)
        return
    generations = cluster.deploy(*specs)
    for spec, generation in zip(specs, generations):
        console.print(f"deployed {escape(spec.key)}: {plural(spec.replicas, 'replica')} (generation {generation})")
    if not wait:
        return
    wanted = {spec.key: generation for spec, generation in zip(specs, generations)}
    limit = timeout if timeout is not None else cluster.config.timeouts.startup
    verdict, found = _wait_with_progress(cluster, wanted, limit)
    _deployments_table(found, wide)
    if verdict is not None:
        errors.print(f"[red]not ready:[/] {escape(verdict)}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _note_unknown_hosts(cluster, specs: list[Deployment]) -> None:
    """A ``hosts`` entry no registry lists as a worker manager is most likely
    a typo: say so before anything waits on it."""
    if not any(spec.hosts for spec in specs):
        return
    listed = {i.endpoint for i in cluster.instances(model="WorkerManager", worker_type="service", healthy_only=False)}
    for spec in specs:
        for entry in spec.hosts or ():
            if Endpoint(*parse_endpoint(entry)) not in listed:
                errors.print(f"note: {escape(spec.key)}: hosts entry {escape(entry)} is not a worker manager any "
                             f"registry lists", highlight=False, soft_wrap=True)


def wait_verdict(found: list[DeploymentStatus], wanted: dict[str, int]) -> tuple[bool, str | None]:
    """Whether every wanted deployment is ready at its generation, and, when
    waiting cannot help (one is stuck, or no longer deployed), why not."""
    by_key = {d.key: d for d in found}
    done = True
    for key, generation in wanted.items():
        d = by_key.get(key)
        if d is None:
            return False, f"{key} is no longer deployed"
        current = d.observed_generation >= generation
        if current and d.stuck:
            return False, f"{key} is stuck: {d.last_error or f'{d.ready} of {d.replicas} ready, {d.state}'}"
        done = done and current and d.state == "ready"
    return done, None


def _line(d: DeploymentStatus | None, key: str) -> str:
    if d is None:
        return f"{escape(key)}: waiting for its status"
    why = f" — {escape(d.last_error)}" if d.last_error and d.state != "ready" else ""
    return f"{escape(key)}: {d.ready}/{d.replicas} ready, {d.state}{why}"


def _wait_with_progress(cluster, wanted: dict[str, int], limit: float) -> tuple[str | None, list[DeploymentStatus]]:
    """Poll the deployments, one progress line each (ready x/y, state, last
    error), until all are ready at their generation, one is stuck, or
    ``limit`` seconds pass. Why it stopped short (None: all ready), and the
    statuses last seen."""
    deadline = time.monotonic() + limit
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bars = {key: progress.add_task(escape(key), total=None) for key in wanted}
        while True:
            found = cluster.deployments()
            by_key = {d.key: d for d in found}
            for key, bar in bars.items():
                d = by_key.get(key)
                progress.update(bar, description=_line(d, key), total=d.replicas if d else None,
                                completed=d.ready if d else 0)
            done, why = wait_verdict(found, wanted)
            if done or why is not None:
                return why, found
            if time.monotonic() >= deadline:
                late = [_line(by_key.get(k), k) for k in wanted
                        if k not in by_key or by_key[k].state != "ready"
                        or by_key[k].observed_generation < wanted[k]]
                return f"after {limit:g} s: {'; '.join(late) or 'not observed yet'}", found
            time.sleep(WAIT_POLL)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@_wide
@click.pass_obj
def deployments(obj: Context, as_json: bool, wide: bool) -> None:
    """Every deployment: desired and ready replicas, state, instances, last error."""
    found = obj.cluster().deployments()
    if as_json:
        click.echo(json.dumps([d.model_dump(mode="json") for d in found], indent=2))
    else:
        _deployments_table(found, wide)
    if any(d.state == "failing" for d in found):
        sys.exit(1)


DEPLOYMENT_COLUMNS = [Col("deployment", keep=True), Col("desired", 2), Col("ready", keep=True), Col("state", 3),
                      Col("instances", keep=True), Col("last error", keep=True, fold=True)]
_COLOUR = {"ready": "green", "progressing": "yellow", "degraded": "red", "failing": "red"}


def deployments_rows(found: list[DeploymentStatus]) -> list[list[str]]:
    return [[escape(d.key), str(d.replicas), str(d.ready), f"[{_COLOUR[d.state]}]{d.state}[/]",
             "\n".join(d.instances), escape(d.last_error or "")] for d in found]


def _deployments_table(found: list[DeploymentStatus], wide: bool = False) -> None:
    if not found:
        console.print("no deployments ('coordinator deploy FILE' keeps some)")
        return
    tables.show(console, "deployments", DEPLOYMENT_COLUMNS, deployments_rows(found), wide)


@cli.command()
@click.argument("model")
@_worker_type
@click.option("--shutdown", is_flag=True, help="stop every instance of it first")
@click.pass_obj
def undeploy(obj: Context, model: str, worker_type: str, shutdown: bool) -> None:
    """Stop keeping MODEL; its instances keep running unless --shutdown."""
    last = obj.cluster().undeploy(model, worker_type=worker_type, shutdown=shutdown)
    kept = "stopped" if shutdown else f"left running ({last.ready} ready)"
    console.print(f"undeployed {escape(last.key)}: its instances {kept}")


def main() -> None:
    cli(prog_name="coordinator")
