"""
The jit backend (CPU): torch.jit.trace + freeze in channels_last, oneDNN packs the weights once.

In bf16 the weights themselves are bf16 (no autocast casts on each call), which lets oneDNN use
the CPU's bf16 units (AVX512-BF16, AMX) for every convolution and matrix product; the
embeddings stay within the fast path's cosine bar of fp32 (checked when built).
"""

from __future__ import annotations

from taco_cvgl.inference.base import BuildRequest, FastPathError
from taco_cvgl.inference.cpu import CastInput, precision_dtype, warnings_quiet, weights_copy
import torch


class JitRunner:
    """A traced and frozen copy of the network in the model's precision."""

    name = 'jit'

    def __init__(self, model, precision: str, config):
        """Trace on a batch of 1 (the batch stays free) and freeze."""
        dtype = precision_dtype(precision, 'jit')
        module = CastInput(weights_copy(model, dtype), dtype).eval()
        example = torch.zeros((1, 3) + tuple(config.input_size))
        with torch.inference_mode(), warnings_quiet():
            traced = torch.jit.trace(module, example, check_trace=False)
            self.fn = torch.jit.freeze(traced.eval())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        with torch.inference_mode():
            return self.fn(x.float()).float()


def build(request: BuildRequest) -> JitRunner:
    """Return the frozen TorchScript of the request's model (FastPathError off the CPU)."""
    if request.device.type != 'cpu':
        raise FastPathError('the jit backend is for the CPU')
    return JitRunner(request.model, request.precision, request.config)
