"""Power of two choices on load: the policy that knows nothing of prompts.

Two candidates are drawn at random in proportion to their weight; the one
with less load (requests in flight, this router's and the others', per unit of
weight) wins. Random enough that several routers do not herd onto the same
least-loaded instance, and within a small factor of least-loaded's balance."""

from __future__ import annotations

import random
from collections.abc import Sequence

from coordinator.core.routing.base import Candidate, Choice, Endpoint, usable_indices


def choose(candidates: Sequence[Candidate], rng: random.Random | None = None) -> int | None:
    """Power of two choices on requests in flight, honouring weight: two
    candidates drawn at random in proportion to their weight; the one with
    less load (:attr:`Candidate.load`) wins (the first drawn on a tie).
    The index chosen, or None when there is nothing to choose from. Local and
    linear in the model's instances, whatever the fleet's size."""
    rng = rng or random
    usable = usable_indices(candidates)
    if not usable:
        return None
    if len(usable) == 1:
        return usable[0]
    weights = [candidates[i].weight for i in usable]
    a, b = rng.choices(usable, weights=weights, k=2)
    if a == b:  # drew the same one twice: draw its rival among the others
        others = [i for i in usable if i != a]
        b = rng.choices(others, weights=[candidates[i].weight for i in others], k=1)[0]
    return a if candidates[a].load <= candidates[b].load else b


class PowerOfTwo:
    """:func:`choose` as a :class:`~coordinator.core.routing.base.Policy`
    (reason ``load``); it learns nothing."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, model: str, candidates: Sequence[Candidate], prompt_key: str | None = None) -> Choice | None:
        i = choose(candidates, self._rng)
        return None if i is None else Choice(i, "load")

    def record(self, model: str, endpoint: Endpoint, prompt_key: str | None = None) -> None:
        pass

    def forget(self, endpoint: Endpoint, model: str | None = None) -> None:
        pass
