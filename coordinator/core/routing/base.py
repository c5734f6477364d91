"""The one shape every routing policy works over: the candidates for a request
(one per instance of the model), the choice a policy makes, and the
:class:`Policy` protocol they all implement.

A policy is pure and synchronous: it reads the candidates it is given and its
own learned state (e.g. a prefix index), never a clock, a socket or Ray. It is
not thread-safe: keep one per event loop (a gateway replica, a caller)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

#: (host, port) of a worker manager.
Endpoint = tuple[str, int]

#: Why an instance was chosen (for the "routing decisions by reason" metric):
#: ``prefix_hit``  it is believed to hold most of the prompt's prefix, and is not a hot spot;
#: ``load``        no instance holds enough of the prefix: the less loaded won;
#: ``hot_spot``    instances hold the prefix but all are loaded far beyond the least loaded;
#: ``random``      drawn at random in proportion to weight.
Reason = Literal["prefix_hit", "load", "hot_spot", "random"]
REASONS: tuple[Reason, ...] = ("prefix_hit", "load", "hot_spot", "random")


class Candidate(NamedTuple):
    """An instance a request may go to, as the caller sees it right now."""

    endpoint: Endpoint
    #: Share of the model's traffic it should take; 0 (or less) = not usable.
    weight: float
    #: This router's requests in flight there.
    in_flight: int
    #: What other routers (e.g. other gateway replicas) report in flight there.
    others_in_flight: int = 0

    @property
    def usable(self) -> bool:
        return self.weight > 0

    @property
    def load(self) -> float:
        """Requests in flight (everyone's) per unit of weight. Only for a usable candidate."""
        return (self.in_flight + self.others_in_flight) / self.weight


class Choice(NamedTuple):
    """A policy's answer: the index of the chosen candidate, and why."""

    index: int
    reason: Reason
    #: The fraction of the prompt's prefix blocks the chosen instance is believed
    #: to hold (0.0 when the policy keeps no prefix index): the estimated hit rate.
    matched: float = 0.0


@runtime_checkable
class Policy(Protocol):
    """What every routing policy does. ``prompt_key`` is the rendered prompt
    (the caller renders chat messages to text), or None when there is none (an
    embedding batch, a policy that does not look at prompts)."""

    #: The name it is chosen by in configuration.
    name: str

    def choose(self, model: str, candidates: Sequence[Candidate], prompt_key: str | None = None) -> Choice | None:
        """The candidate a request for ``model`` should go to, or None when no
        candidate is usable (none, or every weight <= 0). Changes no state:
        call :meth:`record` once the request is sent."""
        ...

    def record(self, model: str, endpoint: Endpoint, prompt_key: str | None = None) -> None:
        """Learn that a request with this prompt went to ``endpoint`` (after a
        failover: where it finally went)."""
        ...

    def forget(self, endpoint: Endpoint, model: str | None = None) -> None:
        """An instance left the route table: drop what was learned about it (for
        one model, or for every model it served)."""
        ...


def usable_indices(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the candidates a request may go to (weight > 0)."""
    return [i for i, c in enumerate(candidates) if c.weight > 0]
