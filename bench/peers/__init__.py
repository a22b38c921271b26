"""Peers served beside segserve in `python -m bench.peers`: Triton's Python backend and a
LitServe server, each running segserve's own engine (the same onnxruntime session, the
same prepare/batch/run) so that the work per image is identical."""
