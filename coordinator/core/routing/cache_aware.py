"""Cache- and load-aware choice: send a request where its prompt's prefix is
believed to be cached, unless that instance is a hot spot.

For each usable candidate, the fraction of the prompt's blocks it is believed
to hold (:mod:`coordinator.core.routing.prefix`, learned by :meth:`CacheAware.record`
from where requests went). Then:

1. the candidates holding at least ``min_match`` of the prompt and not hot
   spots: the one holding most wins (less load, then the injected random
   generator, break ties) — ``prefix_hit``;
2. candidates hold that much, but every one of them is a hot spot: the least
   loaded candidate wins (the longest match, then the random generator, break
   ties) — ``hot_spot``. Since :meth:`~CacheAware.record` then teaches the index
   that it holds the prefix too, a hot prefix spreads to a second instance, and
   its traffic is shared between them from then on;
3. a prompt no instance holds enough of: the instance believed to hold the
   least (most room in its cache, as SGLang's router sends a miss to its
   smallest tree) among those that are not hot spots, the less loaded on a
   tie — ``load``; so new prefixes spread evenly over the fleet's caches;
4. no prompt, or nothing learned yet: power of two choices on load, exactly
   as the ``power_of_two`` policy — ``load``.

The hot-spot guard is what keeps pure affinity from piling a hot prefix's
traffic on one worker (SGLang router users' "death spiral", vllm-router #238).
A candidate is a hot spot when its load exceeds the least loaded candidate's
both by more than ``balance_abs`` (requests in flight per unit of weight) and
by more than ``balance_rel`` times — both, as SGLang's router requires, so that
a handful of requests on a quiet fleet, or a small excess on a busy one, do not
break affinity."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from coordinator.core.routing import power_of_two
from coordinator.core.routing.base import Candidate, Choice, Endpoint, usable_indices
from coordinator.core.routing.prefix import PrefixIndex


class CacheAware:
    """The ``cache_aware`` :class:`~coordinator.core.routing.base.Policy`.

    ``block_chars`` and ``capacity_blocks`` shape its :class:`PrefixIndex`
    (exposed as :attr:`index`); ``min_match`` (0 < m <= 1) is the fraction of a
    prompt's blocks an instance must hold for a prefix hit; ``balance_abs`` (>= 0)
    and ``balance_rel`` (>= 1) are the hot-spot thresholds; ``rng`` breaks ties
    and drives the load choice."""

    name = "cache_aware"

    def __init__(self, *, block_chars: int = 64, capacity_blocks: int = 16_384, min_match: float = 0.5,
                 balance_abs: float = 4.0, balance_rel: float = 1.5, rng: random.Random | None = None) -> None:
        if not 0 < min_match <= 1:
            raise ValueError(f"min_match must be in (0, 1], not {min_match}")
        if balance_abs < 0:
            raise ValueError(f"balance_abs must be >= 0, not {balance_abs}")
        if balance_rel < 1:
            raise ValueError(f"balance_rel must be >= 1, not {balance_rel}")
        self.index = PrefixIndex(block_chars, capacity_blocks)
        self.min_match = min_match
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._rng = rng or random.Random()
        #: The last prompt's blocks: a request is chosen for, then recorded,
        #: with the same prompt — hashed once.
        self._last: tuple[str, list[int]] | None = None

    def _blocks(self, prompt_key: str) -> list[int]:
        last = self._last
        if last is not None and last[0] is prompt_key:
            return last[1]
        blocks = self.index.blocks(prompt_key)
        self._last = (prompt_key, blocks)
        return blocks

    def choose(self, model: str, candidates: Sequence[Candidate], prompt_key: str | None = None) -> Choice | None:
        usable = usable_indices(candidates)
        if not usable:
            return None
        blocks = self._blocks(prompt_key) if prompt_key else []
        if not blocks:
            return self._by_load(candidates, {}, 1)
        found = self.index.match(model, blocks)
        total = len(blocks)
        matched = {i: found.get(candidates[i].endpoint, 0) for i in usable}
        holding = [i for i in usable if matched[i] >= self.min_match * total]
        if not holding:
            return self._miss(model, candidates, usable, matched, total)
        loads = {i: candidates[i].load for i in usable}
        floor = min(loads.values())
        cool = [i for i in holding if not self.is_hot(loads[i], floor)]
        if cool:
            i = self._pick(cool, first=lambda j: matched[j], then=lambda j: -loads[j])
            return Choice(i, "prefix_hit", matched[i] / total)
        least = [i for i in usable if loads[i] == floor]
        i = self._pick(least, first=lambda j: matched[j], then=lambda j: 0)
        return Choice(i, "hot_spot", matched[i] / total)

    def is_hot(self, load: float, floor: float) -> bool:
        """Whether an instance at ``load`` is a hot spot when the least loaded is at ``floor``."""
        return load - floor > self.balance_abs and load > floor * self.balance_rel

    def record(self, model: str, endpoint: Endpoint, prompt_key: str | None = None) -> None:
        if prompt_key:
            self.index.insert(model, endpoint, self._blocks(prompt_key))

    def forget(self, endpoint: Endpoint, model: str | None = None) -> None:
        self.index.remove(endpoint, model)

    def _miss(self, model: str, candidates: Sequence[Candidate], usable: list[int], matched: dict[int, int],
              total: int) -> Choice:
        """No instance holds enough of the prompt: the one believed to hold the
        least (the most room for it: SGLang's router sends a miss to the
        smallest tree) among those that are not hot spots, the less loaded on a
        tie — so new prefixes spread evenly over the fleet's caches instead of
        where chance puts them. Before anything is learned: by load."""
        held = {i: self.index.held(model, candidates[i].endpoint) for i in usable}
        if not any(held.values()):
            return self._by_load(candidates, matched, total)
        loads = {i: candidates[i].load for i in usable}
        floor = min(loads.values())
        cool = [i for i in usable if not self.is_hot(loads[i], floor)]
        i = self._pick(cool, first=lambda j: -held[j], then=lambda j: -loads[j])
        return Choice(i, "load", matched.get(i, 0) / total)

    def _by_load(self, candidates: Sequence[Candidate], matched: dict[int, int], total: int) -> Choice:
        i = power_of_two.choose(candidates, self._rng)
        assert i is not None  # the caller checked a usable candidate exists
        return Choice(i, "load", matched.get(i, 0) / total)

    def _pick(self, pool: list[int], first: Callable[[int], float], then: Callable[[int], float]) -> int:
        """The best of ``pool`` by ``first``, then ``then`` (higher wins), then at random."""
        best = max((first(i), then(i)) for i in pool)
        ties = [i for i in pool if (first(i), then(i)) == best]
        return ties[0] if len(ties) == 1 else self._rng.choice(ties)
