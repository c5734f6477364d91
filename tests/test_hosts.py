"""What a registry entry's host and port may be before they become a URL. Pure:
no Ray, no network."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.core.hosts import host_problem, parse_endpoint, port_problem
from coordinator.core.models import ModelInstance, WorkerStartupRequest

BAD_HOSTS = [
    "evil.com/x?", "user@host", "host:1234", "http://host", "127.0.0.1#", "",
    "a" * 300, "wörker.internal", "gpu\u200b01",  # non-ASCII, zero-width space
    "host name", " host", "host\n", "host\r\nX-Injected: 1", "host\x00", "host\\x",
    "[::1]", "fe80::1%eth0", "..", ".", "-host", "host-", "a..b", "999.1.1.1", "2130706433",
    "host?x=1", "host#frag", "host;x", "%2e%2e", "a" * 64 + ".com",
]
GOOD_HOSTS = ["10.0.0.7", "127.0.0.1", "::1", "2001:db8::7", "gpu-01", "gpu-01.cluster.internal",
              "db_gpt", "xn--wrker-jua.internal", "host.", "a" * 63 + ".com"]
BAD_PORTS = [0, -1, -18001, 65536, 10**9, True, False, 80.5, "http", None]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_host_that_is_not_a_bare_hostname_or_ip_is_refused(host):
    assert host_problem(host)
    with pytest.raises(ValidationError) as info:
        ModelInstance(model_name="m@llm", host=host, port=18001)
    assert info.value.errors()[0]["loc"] == ("host",)
    with pytest.raises(ValidationError):
        WorkerStartupRequest(host=host, port=18001, model="m", worker_type="llm")


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_hostnames_and_ip_literals_are_accepted(host):
    assert host_problem(host) is None
    assert ModelInstance(model_name="m@llm", host=host, port=1).host == host


@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_outside_1_to_65535_or_not_an_integer_is_refused(port):
    with pytest.raises(ValidationError) as info:
        ModelInstance(model_name="m@llm", host="h", port=port)
    assert info.value.errors()[0]["loc"] == ("port",)


def test_port_rule():
    assert port_problem(1) is None and port_problem(65535) is None
    assert port_problem(True) and port_problem(0) and port_problem(65536)


def test_names_longer_than_256_characters_are_refused():
    with pytest.raises(ValidationError) as info:
        ModelInstance(model_name="m" * 257, host="h", port=1)
    assert info.value.errors()[0]["loc"] == ("model_name",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.7:18001", ("10.0.0.7", 18001)), ("[::1]:8000", ("::1", 8000)), ("gpu-01:1", ("gpu-01", 1))],
)
def test_endpoint_keys_parse(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.7", "::1:8000", "evil.com/x:80", "h:0", "h:x", "user@h:80", ":80"])
def test_bad_endpoint_keys_say_what_is_wrong(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)


@settings(max_examples=300, deadline=None)
@example(host="h", port=80)
@given(host=st.text(max_size=80) | st.from_regex(r"[a-z0-9.\-_:@/?#%\[\] ]{1,40}", fullmatch=True),
       port=st.integers(min_value=-10, max_value=70000))
def test_an_accepted_host_becomes_a_url_to_exactly_that_host_and_port(host, port):
    """Whatever a registry says, what passes validation yields a URL whose host
    and port are exactly the entry's, with no userinfo, query or fragment, and
    the path we chose."""
    try:
        inst = ModelInstance(model_name="m@llm", host=host, port=port)
    except ValidationError:
        return
    url = httpx.URL(scheme="http", host=inst.host, port=inst.port, path="/api/worker")
    request = httpx.Client(base_url=url).build_request("POST", "/apply")
    assert request.url.host == host.lower().rstrip(".") or request.url.host == host.lower()
    assert (request.url.port or 80) == port  # httpx leaves out the scheme's default port
    assert request.url.path == "/api/worker/apply"
    assert request.url.userinfo == b"" and request.url.query == b"" and request.url.fragment == ""
