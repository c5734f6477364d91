"""The command line: ``coordinator`` (or ``python -m coordinator``).

    coordinator start --config coordinator.yaml      # detached: outlives the command
    coordinator status [--json]
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
(exit 2), with ``--verbose`` for the traceback.

Why this module is long: one click command per function, each a few lines of
argument handling and a rich table; they share the connection context and the
table helpers, and reading them side by side is how the command line is kept
consistent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import click
import yaml
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.core.config import CoordinatorConfig, GatewaySettings, Timeouts
from coordinator.core.deployments import Deployment, DeploymentStatus, check_distinct
from coordinator.core.errors import CoordinatorError
from coordinator.core.hosts import parse_endpoint
from coordinator.core.models import Endpoint, WorkerApplyOutput
from coordinator.core.naming import DEFAULT_NAME, DEFAULT_NAMESPACE

console = Console()
errors = Console(stderr=True)


class Context:
    def __init__(self, address: str | None, namespace: str, name: str, verbose: bool) -> None:
        self.address, self.namespace, self.name, self.verbose = address, namespace, name, verbose

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
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
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _outputs_table(title: str, outputs: list[WorkerApplyOutput]) -> Table:
    table = Table(title=title)
    for col in ("worker", "ok", "seconds", "message"):
        table.add_column(col)
    for o in outputs:
        table.add_row(f"{o.host}:{o.port}", "[green]yes[/]" if o.success else "[red]no[/]",
                      f"{o.timecost:.3f}" if o.timecost is not None and o.timecost >= 0 else "-", escape(o.message))
    return table


def _finish(outputs: list[WorkerApplyOutput], as_json: bool, title: str) -> None:
    if as_json:
        click.echo(json.dumps([o.model_dump(mode="json") for o in outputs], indent=2))
    else:
        console.print(_outputs_table(title, outputs))
    if not all(o.success for o in outputs):
        sys.exit(1)


class _Group(click.Group):
    """Turns the errors a user can cause into one readable line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CoordinatorError, ValidationError, ConnectionError, TimeoutError, OSError, ValueError) as exc:
            obj = ctx.obj
            if obj is not None and obj.verbose:
                raise
            message = str(exc).strip().splitlines()
            if isinstance(exc, ValidationError):
                message = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            errors.print(f"[red]error:[/] {type(exc).__name__}: {escape('; '.join(message))}", highlight=False,
                         soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: auto)")
@click.option("--namespace", default=DEFAULT_NAMESPACE, show_default=True)
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="the coordinator's actor name")
@click.option("-v", "--verbose", is_flag=True, help="tracebacks instead of one-line errors")
@click.pass_context
def cli(ctx: click.Context, address: str | None, namespace: str, name: str, verbose: bool) -> None:
    """Drive a fleet of DB-GPT model workers through the Ray coordinator."""
    ctx.obj = Context(address, namespace, name, verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def start(obj: Context, config_path: str) -> None:
    """Start the coordinator and its watchers, detached."""
    from coordinator.driver.install import start as start_coordinator

    config = CoordinatorConfig.from_file(config_path)
    obj.connect()
    cluster = start_coordinator(config, name=obj.name, namespace=obj.namespace, detached=True)
    console.print(f"coordinator [bold]{obj.name}[/] running in namespace [bold]{obj.namespace}[/]")
    for w in cluster.status().watchers:
        console.print(f"  watching {w.kind} {w.target}: {w.instances} instances")


@cli.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8100, show_default=True,
              help="port to serve OpenAI's API on (0: any free port)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to serve on (a non-loopback one needs --config with gateway.api_keys)")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="gateway actors, spread over the Ray nodes")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a coordinator config file whose gateway: section to use (API keys, TLS, limits)")
@click.pass_obj
def serve(obj: Context, port: int, host: str, replicas: int, config_path: str | None) -> None:
    """Serve OpenAI's API over the fleet (the gateway), kept with the coordinator."""
    settings: dict | GatewaySettings = {"port": port, "host": host, "replicas": replicas}
    if config_path is not None:
        section = CoordinatorConfig.from_file(config_path).gateway
        if section is None:
            raise click.UsageError(f"{config_path} has no gateway: section")
        settings = section
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Instances with registry health and probe state; watchers with freshness."""
    st = obj.cluster().status()
    if as_json:
        click.echo(st.model_dump_json(indent=2))
        return
    if st.page_url:  # the fleet page: the same, live, in a browser
        click.echo(f"fleet page: {st.page_url}")
    reporting = f", in flight as {st.load_reporters} caller(s) report" if st.load_reporters else ""
    table = Table(title=f"instances ({st.name}{reporting})")
    for col in ("model", "type", "worker", "registry", "probe", "in flight", "last heartbeat"):
        table.add_column(col)
    for r in sorted(st.instances, key=lambda r: (r.model, r.worker_type, r.host, r.port)):
        probe = {True: "[green]reachable[/]", False: f"[red]unreachable[/] {escape(r.probe_error or '')}",
                 None: "-"}[r.reachable]
        # Names come from registries: printed as text, never read as markup.
        table.add_row(escape(r.model), escape(r.worker_type), f"{r.host}:{r.port}",
                      "[yellow]draining[/]" if r.draining else
                      "[green]healthy[/]" if r.registry_healthy else "[red]unhealthy[/]", probe, str(r.in_flight),
                      r.last_heartbeat.strftime("%H:%M:%S") if r.last_heartbeat else "-")
    console.print(table)
    if st.waiting:
        table = Table(title="requests waiting for an instance (scaling from zero)")
        for col in ("model", "waiting"):
            table.add_column(col)
        for key, n in sorted(st.waiting.items()):
            table.add_row(escape(key), str(n))
        console.print(table)
    table = Table(title="watchers")
    for col in ("source", "kind", "target", "version", "instances", "refused", "state", "last error"):
        table.add_column(col)
    for w in st.watchers:
        state = "[red]stale[/]" if w.stale else ("[green]fresh[/]" if w.ready else "starting")
        refused = "\n".join([str(w.rejected_entries), *map(escape, w.rejected_examples)]) if w.rejected_entries else "0"
        table.add_row(escape(w.source), w.kind, escape(w.target), str(w.version), str(w.instances), refused,
                      state, escape(w.last_error or ""))
    console.print(table)
    if st.busy_keys:
        table = Table(title="operations")
        for col in ("model", "waiting"):
            table.add_column(col)
        for key in st.busy_keys:  # one running each; the waiting ones behind it
            table.add_row(escape(key), str(st.queued.get(key, 0)))
        console.print(table)


@cli.command()
@click.argument("model")
@click.argument("apply_type", type=click.Choice(["start", "stop", "restart", "update_params"]))
@click.option("--worker-type", default="llm", show_default=True)
@click.option("--param", "params", multiple=True, help="key=value, repeatable (update_params)")
@click.option("--max-unavailable", type=int, help="roll through batches of at most this many instances")
@click.option("--health-timeout", type=float, help="seconds a batch has to come back healthy")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              help="seconds each instance is drained at most before a stop, restart or update_params "
                   "(default: the config's drain.timeout; 0: no drain)")
@click.option("--dry-run", is_flag=True, help="print the plan; send nothing")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def apply(obj: Context, model: str, apply_type: str, worker_type: str, params: tuple[str, ...],
          max_unavailable: int | None, health_timeout: float | None, drain_timeout: float | None, dry_run: bool,
          as_json: bool) -> None:
    """Apply an operation to every instance of MODEL (all at once, or rolling)."""
    cluster = obj.cluster()
    kwargs = dict(worker_type=worker_type, params=_params(params) or None, max_unavailable=max_unavailable,
                  health_timeout=health_timeout, drain_timeout=drain_timeout)
    if dry_run:
        plan = cluster.apply(model, apply_type, dry_run=True, **kwargs)
        if as_json:
            click.echo(plan.model_dump_json(indent=2))
            return
        table = Table(title=f"plan: {apply_type} {plan.key}, {plan.instances} instances (nothing sent)")
        table.add_column("batch")
        table.add_column("instances")
        for i, batch in enumerate(plan.batches, 1):
            table.add_row(str(i), ", ".join(f"{h}:{p}" for h, p in batch))
        console.print(table)
        return
    if max_unavailable is None or as_json:
        result = cluster.apply(model, apply_type, **kwargs)
    else:
        result = asyncio.run(_apply_with_progress(cluster, model, apply_type, kwargs))
    if apply_type == "stop":
        _note_if_deployed(cluster, model, worker_type)
    _finish(result.outputs, as_json, f"{apply_type} {model}@{worker_type}")


def _note_if_deployed(cluster, model: str, worker_type: str) -> None:
    """After a stop or shutdown: a deployed model comes back, and the operator
    should hear it here rather than discover it later."""
    key = f"{model}@{worker_type}"
    kept = next((d for d in cluster.deployments() if d.key == key), None)
    if kept is not None and kept.replicas > 0:
        errors.print(f"note: {escape(key)} is deployed ({kept.replicas} replicas): the coordinator starts it "
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
    @click.option("--worker-type", default="llm", show_default=True)
    @click.option("--param", "params", multiple=True, help="key=value, repeatable")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def command(obj: Context, host: str, port: int, model: str, worker_type: str,
                params: tuple[str, ...], as_json: bool, drain_timeout: float | None = None) -> None:
        req = {"host": host, "port": port, "model": model, "worker_type": worker_type, "params": _params(params)}
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
@click.pass_obj
def supports(obj: Context, as_json: bool) -> None:
    """Models every healthy worker manager can run."""
    outcomes = obj.cluster().supports()
    if as_json:
        click.echo(json.dumps([o.model_dump(mode="json") for o in outcomes], indent=2))
    else:
        table = Table(title="supported models")
        for col in ("worker", "model", "type", "provider", "error"):
            table.add_column(col)
        for o in outcomes:
            worker = f"{o.endpoint[0]}:{o.endpoint[1]}"
            if o.error:
                table.add_row(worker, "", "", "", f"[red]{escape(o.error)}[/]")
            for wsm in o.models:
                for m in wsm.models:
                    table.add_row(worker, escape(m.model), escape(m.worker_type), escape(m.provider or ""), "")
        console.print(table)
    if any(o.error for o in outcomes):
        sys.exit(1)


def read_deployments(path: str) -> list[Deployment]:
    """A fleet file: ``deployments: [...]`` (or a bare list), validated."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        data = data.get("deployments")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: want a non-empty 'deployments:' list")
    specs = TypeAdapter(list[Deployment]).validate_python(data)
    check_distinct(specs)
    return specs


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
@click.pass_obj
def deploy(obj: Context, file: str, dry_run: bool, wait: bool, timeout: float | None) -> None:
    """Keep the deployments in FILE: N replicas of each model, healed and restored."""
    specs = read_deployments(file)
    cluster = obj.cluster()
    _note_unknown_hosts(cluster, specs)
    if dry_run:
        table = Table(title="plan (nothing sent)")
        for col in ("deployment", "action", "worker", "why"):
            table.add_column(col)
        for key, decision in cluster.plan(*specs):
            for action in decision.actions:
                table.add_row(escape(key), action.kind, str(action.endpoint or "every instance, rolling"),
                              escape(action.reason))
            if not decision.actions:
                table.add_row(escape(key), "-", "", escape(decision.why or f"nothing to do ({decision.state})"))
        console.print(table)
        return
    generations = cluster.deploy(*specs)
    for spec, generation in zip(specs, generations):
        console.print(f"deployed {escape(spec.key)}: {spec.replicas} replicas (generation {generation})")
    if not wait:
        return
    wanted = {spec.key: generation for spec, generation in zip(specs, generations)}
    limit = timeout if timeout is not None else cluster.config.timeouts.startup
    verdict, found = _wait_with_progress(cluster, wanted, limit)
    _deployments_table(found)
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
@click.pass_obj
def deployments(obj: Context, as_json: bool) -> None:
    """Every deployment: desired and ready replicas, state, instances, last error."""
    found = obj.cluster().deployments()
    if as_json:
        click.echo(json.dumps([d.model_dump(mode="json") for d in found], indent=2))
    else:
        _deployments_table(found)
    if any(d.state == "failing" for d in found):
        sys.exit(1)


def _deployments_table(found: list[DeploymentStatus]) -> None:
    table = Table(title="deployments")
    for col in ("deployment", "desired", "ready", "state", "instances", "last error"):
        table.add_column(col)
    colour = {"ready": "green", "progressing": "yellow", "degraded": "red", "failing": "red"}
    for d in found:
        table.add_row(escape(d.key), str(d.replicas), str(d.ready), f"[{colour[d.state]}]{d.state}[/]",
                      "\n".join(d.instances), escape(d.last_error or ""))
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--worker-type", default="llm", show_default=True)
@click.option("--shutdown", is_flag=True, help="stop every instance of it first")
@click.pass_obj
def undeploy(obj: Context, model: str, worker_type: str, shutdown: bool) -> None:
    """Stop keeping MODEL; its instances keep running unless --shutdown."""
    last = obj.cluster().undeploy(model, worker_type=worker_type, shutdown=shutdown)
    kept = "stopped" if shutdown else f"left running ({last.ready} ready)"
    console.print(f"undeployed {escape(last.key)}: its instances {kept}")


def main() -> None:
    cli(prog_name="coordinator")
