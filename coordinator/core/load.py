"""The fleet's load as the callers see it: requests in flight per instance,
summed over every router (driver processes, gateway replicas) that reports.

Each router counts its own requests in flight per instance and reports the
whole count — not increments — when it changes (coalesced) and at least every
``report_every`` seconds while anything is in flight. A report replaces that
reporter's previous one, so a lost or repeated report costs nothing, and a
report older than the last one taken (``seq``) is ignored.

A reporter is a router's life, not a process: a router that restarts comes
back under a new id and counts from zero. A reporter that stops reporting —
its process died, its node is gone — stops counting once its last report is
``ttl`` old: a drain or an autoscaler never waits on a caller that is gone.
A router that stops cleanly says so (:meth:`LoadBook.forget`).

Each report also says which route table the router has applied (``applied``:
the table's epoch and version; routers report every table change they take).
A drain takes an instance out of the table at some version, then waits until
every live reporter has applied it (:meth:`LoadBook.behind`) *and* nothing
is in flight there: a request a router chose just before it heard of the
drain is then in its count, never missed between the two.

Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

#: An instance: (model@type, host, port) — a route's identity.
Instance = tuple[str, str, int]


#: A route table's position: (epoch, version).
Position = tuple[str, int]


@dataclass
class _Report:
    seq: int
    at: float
    counts: dict[Instance, int] = field(default_factory=dict)
    applied: Position | None = None
    #: Requests waiting per model@type: held for want of any instance (scale
    #: from zero), or queued by flow control.
    queued: dict[str, int] = field(default_factory=dict)


class LoadBook:
    """The last report of every live reporter, and the sums of them."""

    def __init__(self, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        self.ttl = ttl
        self._reports: dict[str, _Report] = {}

    def report(self, reporter: str, seq: int, counts: Mapping[Instance, int], now: float,
               applied: Position | None = None, queued: Mapping[str, int] | None = None) -> bool:
        """Take ``reporter``'s count of its requests in flight (its whole count:
        instances it leaves out have none), and the route table it has
        applied. Whether it was taken (False: an older report than one
        already taken)."""
        last = self._reports.get(reporter)
        if last is not None and seq <= last.seq:
            return False
        bad = {i: n for i, n in counts.items() if n < 0}
        if bad:
            raise ValueError(f"in-flight counts cannot be negative: {bad}")
        self._reports[reporter] = _Report(seq, now, {i: n for i, n in counts.items() if n}, applied,
                                          {k: n for k, n in (queued or {}).items() if n > 0})
        return True

    def behind(self, mark: Position, now: float) -> list[str]:
        """The live reporters that have not said they applied the route table
        at ``mark`` (or later, of the same epoch)."""
        epoch, version = mark
        return [r for r, rep in self._live(now)
                if rep.applied is None or rep.applied[0] != epoch or rep.applied[1] < version]

    def forget(self, reporter: str) -> None:
        """``reporter`` stopped cleanly: it counts for nothing from now."""
        self._reports.pop(reporter, None)

    def expire(self, now: float) -> list[str]:
        """Drop the reporters silent for ``ttl``; their ids."""
        gone = [r for r, rep in self._reports.items() if now - rep.at >= self.ttl]
        for reporter in gone:
            del self._reports[reporter]
        return gone

    def _live(self, now: float) -> list[tuple[str, _Report]]:
        return [(r, rep) for r, rep in self._reports.items() if now - rep.at < self.ttl]

    def in_flight(self, now: float) -> Counter[Instance]:
        """Requests in flight per instance, over every live reporter."""
        total: Counter[Instance] = Counter()
        for _, rep in self._live(now):
            total.update(rep.counts)
        return total

    def on(self, instance: Instance, now: float) -> int:
        """Requests in flight on ``instance``, over every live reporter."""
        return sum(rep.counts.get(instance, 0) for _, rep in self._live(now))

    def others(self, reporter: str, now: float) -> dict[Instance, int]:
        """What every live reporter but ``reporter`` has in flight, per instance
        (what one gateway replica should add to its own count when choosing)."""
        total: Counter[Instance] = Counter()
        for r, rep in self._live(now):
            if r != reporter:
                total.update(rep.counts)
        return dict(total)

    def reporters(self, now: float) -> int:
        return len(self._live(now))

    def by_model(self, now: float, queued: bool = True) -> dict[str, int]:
        """Requests in flight per model@type, over every live reporter — and,
        with ``queued``, those waiting for it (held for an instance, or queued
        by flow control): the load the autoscaler follows."""
        total: Counter[str] = Counter()
        for (key, _, _), n in self.in_flight(now).items():
            total[key] += n
        if queued:
            total.update(self.queued(now))
        return dict(total)

    def queued(self, now: float) -> dict[str, int]:
        """Requests waiting per model@type (held for want of an instance, or
        queued by flow control), over every live reporter."""
        total: Counter[str] = Counter()
        for _, rep in self._live(now):
            total.update(rep.queued)
        return dict(total)
