"""The routing policies (coordinator.core.routing): pure choices over one shape,
tested without Ray or HTTP — table tests per policy, hypothesis properties, and
a small in-process simulation of tenants with long shared system prompts."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import coordinator.core.routing as routing
from coordinator.core.routing import (
    POLICY_NAMES,
    CacheAware,
    Candidate,
    Choice,
    ModelPolicies,
    Policy,
    PowerOfTwo,
    PrefixIndex,
    RoutingSettings,
    WeightedRandom,
    chain_hashes,
    make_policy,
)

A, B, C, D = ("a", 1), ("b", 1), ("c", 1), ("d", 1)
M = "llm"
BLOCK = 8


def text(*blocks: str) -> str:
    """A prompt of full blocks, each block one letter repeated (so tests read as block lists)."""
    return "".join(b * BLOCK for b in blocks)


def cands(*loads: int, weights: tuple[float, ...] | None = None) -> list[Candidate]:
    endpoints = [A, B, C, D, ("e", 1), ("f", 1)]
    weights = weights or (1.0,) * len(loads)
    return [Candidate(endpoints[i], w, n) for i, (n, w) in enumerate(zip(loads, weights))]


def cache_aware(**kw) -> CacheAware:
    return CacheAware(block_chars=BLOCK, rng=random.Random(0), **kw)


# ---- every policy ------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_chooses_nothing_when_no_candidate_is_usable(name):
    policy = make_policy(name, rng=random.Random(1), block_chars=BLOCK)
    policy.record(M, A, text("x", "y"))
    assert policy.choose(M, [], text("x", "y")) is None
    assert policy.choose(M, cands(0, 0, weights=(0.0, -1.0)), text("x", "y")) is None


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_never_chooses_a_zero_weight_even_holding_the_prefix(name):
    policy = make_policy(name, rng=random.Random(1), block_chars=BLOCK)
    policy.record(M, A, text("x", "y"))
    picks = {policy.choose(M, cands(0, 50, weights=(0.0, 1.0)), text("x", "y")).index for _ in range(200)}
    assert picks == {1}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_is_a_policy(name):
    assert isinstance(make_policy(name), Policy)
    assert make_policy(name).name == name


def test_random_draws_in_proportion_to_weight_whatever_the_load():
    policy = WeightedRandom(rng=random.Random(3))
    counts = Counter(policy.choose(M, cands(100, 0, weights=(3.0, 1.0))) for _ in range(4000))
    assert {c.reason for c in counts} == {"random"}
    by_index = Counter({c.index: n for c, n in counts.items()})
    assert 2700 < by_index[0] < 3300  # 3:1, though far more loaded


def test_power_of_two_counts_what_other_routers_have_in_flight():
    policy = PowerOfTwo(rng=random.Random(3))
    loaded_elsewhere = [Candidate(A, 1.0, 0, others_in_flight=10), Candidate(B, 1.0, 2)]
    assert {policy.choose(M, loaded_elsewhere) for _ in range(500)} == {Choice(1, "load")}


def test_the_existing_import_path_is_the_routing_packages():
    from coordinator.core import inference

    assert inference.Candidate is Candidate and inference.choose is routing.choose
    assert Candidate(A, 1.0, 3) == Candidate(A, 1.0, 3, 0)  # three fields still build one


def test_the_package_exports_what_it_documents():
    assert all(hasattr(routing, name) for name in routing.__all__)
    assert {"CacheAware", "Candidate", "Choice", "Policy", "PrefixIndex", "RoutingSettings", "make_policy",
            "ModelPolicies"} <= set(routing.__all__)


# ---- the prefix index -----------------------------------------------------------


def test_a_trailing_partial_block_is_not_hashed():
    assert len(chain_hashes("x" * (BLOCK * 2 - 1), BLOCK)) == 1
    assert chain_hashes("x" * (BLOCK - 1), BLOCK) == []


def test_chain_hashing_a_shared_first_block_then_a_different_second_matches_one():
    index = PrefixIndex(BLOCK)
    index.insert(M, A, index.blocks(text("s", "x", "q")))
    assert index.match(M, index.blocks(text("s", "y", "q"))) == {A: 1}  # "q" at the same place, after a different block


def test_the_same_block_after_a_different_prefix_does_not_match():
    index = PrefixIndex(BLOCK)
    index.insert(M, A, index.blocks(text("x", "s")))
    assert index.match(M, index.blocks(text("y", "s"))) == {}


def test_match_counts_each_instances_leading_blocks_and_leaves_out_those_holding_none():
    index = PrefixIndex(BLOCK)
    index.insert(M, A, index.blocks(text("s", "t", "u", "v")))
    index.insert(M, B, index.blocks(text("s", "z")))
    index.insert(M, C, index.blocks(text("z", "s")))
    index.insert("other-model", D, index.blocks(text("s", "t", "u")))
    assert index.match(M, index.blocks(text("s", "t", "u", "w"))) == {A: 3, B: 1}


def test_the_capacity_evicts_the_least_recently_used_blocks():
    index = PrefixIndex(BLOCK, capacity_blocks=4)
    first, second, third = (index.blocks(text(p, p.upper())) for p in "xyz")
    index.insert(M, A, first)
    index.insert(M, A, second)
    index.insert(M, A, first)  # used again: now the most recent
    index.insert(M, A, third)
    assert index.held(M, A) == 4
    assert index.match(M, second) == {} and index.match(M, first) == {A: 2} and index.match(M, third) == {A: 2}


def test_a_prompts_tail_is_evicted_before_its_head():
    index = PrefixIndex(BLOCK, capacity_blocks=4)
    long = index.blocks(text("s", "t", "u", "v"))
    index.insert(M, A, long)
    index.insert(M, A, index.blocks(text("x")))
    assert index.match(M, long) == {A: 3}


def test_a_prompt_longer_than_the_capacity_keeps_its_head():
    index = PrefixIndex(BLOCK, capacity_blocks=2)
    assert len(index.blocks(text("s", "t", "u"))) == 2  # no instance could hold more
    index.insert(M, A, chain_hashes(text("s", "t", "u"), BLOCK))
    assert index.match(M, index.blocks(text("s", "t", "u"))) == {A: 2}


def test_removing_an_instance_forgets_it_and_frees_its_place():
    index = PrefixIndex(BLOCK)
    prompt = index.blocks(text("s", "t"))
    index.insert(M, A, prompt)
    index.insert(M, B, prompt)
    index.insert("other-model", A, prompt)
    index.remove(A, model=M)
    assert index.match(M, prompt) == {B: 2} and index.match("other-model", prompt) == {A: 2}
    index.remove(A)
    assert index.match("other-model", prompt) == {} and index.endpoints("other-model") == set()
    index.insert(M, C, prompt)  # takes A's freed slot: nothing of A's comes back with it
    assert index.match(M, prompt) == {B: 2, C: 2} and index.held(M, A) == 0


def test_bad_index_shapes_are_refused_naming_them():
    with pytest.raises(ValueError, match="block_chars"):
        PrefixIndex(0)
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixIndex(8, capacity_blocks=0)


class ReferenceIndex:
    """What the index should answer, the slow obvious way."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[tuple, OrderedDict] = {}

    def insert(self, endpoint, blocks):
        lru = self.held.setdefault(endpoint, OrderedDict())
        for h in reversed(blocks[:self.capacity]):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def match(self, blocks):
        out = {}
        for endpoint, lru in self.held.items():
            n = 0
            while n < len(blocks) and blocks[n] in lru:
                n += 1
            if n:
                out[endpoint] = n
        return out


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "insert", "insert", "remove"]),
                              st.sampled_from([A, B, C, D]),
                              st.text(alphabet="ab", min_size=0, max_size=6)), max_size=30),
       probe=st.text(alphabet="ab", min_size=1, max_size=6), capacity=st.integers(1, 6))
def test_the_index_answers_as_the_obvious_reference_does(ops, probe, capacity):
    index, reference = PrefixIndex(1, capacity_blocks=capacity), ReferenceIndex(capacity)
    for op, endpoint, prompt in ops:
        if op == "insert":
            index.insert(M, endpoint, index.blocks(prompt))
            reference.insert(endpoint, index.blocks(prompt))
        else:
            index.remove(endpoint)
            reference.held.pop(endpoint, None)
    assert index.match(M, index.blocks(probe)) == reference.match(index.blocks(probe))
    for endpoint, lru in reference.held.items():
        assert index.held(M, endpoint) == len(lru)


# ---- cache_aware -----------------------------------------------------------------


def test_a_prompt_goes_where_its_prefix_was_sent():
    policy = cache_aware()
    policy.record(M, C, text("s", "t", "u", "q"))
    choice = policy.choose(M, cands(2, 0, 3, 0), text("s", "t", "u", "r"))
    assert choice == Choice(2, "prefix_hit", 0.75)


def test_the_longest_prefix_wins_and_less_load_breaks_a_tie():
    policy = cache_aware()
    policy.record(M, A, text("s", "t"))
    policy.record(M, B, text("s", "t", "u"))
    policy.record(M, C, text("s", "t", "u"))
    assert policy.choose(M, cands(0, 3, 2, 0), text("s", "t", "u")) == Choice(2, "prefix_hit", 1.0)


def test_a_partial_prefix_below_min_match_goes_where_there_is_most_room_unless_it_is_hot():
    policy = cache_aware(min_match=0.5)
    policy.record(M, A, text("s", "x", "y", "z"))
    # A holds 1 of the 4 blocks (4 blocks in all), B nothing: a miss spreads to B's empty cache ...
    choice = policy.choose(M, cands(0, 3), text("s", "t", "u", "v"))
    assert choice.reason == "load" and choice.index == 1 and choice.matched == 0.0
    # ... unless B is a hot spot (10 in flight against 0: beyond both thresholds): then by room among the rest.
    hot = policy.choose(M, cands(0, 10), text("s", "t", "u", "v"))
    assert hot.reason == "load" and hot.index == 0 and hot.matched == 0.25
    policy.record(M, A, text("s", "t", "y", "z"))
    assert policy.choose(M, cands(0, 3), text("s", "t", "u", "v")).reason == "prefix_hit"  # 2 of 4


def test_new_prefixes_spread_evenly_over_the_caches():
    """Sixteen tenants' first requests on four idle instances: four each (a
    miss goes to the instance holding least), not where chance puts them."""
    policy = cache_aware(min_match=0.5)
    endpoints = [("h", i) for i in range(4)]
    placed = Counter()
    for t in range(16):
        prompt = text(*(f"tenant{t}-{k}" for k in range(8)))
        choice = policy.choose(M, [Candidate(ep, 1.0, 0) for ep in endpoints], prompt)
        policy.record(M, endpoints[choice.index], prompt)
        placed[choice.index] += 1
    assert sorted(placed.values()) == [4, 4, 4, 4]


def test_without_a_prompt_or_a_match_cache_aware_goes_by_load():
    policy = cache_aware()
    policy.record(M, A, text("s", "t"))
    assert policy.choose(M, cands(9, 0)) == Choice(1, "load")
    assert policy.choose(M, cands(9, 0), "short") == Choice(1, "load")  # under one block
    assert policy.choose(M, cands(9, 0), text("z", "t")) == Choice(1, "load")


# holder's load, least load elsewhere -> the reason, with balance_abs=4, balance_rel=1.5
HOT_SPOTS = [
    (10, 0, "hot_spot"),    # 10 more and infinitely more loaded: both exceeded
    (12, 6, "hot_spot"),    # 6 more (> 4) and 2x (> 1.5x)
    (4, 0, "prefix_hit"),   # 4 more is not more than 4
    (3, 1, "prefix_hit"),   # 3x, but only 2 more: only the relative threshold exceeded
    (20, 15, "prefix_hit"),  # 5 more, but only 1.33x: only the absolute threshold exceeded
    (9, 6, "prefix_hit"),   # neither
]


@pytest.mark.parametrize("holder,least,reason", HOT_SPOTS)
def test_the_hot_spot_guard_needs_both_thresholds_exceeded(holder, least, reason):
    policy = cache_aware(balance_abs=4, balance_rel=1.5)
    policy.record(M, A, text("s", "t"))
    choice = policy.choose(M, cands(holder, least, least + 1), text("s", "t"))
    assert choice.reason == reason
    assert choice.index == (0 if reason == "prefix_hit" else 1)  # a hot spot goes to the least loaded


def test_the_guard_reads_load_per_unit_of_weight_and_other_routers_in_flight():
    policy = cache_aware()
    policy.record(M, A, text("s", "t"))
    heavy = [Candidate(A, 4.0, 12), Candidate(B, 1.0, 0)]  # 12 on weight 4: load 3, not hot
    assert policy.choose(M, heavy, text("s", "t")).reason == "prefix_hit"
    busy_elsewhere = [Candidate(A, 1.0, 0, others_in_flight=10), Candidate(B, 1.0, 0)]
    assert policy.choose(M, busy_elsewhere, text("s", "t")) == Choice(1, "hot_spot", 0.0)


def test_after_a_hot_spot_the_prefix_spreads_to_a_second_instance():
    policy = cache_aware()
    hot = text("s", "t", "u")
    policy.record(M, A, hot)
    choice = policy.choose(M, cands(10, 1, 0), hot)
    assert choice == Choice(2, "hot_spot", 0.0)
    policy.record(M, C, hot)  # the caller sends it there
    assert policy.index.match(M, policy.index.blocks(hot)) == {A: 3, C: 3}
    # A is still hot: C, now holding the prefix too, takes it as a hit
    assert policy.choose(M, cands(10, 0, 1), hot) == Choice(2, "prefix_hit", 1.0)
    # and once A cools down, either holder may serve it
    assert policy.choose(M, cands(1, 0, 1), hot).index in (0, 2)


def test_a_forgotten_instance_is_no_longer_chosen_for_its_prefix():
    policy = cache_aware()
    policy.record(M, A, text("s", "t"))
    policy.forget(A)
    assert policy.choose(M, cands(5, 0), text("s", "t")) == Choice(1, "load")
    policy.record(M, A, text("s", "t"))
    policy.forget(A, model="another-model")  # only that model's instance left the table
    assert policy.choose(M, cands(1, 0), text("s", "t")).reason == "prefix_hit"


@pytest.mark.parametrize("bad", [{"min_match": 0}, {"min_match": 1.5}, {"balance_abs": -1}, {"balance_rel": 0.5}])
def test_bad_cache_aware_settings_are_refused_naming_them(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CacheAware(**bad)


# ---- properties -------------------------------------------------------------------

PROMPTS = [text("s", "t", "u"), text("s", "t", "v"), text("s", "x"), text("y", "t", "u", "v"), "", "short"]

candidate_lists = st.lists(
    st.builds(lambda w, n, o: (w, n, o), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]), st.integers(0, 40),
              st.integers(0, 40)),
    max_size=6,
).map(lambda rows: [Candidate((f"h{i}", 1), w, n, o) for i, (w, n, o) in enumerate(rows)])
histories = st.lists(st.tuples(st.integers(0, 5), st.integers(0, len(PROMPTS) - 1)), max_size=12)


def learned(policy: Policy, candidates: list[Candidate], history) -> Policy:
    for i, p in history:
        if i < len(candidates):
            policy.record(M, candidates[i].endpoint, PROMPTS[p])
    return policy


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(POLICY_NAMES), candidates=candidate_lists, history=histories,
       prompt=st.sampled_from(PROMPTS), seed=st.integers(0, 2**16))
def test_the_choice_is_always_a_usable_candidate(name, candidates, history, prompt, seed):
    policy = learned(make_policy(name, rng=random.Random(seed), block_chars=BLOCK), candidates, history)
    choice = policy.choose(M, candidates, prompt)
    if not any(c.weight > 0 for c in candidates):
        assert choice is None
    else:
        assert 0 <= choice.index < len(candidates) and candidates[choice.index].weight > 0
        assert choice.reason in routing.REASONS and 0.0 <= choice.matched <= 1.0


@settings(max_examples=200, deadline=None)
@given(candidates=candidate_lists, prompt=st.sampled_from(PROMPTS), seed=st.integers(0, 2**16))
def test_with_no_prefix_learned_cache_aware_is_power_of_two(candidates, prompt, seed):
    cache = CacheAware(block_chars=BLOCK, rng=random.Random(seed))
    load = PowerOfTwo(rng=random.Random(seed))
    for _ in range(3):
        assert cache.choose(M, candidates, prompt) == load.choose(M, candidates, prompt)


@settings(max_examples=300, deadline=None)
@given(candidates=candidate_lists, history=histories, prompt=st.sampled_from(PROMPTS), seed=st.integers(0, 2**16),
       balance_abs=st.sampled_from([0, 2, 4]), balance_rel=st.sampled_from([1.0, 1.5, 3.0]))
def test_a_candidate_loaded_far_above_the_least_is_never_chosen_for_a_prefix_hit(
        candidates, history, prompt, seed, balance_abs, balance_rel):
    policy = learned(CacheAware(block_chars=BLOCK, balance_abs=balance_abs, balance_rel=balance_rel,
                                rng=random.Random(seed)), candidates, history)
    choice = policy.choose(M, candidates, prompt)
    if choice is None or choice.reason != "prefix_hit":
        return
    floor = min(c.load for c in candidates if c.weight > 0)
    load = candidates[choice.index].load
    assert not (load - floor > balance_abs and load > floor * balance_rel)
    assert choice.matched >= policy.min_match


# ---- factory and settings -----------------------------------------------------------


def test_make_policy_builds_each_policy_by_name():
    assert isinstance(make_policy("random"), WeightedRandom)
    assert isinstance(make_policy("power_of_two"), PowerOfTwo)
    policy = make_policy("cache_aware", block_chars=32, capacity_blocks=100, min_match=0.7, balance_abs=2,
                         balance_rel=2.0)
    assert isinstance(policy, CacheAware)
    assert (policy.index.block_chars, policy.index.capacity_blocks, policy.min_match, policy.balance_abs,
            policy.balance_rel) == (32, 100, 0.7, 2, 2.0)


def test_make_policy_names_what_it_refuses():
    with pytest.raises(ValueError, match="'round_robin'"):
        make_policy("round_robin")
    with pytest.raises(ValueError, match="min_mach"):
        make_policy("cache_aware", min_mach=0.5)
    with pytest.raises(ValidationError, match="min_match"):
        make_policy("power_of_two", min_match=2)  # checked even where unused


def test_routing_settings_defaults_and_per_model_overrides():
    settings_ = RoutingSettings.model_validate({"models": {"text2vec": "power_of_two", "chat": "random"}})
    assert settings_.policy == "cache_aware" and settings_.block_chars == 64
    assert [settings_.policy_for(m) for m in ("text2vec", "chat", "llm")] == ["power_of_two", "random", "cache_aware"]


@pytest.mark.parametrize("bad,field", [
    ({"policy": "least_loaded"}, "policy"),
    ({"models": {"m": "sticky"}}, "models.m"),
    ({"models": {" ": "random"}}, "models"),
    ({"block_chars": 0}, "block_chars"),
    ({"capacity_blocks": -5}, "capacity_blocks"),
    ({"min_match": 0}, "min_match"),
    ({"balance_abs": -1}, "balance_abs"),
    ({"balance_rel": 0.9}, "balance_rel"),
    ({"balance_relative": 2}, "balance_relative"),
])
def test_bad_routing_settings_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValidationError) as caught:
        RoutingSettings.model_validate(bad)
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [field]


def test_model_policies_route_each_model_by_its_own_policy():
    policies = ModelPolicies(RoutingSettings(block_chars=BLOCK, models={"embed": "power_of_two"}),
                             rng=random.Random(0))
    prompt = text("s", "t")
    for model in ("llm", "embed"):
        policies.record(model, A, prompt)
    assert policies.choose("llm", cands(2, 0), prompt) == Choice(0, "prefix_hit", 1.0)
    assert policies.choose("embed", cands(2, 0), prompt) == Choice(1, "load")
    assert isinstance(policies, Policy) and isinstance(policies.policy("llm"), CacheAware)
    policies.forget(A)
    assert policies.choose("llm", cands(2, 0), prompt) == Choice(1, "load")


# ---- a small simulation: tenants with long shared system prompts ------------------------


def simulate(policy: Policy, *, tenants=16, instances=4, ticks=600, arrivals=2, tenant_weights=None,
             seed=11) -> dict:
    """Requests of ``tenants`` (each prompt: the tenant's long system prompt, then a
    short question of its own) arriving at ``arrivals`` per tick on ``instances``
    workers, each of whose real cache holds 4 tenants' prompts (LRU). A request
    whose tenant the worker holds takes 2 ticks, else 8 (the prefill)."""
    rng = random.Random(seed)
    endpoints = [(f"w{i}", 8000) for i in range(instances)]
    system = [f"tenant {t}: " + "".join(rng.choice("abcdefgh") for _ in range(1200)) for t in range(tenants)]
    caches = {e: OrderedDict() for e in endpoints}  # the workers' real caches, by tenant
    in_flight = dict.fromkeys(endpoints, 0)
    running: list[tuple[int, tuple]] = []
    hits = requests = 0
    spread = 0
    reasons: Counter[str] = Counter()
    homes: set[tuple] = set()  # where tenant 0's requests went
    for tick in range(ticks):
        for done in [r for r in running if r[0] <= tick]:
            running.remove(done)
            in_flight[done[1]] -= 1
        for _ in range(arrivals):
            t = rng.choices(range(tenants), weights=tenant_weights)[0]
            prompt = system[t] + f" question {rng.random()}"
            candidates = [Candidate(e, 1.0, in_flight[e]) for e in endpoints]
            choice = policy.choose(M, candidates, prompt)
            endpoint = endpoints[choice.index]
            policy.record(M, endpoint, prompt)
            reasons[choice.reason] += 1
            if t == 0:
                homes.add(endpoint)
            hit = t in caches[endpoint]
            caches[endpoint][t] = None
            caches[endpoint].move_to_end(t)
            if len(caches[endpoint]) > 4:
                caches[endpoint].popitem(last=False)
            hits += hit
            requests += 1
            in_flight[endpoint] += 1
            running.append((tick + (2 if hit else 8), endpoint))
            spread = max(spread, max(in_flight.values()) - min(in_flight.values()))
    return {"hit_rate": hits / requests, "spread": spread, "reasons": reasons, "homes": len(homes)}


def sim_cache_aware(seed=0) -> CacheAware:
    # each instance's index holds about what its worker caches: 4 tenants of ~20 blocks, and some questions
    return CacheAware(block_chars=64, capacity_blocks=100, rng=random.Random(seed))


def test_cache_aware_keeps_each_tenant_on_its_instance_and_load_within_the_guard():
    cache = simulate(sim_cache_aware())
    load = simulate(PowerOfTwo(rng=random.Random(0)))
    randomly = simulate(WeightedRandom(rng=random.Random(0)))
    assert cache["hit_rate"] > 2 * load["hit_rate"] and cache["hit_rate"] > 2 * randomly["hit_rate"]
    assert cache["reasons"]["prefix_hit"] > cache["reasons"]["load"] + cache["reasons"]["hot_spot"]
    # in flight stays balanced within the guard (4 more than the least, plus the arrivals of a tick)
    assert cache["spread"] <= 4 + 2 + 1


def test_a_hot_tenant_spreads_over_instances_instead_of_piling_on_one():
    skewed = [16.0] + [1.0] * 15  # one tenant half the requests, at a rate one instance cannot keep up with
    cache = simulate(sim_cache_aware(), tenant_weights=skewed, arrivals=8)
    affinity = simulate(CacheAware(block_chars=64, capacity_blocks=100, balance_abs=1e9, rng=random.Random(0)),
                        tenant_weights=skewed, arrivals=8)  # the guard off: pure affinity
    load = simulate(PowerOfTwo(rng=random.Random(0)), tenant_weights=skewed, arrivals=8)
    assert affinity["homes"] == 1 and cache["homes"] >= 2  # the hot prefix spread ...
    assert cache["reasons"]["hot_spot"] > 0  # ... because the guard fired
    assert cache["spread"] < affinity["spread"] and cache["spread"] <= load["spread"]
    assert cache["hit_rate"] > load["hit_rate"]
