"""The images, built and run: the CPU image serves read-only, non-root, without
capabilities, answers gRPC and exports traces when OTEL_* ask, drains on SIGTERM and runs
the shipped monitoring without an alert; built with the ray extra, it runs `segserve batch`
on a Ray cluster as KubeRay starts it; the GPU image's CUDA library chain resolves but for
the driver, and it refuses to start on CUDA without one. Run by `make test-images`; figures
go to .bench/images-report.json."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from dockerd import CACHE, build
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_tracing import CLIENT_SPAN

from helpers import (
    OtlpReceiver,
    free_port,
    image_bytes,
    otlp_receiver,
    spans_of,
    start_prometheus,
    wait_for,
)

pytestmark = pytest.mark.images
REPORT = CACHE / "images-report.json"


def report(**entries) -> None:
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    data.update(entries)
    REPORT.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def models(tiny_repository) -> Path:
    """The test repository where the image's uid 10001 can read it."""
    target = CACHE / "images-models"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tiny_repository, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture(scope="module")
def cpu_image(docker, base_image) -> dict:
    info = build(docker, base_image, "docker/Dockerfile.cpu", "segserve:cpu-test")
    report(cpu_image=info)
    return info


@pytest.fixture(scope="module")
def cpu_ray_image(docker, base_image) -> dict:
    """The CPU image as deploy/ray/rayjob.yaml runs it: built with the ray extra."""
    info = build(
        docker,
        base_image,
        "docker/Dockerfile.cpu",
        "segserve:cpu-ray-test",
        extras="grpc,tracing,openvino,ray",
    )
    report(cpu_ray_image=info)
    return info


@pytest.fixture(scope="module")
def gpu_image(docker, base_image) -> dict:
    info = build(docker, base_image, "docker/Dockerfile.gpu", "segserve:gpu-test")
    report(gpu_image=info)
    return info


@pytest.fixture(scope="module")
def receiver():
    """An OTLP/HTTP receiver on the host's loopback (the containers share its network)."""
    with otlp_receiver() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cpu_container(docker, cpu_image, models, receiver, grpc_port):
    port = free_port()
    name = f"segserve-cpu-{port}"
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network=host",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--tmpfs=/tmp:size=64m",
        "-v",
        f"{models}:/models:ro",
        "-e",
        "SEGSERVE_WARMUP_SHAPES=64x64",
        "-e",
        "SEGSERVE_METRICS_TOKEN=scrape",
        "-e",
        "SEGSERVE_API_KEY=key",
        "-e",
        f"SEGSERVE_GRPC_PORT={grpc_port}",  # the image's 8001 may be taken on this host
        "-e",
        "OTEL_TRACES_EXPORTER=otlp",
        "-e",
        "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
        "-e",
        f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver}",
        "-e",
        "OTEL_BSP_SCHEDULE_DELAY=100",
        cpu_image["tag"],
        "--port",
        str(port),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(docker("logs", name, check=False).stdout[-3000:])
        time.sleep(0.5)
    yield name, url
    docker("rm", "-f", name, check=False)


def test_the_cpu_image_serves_read_only_as_a_non_root_user_without_capabilities(
    docker, cpu_container
):
    name, url = cpu_container
    inspect = json.loads(docker("inspect", name).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] and inspect["HostConfig"]["CapDrop"] == ["ALL"]
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
    r = httpx.post(
        url + "/segment",
        content=image_bytes(96, 128, "JPEG"),
        headers={"Content-Type": "image/jpeg", "Authorization": "Bearer key"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # The image carries OpenVINO (the openvino extra), and it runs on a read-only root: its
    # float32 candidate was compiled and timed beside onnxruntime's.
    detail = httpx.get(url + "/models/tiny", headers={"Authorization": "Bearer key"}, timeout=10)
    choice = detail.json()["variant_choice"]
    candidates = {c["name"]: c for c in choice["candidates"]}
    assert candidates["openvino-float32"]["seconds"] > 0, candidates
    report(cpu_variant_choice=choice)
    health = docker("inspect", "-f", "{{.State.Health.Status}}", name, check=False).stdout.strip()
    assert health in ("starting", "healthy")  # the image's HEALTHCHECK on /healthz
    assert docker("exec", name, "python3", "-c", "import torch", check=False).returncode != 0


def test_the_cpu_image_answers_grpc_and_exports_the_request_s_trace(cpu_container, grpc_port):
    """The image carries the grpc and tracing extras: tritonclient.grpc gets the labels HTTP
    v2 gives, grpc.health.v1 says SERVING, and the request's spans reach the receiver under
    the client's trace id."""
    _, url = cpu_container
    pixels = np.random.default_rng(3).integers(0, 256, (1, 72, 96, 3), dtype=np.uint8)
    auth = {"authorization": "Bearer key"}
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    model = httpx.get(url + "/models", headers=auth).json()["default"]
    tensor = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    trace = "5e1f0c2a9b8d4e7fa3c6b0d2e4f6a8c1"
    answer = grpc_client.infer(
        model, [tensor], headers={**auth, "traceparent": f"00-{trace}-{CLIENT_SPAN}-01"}
    )
    http_client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    tensor = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    expected = http_client.infer(model, [tensor], headers=auth).as_numpy("labels")
    assert np.array_equal(answer.as_numpy("labels"), expected)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    request_span = "/inference.GRPCInferenceService/ModelInfer"

    def batch_linked_and_request_ended() -> bool:
        # the request's span ends after its answer is sent: it may come in a later export
        batches = [s for s in OtlpReceiver.spans if s.name == "batch"]
        linked = any(link.trace_id.hex() == trace for s in batches for link in s.links)
        return linked and any(s.name == request_span for s in spans_of(trace))

    wait_for(batch_linked_and_request_ended, 30, "the batch span and the request's span")
    names = {s.name for s in spans_of(trace)}
    assert {request_span, "queue", "inference"} <= names
    report(cpu_grpc_trace={"spans": sorted(names)})


def test_the_shipped_monitoring_has_no_firing_alert_against_a_cpu_stack(cpu_container, tmp_path):
    """Prometheus with the shipped config and rules (targets on loopback), two minutes of
    evaluation with traffic running: nothing fires (no GPU target on a CPU stack)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("Debian's prometheus package is needed")
    from test_deploy import local_prometheus_config

    _, url = cpu_container
    port = free_port()
    config = local_prometheus_config(
        tmp_path, url.removeprefix("http://"), "127.0.0.1:1", port, "scrape"
    )
    settings = yaml.safe_load(config.read_text())
    settings["global"]["evaluation_interval"] = "5s"
    config.write_text(yaml.safe_dump(settings))
    proc = start_prometheus(prometheus, config, tmp_path / "data", port, tmp_path / "p.log")
    stop = time.monotonic() + 125

    def traffic():
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer key"}) as c:
            while time.monotonic() < stop:
                c.post(
                    "/segment", content=image_bytes(64, 64), headers={"Content-Type": "image/png"}
                )
                time.sleep(0.2)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        firing = []
        while time.monotonic() < stop:
            time.sleep(5)
            try:
                alerts = httpx.get(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5).json()[
                    "data"
                ]["alerts"]
            except httpx.HTTPError:
                continue
            firing += [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"]
        up = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query", params={"query": 'up{job="segserve"}'}
        ).json()
    finally:
        worker.join(60)
        proc.terminate()
        proc.wait(30)
    assert up["data"]["result"][0]["value"][1] == "1"  # it really scraped, with the token
    assert firing == []
    report(monitoring_cpu_stack={"seconds": 125, "firing": firing})


def test_sigterm_drains_the_cpu_container_and_it_exits(docker, cpu_container):
    name, url = cpu_container
    results: list = []

    def send():
        try:
            r = httpx.post(
                url + "/segment",
                content=image_bytes(512, 512),
                headers={"Content-Type": "image/png", "Authorization": "Bearer key"},
                timeout=60,
            )
            results.append(r.status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while inflight(url) < len(threads) + 1 and time.monotonic() < deadline:  # + this scrape
        time.sleep(0.01)
    stopped = docker("stop", "-t", "40", name)
    for t in threads:
        t.join(60)
    code = int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout)
    logs = docker("logs", name, check=False)
    assert stopped.returncode == 0 and results == [200] * 6, (results, logs.stdout[-2000:])
    assert "Finished server process" in logs.stdout + logs.stderr
    report(cpu_sigterm_exit_code=code)


def inflight(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer scrape"}, timeout=5).text
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("segserve_inflight_requests ")
    )


GPU_CHECK = r"""
import glob, os, subprocess
import onnxruntime as ort
ort.preload_dlls()
base = os.path.dirname(ort.__file__)
site = os.path.dirname(base)
libs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "*.so*")))
paths = sorted({os.path.dirname(p) for p in libs}) + [os.path.join(base, "capi")]
env = dict(os.environ, LD_LIBRARY_PATH=":".join(paths))
provider = os.path.join(base, "capi", "libonnxruntime_providers_cuda.so")
for lib in [provider] + libs:  # the provider, and what it loads at run time (cuDNN's parts)
    print("@@", os.path.basename(lib))
    print(subprocess.run(["ldd", lib], env=env, capture_output=True, text=True).stdout)
"""


def test_the_gpu_images_cuda_chain_resolves_but_for_the_driver(docker, gpu_image):
    out = docker("run", "--rm", "--entrypoint", "python3", gpu_image["tag"], "-c", GPU_CHECK).stdout
    checked = [line[3:] for line in out.splitlines() if line.startswith("@@ ")]
    links = [line.strip() for line in out.splitlines() if "=>" in line]
    missing = sorted({line.split()[0] for line in links if "not found" in line})
    resolved = sorted({line.split()[0] for line in links if "not found" not in line})
    cuda = sorted({lib for lib in checked + resolved if lib.startswith(("libcu", "libnv"))})
    report(gpu_ldd={"libraries_checked": len(checked), "missing": missing, "cuda_libraries": cuda})
    assert missing == ["libcuda.so.1"], out
    assert any(lib.startswith("libcudnn") for lib in checked)
    assert any(lib.startswith("libcublas") for lib in resolved)
    assert (
        docker(
            "run",
            "--rm",
            "--entrypoint",
            "python3",
            gpu_image["tag"],
            "-c",
            "import torch",
            check=False,
        ).returncode
        != 0
    )


def test_the_gpu_image_refuses_to_serve_on_cuda_without_a_driver(docker, gpu_image, models):
    result = docker(
        "run",
        "--rm",
        "--network=host",
        "-v",
        f"{models}:/models:ro",
        "-e",
        "SEGSERVE_WARMUP_SHAPES=32x32",
        gpu_image["tag"],
        "--port",
        str(free_port()),
        check=False,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "CUDAExecutionProvider did not load" in output and "libcuda.so.1" in output
    report(
        gpu_without_driver={
            "exit_code": result.returncode,
            "message": next(line for line in output.splitlines() if "did not load" in line),
        }
    )


def test_the_cpu_image_with_the_ray_extra_runs_segserve_batch_on_a_ray_cluster_in_it(
    docker, cpu_ray_image, models
):
    """As KubeRay runs the image (its own command in a login shell, `bash -lc`, not the
    image's entrypoint): `ray start --head`, then `segserve batch` as the driver on that
    cluster. Every input gets its
    label PNG at its relative path and one manifest row, served on Ray."""
    import pyarrow.parquet as pq
    from PIL import Image

    inputs, out = CACHE / "images-batch-in", CACHE / "images-batch-out"
    for folder in (inputs, out):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    sizes = {"a.png": (48, 64), "b.jpg": (70, 50), "sub/c.png": (96, 96), "sub/d.jpg": (33, 41)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (inputs / name).parent.mkdir(exist_ok=True)
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        (inputs / name).write_bytes(image_bytes(h, w, fmt, seed=i))
    for path in [inputs, *inputs.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out.chmod(0o777)  # the image's uid 10001 writes there
    port = free_port()
    script = (
        f"ray start --head --port={port} --num-cpus=2 --include-dashboard=false "
        "--disable-usage-stats >/dev/null && "
        "segserve batch /data/input --model /models/tiny/2/model.onnx --out /data/out "
        f"--ray-address 127.0.0.1:{port} --no-progress; code=$?; ray stop >/dev/null; exit $code"
    )
    result = docker(
        "run",
        "--rm",
        "--network=host",
        "--shm-size=512m",
        "--entrypoint",
        "/bin/bash",
        "-v",
        f"{models}:/models:ro",
        "-v",
        f"{inputs}:/data/input:ro",
        "-v",
        f"{out}:/data/out",
        "-e",
        "SEGSERVE_WARMUP_SHAPES=32x32",
        cpu_ray_image["tag"],
        "-lc",
        script,
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    closing = [line for line in output.splitlines() if "images in" in line]
    assert closing and "ray" in closing[-1] and "0 errors of 4 inputs" in closing[-1], closing
    for name, (h, w) in sizes.items():
        png = out / Path(name).with_suffix(".png")
        with Image.open(png) as image:
            assert image.size == (w, h) and image.mode in ("L", "P"), name
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(sizes)
    assert {r["status"] for r in rows} == {"ok"}
    report(cpu_ray_batch={"closing_line": closing[-1]})
