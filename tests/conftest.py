from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores: keep torch from oversubscribing them when tests run next to a server.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic VOC-layout data set, made once per test session."""
    from segserve.training.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(count=24, seed=3, min_size=64, max_size=128), progress=False)
    return root


@pytest.fixture(scope="session")
def png_bomb(tmp_path_factory) -> bytes:
    """A real 30000 x 30000 1-bit PNG (well under 1 MB), made once per session."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session", autouse=True)
def onnx_conversions_once():
    """The torch -> ONNX conversion of a network (the dynamo exporter: 10-20 s on two cores)
    once per network and weights in a session. Every variant of a checkpoint (pixels or float
    in, labels or logits out, float16) is built from that one conversion by export itself;
    tests that export the same weights again (a new version, --force, the tiny repository
    beside test_export's own) get a copy of the first conversion, and everything export does
    after it (the ends of the graph, the parity gate, the card, publishing) runs every time."""
    import hashlib

    import onnx

    from segserve.export import onnx_export

    real, converted = onnx_export.convert_network, {}

    def convert_network(net):
        digest = hashlib.sha256(type(net).__name__.encode())
        for name, tensor in net.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in converted:
            converted[key] = real(net).SerializeToString()
        return onnx.load_from_string(converted[key])

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
