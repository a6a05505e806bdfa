"""
What the CPU backends share: a packed copy of the weights, and what this CPU and host offer.

The CPU backends (compile, int8, jit, onnxruntime) each run their own copy of the network,
made by `weights_copy` from the model's config and state dict alone.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from typing import List, Optional

from taco_cvgl.inference.base import FastPathError
import torch
import torch.nn as nn


class CastInput(nn.Module):
    """A network whose weights are in `dtype`, fed float32 input: cast, then channels_last."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        """Wrap `network` (weights already in `dtype`)."""
        super().__init__()
        self.network = network
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on x cast to the weights' dtype."""
        return self.network(x.to(self.dtype).contiguous(memory_format=torch.channels_last))


def weights_copy(model, dtype: torch.dtype = torch.float32,
                 memory_format=torch.channels_last) -> nn.Module:
    """
    Return a CPU eval copy of the network with its weights in `dtype`.

    Built on the meta device (no random initialisation, which costs seconds for ConvNeXt) from
    the config, then given the model's state dict: nothing but the weights comes along.
    """
    with torch.device('meta'):
        clone = type(model)(model.config)
    clone = clone.to_empty(device='cpu')
    clone.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    clone.device = torch.device('cpu')
    return clone.to(dtype=dtype, memory_format=memory_format).eval()


def precision_dtype(precision: str, backend: str) -> torch.dtype:
    """Return the weights' dtype a CPU backend runs a precision in (fp32 or bf16 only)."""
    if precision not in ('fp32', 'bf16'):
        raise FastPathError(f'the {backend} backend runs fp32 or bf16, not {precision}')
    return torch.bfloat16 if precision == 'bf16' else torch.float32


@contextlib.contextmanager
def warnings_quiet():
    """Silence the tracer's warnings about Python values (shapes are fixed here)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def find_cxx_compiler() -> Optional[str]:
    """Return the C++ compiler inductor would use, or None when there is none."""
    candidates = []
    if os.environ.get('CXX'):
        candidates.append(os.environ['CXX'])
    try:
        from torch._inductor import config as inductor_config
        configured = inductor_config.cpp.cxx
        candidates.extend(c for c in (configured if isinstance(configured, tuple)
                                      else (configured,)) if c)
    except Exception:  # noqa: B902 - a private module: its absence just means the defaults
        pass
    candidates.extend(('g++', 'clang++'))
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def cpu_has_bf16() -> bool:
    """
    Return True when this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16).

    There bf16 weights run about 2-3x faster than fp32 (bench: cpu_latency) with embeddings
    within the fast path's cosine bar; elsewhere bf16 is emulated and slower than fp32.
    """
    for line in _cpuinfo_lines():
        if line.startswith(('flags', 'Features')):
            flags = set(line.split(':', 1)[1].split())
            return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})
    return False


def cpu_signature() -> str:
    """Return what identifies this CPU's instruction set (model name and flags)."""
    wanted = [line for line in _cpuinfo_lines()
              if line.startswith(('model name', 'flags', 'Features'))]
    return '\n'.join(dict.fromkeys(wanted)) or f'{platform.machine()} {platform.processor()}'


def _cpuinfo_lines() -> List[str]:
    """Return /proc/cpuinfo's lines (none where there is no such file)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            return handle.read().splitlines()
    except OSError:
        return []
