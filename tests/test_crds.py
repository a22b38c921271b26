"""Every custom resource in deploy/ against its real CRD (tests/data/crds, copies of what KServe,
KEDA and the Prometheus Operator publish): the CRD's OpenAPI schema as JSON Schema, refusing
unknown fields as `kubectl apply` does with strict field validation. A misspelled field, a
wrong type or a value outside an enum fails.

Not checked here: the CEL rules (x-kubernetes-validations) some CRDs add, which only an API
server evaluates."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = Path(__file__).resolve().parent / "data" / "crds"
BUILT_IN = ("", "apps", "autoscaling", "policy", "v1", "kustomize.config.k8s.io")


def strict(schema: dict) -> dict:
    """A structural schema as JSON Schema: objects with `properties` take no other key unless
    the CRD says so (x-kubernetes-preserve-unknown-fields or additionalProperties)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


def load_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a validator, for every version each CRD serves."""
    validators = {}
    for path in CRDS.glob("*.yaml"):
        # libyaml's parser: the KServe CRD is 2 MB, a few seconds instead of half a minute
        for crd in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(
                    schema
                )
    return validators


VALIDATORS = load_validators()


def custom_resources() -> dict[str, dict]:
    """Every YAML document under deploy/ whose API group is not built into Kubernetes."""
    found = {}
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not isinstance(doc, dict) or "apiVersion" not in doc:
                continue  # a config file (prometheus-adapter's rules), not a manifest
            group = doc["apiVersion"].rpartition("/")[0]
            if group not in BUILT_IN and not group.endswith(".k8s.io"):
                found[f"{path.relative_to(ROOT)}#{i}"] = doc
    return found


def errors(doc: dict) -> list[str]:
    validator = VALIDATORS[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_shipped_custom_resources_are_the_ones_we_hold_crds_for():
    kinds = sorted(d["kind"] for d in custom_resources().values())
    assert kinds == [
        "AnalysisTemplate",
        "InferenceService",
        "MetricTemplate",
        "MetricTemplate",
        "RayJob",
        "ScaledObject",
        "ServiceMonitor",
    ]
    for name, doc in custom_resources().items():
        assert (doc["apiVersion"], doc["kind"]) in VALIDATORS, f"{name}: no CRD for it"


@pytest.mark.parametrize("name", sorted(custom_resources()))
def test_every_custom_resource_validates_against_its_crd(name):
    assert errors(custom_resources()[name]) == []


def test_a_misspelled_analysis_field_or_an_unknown_flagger_provider_is_refused():
    (analysis,) = [d for d in custom_resources().values() if d["kind"] == "AnalysisTemplate"]
    broken = copy.deepcopy(analysis)
    metric = broken["spec"]["metrics"][0]
    metric["successCondtion"] = metric.pop("successCondition")
    assert any("successCondtion" in e for e in errors(broken))
    template = copy.deepcopy(
        next(d for d in custom_resources().values() if d["kind"] == "MetricTemplate")
    )
    template["spec"]["provider"]["type"] = "promethues"
    assert any("promethues" in e for e in errors(template))


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in custom_resources().values() if d["kind"] == kind]
    return copy.deepcopy(doc)


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def test_misspelled_fields_anywhere_in_a_custom_resource_are_refused():
    isvc = by_kind("InferenceService")
    rename(isvc["spec"]["predictor"], "minReplicas", "minReplica")
    assert any("'minReplica' was unexpected" in e for e in errors(isvc))

    isvc = by_kind("InferenceService")
    metric = isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]
    rename(metric, "query", "qurey")
    assert errors(isvc)

    isvc = by_kind("InferenceService")
    rename(isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"], "path", "pth")
    assert errors(isvc)

    scaled = by_kind("ScaledObject")
    rename(scaled["spec"], "minReplicaCount", "minReplicaCout")
    assert errors(scaled)

    monitor = by_kind("ServiceMonitor")
    rename(monitor["spec"]["endpoints"][0], "interval", "intervall")
    assert errors(monitor)

    top = by_kind("ServiceMonitor")
    rename(top, "spec", "sepc")
    assert errors(top)


def test_wrong_types_and_values_outside_an_enum_are_refused():
    isvc = by_kind("InferenceService")
    isvc["spec"]["predictor"]["maxReplicas"] = "four"
    assert any("is not of type 'integer'" in e for e in errors(isvc))

    scaled = by_kind("ScaledObject")
    scaled["spec"]["pollingInterval"] = "15s"
    assert any("is not of type 'integer'" in e for e in errors(scaled))

    isvc = by_kind("InferenceService")
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["type"] = "Prometheus"
    assert any("is not one of ['Resource', 'External', 'PodMetric']" in e for e in errors(isvc))


def test_free_form_maps_stay_free():
    """Trigger metadata (a string map in KEDA's CRD) takes any key: not every key is a typo."""
    scaled = by_kind("ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["ignoreNullValues"] = "false"
    assert errors(scaled) == []


def test_the_batch_rayjob_runs_segserve_batch_on_the_cpu_image_and_cleans_up_after_itself():
    job = by_kind("RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("segserve batch ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    pods = [
        cluster["headGroupSpec"]["template"],
        *(g["template"] for g in cluster["workerGroupSpecs"]),
    ]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"].startswith("segserve:cpu") and container["resources"]["limits"]
    broken = copy.deepcopy(job)
    rename(broken["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    assert any("shutdownAfterJobFinish" in e for e in errors(broken))
    broken = copy.deepcopy(job)
    broken["spec"]["ttlSecondsAfterFinished"] = "an hour"  # an integer, says the CRD
    assert any("ttlSecondsAfterFinished" in e for e in errors(broken))
