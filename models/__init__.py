"""Training-time package: datasets, networks, training, evaluation, compression and ONNX export.

Needs the ``train`` extra (torch, torchvision, segmentation-models-pytorch, torch-pruning, onnx).
"""

import os

# No model hub is reachable at run time: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
