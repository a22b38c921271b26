"""segserve: semantic segmentation as a service (FCN-8s / U-Net, PyTorch -> ONNX -> onnxruntime)."""

__version__ = "0.1.0"  # the one place the version is written (pyproject reads it)
