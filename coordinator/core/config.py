"""The one configuration model, built on the driver and handed to every actor.

Load it with :meth:`CoordinatorConfig.from_file` (YAML or JSON) or build it in
Python; either way a mistake raises ``pydantic.ValidationError`` naming the field,
before anything starts::

    registries:
      - kind: embedded            # the registry this project serves itself
        port: 8000
      - kind: dbgpt               # an existing DB-GPT controller (or several, HA)
        urls: ["http://10.0.0.5:8000"]
      - kind: static              # a fixed list, re-read when the file changes
        path: instances.yaml
    timeouts: {apply: 300, startup: 900}

Why this module is long: it is the one configuration model — every section a
user can write, with its validation and its documentation, in the one place a
reader looks for a setting.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from coordinator.core.errors import ConfigFileError
from coordinator.core.deployments import Deployment, check_distinct
from coordinator.core.flow import FlowPolicy, Share
from coordinator.core.hosts import parse_endpoint
from coordinator.core.models import Endpoint, ModelInstance
from coordinator.core.openai import OpenAILimits
from coordinator.core.routing.factory import RoutingSettings
from coordinator.core.secrets import Secret

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
#: An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Headers that carry credentials: never as plain text in a config.
_CREDENTIAL_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-api-key"}


class _Strict(BaseModel):
    # A typo in a config key is an error, not a silently ignored setting; an
    # error never echoes the value it refused (it may be a secret).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _check_headers(headers: dict[str, str | Secret]) -> dict[str, str | Secret]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if isinstance(value, str):
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ValueError(f"header {name!r}: the value contains a control character")
            if name.lower() in _CREDENTIAL_HEADERS:
                raise ValueError(
                    f"header {name!r} carries a credential: give it as {{env: NAME}} or {{file: PATH}} "
                    "(or use 'token' for a bearer token)"
                )
    return headers


class TlsSettings(_Strict):
    """https to workers. Without ``ca_bundle`` the system's trusted CAs are used;
    with ``client_cert`` (and ``client_key`` unless the cert file holds it) the
    proxy proves who it is (mutual TLS)."""

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Self:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("tls.client_key needs tls.client_cert")
        return self


class ServeTls(_Strict):
    """Serve https with this certificate chain and key (PEM files); with
    ``client_ca``, also require a client certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class WorkerAccess(_Strict):
    """How proxies call the workers of a source: extra headers, a bearer token,
    https. Secret values are ``{env: NAME}`` or ``{file: PATH}``."""

    token: Secret | None = None
    headers: dict[str, str | Secret] = Field(default_factory=dict)
    tls: TlsSettings | None = None

    @field_validator("headers", mode="after")
    @classmethod
    def _valid_headers(cls, headers: dict[str, str | Secret]) -> dict[str, str | Secret]:
        return _check_headers(headers)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def http_headers(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The headers to send: ``base`` (the config's global ones), these, and the
        token, with secrets revealed. For the proxy's client only."""
        out = dict(base or {})
        out.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in self.headers.items()})
        if self.token is not None:
            out["Authorization"] = f"Bearer {self.token.reveal()}"
        return out

    def secret_values(self) -> list[str]:
        """Every secret value, to scrub from anything shown (a worker may echo one)."""
        values = [v.reveal() for v in self.headers.values() if isinstance(v, Secret)]
        return values + ([self.token.reveal()] if self.token is not None else [])


class Timeouts(_Strict):
    """Seconds allowed for each kind of worker call."""

    connect: float = Field(5.0, gt=0)
    apply: float = Field(300.0, gt=0)
    startup: float = Field(900.0, gt=0)  # loading a large model takes minutes
    shutdown: float = Field(120.0, gt=0)
    supports: float = Field(30.0, gt=0)
    #: In a rolling apply, how long a batch has to come back healthy.
    rollout_health: float = Field(300.0, gt=0)

    def for_operation(self, op: str) -> float:
        return float(getattr(self, op))


class ProbeSettings(_Strict):
    """How a proxy checks that its worker still answers."""

    enabled: bool = True
    interval: float = Field(1.0, gt=0)
    timeout: float = Field(1.0, gt=0)
    failures_to_dead: int = Field(2, ge=1)


class BackoffSettings(_Strict):
    """How a watcher retries a registry that fails."""

    initial: float = Field(0.5, gt=0)
    maximum: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.maximum < self.initial:
            raise ValueError("backoff.maximum must be >= backoff.initial")
        return self

    #: The doubling stops at this power of two: past it any sane delay is
    #: beyond ``maximum`` already, and ``2 ** n`` itself overflows a float
    #: after ~1,024 failures in a row (a source down for a long weekend).
    MAX_DOUBLINGS: ClassVar[int] = 64

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row:
        ``initial`` doubling up to ``maximum``, for any count of failures."""
        doublings = min(max(0, failures - 1), self.MAX_DOUBLINGS)
        return min(self.maximum, self.initial * 2.0**doublings)


class ReconcileSettings(_Strict):
    """How the coordinator keeps deployments in shape."""

    #: Seconds between reconcile rounds when nothing changed.
    resync_interval: float = Field(10.0, gt=0)
    #: A failed start on a worker manager waits this long before it is tried
    #: there again, doubling with each failure in a row up to ``backoff_max``.
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(300.0, gt=0)
    #: After a start answered success, how long its instance may take to show
    #: up healthy in the registry before it counts as missing again.
    appear_within: float = Field(60.0, gt=0)
    #: An instance that stops answering without proof of death (a timeout,
    #: not a refused connection; still listed healthy) leaves the route table
    #: at once but is replaced only after this many seconds: a network blip
    #: or a long pause must not start a model load elsewhere.
    replace_after: float = Field(15.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("reconcile.backoff_max must be >= reconcile.backoff_initial")
        return self


class DrainSettings(_Strict):
    """How an instance is drained before the coordinator stops, restarts or
    reconfigures it (an apply stop/restart/update_params, a shutdown, and the
    keeper's scale-downs, params rolls and replacements): it leaves the route
    table and the embedded registries list it unhealthy, then the operation
    waits for the requests in flight on it to end."""

    #: Seconds a drain waits at most for the requests in flight on an instance
    #: (summed over every caller that reports) to end; then the operation goes
    #: on and says how many were still in flight. 0: no drain.
    timeout: float = Field(60.0, ge=0)
    #: Seconds a drain lasts at least after an embedded registry last listed
    #: the instance as healthy to a reader — DB-GPT's own API server and
    #: webserver, which report nothing and may still be streaming from it.
    #: Costs nothing when no one read the registry that recently. 0: off.
    grace: float = Field(10.0, ge=0)


class PlacementSettings(_Strict):
    """Where the actors run on a multi-node Ray cluster."""

    #: The coordinator, its watchers and embedded registries run on the head node.
    on_head: bool = True
    #: A proxy prefers the Ray node whose IP is its worker's host.
    colocate_proxies: bool = True
    #: Worker host -> a custom resource of the node its proxy should prefer; for
    #: hosts whose Ray node has another address, or raylets that share an IP.
    host_resources: dict[str, str] = Field(default_factory=dict)


class CallerSettings(_Strict):
    """How a process that sends requests to the workers (``RayWorkerManager``)
    connects to them. The limit is per worker and per process: a request that
    would exceed it goes to another instance, and when every instance is at it,
    fails at once naming it instead of queueing."""

    #: Requests (connections) in flight from one process to one worker at most.
    #: Size it to what a worker serves at once (its batch), not to the fleet.
    max_connections_per_worker: int = Field(100, ge=1)
    #: Seconds a request may wait for a free connection to its worker; after
    #: that it was never sent, and goes to another instance (at most twice).
    pool_timeout: float = Field(1.0, gt=0)
    #: Seconds between a caller's reports of its requests in flight per
    #: instance to the coordinator while it has any (it also reports each
    #: change at once, coalesced). The fleet's load is the sum of them.
    report_every: float = Field(1.0, gt=0)
    #: Seconds after its last report that a caller's in-flight count stops
    #: counting (its process died): nothing waits on a caller that is gone.
    report_ttl: float = Field(5.0, gt=0)
    #: Flow control of this process's own callers (``RayWorkerManager``'s
    #: generate, generate_stream, embeddings and routed calls; not the
    #: gateway's, which its ``gateway.flow`` gates): a capacity per model
    #: from the process, a queue, priorities and fair shares between the
    #: tenants the managers are made for. Without it every call is sent at once.
    flow: FlowSettings | None = None

    @model_validator(mode="after")
    def _reports_outlive_their_interval(self) -> Self:
        if self.report_ttl < 2 * self.report_every:
            raise ValueError(f"caller.report_ttl ({self.report_ttl}) must be at least twice caller.report_every "
                             f"({self.report_every}), or a live caller's count would expire between its reports")
        return self


class _Source(_Strict):
    name: str | None = Field(None, pattern=_NAME)
    #: How to call the workers this source lists (headers, token, https).
    workers: WorkerAccess = WorkerAccess()


class DbgptSource(_Source):
    """A DB-GPT model controller, polled over its HTTP API.

    Several URLs are replicas of one controller (DB-GPT's HA mode): the first that
    answers is used.
    """

    kind: Literal["dbgpt"] = "dbgpt"
    url: AnyHttpUrl | None = None
    urls: list[AnyHttpUrl] = Field(default_factory=list)
    poll_interval: float = Field(1.0, gt=0)
    request_timeout: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_or_more_urls(self) -> Self:
        if self.url is None and not self.urls:
            raise ValueError("a dbgpt source needs 'url' or 'urls'")
        return self

    @property
    def controller_urls(self) -> list[str]:
        urls = ([self.url] if self.url is not None else []) + list(self.urls)
        return [str(u).rstrip("/") for u in urls]


class EmbeddedSource(_Source):
    """The registry this project serves itself (a Ray actor with DB-GPT's
    controller HTTP API). Port 0 picks a free port on first start."""

    kind: Literal["embedded"] = "embedded"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    heartbeat_interval: float = Field(5.0, gt=0)
    #: DB-GPT's own controller uses 60 s. Do not go below ~30 s with DB-GPT
    #: workers: a DB-GPT 0.8.2 worker manager heartbeats its ``WorkerManager@service``
    #: entry every 20 s whatever its configured interval, so a shorter timeout
    #: makes it flap. (Dead workers are noticed in seconds by the proxies' probes,
    #: not by this timeout.)
    heartbeat_timeout: float = Field(60.0, gt=0)
    #: When set, register / deregister / heartbeat need ``Authorization: Bearer
    #: <token>`` (DB-GPT's workers send none: leave it off for them). Reads stay
    #: open, as DB-GPT's webserver reads without credentials.
    token: Secret | None = None
    #: Serve https, so that the token does not cross the network in clear.
    tls: ServeTls | None = None
    #: Largest request body accepted (bytes), and most entries held (a
    #: bound on memory against a flood of made-up entries: about 2 KiB each,
    #: so 100,000 is some 200 MiB; a 10,000-instance fleet fits with room).
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    max_instances: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> Self:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        return self


class StaticSource(_Source):
    """A fixed list of instances, inline or in a YAML/JSON file that is re-read
    when it changes."""

    kind: Literal["static"] = "static"
    instances: list[ModelInstance] | None = None
    path: Path | None = None
    poll_interval: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.instances is None) == (self.path is None):
            raise ValueError("a static source needs exactly one of 'instances' or 'path'")
        return self


RegistrySource = Annotated[DbgptSource | EmbeddedSource | StaticSource, Field(discriminator="kind")]


#: The tenant of every request when the gateway has no keys (it serves open).
OPEN_TENANT = "open"
#: A priority the header may ask for is 0 .. this many digits long at most.
_PRIORITY = re.compile(r"^[0-9]{1,6}$")


class FlowShare(_Strict):
    """What a tenant gets under flow control: its weight against the others'
    when they compete for a model, its priority, and its own limits."""

    #: Its share of a full model's capacity, relative to the other tenants'
    #: weights (cost served over weight is kept even between them).
    weight: float = Field(1.0, gt=0, le=1_000_000)
    #: Its requests' priority (higher first) when the priority header does not ask another.
    priority: int = Field(0, ge=0, le=999_999)
    #: The highest priority its requests may ask for with the header (default:
    #: ``priority``); asking lower is always allowed.
    max_priority: int | None = Field(None, ge=0, le=999_999)
    #: Its requests in flight at once over every model; more wait in the queue.
    max_in_flight: int | None = Field(None, ge=1)
    #: Its requests waiting at once; one more is answered 429 at once (0: none wait).
    max_queued: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _priorities_ordered(self) -> Self:
        if self.max_priority is not None and self.max_priority < self.priority:
            raise ValueError(f"max_priority ({self.max_priority}) must be >= priority ({self.priority})")
        return self

    @property
    def top_priority(self) -> int:
        return self.priority if self.max_priority is None else self.max_priority

    def priority_for(self, asked: str | None) -> int:
        """The priority of a request whose priority header is ``asked`` (None:
        no header). Raises ValueError saying what is allowed."""
        if asked is None:
            return self.priority
        if not _PRIORITY.match(asked.strip()) or int(asked) > self.top_priority:
            raise ValueError(f"must be an integer from 0 to {self.top_priority} for this key")
        return int(asked)

    def share(self) -> Share:
        return Share(weight=self.weight, max_in_flight=self.max_in_flight, max_queued=self.max_queued)


class FlowTenant(FlowShare):
    """A named tenant: the keys it calls the gateway with (secrets holding one
    key per line; they are valid keys of the gateway) and what it gets. Under
    ``caller.flow`` a tenant is the name a ``RayWorkerManager`` is made for,
    and lists no keys (a process's callers are trusted to say who they are)."""

    name: str = Field(pattern=_NAME)
    keys: list[Secret] = Field(default_factory=list)

    def key_values(self) -> list[str]:
        return [k.strip() for s in self.keys for k in s.reveal().splitlines() if k.strip()]


class FlowSettings(_Strict):
    """Flow control where requests enter: the gateway (``gateway.flow``) or a
    Python process's ``RayWorkerManager`` callers (``caller.flow``). Up to
    ``capacity`` requests in flight per model from one gateway replica (or one
    process); more wait (at most ``max_queued`` per model, each at most
    ``max_wait`` seconds) and run by priority, then by weighted fair share
    between tenants; a request that cannot wait is answered 429 with
    ``Retry-After`` (a caller gets ``OverloadedError`` with ``retry_after``).
    At the gateway a tenant is a named group of keys in ``tenants``, or else
    each key of ``api_keys`` alone; for callers it is the name a manager is
    made for (``default`` says what a tenant not listed gets)."""

    #: Requests in flight per model from one gateway replica. Size it to what
    #: the model's instances serve at once (the router answers 429 itself when
    #: every instance is at caller.max_connections_per_worker).
    capacity: int = Field(ge=1)
    #: Per-model overrides of ``capacity``: model name -> requests in flight.
    models: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    #: Requests waiting per model at most (0: none wait; 429 when full).
    max_queued: int = Field(1024, ge=0)
    #: Seconds a request waits for a place at most (and never past
    #: gateway.request_timeout); then 429.
    max_wait: float = Field(30.0, gt=0)
    #: Seconds the 429s of flow control ask a client to wait (``Retry-After``).
    retry_after: int = Field(1, ge=0)
    #: The request header that asks for a priority (0 up to the tenant's
    #: max_priority; the gateway's only).
    priority_header: str = "X-Priority"
    #: What each key of ``api_keys`` gets (each key is its own tenant), and the
    #: gateway's one tenant when it has no keys.
    default: FlowShare = FlowShare()
    tenants: list[FlowTenant] = Field(default_factory=list)

    @field_validator("priority_header", mode="after")
    @classmethod
    def _header_name(cls, name: str) -> str:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")
        return name

    @field_validator("models", mode="after")
    @classmethod
    def _named(cls, models: dict[str, int]) -> dict[str, int]:
        if any(not name.strip() for name in models):
            raise ValueError("a model name must not be empty")
        return models

    @field_validator("tenants", mode="after")
    @classmethod
    def _distinct(cls, tenants: list[FlowTenant]) -> list[FlowTenant]:
        names = [t.name for t in tenants]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tenant names must be unique; repeated: {dupes}")
        owner: dict[str, str] = {}
        for tenant in tenants:
            for key in tenant.key_values():
                if owner.setdefault(key, tenant.name) != tenant.name:  # never echo the key itself
                    raise ValueError(f"tenants {owner[key]!r} and {tenant.name!r} share a key")
        return tenants

    def share(self, tenant: str) -> FlowShare:
        """What ``tenant`` (a name from :meth:`GatewaySettings.key_tenants`) gets."""
        for t in self.tenants:
            if t.name == tenant:
                return t
        return self.default

    def policy(self) -> FlowPolicy:
        """The scheduler's settings (pools are model names)."""
        return FlowPolicy(capacity=self.capacity, max_queued=self.max_queued, capacities=self.models,
                          shares={t.name: t.share() for t in self.tenants}, default_share=self.default.share())


class GatewaySettings(_Strict):
    """The OpenAI-compatible gateway: where it serves, how many replicas, who
    may call it. Without ``api_keys`` it serves only on a loopback address
    unless ``allow_open`` says otherwise (then it warns at every start)."""

    host: str = "127.0.0.1"
    port: int = Field(8100, ge=0, le=65535)
    #: Gateway actors; with more than one they spread over the Ray nodes and
    #: share the port (each node serves it): put a load balancer in front.
    replicas: int = Field(1, ge=1, le=64)
    #: A custom Ray resource of the nodes the gateway should serve on: each
    #: replica then takes one unit of it, so a node started with
    #: ``--resources='{"NAME": 1}'`` holds exactly one replica, and a load
    #: balancer (a Kubernetes Service) that sends to those nodes always finds
    #: one. Set ``replicas`` to the number of such nodes: a replica with no free
    #: unit waits, and the gateway's start fails after its ready timeout.
    #: Without it the replicas spread over any nodes.
    node_resource: str | None = Field(None, pattern=_NAME)
    #: Keys callers send as ``Authorization: Bearer <key>``: each secret is a
    #: file or environment variable holding one key per line.
    api_keys: list[Secret] = Field(default_factory=list)
    #: Serve without keys on a non-loopback address (not recommended).
    allow_open: bool = False
    tls: ServeTls | None = None
    #: Request limits (body size, messages, characters, stop sequences, ...).
    limits: OpenAILimits = OpenAILimits()
    #: A request not answered (non-streamed) or not finished (streamed) within
    #: this many seconds ends with 504.
    request_timeout: float = Field(600.0, gt=0)
    #: Requests one gateway replica holds at once, waiting or not; more are
    #: answered 429 with Retry-After (a bound against overload, not fairness).
    max_in_flight: int = Field(4096, ge=1)
    #: Flow control: a capacity per model, a queue, priorities and fair
    #: shares between tenants. Without it every request is sent at once.
    flow: FlowSettings | None = None

    def key_tenants(self) -> list[tuple[str, str]]:
        """Every configured key, revealed (for the gateway's comparison only),
        with its tenant: the flow tenant that lists it, else the key alone,
        named by where it is (``api_keys[0]#2``: the second key of the first
        secret) so that no name shows anything of a key."""
        out: list[tuple[str, str]] = []
        for tenant in self.flow.tenants if self.flow is not None else []:
            out += [(key, tenant.name) for key in tenant.key_values()]
        named = {key for key, _ in out}
        for i, secret in enumerate(self.api_keys):
            lines = [k.strip() for k in secret.reveal().splitlines() if k.strip()]
            out += [(key, f"api_keys[{i}]#{j}") for j, key in enumerate(lines, 1) if key not in named]
        return out

    def keys(self) -> list[str]:
        """Every configured key, revealed (for the gateway's comparison only)."""
        return [key for key, _ in self.key_tenants()]

    @model_validator(mode="after")
    def _tenants_have_keys(self) -> Self:
        for i, tenant in enumerate(self.flow.tenants if self.flow is not None else []):
            if not tenant.keys:
                raise ValueError(f"flow.tenants.{i}.keys: tenant {tenant.name!r} lists no keys, and the gateway "
                                 "knows its callers' tenants by their keys")
        return self

    @model_validator(mode="after")
    def _safe_by_default(self) -> Self:
        if not self.keys() and not self.allow_open and not is_loopback(self.host):
            raise ValueError(f"gateway.host {self.host!r} is not a loopback address: set gateway.api_keys or "
                             "gateway.flow.tenants (or gateway.allow_open: true to serve it open anyway)")
        return self


class PageSettings(_Strict):
    """The fleet page: a read-only web page of the fleet's state, served by
    the coordinator actor on its own port. It takes the gateway's API keys
    (``gateway.api_keys`` and its flow tenants' keys); without any it serves
    only on a loopback address unless ``allow_open`` says otherwise."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0 picks a free port (a new one after each restart of the coordinator):
    #: ``cluster.fleet_page_url()`` and ``coordinator status`` say which.
    port: int = Field(0, ge=0, le=65535)
    tls: ServeTls | None = None
    #: Serve without keys on a non-loopback address (not recommended).
    allow_open: bool = False
    #: A browser's login lasts this long (hours); a coordinator restart ends it too.
    session_hours: float = Field(12.0, gt=0, le=24 * 30)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CoordinatorConfig(_Strict):
    registries: list[RegistrySource] = Field(min_length=1)
    timeouts: Timeouts = Timeouts()
    probe: ProbeSettings = ProbeSettings()
    backoff: BackoffSettings = BackoffSettings()
    placement: PlacementSettings = PlacementSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    drain: DrainSettings = DrainSettings()
    #: How inference callers (RayWorkerManager, the gateway) connect to the workers.
    caller: CallerSettings = CallerSettings()
    #: How they choose an instance: policy per model (random / power_of_two /
    #: cache_aware) and the cache-aware policy's settings.
    routing: RoutingSettings = RoutingSettings()
    #: The OpenAI-compatible gateway, started with the coordinator when given.
    gateway: GatewaySettings | None = None
    #: The fleet page (a read-only web page of the fleet), served by the coordinator.
    page: PageSettings = PageSettings()
    #: Deployed when the coordinator starts, unless a deployment of the same
    #: model@type is already kept (from an earlier deploy, in Ray's GCS).
    deployments: list[Deployment] = Field(default_factory=list)
    #: Extra headers sent with every worker call (plain values only: put
    #: credentials in a source's ``workers`` settings).
    headers: dict[str, str] = Field(default_factory=dict)
    #: Per worker ("host:port"): access settings that replace its source's.
    worker_overrides: dict[str, WorkerAccess] = Field(default_factory=dict)
    #: Distinct operations that may wait for one model@type; one more is
    #: refused at once (ModelBusyError). An operation identical to a waiting
    #: one (same apply_type, worker_type and params) joins it instead.
    max_queued_operations: int = Field(32, ge=1)
    #: Seconds between checks that every live endpoint has a live proxy and no
    #: departed one keeps its proxy (repairs drift; normally there is none).
    resync_interval: float = Field(10.0, gt=0)
    #: How long a watcher long poll waits before answering "nothing new".
    long_poll_timeout: float = Field(10.0, gt=0)
    #: After a change arrives, a follower (a watcher of the embedded registry,
    #: the coordinator of its watchers) waits this long before asking for the
    #: next, so a burst of changes travels as a few deltas instead of one call
    #: per change. The first change after a quiet spell is not delayed.
    change_pace: float = Field(0.02, ge=0, le=1)
    _overrides: dict[Endpoint, WorkerAccess] = PrivateAttr(default_factory=dict)

    @field_validator("registries", mode="after")
    @classmethod
    def _name_sources(cls, sources: list[RegistrySource]) -> list[RegistrySource]:
        named = [
            s if s.name else s.model_copy(update={"name": f"{s.kind}-{i}"})
            for i, s in enumerate(sources)
        ]
        names = [s.name for s in named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"registry source names must be unique; repeated: {dupes}")
        return named

    @field_validator("headers", mode="after")
    @classmethod
    def _plain_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        return _check_headers(headers)

    @field_validator("deployments", mode="after")
    @classmethod
    def _one_per_model(cls, deployments: list[Deployment]) -> list[Deployment]:
        check_distinct(deployments)
        return deployments

    @field_validator("worker_overrides", mode="after")
    @classmethod
    def _endpoint_keys(cls, overrides: dict[str, WorkerAccess]) -> dict[str, WorkerAccess]:
        for key in overrides:
            parse_endpoint(key)  # raises naming the key
        return overrides

    @model_validator(mode="after")
    def _page_safe_by_default(self) -> Self:
        page = self.page
        if page.enabled and not self.page_keys() and not page.allow_open and not is_loopback(page.host):
            raise ValueError(f"page.host {page.host!r} is not a loopback address: set gateway.api_keys (the page "
                             "takes the gateway's keys), or page.allow_open: true to serve it open anyway")
        return self

    def page_keys(self) -> list[str]:
        """The keys the fleet page accepts: the gateway's (revealed, for the
        page's comparison only)."""
        return self.gateway.keys() if self.gateway is not None else []

    @model_validator(mode="after")
    def _index_overrides(self) -> Self:
        self._overrides = {Endpoint(*parse_endpoint(k)): v for k, v in self.worker_overrides.items()}
        return self

    def access_for(self, endpoint: Endpoint, sources: Iterable[str]) -> WorkerAccess:
        """How to call the worker at ``endpoint``, listed by ``sources``: its
        override if any, else the settings of the first listing source in config
        order."""
        if endpoint in self._overrides:
            return self._overrides[endpoint]
        sources = set(sources)
        for source in self.registries:
            if source.name in sources:
                return source.workers
        return WorkerAccess()

    @classmethod
    def from_file(cls, path: str | Path) -> CoordinatorConfig:
        """Load from YAML or JSON (JSON is YAML). Relative static paths are taken
        relative to the file. A file that is not YAML raises
        :class:`ConfigFileError` saying ``path:line:column``. The file alone:
        ``load_config`` (in ``config_sources``) layers the environment and
        explicit settings on it."""
        return cls.model_validate(read_config_file(path))

    def source(self, name: str) -> RegistrySource:
        for s in self.registries:
            if s.name == name:
                return s
        raise KeyError(name)


def read_config_file(path: str | Path) -> dict:
    """A config file's data, parsed but not validated, with relative static
    paths made absolute (relative to the file)."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    for source in data.get("registries") or []:
        if isinstance(source, dict) and source.get("path"):
            source["path"] = str((path.parent / source["path"]).resolve())
    return data


def read_yaml(path: str | Path) -> object:
    """A YAML (or JSON) file, parsed; a syntax error raises
    :class:`ConfigFileError` saying ``path:line:column: what is wrong``."""
    text = Path(path).read_text()
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = exc.context
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context += f" that starts at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        what = "; ".join(p for p in (exc.problem, context) if p) or type(exc).__name__
        raise ConfigFileError(f"{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {exc}") from None


def read_instances_file(path: Path) -> object:
    """A static source's file, parsed but not validated: a list of entries, or
    ``{instances: [...]}``."""
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data = data.get("instances")
    return data or []
