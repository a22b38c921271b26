"""One engine per served variant of a model version: the one place that turns images into labels.

`prepare` (one image, in the request's own worker thread) -> `stack` (stack and pad a group)
-> `run` (one inference, crop each result back to its image). `segment` does all three
for callers without a batcher (warm-up, `segserve predict`). The card says what the graph
takes: uint8 pixels (normalised inside the graph, nothing to do here) or, for older and
imported models, float NCHW pixels normalised here.

The inference itself is a runner's: an onnxruntime session (any provider), or OpenVINO's
CPU plugin (service/runtime/openvino.py). Which file, runtime and arithmetic an engine runs
is its `variant`: "float32" or "int8" on onnxruntime, "openvino-bf16" and the like.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from segserve.contracts.architectures import padded_size
from segserve.contracts.card import ModelCard, read_card
from segserve.contracts.repository import CARD_FILE
from segserve.service.runtime.memory import give_back_memory
from segserve.service.runtime.providers import (
    ProviderUnavailable,
    choose_providers,
    preload_cuda_libraries,
    provider_options,
)
from segserve.service.settings import ARENA_SHRINK_PIXELS

if TYPE_CHECKING:
    from segserve.service.runtime.openvino import OpenVinoRunner

log = logging.getLogger("segserve.engine")

_SHRINK_CPU_ARENA = ort.RunOptions()
_SHRINK_CPU_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


class OrtRunner:
    """An onnxruntime session, run by the engine."""

    runtime = "onnxruntime"

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0].removesuffix("ExecutionProvider").lower()

    def run(self, output: str, input_name: str, batch: np.ndarray, shrink: bool) -> np.ndarray:
        options = _SHRINK_CPU_ARENA if shrink else None  # the arena would keep its peak
        return self.session.run([output], {input_name: batch}, options)[0]


@dataclass
class Engine:
    runner: OrtRunner | OpenVinoRunner
    card: ModelCard
    path: Path
    # Runs on this many pixels or more shrink the CPU arena when they end (None: never, or
    # no arena).
    shrink_at_pixels: int | None = None
    variant: str = ""  # the card's precision on onnxruntime; "openvino-ARITHMETIC" on OpenVINO

    @classmethod
    def load(
        cls,
        path: Path,
        providers: str = "auto",
        intra_op_threads: int = 1,
        cudnn_conv_algo_search: str = "HEURISTIC",
        cpu_arena: bool = True,
        spinning: bool = False,
        card: ModelCard | None = None,
        arena_shrink_pixels: int | None = ARENA_SHRINK_PIXELS,  # None: never shrink
        card_path: Path | None = None,  # default: model.json beside the file
    ) -> Engine:
        chosen, strict = choose_providers(providers, ort.get_available_providers())
        if "CUDAExecutionProvider" in chosen:
            preload_cuda_libraries()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Without the arena every run maps its activations afresh and page-faults them in:
        # ~17,000 faults per photo-sized image, 13-20 % of CPU throughput (docs/benchmarks.md:
        # "onnxruntime's CPU arena"). With it, runs reuse the memory; large runs give it back.
        opts.enable_cpu_mem_arena = cpu_arena
        # Idle intra-op threads spin for work by default: CPU burnt between requests that the
        # decode and encode threads need (docs/benchmarks.md: server CPU per request).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        session = ort.InferenceSession(
            str(path),
            opts,
            providers=chosen,
            provider_options=provider_options(chosen, cudnn_conv_algo_search),
        )
        loaded = session.get_providers()
        if strict and (missing := [p for p in chosen if p not in loaded]):
            raise ProviderUnavailable(
                f"{', '.join(missing)} did not load for {path} (onnxruntime fell back to "
                f"{', '.join(loaded)}); for CUDA the NVIDIA driver (libcuda.so.1) and the CUDA "
                "and cuDNN libraries must be present"
            )
        if chosen[0] not in loaded:
            log.warning("%s did not load for %s; running on %s", chosen[0], path, loaded[0])
        if card is None:
            beside = card_path or Path(path).with_name(CARD_FILE)
            card = read_card(session.get_modelmeta().custom_metadata_map, beside)
        engine = cls(
            runner=OrtRunner(session),
            card=card,
            path=Path(path),
            shrink_at_pixels=arena_shrink_pixels if cpu_arena else None,
            variant=card.precision,
        )
        engine.check_io()
        return engine

    @classmethod
    def load_openvino(
        cls,
        path: Path,
        arithmetic: str,
        card: ModelCard,
        intra_op_threads: int = 1,
        shape_cache: int = 16,
        batch_pixels: int | None = ARENA_SHRINK_PIXELS,
    ) -> Engine:
        """`path` compiled by OpenVINO's CPU plugin to compute in `arithmetic` (float32,
        bf16, float16; an int8 file computes as its QDQ says: name it int8). The card is the
        file's, read by the caller (OpenVINO does not keep ONNX metadata). `batch_pixels`:
        the most pixels one batch of several images holds, as for a CPU session, since
        OpenVINO keeps the memory of its largest run."""
        from segserve.service.runtime.openvino import OpenVinoRunner

        runner = OpenVinoRunner(Path(path), arithmetic, intra_op_threads, shape_cache)
        engine = cls(
            runner=runner,
            card=card,
            path=Path(path),
            shrink_at_pixels=batch_pixels,
            variant=f"openvino-{arithmetic}",
        )
        engine.check_io()
        return engine

    @property
    def batch_pixel_limit(self) -> int | None:
        """The most pixels a batch of several images may hold on this engine (None: no
        limit of its own). On CPU a batch computes a few per cent faster per image than its
        images one by one only while the arena keeps its memory: a batch that made the
        arena shrink would page-fault its successor's memory in afresh (docs/benchmarks.md,
        "Batch size by provider")."""
        if self.provider != "cpu" or self.shrink_at_pixels is None:
            return None
        return self.shrink_at_pixels - 1

    def check_io(self) -> None:
        """The graph has the input and output its card names."""
        inputs, outputs = set(self.runner.inputs), set(self.runner.outputs)
        if self.card.input_name not in inputs or self.card.output_name not in outputs:
            raise ValueError(
                f"the card names input {self.card.input_name!r} and output "
                f"{self.card.output_name!r}; the graph has inputs {sorted(inputs)} and "
                f"outputs {sorted(outputs)}"
            )

    @property
    def provider(self) -> str:
        """The device kind: cpu, cuda or tensorrt (OpenVINO runs on the CPU)."""
        return self.runner.provider

    @property
    def runtime(self) -> str:
        return self.runner.runtime

    # -- the data path -----------------------------------------------------------------

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """One H x W x 3 uint8 image as the graph takes it (the card says how)."""
        return self.card.model_input(rgb)

    def item_size(self, item: np.ndarray) -> tuple[int, int]:
        """(H, W) of a prepared item."""
        if self.card.input_layout == "NHWC":
            return item.shape[0], item.shape[1]
        return item.shape[1], item.shape[2]

    def stack(self, items: list[np.ndarray]) -> np.ndarray:
        """Stack prepared items into one input; items of different sizes are padded
        bottom/right to a common size rounded up to the size divisor, by repeating their last
        row and column: the image seems to go on, as a network that pads its own input this
        way (segserve's U-Net) sees it when the image runs alone."""
        sizes = [self.item_size(it) for it in items]
        if len(set(sizes)) == 1:
            return items[0][None] if len(items) == 1 else np.stack(items)
        div = self.card.size_divisor
        h = max(padded_size(size, div)[0] for size in sizes)
        w = max(padded_size(size, div)[1] for size in sizes)
        nhwc = self.card.input_layout == "NHWC"
        out = np.empty((len(items), h, w, 3) if nhwc else (len(items), 3, h, w), items[0].dtype)
        for i, (it, (ih, iw)) in enumerate(zip(items, sizes, strict=True)):
            # In NCHW the channels come first: view each as H x W x ... to fill it the same way.
            one = out[i] if nhwc else out[i].transpose(1, 2, 0)
            pixels = it if nhwc else it.transpose(1, 2, 0)
            one[:ih, :iw] = pixels
            one[ih:, :iw] = pixels[ih - 1 : ih]  # the last row, downwards
            one[:, iw:] = one[:, iw - 1 : iw]  # the last column (and corner), rightwards
        return out

    def run(self, batch: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """One inference; the labels of each item, cropped back to its (H, W)."""
        pixels = batch.size // 3  # N x H x W, either layout
        shrink = self.shrink_at_pixels is not None and pixels >= self.shrink_at_pixels
        out = self.runner.run(self.card.output_name, self.card.input_name, batch, shrink)
        if self.card.output == "logits":
            out = out.argmax(axis=1)
        labels = out.astype(np.uint8, copy=False)
        if len(sizes) == 1 and labels.shape[1:] == sizes[0]:
            result = [labels[0]]
        else:
            result = [
                np.ascontiguousarray(lab[:h, :w]) for lab, (h, w) in zip(labels, sizes, strict=True)
            ]
        # The network's activations (hundreds of MB per megapixel) are freed by now.
        give_back_memory(labels.size)
        return result

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Labels (H x W uint8) for RGB images in one inference, without a batcher."""
        items = [self.prepare(im) for im in images]
        return self.run(self.stack(items), [self.item_size(it) for it in items])
