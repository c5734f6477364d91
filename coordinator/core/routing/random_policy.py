"""Weighted random: each usable candidate drawn in proportion to its weight,
whatever its load. What DB-GPT's API server does (without the weights); the
baseline the other policies are measured against."""

from __future__ import annotations

import random
from collections.abc import Sequence

from coordinator.core.routing.base import Candidate, Choice, Endpoint, usable_indices


class WeightedRandom:
    """A :class:`~coordinator.core.routing.base.Policy` choosing at random in
    proportion to weight (reason ``random``); it learns nothing."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, model: str, candidates: Sequence[Candidate], prompt_key: str | None = None) -> Choice | None:
        usable = usable_indices(candidates)
        if not usable:
            return None
        i = self._rng.choices(usable, weights=[candidates[i].weight for i in usable], k=1)[0]
        return Choice(i, "random")

    def record(self, model: str, endpoint: Endpoint, prompt_key: str | None = None) -> None:
        pass

    def forget(self, endpoint: Endpoint, model: str | None = None) -> None:
        pass
