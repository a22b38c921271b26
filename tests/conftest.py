from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Two cores: keep torch from oversubscribing them when tests run next to a server.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tiles of 320 px (the least a halo of 80 allows) unless a test asks for the provider's own
# (tile_size=None): a native model is warmed and timed at its tile when it loads, and at
# 640 px that was half a second of every start of the tests' two-version repository, some
# seventy starts a run. Servers the tests start inherit it.
os.environ.setdefault("SEGSERVE_TILE_SIZE", "320")
# float32 unless a test asks for another or for auto: `auto` loads, times and checks every
# candidate runtime x arithmetic at each start (tests/test_selection.py is where it is
# tested), seconds the suite would spend again in every `segserve predict` it runs.
os.environ.setdefault("SEGSERVE_VARIANT", "float32")
# What `segserve predict` and `segserve batch` warm a model on in the tests (the servers the
# tests start say 64x64 themselves): the default 512x512 and 375x500 cost each load a second.
os.environ.setdefault("SEGSERVE_WARMUP_SHAPES", "64x64")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic VOC-layout data set, made once per test session."""
    from segserve.training.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(count=24, seed=3, min_size=64, max_size=128), progress=False)
    return root


@pytest.fixture(scope="session")
def png_bomb(tmp_path_factory) -> bytes:
    """A real 20000 x 20000 1-bit PNG (well under 1 MB, 400 MP: ten times the default limit
    and over Pillow's own bomb threshold), made once per session."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def grpc_traced_server(tmp_path_factory):
    """`segserve serve` with the default model, an API key, gRPC on a port of its own, a
    2 MB body limit, and tracing on (the standard OTEL_* variables) to an OTLP receiver in
    this process: one server for the gRPC tests and the tracing tests. Its `grpc` is the
    gRPC address, `key` the API key."""
    from helpers import free_port, otlp_receiver, run_server
    from segserve.default_model import install

    repo = tmp_path_factory.mktemp("grpc-traced") / "repo"
    install(repo)
    grpc_port = free_port()
    with otlp_receiver() as endpoint, pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "segserve-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }.items():
            patch.setenv(key, value)
        with run_server(
            repo, tmp_path_factory.mktemp("grpc-traced-logs"), api_key="grpc-key",
            grpc_port=grpc_port, max_body_bytes=2_000_000,
        ) as server:  # fmt: skip
            server.grpc = f"127.0.0.1:{grpc_port}"
            server.key = "grpc-key"
            yield server


CONVERSIONS = pytest.StashKey[tuple[Path, "subprocess.Popen | None"]]()


def pytest_configure(config):
    """A whole-suite run converts the tests' tiny U-Net to ONNX in a process of its own from
    the start, while tests are collected and the first ones run: the exporter needs about 15 s
    of one core for it (its first use in a process), and the suite leaves the second of two
    cores mostly idle. Runs of single files convert in-process when they need it."""
    cache = Path(tempfile.mkdtemp(prefix="segserve-conversions-"))
    warm = None
    whole_suite = all(Path(arg).is_dir() for arg in config.args)
    if whole_suite and not config.option.collectonly:
        warm = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, helpers; helpers.convert_the_tiny_unet(sys.argv[1])",
                str(cache),
            ],
            cwd=Path(__file__).parent,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=(cache / "warm.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    config.stash[CONVERSIONS] = (cache, warm)


def pytest_collection_finish(session):
    """Stops the warm-up when no selected test exports the tiny U-Net (e.g. `-m slow`)."""
    _, warm = session.config.stash[CONVERSIONS]
    uses = {"tiny_repository", "unet_ckpt"}  # the fixtures that export it
    if warm is not None and not any(
        uses & set(getattr(i, "fixturenames", ())) for i in session.items
    ):
        warm.kill()
        warm.wait()


def pytest_unconfigure(config):
    cache, warm = config.stash.get(CONVERSIONS, (None, None))
    if warm is not None and warm.poll() is None:
        warm.kill()
        warm.wait()
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def onnx_conversions_once(pytestconfig):
    """The torch -> ONNX conversion of a network (the dynamo exporter: 10-20 s on two cores)
    once per network and weights in a session. Every variant of a checkpoint (pixels or float
    in, labels or logits out, float16) is built from that one conversion by export itself;
    tests that export the same weights again (a new version, --force, the tiny repository
    beside test_export's own) get a copy of the first conversion, and everything export does
    after it (the ends of the graph, the parity gate, the card, publishing) runs every time.
    A conversion is the exporter's own output, made in this process or by the warm-up one."""
    import onnx

    from helpers import conversion_path, convert_into
    from segserve.export import onnx_export

    real = onnx_export.convert_network
    cache, warm = pytestconfig.stash[CONVERSIONS]

    def convert_network(net):
        path = conversion_path(cache, net)
        if not path.exists() and warm is not None and warm.poll() is None:
            warm.wait(600)  # it may be converting this very network
        if not path.exists():
            convert_into(path, net, real)
        return onnx.load(str(path))

    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "convert_network", convert_network)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """A model repository holding a width-8 U-Net with 4 classes, exported for real twice:
    `tiny` v1 as older exports were (float NCHW in, logits out) and `tiny` v2 as exports
    are now (uint8 pixels in, labels out). v2, the newest, is what requests get by default."""
    from helpers import make_checkpoint
    from segserve.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("repository")
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", width=8, batch_norm=True)
    shapes = ((1, 37, 53), (2, 64, 80))
    quiet = {"parity_shapes": shapes, "log": lambda *_: None}
    export_checkpoint(ckpt, root, "tiny", input="float", output="logits", **quiet)
    export_checkpoint(ckpt, root, "tiny", **quiet)
    return root
