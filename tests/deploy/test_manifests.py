"""Issue 15: the Kubernetes manifests validate offline, and say what the issue asks of them.

Core objects (Namespace, PVC, Deployment, Service, PodDisruptionBudget) are validated strictly
(unknown fields rejected) against the Kubernetes schemas that the ``kubernetes-validate`` package
ships, for the oldest and the newest Kubernetes version we claim. The two custom resources,
KEDA's ScaledObject and the Prometheus Operator's PodMonitor, have no schema there: they are
validated against their CRDs' own ``openAPIV3Schema`` vendored in ``tests/deploy/schemas/``, made
strict the way ``kubectl --validate=strict`` treats a structural schema (unknown fields rejected
wherever the schema lists properties and does not preserve unknown fields).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _kustomization() -> dict:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


def _objects() -> list[tuple[str, dict]]:
    """Returns: every object of every file the kustomization lists, with its file name."""
    objects = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if doc is not None:
                objects.append((name, doc))
    return objects


def _one(kind: str) -> dict:
    found = [doc for _, doc in _objects() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def _strict(schema):
    """Reject unknown fields wherever a CRD schema lists its properties (kubectl's strict mode)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def test_kustomization_lists_every_manifest():
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_strictly(version):
    checked = 0
    for name, doc in _objects():
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} invalid for Kubernetes {version}: {e.message}")
        checked += 1
    assert checked == 6  # namespace, 2 PVCs, deployment, service, PDB


def test_strict_validation_catches_a_misspelt_field():
    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(("api_version", "kind"), list(CRD_SCHEMAS))
def test_custom_resources_validate_against_their_crd(api_version, kind):
    schema = _strict(json.loads((SCHEMAS / CRD_SCHEMAS[api_version, kind]).read_text()))
    doc = _one(kind)
    assert doc["apiVersion"] == api_version
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert set(doc["metadata"]) <= {"name", "labels", "annotations"}
    assert DNS_1123.fullmatch(doc["metadata"]["name"])
    # and the strict schema does catch what the API server would reject
    broken = json.loads(json.dumps(doc))
    broken["spec"]["unknownField"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)


def _container() -> dict:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_deployment_one_gpu_per_pod_probes_and_drain():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    env = _env(container)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names["http"] == int(env["TTS_PORT"]["value"])
    for probe, path in (
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
        ("startupProbe", "/health/ready"),
    ):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] in port_names
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a first load's time
    # a full pod leaves the endpoints at the first failed check and comes back at the first pass
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["readinessProbe"]["successThreshold"] == 1
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["TTS_DRAIN_SECONDS"]["value"])
    assert pod["terminationGracePeriodSeconds"] > drain + float(pre_stop[1])


def test_deployment_models_from_a_volume_and_key_from_a_secret():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    env = _env(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {
        doc["metadata"]["name"] for _, doc in _objects() if doc["kind"] == "PersistentVolumeClaim"
    }
    for variable, volume in (("TTS_MODEL_DIR", "models"), ("TTS_VOICES_DIR", "voices")):
        assert env[variable]["value"].startswith(mounts[volume]["mountPath"])
        assert volumes[volume]["persistentVolumeClaim"]["claimName"] in claims
    assert mounts["models"]["readOnly"] is True
    key = env["TTS_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["TTS_API_KEY"]
    # Prometheus scrapes /metrics with the same key
    endpoint = _one("PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["authorization"]["credentials"] == {"name": key["name"], "key": key["key"]}
    assert endpoint["port"] in {p["name"] for p in container["ports"]}
    assert endpoint["path"] == "/metrics"


def test_selectors_match_the_pods():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one("Service")["spec"]["selector"].items() <= labels.items()
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one("PodMonitor")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service_port = _one("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] in {p["name"] for p in _container()["ports"]}


def test_autoscaling_on_active_streams_over_capacity():
    scaled = _one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert re.search(r"sum\(tts_active_streams\{.*\}\)\s*/\s*sum\(tts_capacity\{.*\}\)", query)
    assert f'namespace="{_kustomization()["namespace"]}"' in query
    assert f'container="{_container()["name"]}"' in query
    assert 0 < float(trigger["metadata"]["threshold"]) < 1
    assert scaled["spec"]["minReplicaCount"] >= 1
