"""
The onnxruntime backend (CPU): the fp32 network exported to ONNX and run by ONNX Runtime.

ONNX Runtime's CPU kernels for ConvNeXt's depthwise convolutions and LayerNorms are several
times faster than eager PyTorch on small CPUs. The export is made once per weights and kept
in the cache folder (`onnx_export.cached_export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from taco_cvgl.inference import onnx_export
from taco_cvgl.inference.base import BuildRequest, FastPathError
import torch


class OnnxRuntimeRunner:
    """An ONNX Runtime session of the model's fp32 export."""

    name = 'onnxruntime'

    def __init__(self, model, cache_dir: Optional[Path]):
        """Export (or find the cached export) and open a session with torch's thread count."""
        if not onnx_export.onnxruntime_available():
            raise FastPathError('onnxruntime is not installed (pip install onnxruntime)')
        self.path = onnx_export.cached_export(model, cache_dir)
        self.session = onnx_export.make_session(self.path, threads=torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out)


def build(request: BuildRequest) -> OnnxRuntimeRunner:
    """Return an ONNX Runtime session of the request's model (CPU, fp32 only)."""
    if request.device.type != 'cpu':
        raise FastPathError('the onnxruntime backend runs on the CPU only (this install has '
                            'no ONNX Runtime GPU provider)')
    if request.precision != 'fp32':
        raise FastPathError('the onnxruntime backend runs fp32 only')
    return OnnxRuntimeRunner(request.model, request.cache_dir)
