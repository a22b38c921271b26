"""Triton Python-backend model: segserve's Engine behind Triton's dynamic batcher.

Copied to TRITON_REPO/NAME/1/model.py by bench.peers; config.pbtxt names the ONNX file and
the intra-op threads. Triton batches requests of one shape together (its dynamic batcher
does not pad); a batch of several shapes would be run one image at a time.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from segserve.service.runtime.engine import Engine


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # onnxruntime's CPU arena as a plain session has it: on and never shrunk (segserve
        # shrinks it after large runs, which would cost batches of 8 here page faults).
        self.engine = Engine.load(
            params["onnx"], "cpu", int(params["threads"]), arena_shrink_pixels=None
        )

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        images = [im for batch in batches for im in batch]
        if len({im.shape for im in images}) == 1:
            labels = self.engine.segment(images)
        else:
            labels = [self.engine.segment([im])[0] for im in images]
        responses, k = [], 0
        for batch in batches:
            out = np.stack(labels[k : k + len(batch)])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("labels", out)]))
            k += len(batch)
        return responses
