"""Choosing a policy by name, and the routing section of the configuration.

:class:`RoutingSettings` is what an operator writes (one policy for every model,
``cache_aware`` by default, with per-model overrides, and the cache-aware
policy's knobs); :func:`make_policy` builds one policy by name;
:class:`ModelPolicies` is the :class:`~coordinator.core.routing.base.Policy` a
router holds: each model's requests go to the policy its settings name::

    routing:
      policy: cache_aware
      block_chars: 64
      capacity_blocks: 16384
      min_match: 0.5
      balance_abs: 4
      balance_rel: 1.5
      models: {text2vec: power_of_two}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.core.routing.base import Candidate, Choice, Endpoint, Policy
from coordinator.core.routing.cache_aware import CacheAware
from coordinator.core.routing.power_of_two import PowerOfTwo
from coordinator.core.routing.random_policy import WeightedRandom

PolicyName = Literal["random", "power_of_two", "cache_aware"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)
#: The settings :func:`make_policy` takes (only ``cache_aware`` uses them).
SETTINGS: tuple[str, ...] = ("block_chars", "capacity_blocks", "min_match", "balance_abs", "balance_rel")


class RoutingSettings(BaseModel):
    """How requests are routed among a model's instances. A mistake raises
    ``pydantic.ValidationError`` naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The policy of every model not named in ``models``.
    policy: PolicyName = "cache_aware"
    #: Characters per prefix block (characters, not tokens: there is no tokenizer).
    block_chars: int = Field(64, ge=1, le=1 << 20)
    #: Blocks each instance is believed to hold before forgetting the least recently used
    #: (16,384 blocks of 64 characters: 1 MiB of prompt text, ~250k tokens).
    capacity_blocks: int = Field(16_384, ge=1, le=1 << 24)
    #: The fraction of a prompt's blocks an instance must hold for a prefix hit.
    min_match: float = Field(0.5, gt=0, le=1)
    #: Hot spot: load above the least loaded's by more than this (requests per unit of weight) ...
    balance_abs: float = Field(4.0, ge=0)
    #: ... and by more than this factor.
    balance_rel: float = Field(1.5, ge=1)
    #: Per-model overrides of ``policy``: model name -> policy name.
    models: dict[str, PolicyName] = Field(default_factory=dict)

    @field_validator("models", mode="after")
    @classmethod
    def _named(cls, models: dict[str, PolicyName]) -> dict[str, PolicyName]:
        if any(not name.strip() for name in models):
            raise ValueError("a model name must not be empty")
        return models

    def policy_for(self, model: str) -> PolicyName:
        """The name of the policy routing ``model``'s requests (a model name,
        or a ``model@worker_type`` key: either may be configured)."""
        return self.models.get(model) or self.models.get(model.split("@", 1)[0], self.policy)

    def policy_settings(self) -> dict[str, Any]:
        """The keyword arguments :func:`make_policy` takes."""
        return {name: getattr(self, name) for name in SETTINGS}


def make_policy(name: PolicyName, *, rng: random.Random | None = None, **settings: Any) -> Policy:
    """A new policy called ``name``. ``settings`` are :data:`SETTINGS` (checked
    as :class:`RoutingSettings` checks them; a policy that has no use for them
    ignores them); ``rng`` breaks ties and draws (an unseeded generator if None)."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown routing policy {name!r}: expected one of {', '.join(POLICY_NAMES)}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown routing setting(s) {', '.join(unknown)}: expected some of {', '.join(SETTINGS)}")
    checked = RoutingSettings(**settings)
    if name == "cache_aware":
        return CacheAware(rng=rng, **checked.policy_settings())
    if name == "power_of_two":
        return PowerOfTwo(rng=rng)
    return WeightedRandom(rng=rng)


class ModelPolicies:
    """The policy a router holds: each model's requests go to the policy
    :meth:`RoutingSettings.policy_for` names (one instance per policy name,
    shared by the models using it; the cache-aware index is kept per model)."""

    name = "per_model"

    def __init__(self, settings: RoutingSettings | None = None, rng: random.Random | None = None) -> None:
        self.settings = settings or RoutingSettings()
        self._rng = rng
        self._policies: dict[str, Policy] = {}

    def policy(self, model: str) -> Policy:
        """The policy routing ``model``'s requests."""
        name = self.settings.policy_for(model)
        found = self._policies.get(name)
        if found is None:
            found = self._policies[name] = make_policy(name, rng=self._rng, **self.settings.policy_settings())
        return found

    def choose(self, model: str, candidates: Sequence[Candidate], prompt_key: str | None = None) -> Choice | None:
        return self.policy(model).choose(model, candidates, prompt_key)

    def record(self, model: str, endpoint: Endpoint, prompt_key: str | None = None) -> None:
        self.policy(model).record(model, endpoint, prompt_key)

    def forget(self, endpoint: Endpoint, model: str | None = None) -> None:
        for policy in self._policies.values():
            policy.forget(endpoint, model)
