"""A worker-call error always says its cause: httpx raises some exceptions
with an empty message (a connection closed without a word), and then the
cause is the exception's type, never ``()``."""

from __future__ import annotations

import httpx
import pytest

from coordinator.plumbing.transport import (
    WorkerBadAnswer,
    WorkerConnectionLost,
    WorkerUnreachable,
    cause,
    map_transport_errors,
)


@pytest.mark.parametrize(
    ("raised", "error", "message"),
    [
        (httpx.ReadError(""), WorkerConnectionLost, "connection lost mid-call (ReadError)"),
        (httpx.RemoteProtocolError(""), WorkerConnectionLost, "connection lost mid-call (RemoteProtocolError)"),
        (httpx.ReadError("peer closed"), WorkerConnectionLost, "connection lost mid-call (peer closed)"),
        (httpx.DecodingError(""), WorkerBadAnswer, "undecodable answer (DecodingError)"),
        (httpx.ProxyError(""), WorkerConnectionLost, "transport error (ProxyError)"),
        (httpx.ConnectError(""), WorkerUnreachable, "connection refused"),
    ],
)
def test_an_exception_with_nothing_to_say_is_named_by_its_type(raised, error, message):
    with pytest.raises(error) as caught, map_transport_errors(1.0):
        raise raised
    assert str(caught.value) == message


def test_cause():
    assert cause(ValueError("")) == "ValueError"
    assert cause(ValueError("  ")) == "ValueError"
    assert cause(ValueError("bad")) == "bad"
