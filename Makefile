# The two commands a newcomer needs:
#   make demo   set up, then run the quick start (local Ray, embedded registry)
#   make test   set up, then run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup bench detection scale proxies transport chaos healing traffic gateway rollout demand clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) examples/quickstart.py

test: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m pytest

# The fast tier: pure logic, the proxy with a mock transport, the registry,
# watchers and reference worker over loopback HTTP — no Ray, no DB-GPT, no
# install of the wheel into a new venv (marked slow).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not ray and not dbgpt and not slow" -q

# The benchmark suite (about 6½ minutes on 2 cores), and the detection
# benchmark (killed worker noticed: coordinator vs DB-GPT's heartbeat timeout).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.suite

detection: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.detection

# Fleet size (about 4½ minutes): the embedded registry and the live set at
# 1,000 / 5,000 / 10,000 entries beside DB-GPT's own controller; proxy actors'
# memory and start-up (128 endpoints, about 5 minutes and 13 GiB); the
# proxy's HTTP transport, httpx's default against httpx-aiohttp.
scale: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.scale

proxies: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.proxies

transport: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m bench.transport

# The chaos soak: 5 minutes of operations while workers, proxies, the watcher,
# the registry and the coordinator are killed at random; every promise checked.
chaos: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.chaos

# A deployment's healing (about 1½ minutes): a worker manager SIGKILLed, its
# replica ready elsewhere; next to detection time and the model's start-up.
healing: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.healing

# Serving traffic (about 2 minutes; builds DB-GPT's environment the first
# time): RayWorkerManager.generate beside DB-GPT's RemoteWorkerManager, and
# what the route adds to a stream's first token and chunks.
traffic: $(STAMP)
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.traffic

# The gateway beside DB-GPT's API server (about 8 minutes; builds DB-GPT's
# environment the first time): routing by cache and load under shared-prefix
# and Zipf loads, the gateway's own cost and ceiling.
gateway: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.gateway

# Rollouts under streamed load (about 12 minutes, estimated; half of it waits
# out a scale-down's deploy(wait=True): see bench/README.md): a rolling
# restart, a rolling update_params, a scale-down 4 -> 1 and an undeploy, each
# without and with draining. A smoke run (about 3½ minutes, results kept
# apart): .venv/bin/python -m bench.rollout --quick
rollout: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.rollout

# Following demand (about 25 minutes): an autoscaled deployment
# beside fleets fixed at max and at min under step, spike and sine traces of
# streamed load, on 8 reference worker managers with a 10 s cold start; and
# the first request to a deployment at zero (alone: bench.demand
# --only-from-zero, about a minute). Then a noisy tenant at 10x beside five
# quiet ones through the gateway, with and without flow control (bench.fairness,
# about 8 minutes). A smoke run (about 4 minutes, results kept apart):
# .venv/bin/python -m bench.demand --quick
demand: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.demand
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(PY) -m bench.fairness

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis  # .venv-dbgpt is kept: rebuilding it takes a while
