"""
The int8 backend (CPU): static int8 quantization, compiled ahead of time by inductor.

The network is exported with a dynamic batch dimension, quantized by PT2E with torchao's
X86InductorQuantizer (int8 convolutions and linear layers, per-channel weights, activation
ranges observed on calibration images such as the map's own) and compiled by AOTInductor
with frozen weights into a package (a shared library plus the packed weights). Calls then run
in C++ with no Python per operation and no guard checks; oneDNN runs the int8 products on
VNNI/AMX. In bf16 precision the operations left in floating point run under bf16 autocast.

The package is kept in the cache folder (``int8/``), keyed by the weights, the calibration
batch, the precision, the torch and torchao versions, the CPU and the thread count (inductor
writes its C++ kernels for one thread count and instruction set): a node that restarts on the
same map loads it in well under a second instead of compiling again. A cached package that
cannot be loaded is compiled again over; an unwritable cache folder means compiling into a
temporary one. Accuracy is the calibration's: give it images like the ones it will see (the
map's); the build check compares with eager fp32 on calibration images, not on noise.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np
from taco_cvgl.errors import first_line, InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.inference.base import BuildRequest, FastPathError
from taco_cvgl.inference.cpu import (cpu_signature, find_cxx_compiler, precision_dtype,
                                     warnings_quiet, weights_copy)
from taco_cvgl.logs import quiet_loggers
from taco_cvgl.model.config import cache_dir_default
from taco_cvgl.model.preprocess import prepare_batch
import torch
import torch.nn as nn

log = logging.getLogger('taco_cvgl.inference.int8')

# Calibration images the int8 backend measures activation ranges on (more are sampled down).
INT8_CALIBRATION_IMAGES = 32
# Calibration images the build check compares with eager fp32 on.
CHECK_IMAGES = 8
# torch's loggers whose notices building the backend holds back: torchao's deprecation notices
# and the C++ builder's "No CUDA runtime is found" (the CPU build needs none) are noise in a
# node's log or a CLI's error stream.
QUIET_LOGGERS = ('torch.utils._pytree', 'torch.utils.cpp_extension')


class Int8Runner:
    """The quantized network's AOTInductor package, loaded from the cache or compiled."""

    name = 'int8'

    def __init__(self, model, precision: str, calibration: Optional[torch.Tensor],
                 cache_dir: Optional[Path] = None):
        """Load the cached package of this model and calibration, or quantize and compile."""
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
        except ImportError as exc:
            raise FastPathError(f'the int8 backend needs torchao ({exc})') from None
        if find_cxx_compiler() is None:
            raise FastPathError('the int8 backend compiles with inductor and needs a C++ '
                                'compiler (g++ or clang++ on PATH, or $CXX)')
        if calibration is None or len(calibration) == 0:
            raise FastPathError('the int8 backend needs calibration images (for the node: the '
                                "map's images, which must be at the paths the database lists)")
        precision_dtype(precision, 'int8')
        self._quantize = (x86, prepare_pt2e, convert_pt2e)
        calibration = calibration.float().cpu().contiguous()
        # Quantized ranges hold for images like the calibration's, not for random noise.
        self.check_batch = calibration[spread(len(calibration), CHECK_IMAGES)]
        self.path = int8_package_path(model, precision, calibration, cache_dir)
        self.from_cache = False
        self.fn = self._load_cached()
        if self.fn is None:
            log.info('int8: quantizing and compiling the network (a minute or so, once per '
                     'weights and map)')
            self.fn = self._compile(model, precision, calibration)

    def _load_cached(self):
        if not self.path.is_file():
            return None
        try:
            fn = torch._inductor.aoti_load_package(str(self.path))
        except Exception as exc:  # noqa: B902 - a damaged or foreign package: compile again
            log.warning('int8 package %s cannot be loaded (%s); compiling it again',
                        self.path, first_line(exc))
            return None
        self.from_cache = True
        return fn

    def _compile(self, model, precision: str, calibration: torch.Tensor):
        from torch._inductor import config as inductor_config
        program = self._quantized_program(model, precision, calibration)
        with tempfile.TemporaryDirectory(prefix='taco_cvgl_int8_') as scratch, \
                torch.no_grad(), warnings_quiet():
            package = Path(scratch) / 'int8.pt2'
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(program, package_path=str(package))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(self.path) as tmp:
                    shutil.copyfile(package, tmp)
                return torch._inductor.aoti_load_package(str(self.path))
            except OSError as exc:
                log.warning('int8 package not cached (%s: %s)', self.path.parent, exc)
                return torch._inductor.aoti_load_package(str(package))

    def _quantized_program(self, model, precision: str, calibration: torch.Tensor):
        """Export, quantize (ranges observed on the calibration batch) and export again."""
        x86, prepare_pt2e, convert_pt2e = self._quantize
        network = weights_copy(model, torch.float32, torch.contiguous_format)
        example = calibration[:2] if len(calibration) > 1 else calibration.repeat(2, 1, 1, 1)
        dynamic = ({0: torch.export.Dim('batch', min=1, max=1024)},)
        with torch.no_grad(), warnings_quiet():
            graph = torch.export.export(network, (example,), dynamic_shapes=dynamic).module()
            _drop_dtype_assertions(graph)
            quantizer = x86.X86InductorQuantizer()
            quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(graph, quantizer)
            for start in range(0, len(calibration), 8):
                prepared(calibration[start:start + 8])
            quantized = convert_pt2e(prepared)
            if precision == 'bf16':
                quantized = UnderBf16Autocast(quantized)
            program = torch.export.export(quantized, (example,), dynamic_shapes=dynamic)
            _drop_dtype_assertions(program.graph_module)
        return program

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        with torch.no_grad():
            return self.fn(x.float().contiguous()).float()


class UnderBf16Autocast(nn.Module):
    """Run a module under CPU bf16 autocast (exported as part of the graph), fp32 out."""

    def __init__(self, module: nn.Module):
        """Wrap `module`."""
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the module under autocast."""
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return self.module(x).float()


def int8_package_path(model, precision: str, calibration: torch.Tensor,
                      cache_dir: Optional[Path] = None) -> Path:
    """
    Return where the int8 backend keeps its compiled package for this model and calibration.

    The name is a digest of everything the package depends on: weights and config, precision,
    the calibration batch, torch's and torchao's versions, the thread count and the CPU.
    """
    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = 'none'
    key = hashlib.blake2b(digest_size=12)
    # The fingerprint's first 16 digits: the key packages cached before were written under.
    for part in (model.fingerprint()[:16], model.config.to_json(), precision,
                 torch.__version__, torchao_version, str(torch.get_num_threads()),
                 cpu_signature()):
        key.update(part.encode() + b'\0')
    key.update(calibration.detach().float().cpu().contiguous().numpy().tobytes())
    root = Path(cache_dir) if cache_dir else cache_dir_default()
    return root / 'int8' / f'{key.hexdigest()}.pt2'


def _drop_dtype_assertions(graph) -> None:
    """Remove an exported graph's tensor-metadata assertions (they refuse bf16 autocast)."""
    for node in list(graph.graph.nodes):
        if node.op == 'call_function' and 'assert_tensor_metadata' in str(node.target):
            graph.graph.erase_node(node)
    graph.recompile()


def calibration_batch(images: Sequence, config, count: int = INT8_CALIBRATION_IMAGES,
                      ) -> torch.Tensor:
    """Return up to `count` images, evenly spread over the list, as a network-input batch."""
    if len(images) == 0:
        raise InputError('no calibration images')
    return prepare_batch([images[i] for i in spread(len(images), count)], config,
                         torch.device('cpu'))


def spread(n: int, count: int) -> np.ndarray:
    """Return up to `count` indices into n items, evenly spread from the first to the last."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).astype(int))


def calibration_images(paths: Sequence[str], count: int = INT8_CALIBRATION_IMAGES) -> list:
    """
    Load up to `count` of the image files, evenly spread over the list (e.g. a map's images).

    Files that are missing or unreadable are passed over; the list may come back empty.
    """
    from taco_cvgl.files.image_codec import load_image_file
    paths = [str(p) for p in paths]
    images = []
    step = max(1, len(paths) // max(1, count))
    for path in paths[::step]:
        if len(images) >= count:
            break
        try:
            images.append(load_image_file(path))
        except InputError:
            continue
    return images


def is_cached(request: BuildRequest) -> bool:
    """Return whether the request's int8 package is in the cache (so building it is quick)."""
    if request.device.type != 'cpu' or request.calibration is None:
        return False
    return int8_package_path(request.model, request.precision, request.calibration,
                             request.cache_dir).is_file()


def build(request: BuildRequest) -> Int8Runner:
    """Return the int8 package of the request's model and calibration (CPU only)."""
    if request.device.type != 'cpu':
        raise FastPathError('the int8 backend is for the CPU')
    with quiet_loggers(QUIET_LOGGERS):
        return Int8Runner(request.model, request.precision, request.calibration,
                          request.cache_dir)
