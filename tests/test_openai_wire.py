"""OpenAI's API as the gateway speaks it (coordinator/core/openai.py): requests
parsed and refused by field, translated to DB-GPT's worker bodies, DB-GPT's
outputs translated back — streams, answers, errors. Pure: no Ray, no HTTP."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.core.inference import ModelOutput
from coordinator.core.openai import (
    FAILURES,
    ROLES,
    SSE_DONE,
    EmbeddingsRequestBody,
    OpenAILimits,
    PromptRequestBody,
    StreamTranslator,
    WorkerAnswerError,
    chat_completion_response,
    completion_response,
    embeddings_response,
    error_body,
    error_response,
    make_id,
    models_response,
    parse_chat,
    parse_completion,
    parse_embeddings,
    render_prompt,
    sse,
    to_dbgpt_chat,
    to_dbgpt_completion,
    to_dbgpt_embeddings,
    validation_error_body,
    worker_error,
)

HAS_OPENAI = importlib.util.find_spec("openai") is not None


def chat(**fields):
    return {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], **fields}


def refusal(parse, body, limits=None):
    """The 400 body a refused request gets."""
    with pytest.raises(ValidationError) as info:
        parse(body) if limits is None else parse(body, limits)
    return validation_error_body(info.value)["error"]


# ---- chat requests ------------------------------------------------------------


@pytest.mark.parametrize("role,dbgpt", [("system", "system"), ("developer", "system"), ("user", "human"),
                                        ("assistant", "ai")])
def test_openai_roles_become_dbgpt_roles(role, dbgpt):
    body = to_dbgpt_chat(parse_chat(chat(messages=[{"role": role, "content": "x"}])))
    assert body["messages"] == [{"role": dbgpt, "content": "x"}]


def test_a_chat_becomes_a_prompt_request_that_echoes_nothing():
    req = parse_chat(chat(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                          max_tokens=5, temperature=0, top_p=0.5, presence_penalty=1, frequency_penalty=-1,
                          top_k=40, seed=7, user="ann"))
    assert to_dbgpt_chat(req) == {
        "model": "qwen", "messages": [{"role": "system", "content": "be brief"}, {"role": "human", "content": "hi"}],
        "echo": False, "chat_model": True, "max_new_tokens": 5, "temperature": 0.0, "top_p": 0.5, "top_k": 40,
        "presence_penalty": 1.0, "frequency_penalty": -1.0}


def test_fields_not_given_are_not_sent_to_the_worker():
    assert to_dbgpt_chat(parse_chat(chat())) == {"model": "qwen", "messages": [{"role": "human", "content": "hi"}],
                                                 "echo": False, "chat_model": True}


@pytest.mark.parametrize("fields,expected", [
    ({"max_tokens": 7}, 7),
    ({"max_completion_tokens": 9}, 9),
    ({"max_tokens": 7, "max_completion_tokens": 9}, 9),
    ({}, None),
])
def test_max_completion_tokens_wins_over_max_tokens(fields, expected):
    assert to_dbgpt_chat(parse_chat(chat(**fields))).get("max_new_tokens") == expected


def test_a_default_max_tokens_from_the_limits_applies_only_when_the_request_gives_none():
    limits = OpenAILimits(default_max_tokens=256)
    assert to_dbgpt_chat(parse_chat(chat()), limits)["max_new_tokens"] == 256
    assert to_dbgpt_chat(parse_chat(chat(max_tokens=3)), limits)["max_new_tokens"] == 3


@pytest.mark.parametrize("stop,sent", [("###", ["###"]), (["a", "b"], ["a", "b"]), (None, None), ([], None)])
def test_stop_as_a_string_or_a_list_is_sent_as_a_list(stop, sent):
    assert to_dbgpt_chat(parse_chat(chat(stop=stop))).get("stop") == sent


def test_text_parts_are_joined_with_newlines_and_an_assistant_may_have_no_content():
    req = parse_chat(chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]))
    assert [m["content"] for m in to_dbgpt_chat(req)["messages"]] == ["a\nb", ""]


def test_unknown_fields_are_ignored_as_openai_does():
    req = parse_chat(chat(metadata={"a": 1}, store=True, service_tier="auto", whatever=[1, 2]))
    assert to_dbgpt_chat(req) == to_dbgpt_chat(parse_chat(chat()))


def test_harmless_values_of_unsupported_fields_are_accepted():
    parse_chat(chat(tools=[], tool_choice="none", response_format={"type": "text"}, logprobs=False,
                    logit_bias={}, n=1, modalities=["text"], parallel_tool_calls=True))


@pytest.mark.parametrize("body,param,says", [
    (chat(n=2), "n", "only n=1"),
    (chat(n=0), "n", "at least 1"),
    (chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages.0.role", "'tool'"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages.0.role", "'function'"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages.0.role", "must be one of"),
    (chat(messages=[{"role": "user", "content": "x"}, {"content": "y"}]), "messages.1.role", "required"),
    (chat(messages=[{"role": "user", "content": None}]), "messages.0.content", "required"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages.0.content", "image_url"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", "string"),
    (chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]),
     "messages.0.tool_calls", "tool calls"),
    (chat(messages=[]), "messages", "empty"),
    (chat(messages="hi"), "messages", "list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "required"),
    (chat(model=""), "model", "empty"),
    (chat(model=5), "model", "string"),
    (chat(temperature=2.5), "temperature", "2"),
    (chat(temperature=-0.1), "temperature", "0"),
    (chat(top_p=1.5), "top_p", "1"),
    (chat(presence_penalty=3), "presence_penalty", "2"),
    (chat(frequency_penalty=-3), "frequency_penalty", "-2"),
    (chat(top_k=0), "top_k", "-1"),
    (chat(max_tokens=0), "max_tokens", "at least 1"),
    (chat(max_tokens="10"), "max_tokens", "integer"),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "at least 1"),
    (chat(stream="yes"), "stream", "boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "stream is true"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage", "boolean"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (chat(stop=[1]), "stop.0", "string"),
    (chat(stop=""), "stop", "empty"),
    (chat(stop={"a": 1}), "stop", "string"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tool calls"),
    (chat(tool_choice="required"), "tool_choice", "tool calls"),
    (chat(functions=[{"name": "f"}]), "functions", "function calls"),
    (chat(response_format={"type": "json_object"}), "response_format", "text"),
    (chat(logprobs=True), "logprobs", "logprobs"),
    (chat(top_logprobs=3), "top_logprobs", "logprobs"),
    (chat(logit_bias={"50256": -100}), "logit_bias", "logit_bias"),
    (chat(audio={"voice": "alloy"}), "audio", "audio"),
    (chat(modalities=["text", "audio"]), "modalities", "text"),
])
def test_a_bad_chat_request_is_refused_naming_the_field(body, param, says):
    error = refusal(parse_chat, body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and says in error["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b"NaN"])
def test_a_body_that_is_not_json_or_not_an_object_is_refused_as_a_whole(raw):
    error = refusal(parse_chat, raw)
    assert error["param"] is None and error["type"] == "invalid_request_error"


def test_a_nan_temperature_is_refused():
    assert refusal(parse_chat, b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}'
                   )["param"] == "temperature"


def test_a_raw_body_parses_like_its_decoded_form_lone_surrogates_included():
    body = chat(messages=[{"role": "user", "content": "caf\u00e9 \ud800"}])
    assert parse_chat(json.dumps(body).encode()) == parse_chat(body)


# ---- limits -----------------------------------------------------------------


@pytest.mark.parametrize("parse,body,limits,param", [
    (parse_chat, chat(messages=[{"role": "user", "content": "x"}] * 3), OpenAILimits(max_messages=2), "messages"),
    (parse_chat, chat(messages=[{"role": "user", "content": "x" * 11}]), OpenAILimits(max_message_chars=10),
     "messages.0.content"),
    (parse_chat, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 6}] * 2}]),
     OpenAILimits(max_message_chars=12), "messages.0.content"),
    (parse_chat, chat(stop=["a", "b"]), OpenAILimits(max_stop=1), "stop"),
    (parse_chat, chat(stop=["abc"]), OpenAILimits(max_stop_chars=2), "stop"),
    (parse_chat, chat(max_tokens=101), OpenAILimits(max_tokens=100), "max_tokens"),
    (parse_chat, chat(max_completion_tokens=101), OpenAILimits(max_tokens=100), "max_completion_tokens"),
    (parse_chat, chat(model="m" * 11), OpenAILimits(max_model_chars=10), "model"),
    (parse_completion, {"model": "m", "prompt": "x" * 11}, OpenAILimits(max_message_chars=10), "prompt"),
    (parse_completion, {"model": "m", "prompt": "x", "max_tokens": 101}, OpenAILimits(max_tokens=100), "max_tokens"),
    (parse_embeddings, {"model": "m", "input": ["a", "b", "c"]}, OpenAILimits(max_embedding_inputs=2), "input"),
    (parse_embeddings, {"model": "m", "input": ["x" * 11]}, OpenAILimits(max_message_chars=10), "input"),
])
def test_each_limit_is_enforced_naming_the_field(parse, body, limits, param):
    parse(body)  # within the default limits
    assert refusal(parse, body, limits)["param"] == param


def test_the_default_limits_are_safe():
    limits = OpenAILimits()
    assert limits.max_body_bytes == 4 * 1024 * 1024
    assert (limits.max_messages, limits.max_message_chars, limits.max_stop, limits.max_embedding_inputs,
            limits.max_tokens) == (1024, 1_000_000, 4, 2048, 1_000_000)
    with pytest.raises(ValidationError):
        OpenAILimits(max_messages=0)
    with pytest.raises(ValidationError):
        OpenAILimits(max_mesages=10)  # a misspelt limit is refused, not ignored


# ---- completions and embeddings requests -----------------------------------------


@pytest.mark.parametrize("prompt", ["once upon", ["once upon"]])
def test_a_completion_becomes_a_prompt_request_with_openais_default_of_16_tokens(prompt):
    body = to_dbgpt_completion(parse_completion({"model": "m", "prompt": prompt, "stop": "\n"}))
    assert body == {"model": "m", "prompt": "once upon", "echo": False, "chat_model": False, "max_new_tokens": 16,
                    "stop": ["\n"]}


def test_a_completion_passes_echo_on():
    assert to_dbgpt_completion(parse_completion({"model": "m", "prompt": "x", "echo": True}))["echo"] is True


@pytest.mark.parametrize("body,param,says", [
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"model": "m", "prompt": []}, "prompt", "one prompt per request"),
    ({"model": "m", "prompt": [1, 2, 3]}, "prompt", "token-id"),
    ({"model": "m", "prompt": [[1, 2, 3]]}, "prompt", "token-id"),
    ({"model": "m", "prompt": 5}, "prompt", "string"),
    ({"model": "m"}, "prompt", "required"),
    ({"model": "m", "prompt": "x", "n": 3}, "n", "only n=1"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of", "best_of=1"),
    ({"model": "m", "prompt": "x", "suffix": "end"}, "suffix", "suffix"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs", "logprobs"),
])
def test_a_bad_completion_request_is_refused_naming_the_field(body, param, says):
    error = refusal(parse_completion, body)
    assert error["param"] == param and says in error["message"]


@pytest.mark.parametrize("given,sent", [("hello", ["hello"]), (["a", "b"], ["a", "b"])])
def test_embeddings_input_becomes_dbgpts_list(given, sent):
    assert to_dbgpt_embeddings(parse_embeddings({"model": "bge", "input": given})) == {
        "model": "bge", "input": sent, "worker_type": "text2vec"}


@pytest.mark.parametrize("body,param", [
    ({"model": "bge", "input": []}, "input"),
    ({"model": "bge", "input": ""}, "input"),
    ({"model": "bge", "input": [1, 2]}, "input"),
    ({"model": "bge", "input": [[1, 2]]}, "input"),
    ({"model": "bge", "input": ["a", 3.5]}, "input.1"),
    ({"model": "bge", "input": "a", "dimensions": 256}, "dimensions"),
    ({"model": "bge", "input": "a", "encoding_format": "int8"}, "encoding_format"),
])
def test_a_bad_embeddings_request_is_refused_naming_the_field(body, param):
    assert refusal(parse_embeddings, body)["param"] == param


# ---- the prompt a prefix router hashes ---------------------------------------------


def test_render_prompt_is_role_and_content_per_message_in_order():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert render_prompt(messages) == "system:3:sys\nhuman:2:hi\n"
    assert render_prompt(parse_chat(chat(messages=messages)).messages) == render_prompt(messages)
    assert render_prompt([{"role": "developer", "content": "sys"}]) == render_prompt(messages[:1])


def test_render_prompt_never_confuses_where_one_message_ends():
    a = [{"role": "user", "content": "ab"}, {"role": "user", "content": "c"}]
    b = [{"role": "user", "content": "a"}, {"role": "user", "content": "bc"}]
    assert render_prompt(a) != render_prompt(b)


message = st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES)), "content": st.text(max_size=30)})


@given(st.lists(message, min_size=1, max_size=6), st.integers(0, 6))
def test_requests_sharing_their_first_messages_share_a_rendered_prefix(messages, k):
    assert render_prompt(messages).startswith(render_prompt(messages[:k]))


# ---- streams -------------------------------------------------------------------


def translator(kind="chat", **kw):
    return StreamTranslator(kind, id=make_id(kind, "abc"), model="qwen", created=1_700_000_000, **kw)


def contents(chunks):
    return [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]


def run(t, outputs):
    chunks = []
    for output in outputs:
        chunks += t.feed(output)
    return chunks + t.finish()


def test_cumulative_and_incremental_streams_give_the_same_deltas():
    cumulative = [ModelOutput(text=t) for t in ["He", "Hello", "Hello", "Hello wor", "Hello world"]]
    incremental = [ModelOutput(text=t, incremental=True) for t in ["He", "llo", "", " wor", "ld"]]
    a, b = run(translator(), cumulative), run(translator(), incremental)
    assert contents(a) == contents(b) == ["", "He", "llo", " wor", "ld", None]
    assert a == b


def test_a_chat_stream_opens_with_the_assistant_role_and_closes_with_the_finish_reason():
    chunks = run(translator(), [ModelOutput(text="Hi", finish_reason="length")])
    first, *_, last = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert all(c["finish_reason"] is None for chunk in chunks[:-1] for c in chunk["choices"])
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("chatcmpl-abc", "chat.completion.chunk", 1_700_000_000, "qwen")}


@pytest.mark.parametrize("given,sent", [(None, "stop"), ("stop", "stop"), ("length", "length"),
                                        ("abort", "stop"), ("eos", "stop")])
def test_the_finish_reason_is_dbgpts_when_openai_knows_it_else_stop(given, sent):
    assert run(translator(), [ModelOutput(text="x", finish_reason=given)])[-1]["choices"][0]["finish_reason"] == sent


def test_a_stream_with_no_output_still_opens_and_closes():
    chunks = translator().finish()
    assert contents(chunks) == ["", None] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_rewritten_cumulative_text_is_not_sent_twice():
    t = translator()
    chunks = run(t, [ModelOutput(text="Hello\nUser"), ModelOutput(text="Hello"), ModelOutput(text="Hello\nUser: hi")])
    assert "".join(c or "" for c in contents(chunks)) == "Hello\nUser: hi"
    assert t.rewrites == 1


def test_half_a_character_in_a_cumulative_text_waits_for_the_rest():
    chunks = run(translator(), [ModelOutput(text="caf\ufffd"), ModelOutput(text="caf\u00e9!")])
    assert contents(chunks)[1:-1] == ["caf", "\u00e9!"]


def test_thinking_is_sent_as_reasoning_content():
    chunks = run(translator(), [ModelOutput(text="", thinking="hmm"), ModelOutput(text="42", thinking="hmm.")])
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert deltas == [{"reasoning_content": "hmm"}, {"content": "42", "reasoning_content": "."}]


def test_usage_ends_the_stream_when_asked_with_the_workers_last_counts():
    outputs = [ModelOutput(text="a", usage={"prompt_tokens": 3, "completion_tokens": 1}),
               ModelOutput(text="ab", usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
               ModelOutput(text="ab")]
    chunks = run(translator(include_usage=True), outputs)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[0]


def test_usage_is_null_not_estimated_when_the_worker_reports_none():
    assert run(translator(include_usage=True), [ModelOutput(text="a")])[-1]["usage"] is None
    assert all("usage" not in c for c in run(translator(), [ModelOutput(text="a", usage={"prompt_tokens": 1})]))


def test_an_error_output_mid_stream_becomes_an_error_event_naming_the_worker_and_ends_the_stream():
    t = translator(worker="10.0.0.5:8001")
    chunks = t.feed(ModelOutput(text="Hel")) + t.feed(ModelOutput(text="CUDA out of memory", error_code=1))
    error = chunks[-1]["error"]
    assert "10.0.0.5:8001" in error["message"] and "CUDA out of memory" in error["message"]
    assert (error["type"], error["code"]) == ("server_error", "worker_error")
    assert t.done and t.feed(ModelOutput(text="Hello")) == [] and t.finish() == []


def test_a_broken_stream_ends_with_an_error_event_the_gateway_words():
    t = translator(worker="a:1")
    t.feed(ModelOutput(text="x"))
    assert "b:2" in t.error("connection reset", worker="b:2")["error"]["message"]
    assert t.finish() == []


def test_a_completion_stream_has_the_text_completion_shape():
    chunks = run(translator("completion"), [ModelOutput(text="Once"), ModelOutput(text="Once upon")])
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert [c["choices"][0]["text"] for c in chunks] == ["Once", " upon", ""]
    assert chunks[0]["id"] == "cmpl-abc" and chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---- answers ---------------------------------------------------------------------


def test_a_chat_answer_has_the_message_the_finish_reason_and_dbgpts_usage():
    out = ModelOutput(text="Hi!", finish_reason="length", usage={"prompt_tokens": 4, "completion_tokens": 2})
    assert chat_completion_response(out, "qwen", "chatcmpl-1", 5) == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "qwen",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "length",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}


@pytest.mark.parametrize("usage", [None, {}, {"total_tokens": 3}, {"prompt_tokens": "4"}, {"prompt_tokens": -1}])
def test_usage_without_token_counts_is_omitted(usage):
    assert chat_completion_response(ModelOutput(text="x", usage=usage), "m", "i", 0)["usage"] is None


def test_a_failed_output_is_not_made_into_an_answer():
    with pytest.raises(ValueError):
        chat_completion_response(ModelOutput.error("boom"), "m", "i", 0)
    with pytest.raises(ValueError):
        completion_response(ModelOutput.error("boom"), "m", "i", 0)
    status, body = worker_error("boom", "h:1")
    assert status == 502 and body["error"]["message"] == "worker h:1 failed: boom"


def test_a_completion_answer_has_the_text():
    body = completion_response(ModelOutput(text="upon a time"), "m", "cmpl-1", 5)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "upon a time"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_embeddings_answer_as_floats_or_openais_base64():
    assert embeddings_response([[1, 0.5], [0, -2.0]], "bge") == {
        "object": "list", "model": "bge", "usage": {"prompt_tokens": 0, "total_tokens": 0},
        "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 0.5]},
                 {"object": "embedding", "index": 1, "embedding": [0.0, -2.0]}]}
    packed = embeddings_response([[1, 0.5, -2.0]], "bge", "base64")["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(packed)) == (1.0, 0.5, -2.0)


@pytest.mark.parametrize("vectors,expected", [({"a": 1}, None), ([[1.0]], 2), ([[1.0, "x"]], 1),
                                              ([[math.nan]], 1), ([[1.0, True]], 1), ([1.0], 1)])
def test_a_malformed_embeddings_answer_is_the_workers_fault(vectors, expected):
    with pytest.raises(WorkerAnswerError):
        embeddings_response(vectors, "bge", expected=expected)


def test_models_are_listed_once_each_in_order():
    assert models_response(["b", "a", "b"], created=9) == {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 9, "owned_by": "DB-GPT"},
        {"id": "b", "object": "model", "created": 9, "owned_by": "DB-GPT"}]}


# ---- errors and framing ------------------------------------------------------------


@pytest.mark.parametrize("situation,status,code", [
    ("bad_request", 400, None), ("bad_key", 401, "invalid_api_key"), ("unknown_model", 404, "model_not_found"),
    ("body_too_large", 413, "request_too_large"), ("overloaded", 429, "rate_limit_exceeded"),
    ("worker_failed", 502, "worker_error"), ("no_instance", 503, "no_instance"), ("deadline", 504, "timeout"),
])
def test_each_situation_has_openais_status_and_code(situation, status, code):
    got_status, body = error_response(situation, "msg", param="model" if status == 400 else None)
    assert got_status == status == FAILURES[situation].status
    assert body["error"]["code"] == code and body["error"]["message"] == "msg"


def test_error_bodies_have_openais_shape():
    assert error_body("no", "invalid_request_error", "model", "model_not_found") == {
        "error": {"message": "no", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_sse_frames_one_json_object_per_event():
    frame = sse({"a": "caf\u00e9", "b": [1]})
    assert frame == 'data: {"a":"café","b":[1]}\n\n'.encode()
    assert json.loads(sse({"t": "\ud800"})[6:]) == {"t": "\ud800"}  # still JSON, ASCII-escaped
    assert SSE_DONE == b"data: [DONE]\n\n"


# ---- properties --------------------------------------------------------------------

finite = {"allow_nan": False, "allow_infinity": False}
part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
valid_message = st.fixed_dictionaries({
    "role": st.sampled_from(sorted(ROLES)),
    "content": st.one_of(st.text(max_size=40), st.lists(part, max_size=3))})
valid_chat = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=40), "messages": st.lists(valid_message, min_size=1, max_size=5)},
    optional={
        "max_tokens": st.integers(1, 1_000_000), "max_completion_tokens": st.integers(1, 1_000_000),
        "temperature": st.floats(0, 2, **finite), "top_p": st.floats(0, 1, **finite),
        "presence_penalty": st.floats(-2, 2, **finite), "frequency_penalty": st.floats(-2, 2, **finite),
        "top_k": st.one_of(st.just(-1), st.integers(1, 100)), "n": st.just(1), "stream": st.booleans(),
        "stop": st.one_of(st.text(min_size=1, max_size=10), st.lists(st.text(min_size=1, max_size=10), max_size=4)),
        "seed": st.integers(), "user": st.text(max_size=10), "unknown": st.integers()})


@given(valid_chat)
def test_any_valid_chat_request_becomes_a_valid_dbgpt_body(body):
    req = parse_chat(body)
    sent = to_dbgpt_chat(req)
    PromptRequestBody.model_validate(sent)
    json.dumps(sent)
    assert [m["role"] for m in sent["messages"]] == [ROLES[m["role"]] for m in body["messages"]]
    assert sent.get("max_new_tokens") == body.get("max_completion_tokens", body.get("max_tokens"))
    assert sent["echo"] is False
    assert parse_chat(json.dumps(body).encode()) == req


@given(st.fixed_dictionaries({"model": st.text(min_size=1, max_size=10),
                              "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=40), min_size=1,
                                                                                 max_size=1))},
                             optional={"max_tokens": st.integers(1, 1000), "echo": st.booleans(),
                                       "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4)}),
       st.fixed_dictionaries({"model": st.text(min_size=1, max_size=10),
                              "input": st.one_of(st.text(min_size=1), st.lists(st.text(min_size=1), min_size=1))}))
def test_any_valid_completion_or_embeddings_request_becomes_a_valid_dbgpt_body(completion, embeddings):
    PromptRequestBody.model_validate(to_dbgpt_completion(parse_completion(completion)))
    EmbeddingsRequestBody.model_validate(to_dbgpt_embeddings(parse_embeddings(embeddings)))


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "n", "stop", "presence_penalty", "frequency_penalty", "seed", "user", "tools",
          "tool_choice", "functions", "function_call", "response_format", "logprobs", "top_logprobs", "logit_bias",
          "audio", "modalities", "prompt", "echo", "suffix", "best_of", "input", "encoding_format", "dimensions"]
message_like = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "tool", "x"]) | json_value,
                                                   "content": json_value, "tool_calls": json_value})
fuzz_body = st.one_of(
    json_value,
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=8),
    valid_chat.flatmap(lambda body: st.dictionaries(st.sampled_from(FIELDS), json_value | st.lists(message_like),
                                                    max_size=3).map(lambda extra: {**body, **extra})))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_body)
def test_any_json_body_is_either_parsed_or_refused_with_a_validation_error(body):
    for parse, translate in ((parse_chat, to_dbgpt_chat), (parse_completion, to_dbgpt_completion),
                             (parse_embeddings, to_dbgpt_embeddings)):
        try:
            req = parse(body)
        except ValidationError as exc:
            error = validation_error_body(exc)["error"]
            assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
            continue
        model = EmbeddingsRequestBody if parse is parse_embeddings else PromptRequestBody
        model.model_validate(translate(req))  # a worker is never sent an invalid body


@given(st.binary(max_size=200))
def test_any_bytes_are_either_parsed_or_refused_with_a_validation_error(raw):
    try:
        parse_chat(raw)
    except ValidationError as exc:
        validation_error_body(exc)


@given(st.lists(st.tuples(st.text(max_size=5), st.booleans()), max_size=8))
def test_the_client_is_sent_exactly_the_text_of_an_incremental_stream(pieces):
    t = translator()
    chunks = run(t, [ModelOutput(text=p, incremental=True) for p, _ in pieces])
    assert "".join(c or "" for c in contents(chunks)) == "".join(p for p, _ in pieces)


@given(st.lists(st.text(max_size=5), max_size=8))
def test_a_cumulative_stream_sends_the_final_text_when_each_text_extends_the_last(pieces):
    texts = ["".join(pieces[:i + 1]).replace("\ufffd", "") for i in range(len(pieces))]
    chunks = run(translator(), [ModelOutput(text=t) for t in texts])
    assert "".join(c or "" for c in contents(chunks)) == (texts[-1] if texts else "")


# ---- against DB-GPT's and OpenAI's own models ---------------------------------------


def test_the_bodies_parse_with_dbgpt_0_8_2s_own_models():
    from tests.dbgpt_env import VENV

    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"DB-GPT's environment is not built ({VENV})")
    bodies = [to_dbgpt_chat(parse_chat(chat(messages=[{"role": r, "content": "x"} for r in ROLES], max_tokens=3,
                                            temperature=0, stop="\n", top_k=5, presence_penalty=1))),
              to_dbgpt_completion(parse_completion({"model": "m", "prompt": ["x"], "echo": True}))]
    embeddings = to_dbgpt_embeddings(parse_embeddings({"model": "bge", "input": "x"}))
    script = (
        "import json, sys\n"
        "from dbgpt.model.cluster.base import PromptRequest, EmbeddingsRequest\n"
        "data = json.load(sys.stdin)\n"
        "for body in data['prompts']:\n"
        "    r = PromptRequest(**body)\n"
        "    assert [m.pass_to_model for m in r.messages] == [True] * len(r.messages)\n"
        "    assert r.model_dump(exclude_unset=True) == body, (r.model_dump(exclude_unset=True), body)\n"
        "EmbeddingsRequest(**data['embeddings'])\n"
        "print('ok')\n")
    done = subprocess.run([str(python), "-c", script], input=json.dumps({"prompts": bodies, "embeddings": embeddings}),
                          capture_output=True, text=True, timeout=120)
    # DB-GPT may print its own start-up lines first (a fresh environment says "Setting random seed to 42").
    assert done.stdout.strip().splitlines()[-1:] == ["ok"], (done.stdout[-500:], done.stderr[-2000:])


@pytest.mark.skipif(not HAS_OPENAI, reason="the openai package is not installed in this environment")
def test_the_answers_parse_with_the_official_openai_types():
    from openai.types import Completion, CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    out = ModelOutput(text="Hi", usage={"prompt_tokens": 1, "completion_tokens": 1})
    ChatCompletion.model_validate(chat_completion_response(out, "m", "chatcmpl-1", 1))
    ChatCompletion.model_validate(chat_completion_response(ModelOutput(text="Hi"), "m", "chatcmpl-1", 1))
    Completion.model_validate(completion_response(out, "m", "cmpl-1", 1))
    CreateEmbeddingResponse.model_validate(embeddings_response([[0.1, 0.2]], "bge"))
    for chunk in run(translator(include_usage=True), [ModelOutput(text="a"), ModelOutput(text="ab", usage={
            "prompt_tokens": 1, "completion_tokens": 2})]):
        ChatCompletionChunk.model_validate(chunk)
    # The SDK reads completion stream chunks as Completion without validating
    # them (OpenAI's own have finish_reason null until the last): the last validates.
    Completion.model_validate(run(translator("completion"), [ModelOutput(text="a")])[-1])
