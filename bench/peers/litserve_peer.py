"""LitServe around segserve's Engine: POST /segment with a multipart field `image`, the label
PNG back, with LitServe's own batching (max_batch_size, batch_timeout).

    PEER_ONNX=model.onnx PEER_PORT=8140 PEER_THREADS=2 PEER_BATCH=8 PEER_DELAY_S=0.005 \
        .bench/litserve-venv/bin/python bench/peers/litserve_peer.py
"""

import os

import litserve as ls
from fastapi import Response

from segserve.service.media.imaging import decode_image
from segserve.service.media.render import encode_label_png
from segserve.service.runtime.engine import Engine


class SegmentAPI(ls.LitAPI):
    def setup(self, device):
        # onnxruntime's CPU arena as a plain session has it: on and never shrunk (segserve
        # shrinks it after large runs, which would cost batches of 8 here page faults).
        self.engine = Engine.load(
            os.environ["PEER_ONNX"],
            "cpu",
            int(os.environ["PEER_THREADS"]),
            arena_shrink_pixels=None,
        )

    def decode_request(self, request):
        return decode_image(request["image"].file.read(), 40_000_000)

    def batch(self, inputs):
        return list(inputs)  # images of several sizes: the engine groups them

    def unbatch(self, output):
        return list(output)

    def predict(self, images):
        if not isinstance(images, list):  # max_batch_size 1: one image, not a list
            return self.engine.segment([images])[0]
        if len({im.shape for im in images}) == 1:
            return self.engine.segment(images)
        return [self.engine.segment([im])[0] for im in images]

    def encode_response(self, labels):
        png = encode_label_png(labels, self.engine.card.palette_bytes)
        return Response(png, media_type="image/png")


if __name__ == "__main__":
    api = SegmentAPI(
        max_batch_size=int(os.environ["PEER_BATCH"]),
        batch_timeout=float(os.environ["PEER_DELAY_S"]),
        api_path="/segment",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(port=int(os.environ["PEER_PORT"]), generate_client_file=False)
