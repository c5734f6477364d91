"""The fleet page in a real browser: headless Chromium (Debian's, at
/usr/bin/chromium) driven by Playwright, against a real fleet — a coordinator
on the session's Ray, its embedded registry, reference worker managers as
processes, two deployments and streamed requests in flight. It reads what
the page shows, SIGKILLs a worker manager, and watches the page show it
unreachable and the deployment heal, without a reload.

The browser is installed where it is missing and this process may (root,
apt-get); otherwise the test is skipped, saying why. Playwright only drives
it: ``playwright install`` is never run.

``FLEET_PAGE_SCREENSHOT=docs/fleet_page.png`` saves the README's screenshot
(by default it goes to the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import coordinator
from coordinator.core.deployments import Deployment
from coordinator.driver.cli import cli
from tests.conftest import ROOT, wait_until
from tests.test_deployments_e2e import EMBEDDED, FAST, SIM

# The first test's set-up may install Chromium (apt-get, bounded at 900 s a step).
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Milliseconds the page has to show a change.
SHOWN_WITHIN = 20_000


def _install_chromium() -> str | None:
    """Install Debian's chromium if it is missing; why not, if it cannot be."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and this process cannot apt-get install it (not root, or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)} failed: {exc}"
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else f"chromium installed, but not at {CHROMIUM}"


class Browser:
    """Chromium, driven from a thread of its own: Playwright's sync API keeps
    an event loop running in the thread that uses it, and the coordinator's
    blocking calls refuse to run under one (they would stall it). ``do(fn)``
    runs ``fn`` there and returns what it returns."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="browser")
        self._playwright = None
        self.chromium = None

    def do(self, fn, *args, **kwargs):
        return self._thread.submit(fn, *args, **kwargs).result()

    def launch(self) -> None:
        from playwright.sync_api import sync_playwright

        def launch():
            self._playwright = sync_playwright().start()
            self.chromium = self._playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)

        self.do(launch)

    def close(self) -> None:
        def close():
            if self.chromium is not None:
                self.chromium.close()
            if self._playwright is not None:
                self._playwright.stop()

        self.do(close)
        self._thread.shutdown()


@pytest.fixture(scope="module")
def browser():
    # Playwright first: without it there is nothing to drive a browser with,
    # and no reason to install one.
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    why = _install_chromium()
    if why:
        pytest.skip(why)
    web = Browser()
    try:
        web.launch()
        yield web
    finally:
        web.close()


class Load:
    """Streamed chats through a RayWorkerManager in a thread of its own, so
    the page has requests in flight to show (the manager reports them)."""

    def __init__(self, cluster: coordinator.Cluster, model: str, streams: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(cluster, model, streams),), daemon=True)
        self._thread.start()

    async def _run(self, cluster: coordinator.Cluster, model: str, streams: int) -> None:
        manager = coordinator.RayWorkerManager(cluster)

        async def one() -> None:
            chat = {"model": model, "messages": [{"role": "human", "content": "hello"}]}
            while not self._stop.is_set():
                try:
                    async for _ in manager.generate_stream(chat):
                        if self._stop.is_set():
                            break
                except Exception:  # a stream on the killed worker breaks: start another
                    await asyncio.sleep(0.2)

        try:
            await asyncio.gather(*(one() for _ in range(streams)))
        finally:
            await manager.aclose()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def fleet(ray_session, worker_process):
    cluster = coordinator.start({"registries": [EMBEDDED], **FAST}, name="page-browser", namespace="tests")
    load = None
    try:
        url = cluster.registry_url()
        # Slow streams (12 chunks, 0.4 s apart): requests stay in flight long enough to be seen.
        managers = {w.port: w for w in (worker_process(controller=url, heartbeat_interval=1, chunk_delay=0.4,
                                                       chunks=12) for _ in range(4))}
        cluster.wait_for("WorkerManager", count=4, worker_type="service", timeout=30)
        cluster.deploy(Deployment(model="chat", replicas=2, params=SIM),
                       Deployment(model="embed", worker_type="text2vec", replicas=1, params=SIM),
                       wait=True, timeout=60)
        load = Load(cluster, "chat", streams=5)
        yield cluster, managers
    finally:
        if load is not None:
            load.stop()
        cluster.stop(forget=True)


def ready_ports(cluster: coordinator.Cluster, key: str) -> list[int]:
    [st] = [s for s in cluster.deployments() if s.key == key]
    return sorted(int(i.rsplit(":", 1)[1]) for i in st.instances)


def test_the_page_shows_a_worker_die_and_its_deployment_heal_without_a_reload(fleet, browser, tmp_path):
    cluster, managers = fleet
    url = cluster.fleet_page_url()
    assert url is not None and url.startswith("http://127.0.0.1:")
    assert cluster.status().page_url == url
    said = CliRunner().invoke(cli, ["--name", "page-browser", "--namespace", "tests", "status"], terminal_width=200)
    assert f"fleet page: {url}" in said.output, said.output

    do = browser.do
    page = do(browser.chromium.new_page, viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    do(page.on, "pageerror", lambda exc: errors.append(str(exc)))
    do(page.on, "console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    do(page.goto, url)

    # What it shows: the deployments ready, their instances healthy, the watcher fresh.
    do(page.wait_for_selector, '.deployment[data-key="chat@llm"][data-ready="2"]', timeout=SHOWN_WITHIN)
    do(page.wait_for_selector, '.deployment[data-key="embed@text2vec"][data-ready="1"]', timeout=SHOWN_WITHIN)
    assert do(lambda: page.locator('.deployment[data-key="chat@llm"] .pill').inner_text()) == "ready"
    first = ready_ports(cluster, "chat@llm")
    for port in first:
        assert do(lambda: page.locator(f'.model[data-key="chat@llm"] tr[data-endpoint="127.0.0.1:{port}"]')
                  .get_attribute("data-health")) == "healthy"
    assert do(lambda: page.locator('[data-source="reg"]').get_attribute("data-state")) == "fresh"
    assert do(lambda: page.locator("#live").get_attribute("data-state")) == "on"
    totals = do(lambda: page.locator("#totals").inner_text())
    assert "deployments ready" in totals and "worker managers" in totals
    # The load the router reports reaches the page.
    do(page.wait_for_function, "() => [...document.querySelectorAll('.model[data-key=\"chat@llm\"] td .num')]"
       ".some(n => Number(n.textContent) > 0)", timeout=SHOWN_WITHIN)
    do(page.evaluate, "() => { window.notReloaded = true; }")  # gone if the page were loaded again

    # A worker manager with a chat replica (and nothing else deployed) dies.
    embed = set(ready_ports(cluster, "embed@text2vec"))
    victim = next(p for p in first if p not in embed)
    managers[victim].kill()  # SIGKILL
    killed = time.monotonic()
    row = f'.model[data-key="chat@llm"] tr[data-endpoint="127.0.0.1:{victim}"]'
    do(page.wait_for_function,
       f"() => {{ const r = document.querySelector('{row}');"
       " return r === null || ['unreachable', 'unhealthy'].includes(r.dataset.health); }",
       timeout=SHOWN_WITHIN)
    # ... and the deployment heals on a spare manager: ready 2 again, the victim not among them.
    wait_until(lambda: len(ready_ports(cluster, "chat@llm")) == 2 and victim not in ready_ports(cluster, "chat@llm"),
               timeout=30, what="the replacement ready")
    healed = ready_ports(cluster, "chat@llm")
    do(page.wait_for_function,
       "(ports) => { const card = document.querySelector('.deployment[data-key=\"chat@llm\"]');"
       " if (!card || card.dataset.ready !== '2') return false;"
       " return ports.every(p => { const r = document.querySelector("
       "`.model[data-key=\"chat@llm\"] tr[data-endpoint=\"127.0.0.1:${p}\"]`);"
       " return r && r.dataset.health === 'healthy'; }); }",
       arg=healed, timeout=SHOWN_WITHIN)
    assert do(page.evaluate, "() => window.notReloaded") is True
    assert "start" in do(lambda: page.locator('.deployment[data-key="chat@llm"] .events').inner_text())
    # The router's load settles on the survivors before the picture.
    do(page.wait_for_function,
       "(ports) => ports.every(p => { const r = document.querySelector("
       "`.model[data-key=\"chat@llm\"] tr[data-endpoint=\"127.0.0.1:${p}\"] td .num`);"
       " return r && Number(r.textContent) > 0; })", arg=healed, timeout=SHOWN_WITHIN)
    assert not errors, errors

    shot = Path(os.environ.get("FLEET_PAGE_SCREENSHOT") or tmp_path / "fleet_page.png")
    if not shot.is_absolute():
        shot = ROOT / shot
    do(page.screenshot, path=str(shot), full_page=True)
    print(f"page shot {time.monotonic() - killed:.1f} s after the kill: {shot}")
    assert shot.stat().st_size > 10_000
    do(page.close)


def test_the_page_asks_for_the_gateways_key(ray_session, browser, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-fleet-page-browser\n")
    cluster = coordinator.start({"registries": [EMBEDDED], **FAST,
                                 "gateway": {"port": 0, "api_keys": [{"file": str(keys)}]}},
                                name="page-keys", namespace="tests")
    try:
        url = cluster.fleet_page_url()
        # Scripts: the gateway's key as a bearer header, or nothing.
        assert httpx.get(f"{url}/api/fleet", timeout=10).status_code == 401
        fleet = httpx.get(f"{url}/api/fleet", headers={"authorization": "Bearer sk-fleet-page-browser"}, timeout=10)
        assert fleet.status_code == 200 and fleet.json()["name"] == "page-keys"
        do = browser.do
        page = do(browser.chromium.new_page)
        do(page.goto, url)
        do(page.wait_for_selector, "#login:not([hidden])", timeout=SHOWN_WITHIN)
        assert do(lambda: page.locator("#main").is_hidden())
        do(page.fill, "#key", "sk-wrong")
        do(page.click, "button[type=submit]")
        do(page.wait_for_function, "() => document.querySelector('#login-error').textContent.length > 0",
           timeout=SHOWN_WITHIN)
        do(page.fill, "#key", "sk-fleet-page-browser")
        do(page.click, "button[type=submit]")
        do(page.wait_for_selector, "#main:not([hidden])", timeout=SHOWN_WITHIN)
        do(page.wait_for_selector, '#live[data-state="on"]', timeout=SHOWN_WITHIN)
        assert do(lambda: page.locator("#name").inner_text()) == "page-keys"
        do(page.close)
    finally:
        cluster.stop(forget=True)
