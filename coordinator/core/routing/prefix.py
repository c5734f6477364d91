"""An approximate prefix index per model, learned only from where requests went.

No engine reports what it has cached (and DB-GPT workers front many engines),
so the index guesses it the way the engine's own prefix cache would fill: the
rendered prompt is cut into fixed blocks of ``block_chars`` characters
(characters, not tokens: there is no tokenizer here) and hashed as a chain —
block i's hash covers blocks 0..i, as vLLM's prefix caching does — so two
prompts share block i's hash only if they share everything up to the end of
block i. A request's match against an instance is the number of leading blocks
that instance has seen, all of them still held.

Each instance (a model at an endpoint) keeps an LRU of block hashes bounded by
``capacity_blocks``, so the index forgets what a real worker's KV cache would
have evicted, and its memory is bounded. A request's blocks are touched from
last to first, so the first blocks — the shared system prompt — are the most
recent and a prompt's tail is evicted before its head, as vLLM frees blocks.

Cost: :meth:`PrefixIndex.match` is linear in the request's blocks (one integer
AND per block over a bitmask of the instances still matching) plus the
instances holding its first block, never in the size of the index;
:meth:`PrefixIndex.insert` is linear in the request's blocks (on CPython 3.11
here: a 16,000-character prompt hashes in ~40 us, matches against 16 holders in
~20 us, inserts in ~15 us). Memory, measured with tracemalloc: ~160 bytes per
(instance, block) entry when no other instance holds the block (its LRU entry,
the hash's integer, its holders' bitmask), ~95 bytes when several instances hold
it; so the default 16,384 blocks per instance (1 MiB of prompt text at 64
characters a block) cost at most ~2.6 MiB per instance.

Hashes use Python's ``hash`` of a tuple (string hashing is randomised per
process), so they are stable within one process only: each router keeps its
own index."""

from __future__ import annotations

from collections import OrderedDict

from coordinator.core.routing.base import Endpoint


def chain_hashes(text: str, block_chars: int, limit: int | None = None) -> list[int]:
    """The chain hashes of ``text``'s full blocks of ``block_chars`` characters
    (a trailing partial block is not hashed; at most ``limit`` blocks)."""
    if block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, not {block_chars}")
    end = len(text) - block_chars + 1
    if limit is not None:
        end = min(end, limit * block_chars)
    out: list[int] = []
    prev = 0
    for i in range(0, end, block_chars):
        prev = hash((prev, text[i:i + block_chars]))
        out.append(prev)
    return out


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class PrefixIndex:
    """Which instances of each model are believed to hold which prompt prefixes.

    ``block_chars``: characters per block; ``capacity_blocks``: blocks each
    instance (a model at an endpoint) keeps before forgetting its least
    recently used. Not thread-safe."""

    def __init__(self, block_chars: int = 64, capacity_blocks: int = 16_384) -> None:
        if block_chars < 1:
            raise ValueError(f"block_chars must be >= 1, not {block_chars}")
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, not {capacity_blocks}")
        self.block_chars = block_chars
        self.capacity_blocks = capacity_blocks
        # model -> block hash -> bitmask of the slots of the instances holding it
        self._holders: dict[str, dict[int, int]] = {}
        # model -> slot -> endpoint (None: a free slot), and its inverse
        self._by_slot: dict[str, list[Endpoint | None]] = {}
        self._slots: dict[str, dict[Endpoint, int]] = {}
        # (model, endpoint) -> the instance's blocks, least recently used first
        self._lru: dict[tuple[str, Endpoint], OrderedDict[int, None]] = {}

    def blocks(self, text: str) -> list[int]:
        """The prompt's chain hashes, at most ``capacity_blocks`` of them (no
        instance can hold more)."""
        return chain_hashes(text, self.block_chars, self.capacity_blocks)

    def match(self, model: str, blocks: list[int]) -> dict[Endpoint, int]:
        """For each instance of ``model`` holding the first block: how many
        leading blocks of ``blocks`` it holds. Instances holding none are left out."""
        holders = self._holders.get(model)
        if not holders or not blocks:
            return {}
        alive = holders.get(blocks[0], 0)
        if not alive:
            return {}
        by_slot = self._by_slot[model]
        out: dict[Endpoint, int] = {}
        n = 1
        for h in blocks[1:]:
            still = alive & holders.get(h, 0)
            if still != alive:
                for slot in _bits(alive & ~still):
                    out[by_slot[slot]] = n  # type: ignore[index]
                alive = still
                if not alive:
                    return out
            n += 1
        for slot in _bits(alive):
            out[by_slot[slot]] = n  # type: ignore[index]
        return out

    def insert(self, model: str, endpoint: Endpoint, blocks: list[int]) -> None:
        """Learn that ``endpoint``'s instance of ``model`` has seen ``blocks``
        (it now holds them, most recently used), evicting its least recently
        used blocks beyond the capacity."""
        if not blocks:
            return
        blocks = blocks[:self.capacity_blocks]
        bit = 1 << self._slot(model, endpoint)
        holders = self._holders.setdefault(model, {})
        lru = self._lru.setdefault((model, endpoint), OrderedDict())
        for h in reversed(blocks):  # the first block ends most recent: a tail goes before its head
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                holders[h] = holders.get(h, 0) | bit
        while len(lru) > self.capacity_blocks:
            h, _ = lru.popitem(last=False)
            self._drop(holders, h, bit)

    def remove(self, endpoint: Endpoint, model: str | None = None) -> None:
        """Forget ``endpoint``'s instance of ``model`` (of every model if None)."""
        for m in [model] if model is not None else list(self._slots):
            slots = self._slots.get(m)
            if slots is None or endpoint not in slots:
                continue
            slot = slots.pop(endpoint)
            self._by_slot[m][slot] = None
            holders = self._holders[m]
            for h in self._lru.pop((m, endpoint), ()):
                self._drop(holders, h, 1 << slot)
            if not slots:
                del self._slots[m], self._by_slot[m], self._holders[m]

    def held(self, model: str, endpoint: Endpoint) -> int:
        """How many blocks ``endpoint``'s instance of ``model`` is believed to hold."""
        return len(self._lru.get((model, endpoint), ()))

    def endpoints(self, model: str) -> set[Endpoint]:
        """The instances of ``model`` the index knows anything about."""
        return set(self._slots.get(model, ()))

    def _slot(self, model: str, endpoint: Endpoint) -> int:
        slots = self._slots.setdefault(model, {})
        slot = slots.get(endpoint)
        if slot is None:
            by_slot = self._by_slot.setdefault(model, [])
            slot = next((i for i, e in enumerate(by_slot) if e is None), len(by_slot))
            if slot == len(by_slot):
                by_slot.append(endpoint)
            else:
                by_slot[slot] = endpoint
            slots[endpoint] = slot
        return slot

    @staticmethod
    def _drop(holders: dict[int, int], h: int, bit: int) -> None:
        mask = holders.get(h, 0) & ~bit
        if mask:
            holders[h] = mask
        else:
            holders.pop(h, None)
