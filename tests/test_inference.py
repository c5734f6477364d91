"""The pure parts of serving a request: DB-GPT's ModelOutput on the wire, the
NUL-delimited stream reader, and the choice of an instance. No I/O."""

from __future__ import annotations

import json
import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.inference import Candidate, ChunkReader, ModelOutput, choose

# What DB-GPT 0.8.2's worker manager writes for one chunk (json.dumps(asdict(output))).
DBGPT_CHUNK = {"content": {"type": "text", "object": {"data": "Hello", "format": "text"}}, "error_code": 0,
               "incremental": False, "model_context": None, "finish_reason": None,
               "usage": None, "metrics": {"collect_index": 1}}


def test_model_output_reads_dbgpts_content_form_and_its_text_form():
    out = ModelOutput.model_validate(DBGPT_CHUNK)
    assert (out.text, out.error_code, out.success, out.metrics) == ("Hello", 0, True, {"collect_index": 1})
    assert ModelOutput.model_validate({"text": "Hi", "error_code": 1}).success is False
    thinking = {**DBGPT_CHUNK, "content": [{"type": "thinking", "object": {"data": "hmm", "format": "text"}},
                                           {"type": "text", "object": {"data": "Yes", "format": "text"}}]}
    out = ModelOutput.model_validate(thinking)
    assert (out.text, out.thinking) == ("Yes", "hmm")


def test_model_output_writes_what_dbgpt_reads():
    wire = ModelOutput(text="Hello", metrics={"collect_index": 1}).to_wire()
    assert wire == DBGPT_CHUNK
    assert "text" not in wire  # DB-GPT's ModelOutput(**data) refuses text and content together
    assert ModelOutput.model_validate(wire) == ModelOutput(text="Hello", metrics={"collect_index": 1})


def test_an_error_output_is_dbgpts():
    out = ModelOutput.error("no instance of m@llm")
    assert out.error_code == 1 and out.text.startswith("**LLMServer Generate Error") and "m@llm" in out.text


@given(texts=st.lists(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=20), min_size=1,
                      max_size=8),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_the_stream_reader_finds_every_chunk_however_the_bytes_arrive(texts, cuts):
    stream = b"".join(json.dumps(ModelOutput(text=t).to_wire()).encode() + b"\0" for t in texts)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = ChunkReader()
    seen = [o.text for a, b in zip(bounds, bounds[1:]) for o in reader.feed(stream[a:b])]
    assert seen == texts and reader.pending == b""


def test_a_cut_stream_leaves_bytes_pending():
    reader = ChunkReader()
    assert list(reader.feed(b'{"text": "a"}\0{"text": "b')) == [ModelOutput(text="a")]
    assert reader.pending == b'{"text": "b'


def picks(candidates, n=4000, seed=7) -> Counter[int]:
    rng = random.Random(seed)
    return Counter(choose(candidates, rng) for _ in range(n))


def test_the_less_loaded_of_two_wins():
    counts = picks([Candidate(("a", 1), 1.0, 0), Candidate(("b", 1), 1.0, 10)])
    assert counts[0] == 4000  # two candidates: every draw compares both


def test_weight_is_honoured_when_loads_are_equal():
    counts = picks([Candidate(("a", 1), 3.0, 0), Candidate(("b", 1), 1.0, 0), Candidate(("c", 1), 1.0, 0)])
    assert counts[0] > counts[1] + counts[2]
    # load per unit of weight: 6 in flight on weight 3 is as loaded as 2 on weight 1
    assert picks([Candidate(("a", 1), 3.0, 3), Candidate(("b", 1), 1.0, 2)])[0] == 4000


def test_weight_zero_is_never_chosen_and_nothing_is_none():
    counts = picks([Candidate(("a", 1), 0.0, 0), Candidate(("b", 1), 1.0, 50)])
    assert counts == {1: 4000}
    assert choose([]) is None and choose([Candidate(("a", 1), 0.0, 0)]) is None
