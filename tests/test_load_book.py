"""The in-flight book (coordinator/core/load.py), pure: reports replace each
other, old ones are ignored, silent reporters stop counting, and the sums
are the sums of the live reporters' last reports."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core.load import LoadBook

A = ("chat@llm", "10.0.0.1", 8001)
B = ("chat@llm", "10.0.0.2", 8001)
E = ("embed@text2vec", "10.0.0.1", 8001)


def test_a_report_replaces_the_reporters_last_one():
    book = LoadBook(ttl=5)
    book.report("gw-1", 1, {A: 3, B: 1}, now=0)
    book.report("gw-1", 2, {A: 1}, now=1)  # B left out: none in flight there now
    assert book.in_flight(1) == {A: 1}
    assert book.on(B, 1) == 0


def test_an_older_report_is_ignored():
    book = LoadBook(ttl=5)
    assert book.report("gw-1", 2, {A: 1}, now=0)
    assert not book.report("gw-1", 1, {A: 7}, now=0.1)  # delivered late
    assert book.on(A, 0.1) == 1


def test_reporters_add_up_and_others_leaves_out_the_asker():
    book = LoadBook(ttl=5)
    book.report("gw-1", 1, {A: 2, E: 1}, now=0)
    book.report("gw-2", 1, {A: 3, B: 4}, now=0)
    book.report("driver", 1, {B: 1}, now=0)
    assert book.in_flight(0) == {A: 5, B: 5, E: 1}
    assert book.others("gw-1", 0) == {A: 3, B: 5}
    assert book.others("stranger", 0) == {A: 5, B: 5, E: 1}
    assert book.by_model(0) == {"chat@llm": 10, "embed@text2vec": 1}
    assert book.reporters(0) == 3


def test_a_silent_reporter_stops_counting_after_the_ttl():
    book = LoadBook(ttl=3)
    book.report("dead", 1, {A: 4}, now=0)
    book.report("alive", 1, {A: 1}, now=0)
    book.report("alive", 2, {A: 1}, now=2)
    assert book.on(A, 2.9) == 5
    assert book.on(A, 3.0) == 1  # the dead one's last report is ttl old: never waited on
    assert book.expire(3.0) == ["dead"]
    assert book.reporters(3.0) == 1


def test_a_restarted_reporter_is_a_new_one_and_starts_from_zero():
    book = LoadBook(ttl=3)
    book.report("router-old", 9, {A: 4}, now=0)
    book.forget("router-old")  # stopped cleanly
    book.report("router-new", 1, {}, now=0.1)
    assert book.on(A, 0.1) == 0


def test_negative_counts_and_a_non_positive_ttl_are_refused():
    with pytest.raises(ValueError, match="negative"):
        LoadBook(ttl=1).report("r", 1, {A: -1}, now=0)
    with pytest.raises(ValueError, match="ttl"):
        LoadBook(ttl=0)


reports = st.lists(
    st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.integers(0, 20), st.floats(0, 20),
              st.dictionaries(st.sampled_from([A, B, E]), st.integers(0, 5))),
    max_size=30)


@settings(max_examples=200, deadline=None)
@given(reports, st.floats(0, 30))
def test_the_sum_is_the_sum_of_each_live_reporters_newest_report(stream, now):
    book = LoadBook(ttl=4)
    newest: dict[str, tuple[int, float, dict]] = {}
    for reporter, seq, at, counts in sorted(stream, key=lambda r: r[2]):
        book.report(reporter, seq, counts, at)
        if reporter not in newest or seq > newest[reporter][0]:
            newest[reporter] = (seq, at, counts)
    expected: dict = {}
    for _, at, counts in newest.values():
        if now - at < 4:
            for i, n in counts.items():
                if n:
                    expected[i] = expected.get(i, 0) + n
    assert dict(book.in_flight(now)) == expected
    for inst in (A, B, E):
        assert book.on(inst, now) == expected.get(inst, 0)


def test_a_reporter_is_behind_until_it_says_it_applied_the_table_at_the_mark():
    book = LoadBook(ttl=3)
    book.report("gw-1", 1, {A: 1}, now=0, applied=("e", 7))
    book.report("gw-2", 1, {}, now=0, applied=("e", 9))
    book.report("old-coordinator", 1, {}, now=0, applied=("other", 99))  # a table of another epoch
    book.report("silent", 1, {}, now=0)
    assert sorted(book.behind(("e", 8), 0)) == ["gw-1", "old-coordinator", "silent"]
    book.report("gw-1", 2, {A: 1}, now=1, applied=("e", 8))
    assert "gw-1" not in book.behind(("e", 8), 1)
    assert book.behind(("e", 8), 3.5) == []  # the others fell silent: nothing to wait for
