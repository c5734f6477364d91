"""How proxies call workers: headers and a bearer token per source (or per
worker), secrets only from the environment or a file and never shown, and https
with a CA bundle and an optional client certificate.

The header and redaction tests use a mock transport; the TLS tests run a real
reference worker serving https on loopback, with certificates made by trustme."""

from __future__ import annotations

import logging
import pickle
import ssl

import httpx
import pytest
import trustme
from pydantic import ValidationError

from actors.proxy import WorkerProxy
from reference_worker import ReferenceWorker, SimModel, WorkerSettings
from coordinator.core.config import CoordinatorConfig, ProbeSettings, ServeTls, WorkerAccess
from coordinator.core.models import Endpoint, WorkerApplyRequest

TOKEN = "tok-9f3c1e77-secret"
OTHER = "tok-override-55aa"
APPLY = WorkerApplyRequest(model="chatgpt-test", apply_type="restart")
NO_PROBE = ProbeSettings(enabled=False)


@pytest.fixture
def env_tokens(monkeypatch):
    monkeypatch.setenv("FLEET_TOKEN", TOKEN)
    monkeypatch.setenv("OTHER_TOKEN", OTHER)
    monkeypatch.setenv("FLEET_KEY", "key-77")


def config(**extra) -> CoordinatorConfig:
    return CoordinatorConfig.model_validate({
        "registries": [
            {"kind": "static", "name": "a", "instances": [], "workers": {
                "token": {"env": "FLEET_TOKEN"}, "headers": {"X-Fleet": "prod", "X-Api-Key": {"env": "FLEET_KEY"}}}},
            {"kind": "static", "name": "b", "instances": []},
        ],
        "headers": {"X-Global": "1"},
        **extra,
    })


# ---- configuration -------------------------------------------------------


def test_secrets_come_from_env_or_file_and_are_never_rendered(env_tokens, tmp_path):
    secret_file = tmp_path / "token"
    secret_file.write_text(OTHER + "\n")
    cfg = config(worker_overrides={"10.0.0.7:18001": {"token": {"file": str(secret_file)}}})
    assert cfg.access_for(Endpoint("10.0.0.7", 18001), ["a"]).token.reveal() == OTHER
    renderings = [repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()),
                  repr(cfg.registries[0].workers), str(cfg.registries[0].workers.token)]
    for text in renderings:
        assert TOKEN not in text and OTHER not in text and "key-77" not in text
    assert "value='***'" in repr(cfg.registries[0].workers.token)
    assert cfg.model_dump()["registries"][0]["workers"]["token"] == {"env": "FLEET_TOKEN", "file": None}
    # The value travels with the config to the actors.
    assert pickle.loads(pickle.dumps(cfg)).registries[0].workers.token.reveal() == TOKEN


@pytest.mark.parametrize(
    ("workers", "needle"),
    [
        ({"token": TOKEN}, "never in clear"),
        ({"token": {"env": "NOT_SET_ANYWHERE"}}, "NOT_SET_ANYWHERE is not set"),
        ({"token": {"file": "/nonexistent/token"}}, "cannot read secret file"),
        ({"token": {"env": "FLEET_TOKEN", "file": "/x"}}, "exactly one"),
        ({"headers": {"Authorization": f"Bearer {TOKEN}"}}, "carries a credential"),
        ({"headers": {"X-Bad": "a\r\nX-Injected: 1"}}, "control character"),
        ({"headers": {"Bad Header": "x"}}, "not a valid HTTP header name"),
        ({"tls": {"client_key": "/k.pem"}}, "client_key needs tls.client_cert"),
    ],
)
def test_bad_worker_settings_are_refused_without_echoing_the_value(env_tokens, workers, needle):
    with pytest.raises(ValidationError) as info:
        CoordinatorConfig.model_validate({"registries": [{"kind": "static", "instances": [], "workers": workers}]})
    assert needle in str(info.value)
    assert TOKEN not in str(info.value)


def test_an_override_key_must_be_a_valid_endpoint(env_tokens):
    for key in ("evil.com/x:80", "10.0.0.7", "h:0"):
        with pytest.raises(ValidationError, match="worker_overrides"):
            config(worker_overrides={key: {}})


def test_an_endpoint_takes_its_override_else_its_first_listing_source(env_tokens):
    cfg = config(worker_overrides={"[::1]:8000": {"headers": {"X-Only": "me"}}})
    assert cfg.access_for(Endpoint("::1", 8000), ["a"]).headers == {"X-Only": "me"}  # replaces, not merges
    assert cfg.access_for(Endpoint("h", 1), ["b", "a"]).token is not None  # config order: a first
    assert cfg.access_for(Endpoint("h", 1), ["b"]) == WorkerAccess()
    assert cfg.access_for(Endpoint("h", 1), []) == WorkerAccess()


# ---- what the proxy sends, and shows -------------------------------------


def proxy_with(handler, access: WorkerAccess, **kw) -> tuple[WorkerProxy, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    proxy = WorkerProxy("10.0.0.7", 18001, probe=NO_PROBE, access=access, headers={"X-Global": "1"},
                        transport=httpx.MockTransport(record), **kw)
    return proxy, seen


@pytest.mark.anyio
async def test_headers_and_token_are_sent_and_absent_from_everything_shown(env_tokens, caplog):
    access = config().registries[0].workers

    def echo_401(request):  # a worker (or a proxy before it) that quotes what it got
        return httpx.Response(401, text=f"bad credentials: {request.headers['authorization']} "
                                        f"key={request.headers['x-api-key']}")

    caplog.set_level(logging.DEBUG)
    proxy, seen = proxy_with(echo_401, access)
    out = await proxy.apply(APPLY)
    supports = await proxy.supports()
    await proxy.close()
    sent = seen[0].headers
    assert sent["authorization"] == f"Bearer {TOKEN}"
    assert (sent["x-fleet"], sent["x-api-key"], sent["x-global"]) == ("prod", "key-77", "1")
    assert not out.success and "HTTP 401" in out.message and "***" in out.message
    for text in (out.model_dump_json(), repr(out), supports.model_dump_json(), caplog.text, repr(proxy.__dict__)):
        assert TOKEN not in text and "key-77" not in text


@pytest.mark.anyio
async def test_without_settings_nothing_extra_is_sent(env_tokens):
    proxy, seen = proxy_with(lambda r: httpx.Response(200, json={"message": "ok", "success": True}), WorkerAccess())
    assert (await proxy.apply(APPLY)).success
    await proxy.close()
    assert "authorization" not in seen[0].headers
    assert str(seen[0].url) == "http://10.0.0.7:18001/api/worker/apply"


# ---- https, with and without client certificates --------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an
    unrelated CA, as files."""
    d = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("coordinator-proxy")
    rogue_client = stranger.issue_cert("coordinator-proxy")
    files = {}
    for name, blob in {
        "ca": ca.cert_pem, "stranger_ca": stranger.cert_pem,
        "server_cert": server.cert_chain_pems[0], "server_key": server.private_key_pem,
        "client": client.private_key_and_cert_chain_pem, "rogue_client": rogue_client.private_key_and_cert_chain_pem,
    }.items():
        files[name] = d / f"{name}.pem"
        blob.write_to_path(str(files[name]))
    return files


@pytest.fixture
async def https_worker(pki):
    """A reference worker serving https that requires a client certificate from our CA."""
    worker = ReferenceWorker(WorkerSettings(
        models=[SimModel(name="chatgpt-test")],
        tls=ServeTls(cert=pki["server_cert"], key=pki["server_key"], client_ca=pki["ca"]),
    ))
    await worker.start()
    yield worker
    await worker.stop()


async def apply_over_tls(worker, tls: dict) -> str:
    proxy = WorkerProxy("127.0.0.1", worker.port, probe=NO_PROBE, access=WorkerAccess(tls=tls))
    try:
        out = await proxy.apply(APPLY)
    finally:
        await proxy.close()
    return out.message if not out.success else "ok"


@pytest.mark.anyio
async def test_mutual_tls_with_the_right_ca_and_client_certificate_works(https_worker, pki):
    assert await apply_over_tls(https_worker, {"ca_bundle": pki["ca"], "client_cert": pki["client"]}) == "ok"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ({"ca_bundle": "ca"}, "connection"),  # no client certificate: the server refuses us
        ({"ca_bundle": "ca", "client_cert": "rogue_client"}, "connection"),  # one it does not trust
        ({"ca_bundle": "stranger_ca", "client_cert": "client"}, "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]"),  # we refuse it
        ({"ca_bundle": "/nonexistent/ca.pem"}, "TLS setup failed"),
    ],
)
async def test_tls_fails_closed_and_says_why(https_worker, pki, tls, needle):
    tls = {k: pki.get(v, v) for k, v in tls.items()}
    message = await apply_over_tls(https_worker, tls)
    assert message != "ok" and needle.lower() in message.lower(), message
    assert list(https_worker.journal) == []  # nothing reached the worker's handlers


def test_a_proxy_builds_its_ssl_context_once(pki, monkeypatch):
    calls = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: calls.append(1) or real(*a, **k))
    access = WorkerAccess(tls={"ca_bundle": pki["ca"]})

    async def build_and_use():
        proxy = WorkerProxy("127.0.0.1", 1, probe=NO_PROBE, access=access)
        await proxy.supports()
        await proxy.supports()
        await proxy.close()

    import asyncio

    asyncio.run(build_and_use())
    assert len(calls) == 1
