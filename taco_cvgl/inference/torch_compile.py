"""
The compile backend: torch.compile (inductor) fuses the network's kernels.

On CUDA the compiled network is then captured into CUDA graphs (cuda_graph.py). On the CPU,
inductor's freezing folds the weights into the graph and prepacks them for oneDNN (bf16 on
AVX512-BF16 / AMX units); that needs a C++ compiler and takes tens of seconds on a small CPU
(inductor caches the result on disk for the next start); each new batch size compiles again,
so `warm_up` the sizes a node will use.
"""

from __future__ import annotations

from taco_cvgl.inference.base import BuildRequest, compile_module, FastPathError
from taco_cvgl.inference.cpu import CastInput, find_cxx_compiler, precision_dtype, weights_copy
from taco_cvgl.inference.cuda_graph import CudaGraphRunner
import torch


class CompiledCpu:
    """torch.compile (inductor's C++ kernels) on the CPU, weights frozen and in the precision."""

    name = 'compile'

    def __init__(self, model, precision: str, config):
        """Compile now (batch 1), not on the first frame."""
        if find_cxx_compiler() is None:
            raise FastPathError('torch.compile on the CPU needs a C++ compiler (g++ or clang++ '
                                'on PATH, or $CXX); none is installed')
        dtype = precision_dtype(precision, 'CPU compile')
        self.fn = compile_module(CastInput(weights_copy(model, dtype), dtype).eval())
        self(torch.zeros((1, 3) + tuple(config.input_size)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        from torch._inductor import config as inductor_config
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self.fn(x.float()).float()


def build(request: BuildRequest):
    """Return the compiled network: CUDA graphs of it on CUDA, inductor's C++ on the CPU."""
    if request.device.type == 'cuda':
        return CudaGraphRunner(request.network, request.config, request.batch_sizes, True)
    return CompiledCpu(request.model, request.precision, request.config)
