"""Where actors run, decided purely from a table of Ray nodes. No ray import.

A proxy's HTTP calls should stay on its worker's host: it goes to the Ray node
whose IP is the worker's host, or — where that cannot tell (several raylets on
one machine, or a node that registered under another address) — to the node that
carries the custom resource the config maps the host to. Only live nodes are
chosen, so a proxy never waits for a node that is not there; with no match it
goes wherever Ray puts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

#: The resource Ray gives the head node.
HEAD_NODE_RESOURCE = "node:__internal_head__"


class NodeInfo(NamedTuple):
    node_id: str
    ip: str
    resources: frozenset[str]
    alive: bool = True

    @classmethod
    def from_ray(cls, row: Mapping[str, Any]) -> NodeInfo:
        """One entry of ``ray.nodes()``."""
        return cls(row["NodeID"], row["NodeManagerAddress"], frozenset(row.get("Resources", {})),
                   bool(row.get("Alive", True)))


def proxy_node(host: str, nodes: Iterable[NodeInfo], host_resources: Mapping[str, str],
               colocate: bool = True) -> str | None:
    """The node a proxy for a worker at ``host`` should prefer, or None."""
    alive = sorted((n for n in nodes if n.alive), key=lambda n: n.node_id)
    if host in host_resources:
        wanted = host_resources[host]
        return next((n.node_id for n in alive if wanted in n.resources), None)
    if colocate:
        return next((n.node_id for n in alive if n.ip == host), None)
    return None
