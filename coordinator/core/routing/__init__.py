"""Routing policies: which instance of a model a request goes to. Pure — no
ray, no httpx, no I/O, no clock — and small plug-ins over one shape
(:class:`Candidate` in, :class:`Choice` out), chosen by name:

    base.py           Candidate, Choice, the Policy protocol
    random_policy.py  ``random``: weighted random
    power_of_two.py   ``power_of_two``: power of two choices on load
    cache_aware.py    ``cache_aware``: the instance holding the prompt's prefix,
                      unless it is a hot spot; else by load
    prefix.py         the approximate prefix index cache_aware learns
    factory.py        RoutingSettings, make_policy, ModelPolicies (per-model choice)
    prompt.py         the text of a DB-GPT request that prefix routing hashes
"""

from coordinator.core.routing.base import REASONS, Candidate, Choice, Endpoint, Policy, Reason
from coordinator.core.routing.cache_aware import CacheAware
from coordinator.core.routing.factory import POLICY_NAMES, ModelPolicies, PolicyName, RoutingSettings, make_policy
from coordinator.core.routing.power_of_two import PowerOfTwo, choose
from coordinator.core.routing.prefix import PrefixIndex, chain_hashes
from coordinator.core.routing.prompt import prompt_text
from coordinator.core.routing.random_policy import WeightedRandom

__all__ = [
    "POLICY_NAMES",
    "REASONS",
    "CacheAware",
    "Candidate",
    "Choice",
    "Endpoint",
    "ModelPolicies",
    "Policy",
    "PolicyName",
    "PowerOfTwo",
    "PrefixIndex",
    "Reason",
    "RoutingSettings",
    "WeightedRandom",
    "chain_hashes",
    "choose",
    "make_policy",
    "prompt_text",
]
