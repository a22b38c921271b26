"""Deployment files, checked without a Docker engine: compose, Dockerfiles, Prometheus rules,
and the Grafana dashboard's queries evaluated by a real Prometheus scraping a real segserve."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import ROOT, free_port, image_bytes, run_server

DOCKER = ROOT / "docker"
COMPOSE_ENV = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-only"}


def compose_command() -> list[str] | None:
    """A Compose v2 client (`docker compose` or a v2 `docker-compose`), if this machine has one.

    Compose v1 (Debian's docker-compose 1.29) predates the Compose Spec this file uses
    (top-level `name`, `!reset`), so it does not count."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        version = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith(("2", "3")):
            return cmd
    return None


@pytest.mark.skipif(
    compose_command() is None,
    reason="no Docker Compose v2 client here: the docker CLI lacks its compose plugin "
    "(the static checks below still run)",
)
@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker/compose.cpu.yml"]]
)
def test_docker_compose_config_accepts_the_files(files):
    args = [a for f in files for a in ("-f", f)]
    result = subprocess.run(
        [*compose_command(), *args, "config"],
        cwd=ROOT,
        env=COMPOSE_ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_compose_file_wires_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"segserve", "prometheus", "grafana", "dcgm-exporter"}
    gpu = services["segserve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["segserve"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert services["prometheus"]["depends_on"]["segserve"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("segserve", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
    assert set(compose["volumes"]) == {"prometheus-data", "grafana-data"}
    env = services["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"].endswith(":-false}")
    cpu = yaml.safe_load((DOCKER / "compose.cpu.yml").read_text().replace("!reset", ""))
    assert cpu["services"]["segserve"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"


def code_lines(text: str) -> str:
    """The text without its comments, lower-cased (comments may say "no torch")."""
    return "\n".join(
        line for line in text.lower().splitlines() if not line.lstrip().startswith("#")
    )


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_have_the_essentials(name):
    text = (DOCKER / name).read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage: build tools stay in the build stage"
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for base in bases:
        image = args.get(base.strip("${}"), base)
        assert re.search(r":\d+\.\d+", image), f"base image not pinned to a version: {image}"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/healthz" in text
    assert 'ENTRYPOINT ["segserve", "serve"' in text
    assert "torch" not in code_lines(text)


def test_gpu_image_pairs_onnxruntime_gpu_with_cuda_13_and_carries_no_torch():
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime", text)
    version = re.search(r"onnxruntime-gpu==(\d+)\.(\d+)", text)
    assert version and (int(version[1]), int(version[2])) >= (1, 27), (
        "onnxruntime-gpu >= 1.27 is the CUDA 13 build"
    )
    requirements = code_lines((DOCKER / "requirements-serve.txt").read_text())
    assert "torch" not in requirements and "onnxruntime" not in requirements


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the essentials test above still runs)")
    result = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "docker/Dockerfile.gpu", "docker/Dockerfile.cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: `make test` installs Debian's prometheus package")
    return path


def test_promtool_accepts_the_config_and_the_rules():
    for args in (
        ["check", "config", "docker/prometheus/prometheus.yml"],
        ["check", "rules", "docker/prometheus/alerts.yml"],
    ):
        result = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_latency_errors_rejections_and_targets():
    rules = {
        r["alert"]: r
        for g in yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    latency = rules["SegserveLatencyP95Over200ms"]
    assert "0.95" in latency["expr"] and "> 0.2" in latency["expr"] and latency["for"] == "5m"
    assert (
        "5.." in rules["SegserveErrorRatioOver1Percent"]["expr"]
        and "0.01" in rules["SegserveErrorRatioOver1Percent"]["expr"]
    )
    assert "segserve_rejected_total" in rules["SegserveRejectionsRising"]["expr"]
    assert "up" in rules["SegserveTargetDown"]["expr"]


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
    ):
        assert word in titles, word
    assert {v["name"] for v in dashboard()["templating"]["list"]} == {"model", "instance"}
    latency = next(p for p in dashboard()["panels"] if "p99" in p["title"])
    assert latency["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 0.2
    provisioning = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert provisioning["datasources"][0]["uid"] == dashboard()["panels"][0]["datasource"]["uid"]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would expand them with "All" selected."""
    return (
        expr.replace("$__rate_interval", "15s").replace("$model", ".*").replace("$instance", ".*")
    )


@pytest.fixture(scope="module")
def prometheus_and_segserve(tiny_repository, tmp_path_factory):
    """A real Prometheus (Debian's package) scraping a real segserve, both on loopback."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus missing: `make test` installs Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("prometheus")
    with run_server(tiny_repository, tmp, max_queue_delay_ms=10) as server:
        # The project's own config and rules, with the targets pointed at loopback.
        config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        port = free_port()
        targets = {
            "segserve": server.url.removeprefix("http://"),
            "dcgm": f"127.0.0.1:{free_port()}",
            "prometheus": f"127.0.0.1:{port}",
        }
        for job in config["scrape_configs"]:
            job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp / "alerts.yml")
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=(tmp / "prometheus.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api/v1"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    up = httpx.get(
                        f"{api}/query", params={"query": 'up{job="segserve"}'}, timeout=2
                    ).json()
                    if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1":
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus never scraped segserve"
                time.sleep(0.5)
            # Traffic for the panels: good requests of two sizes and a few bad ones.
            with server.client() as c:
                end = time.monotonic() + 6
                while time.monotonic() < end:
                    c.post(
                        "/segment",
                        content=image_bytes(64, 80),
                        headers={"Content-Type": "image/png"},
                    )
                    c.post(
                        "/segment",
                        content=image_bytes(100, 90, "JPEG"),
                        headers={"Content-Type": "image/jpeg"},
                    )
                    c.post("/segment", content=b"junk", headers={"Content-Type": "image/png"})
            time.sleep(3)  # two more scrapes
            yield api
        finally:
            proc.terminate()
            proc.wait(30)


def query(api: str, expr: str) -> dict:
    r = httpx.get(f"{api}/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def test_every_dashboard_and_alert_expression_evaluates_in_prometheus(prometheus_and_segserve):
    api = prometheus_and_segserve
    for _title, expr in dashboard_queries():
        query(api, grafana_to_promql(expr))
    for group in yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            query(api, rule["expr"])
    rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
    assert sum(len(g["rules"]) for g in rules) == 4
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules


def test_segserve_panels_return_data(prometheus_and_segserve):
    api = prometheus_and_segserve
    empty = []
    for title, expr in dashboard_queries():
        if "DCGM" in expr:  # no GPU here: dcgm-exporter's panels stay empty
            continue
        if not query(api, grafana_to_promql(expr))["result"]:
            empty.append(title)
    assert not empty, f"panels without data: {empty}"
    statuses = {
        r["metric"]["status"]
        for r in query(api, 'sum by (status) (segserve_requests_total{route="/segment"})')["result"]
    }
    assert {"200", "400"} <= statuses
