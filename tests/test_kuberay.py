"""deploy/kuberay/ passes KubeRay's own RayCluster schema and serves what the
project serves: the ConfigMap holds a valid coordinator config, the Services
send to the ports that config opens on the pods that open them, and the head's
start script calls real commands with files that are mounted where it reads
them. Offline: no Kubernetes cluster is involved.

The CRD (tests/data/kuberay/, from KubeRay, Apache-2.0) is validated
strictly: a field the schema does not know is an error, as ``kubectl apply``'s
strict field validation makes it."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from coordinator.core.config import CoordinatorConfig, EmbeddedSource
from coordinator.driver.cli import cli
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kuberay"
CRDS = ROOT / "tests" / "data" / "kuberay"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    return [d for path in sorted(DEPLOY.glob("*.yaml")) for d in documents(path.name)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def raycluster() -> dict[str, Any]:
    return one("RayCluster")


def configmap() -> dict[str, Any]:
    return one("ConfigMap")


def head_spec(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]


def gateway_group(cluster: dict[str, Any]) -> dict[str, Any]:
    [group] = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gateway"]
    return group


def pod_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["spec"]["headGroupSpec"]["template"], *(g["template"] for g in cluster["spec"]["workerGroupSpecs"])]


def config(monkeypatch: pytest.MonkeyPatch) -> CoordinatorConfig:
    """The ConfigMap's coordinator.yaml, validated as `coordinator start` does on
    the head: with the head container's secret-fed environment set."""
    for var in head_spec(raycluster())["containers"][0].get("env", []):
        if "secretKeyRef" in var.get("valueFrom", {}):
            monkeypatch.setenv(var["name"], "sk-test-key")
    return CoordinatorConfig.model_validate(yaml.safe_load(configmap()["data"]["coordinator.yaml"]))


# ---- KubeRay's schema ---------------------------------------------------------


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists
    its properties and does not keep unknown fields: a misspelt field fails, as
    the API server's strict field validation makes it."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def spec_schema(crd: str, version: str = "v1") -> dict[str, Any]:
    data = yaml.load((CRDS / crd).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [served] = [v for v in data["spec"]["versions"] if v["name"] == version]
    return _strict(served["schema"]["openAPIV3Schema"]["properties"]["spec"])


def crd_errors(spec: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(spec_schema("ray.io_rayclusters.yaml"))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(spec)]


def test_the_raycluster_passes_kuberays_own_crd_schema():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])
    assert crd_errors(cluster["spec"]) == []


@pytest.mark.parametrize("break_it", [
    lambda s: s["headGroupSpec"].__setitem__("rayStartParam", {}),                      # misspelt field
    lambda s: s["workerGroupSpecs"][0].pop("groupName"),                                 # required field
    lambda s: s["authOptions"].__setitem__("mode", "password"),                          # not in the enum
    lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),           # strings only
    lambda s: head_spec({"spec": s})["containers"][0]["ports"][0].__setitem__("containerPort", "6379"),
])
def test_the_crd_check_refuses_a_broken_raycluster(break_it):
    spec = copy.deepcopy(raycluster()["spec"])
    break_it(spec)
    assert crd_errors(spec)


# ---- the built-in kinds, structurally ------------------------------------------

_NAME_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"   # a Service's name (DNS-1035 label)
_NAME_1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABELS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

SERVICE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "Service"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": _NAME_1035, "maxLength": 63},
                                    "labels": _LABELS}, "additionalProperties": False},
        "spec": {
            "type": "object", "required": ["selector", "ports"], "additionalProperties": False,
            "properties": {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "selector": {**_LABELS, "minProperties": 1},
                "ports": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "pattern": _NAME_1035},
                                   "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                                   "port": _PORT,
                                   "targetPort": {"anyOf": [_PORT, {"type": "string", "pattern": _NAME_1035}]}}}},
            },
        },
    },
}
CONFIGMAP = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "data"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "ConfigMap"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": _NAME_1123, "maxLength": 253},
                                    "labels": _LABELS}, "additionalProperties": False},
        "data": {"type": "object", "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"},
                 "additionalProperties": {"type": "string"}},
    },
}


def test_every_manifest_is_a_raycluster_or_a_well_formed_configmap_or_service():
    kinds = []
    for doc in manifests():
        kinds.append(doc["kind"])
        if doc["kind"] == "Service":
            jsonschema.validate(doc, SERVICE)
        elif doc["kind"] == "ConfigMap":
            jsonschema.validate(doc, CONFIGMAP)
        else:
            assert doc["kind"] == "RayCluster", doc["kind"]
    assert sorted(kinds) == ["ConfigMap", "RayCluster", "Service", "Service"]


def test_the_structural_checks_refuse_a_broken_service_or_configmap():
    service = copy.deepcopy(one("Service", "dbgpt-fleet-gateway"))
    service["spec"]["ports"][0]["targetPort"] = 70000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, SERVICE)
    cm = copy.deepcopy(configmap())
    cm["data"]["coordinator.yaml"] = {"registries": []}  # a mapping where a string must be
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cm, CONFIGMAP)


# ---- what the project serves ---------------------------------------------------


def test_the_configmap_holds_a_valid_coordinator_config_with_a_registry_and_a_gateway(monkeypatch):
    cfg = config(monkeypatch)
    [registry] = [s for s in cfg.registries if isinstance(s, EmbeddedSource)]
    assert registry.host == "0.0.0.0" and registry.token is None  # DB-GPT's workers send no token
    assert cfg.gateway is not None and cfg.gateway.host == "0.0.0.0"
    assert cfg.gateway.keys() == ["sk-test-key"]  # read from the head's environment, not written in the file
    assert cfg.deployments


def test_the_gateway_keys_come_from_a_secret_into_the_heads_environment():
    env = {v["name"]: v for v in head_spec(raycluster())["containers"][0].get("env", [])}
    keys = yaml.safe_load(configmap()["data"]["coordinator.yaml"])["gateway"]["api_keys"]
    for key in keys:
        assert set(key) == {"env"}, "a file secret would have to be mounted on the head too"
        assert "secretKeyRef" in env[key["env"]]["valueFrom"]


def _selected(selector: dict[str, str]) -> list[dict[str, Any]]:
    """The pod templates of the RayCluster whose labels the selector matches."""
    return [t for t in pod_templates(raycluster())
            if all(t["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]


def _container_ports(template: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_the_registry_service_sends_to_the_head_on_the_embedded_registrys_port(monkeypatch):
    cfg = config(monkeypatch)
    [registry] = [s for s in cfg.registries if isinstance(s, EmbeddedSource)]
    service = one("Service", "dbgpt-fleet-registry")
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == registry.port
    pods = _selected(service["spec"]["selector"])
    assert pods == [raycluster()["spec"]["headGroupSpec"]["template"]]  # the head, where the registry runs
    assert registry.port in _container_ports(pods[0])


def test_the_gateway_service_sends_to_the_gateway_group_on_the_gateways_port(monkeypatch):
    cfg = config(monkeypatch)
    service = one("Service", "dbgpt-fleet-gateway")
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == cfg.gateway.port
    group = gateway_group(raycluster())
    assert _selected(service["spec"]["selector"]) == [group["template"]]
    [container] = group["template"]["spec"]["containers"]
    assert cfg.gateway.port in _container_ports(group["template"])
    # ready only once the replica answers: the Service never sends to a pod without one
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": cfg.gateway.port}


def test_each_gateway_pod_carries_one_unit_of_the_gateways_node_resource(monkeypatch):
    cfg = config(monkeypatch)
    group = gateway_group(raycluster())
    # KubeRay's format: a quoted JSON string, handed to `ray start --resources=`.
    quoted = group["rayStartParams"]["resources"]
    assert json.loads(shlex.split(quoted)[0]) == {cfg.gateway.node_resource: 1}
    # one replica per pod, a pod per replica, and the group never scales away from that
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.gateway.replicas


def test_every_pod_runs_rays_start_command_under_the_overwrite_annotation():
    cluster = raycluster()
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for template in pod_templates(cluster):
        [container] = template["spec"]["containers"]
        assert container["command"] == ["/bin/bash", "-lc", "--"]
        [line] = container["args"]
        assert 'eval "$KUBERAY_GEN_RAY_START_CMD"' in line, "without it the pod would not start Ray"
        assert line.startswith("ulimit -n 65536;")


def _mounted_configmap_files(tmp_path: Path) -> dict[str, Path]:
    """The head's view of the ConfigMap: each key at its mount path, written
    under tmp_path. Only what the head mounts is there."""
    spec = head_spec(raycluster())
    volumes = {v["name"]: v for v in spec["volumes"]}
    name = configmap()["metadata"]["name"]
    files = {}
    for mount in spec["containers"][0].get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if volume.get("configMap", {}).get("name") != name:
            continue
        for key, text in configmap()["data"].items():
            local = tmp_path / key
            local.write_text(text)
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = local
    return files


def _start_script() -> tuple[str, str]:
    """The head's start script: its path in the container args, and its text."""
    [line] = head_spec(raycluster())["containers"][0]["args"]
    [path] = re.findall(r"bash (\S+) &", line)
    return path, configmap()["data"][Path(path).name]


def test_the_head_starts_the_script_from_the_mounted_configmap(tmp_path):
    path, _ = _start_script()
    assert path in _mounted_configmap_files(tmp_path)


def test_the_start_script_calls_real_commands_with_mounted_files(tmp_path, monkeypatch):
    files = _mounted_configmap_files(tmp_path)
    _, script = _start_script()
    code = "\n".join(re.sub(r'echo "[^"]*"', "", line) for line in script.splitlines()
                     if not line.lstrip().startswith("#"))  # what the shell runs, not what it says
    calls = [shlex.split(c) for c in re.findall(r"\bcoordinator\s[^;&|\n]+", code)]
    assert [c[1] for c in calls] == ["start", "serve"]
    for call in calls:
        name, args = call[1], [str(files.get(a, a)) for a in call[2:]]
        assert "--config" in args
        # click parses them as the CLI would: unknown options, a missing
        # --config file (not mounted there) all raise here.
        cli.commands[name].make_context(name, args)
    # the same config the ConfigMap carries (and test_the_configmap_holds... validates)
    assert all(call[call.index("--config") + 1] in files for call in calls)
    from ray.scripts.scripts import cli as ray_cli

    assert "health-check" in ray_cli.commands and "ray health-check" in script


def test_a_start_script_calling_a_missing_option_or_file_fails_the_check(tmp_path):
    with pytest.raises(click.UsageError):
        cli.commands["start"].make_context("start", ["--cofnig", str(tmp_path)])
    with pytest.raises(click.BadParameter):
        cli.commands["start"].make_context("start", ["--config", "/etc/coordinator/not-mounted.yaml"])


def test_the_image_runs_the_raycluster_s_ray_version():
    cluster = raycluster()
    version = cluster["spec"]["rayVersion"]
    [base] = re.findall(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py3\d+", base)
    images = {c["image"] for t in pod_templates(cluster) for c in t["spec"]["containers"]}
    assert len(images) == 1  # head and workers run the same build
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default]>={version.rsplit(".", 1)[0]}"' in pyproject


def test_every_secret_the_manifests_read_is_created_in_the_readme():
    cluster = raycluster()
    names = {v["valueFrom"]["secretKeyRef"]["name"]
             for t in pod_templates(cluster) for c in t["spec"]["containers"] for v in c.get("env", [])
             if "secretKeyRef" in v.get("valueFrom", {})}
    names.add(cluster["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"])
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert f"kubectl create secret generic {name}" in readme, name


def test_coordinator_deploy_reads_the_configmaps_deployments(tmp_path, monkeypatch):
    # README's upgrade path: `coordinator deploy /etc/coordinator/coordinator.yaml --wait`
    from coordinator.driver.cli import read_deployments

    files = _mounted_configmap_files(tmp_path)
    specs = read_deployments(str(files["/etc/coordinator/coordinator.yaml"]))
    assert specs == config(monkeypatch).deployments
