"""
The inference backends by name, and `make_embedder`: the fastest one that works here.

Each backend is a module of this package with a `build(request)` that returns a callable
(normalised batch -> embeddings) or raises:

- ``cuda_graph`` (CUDA): the network captured into CUDA graphs, frames' preprocessing too.
- ``compile`` (CUDA or CPU): torch.compile; on CUDA then captured into CUDA graphs; on the
  CPU it needs a C++ compiler.
- ``int8`` (CPU): static int8 (torchao PT2E, AOTInductor), calibrated on images such as the
  map's own, compiled once per weights and map and kept in the cache folder; needs torchao,
  a C++ compiler and calibration images.
- ``onnxruntime`` (CPU, fp32): the network exported to ONNX and run by ONNX Runtime.
- ``jit`` (CPU): torch.jit.trace + freeze, weights in the precision (oneDNN packing).
- ``eager``: the model as `to_runtime` left it (the reference every chain ends on).

'off' is no backend: `make_embedder` returns the model itself. 'auto' tries, per device and
precision, the backends of `AUTO_CHAINS` fastest first (on this package's bench CPU int8 is
about 6x eager fp32 at 224 px, the frozen bf16 TorchScript 3x).

Every backend is checked when it is built: its embeddings of a fixed batch (random, or for
int8 calibration images) must have a cosine similarity >= `MIN_COSINE` to the eager fp32
model's; otherwise, or when the backend cannot be built at all (no compiler, capture failure,
missing package), a warning is logged and the next backend of the chain is tried, and finally
eager. The embedder's `backend` says what runs, `fallback_reason` why a requested one does not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, List, Optional, Sequence

from taco_cvgl.errors import first_line, InputError, TacoError
from taco_cvgl.inference import cuda_graph, eager, int8, jit, onnx_runtime, torch_compile
from taco_cvgl.inference.base import (BackendEmbedder, BuildRequest, DEFAULT_BATCH_SIZES,
                                      Embedder, FastPathError, MIN_COSINE,
                                      NetworkUnderAutocast)
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BUILDERS = {'eager': eager.build, 'cuda_graph': cuda_graph.build, 'compile': torch_compile.build,
            'int8': int8.build, 'onnxruntime': onnx_runtime.build, 'jit': jit.build}
BACKENDS = ('auto', 'eager', 'cuda_graph', 'compile', 'onnxruntime', 'jit', 'int8')
# What 'auto' tries, in order, per device type and precision (eager always ends the chain).
AUTO_CHAINS = {
    ('cuda', 'fp16'): ('cuda_graph',),
    ('cuda', 'bf16'): ('cuda_graph',),
    ('cuda', 'fp32'): ('cuda_graph',),
    ('cpu', 'fp32'): ('int8', 'onnxruntime', 'jit'),
    ('cpu', 'bf16'): ('int8', 'jit'),
}
# What a backend asked for by name falls back to before eager.
FALLBACKS = {'compile': ('cuda_graph',), 'cuda_graph': (), 'onnxruntime': ('jit',), 'jit': (),
             'int8': ('jit',)}


def make_embedder(model, fast_path: str = 'auto', calibration_images: Optional[Sequence] = None,
                  batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, check: bool = True,
                  force_failure: bool = False, cache_dir=None,
                  uint8_resize: bool = True, compile_int8: bool = True) -> Embedder:
    """
    Return an Embedder of a model placed by `to_runtime`, through the fast path named.

    fast_path: 'off' (the model itself), 'auto' (the fastest backend that passes its check
    here) or a backend of BACKENDS. calibration_images: images (any form `prepare_batch`
    takes; up to int8.INT8_CALIBRATION_IMAGES of them, evenly spread) for the int8 backend.
    force_failure makes every backend but eager fail as if it could not be built (to test the
    fallback on any machine). uint8_resize (CPU) resizes camera frames on uint8 pixels,
    within one grey level of `prepare_batch`'s float resize. compile_int8 False: int8 is
    taken only when its package is cached already (compiling it takes a minute or two; see
    `upgrade_in_background`), else the chain goes on.
    """
    if fast_path == 'off':
        return model
    if fast_path not in BACKENDS:
        raise InputError(f"fast path backend must be 'off' or one of {BACKENDS}, got "
                         f'{fast_path!r}')
    if model.training:
        raise TacoError('the fast path needs a model in eval mode: call model.to_runtime()')
    device = torch.device(model.device)
    request = BuildRequest(model, NetworkUnderAutocast(model, device, model.precision).eval(),
                           tuple(sorted({int(b) for b in batch_sizes})) or (1,), cache_dir)
    reasons: List[str] = []
    for name in chain(fast_path, device.type, model.precision):
        if name == 'int8' and calibration_images is not None and len(calibration_images) \
                and request.calibration is None:
            request.calibration = int8.calibration_batch(calibration_images, model.config)
        if name == 'int8' and not compile_int8 and not int8.is_cached(request):
            reasons.append('int8: not compiled yet for these weights, map and thread count')
            continue
        runner = _built(name, request, check, force_failure, reasons)
        if runner is not None:
            break
    else:
        runner = eager.build(request)
    return BackendEmbedder(model, runner, fast_path, '; '.join(reasons) or None,
                           request.batch_sizes, uint8_resize)


def chain(fast_path: str, device_type: str, precision: str) -> List[str]:
    """Return the backends a fast path tries, in order (eager, when there, ends the chain)."""
    if fast_path == 'auto':
        return list(AUTO_CHAINS.get((device_type, precision), ()))
    names = [fast_path]
    names.extend(name for name in FALLBACKS.get(fast_path, ()) if name != fast_path)
    return names


def _built(name: str, request: BuildRequest, check: bool, force_failure: bool,
           reasons: List[str]):
    """Return the checked runner of a backend, or None (its failure logged, in reasons)."""
    if name == 'eager':
        return eager.build(request)
    try:
        if force_failure:
            raise FastPathError('failure forced (force_failure=True)')
        runner = BUILDERS[name](request)
        if check:
            check_runner(runner, request)
        return runner
    except Exception as exc:  # noqa: B902 - any failure of a backend means: the next one
        reason = f'{name}: {exc.__class__.__name__}: {first_line(exc)}'
        reasons.append(reason)
        log.warning('fast path %s unavailable, falling back (%s)', name, reason)
        return None


def check_runner(runner, request: BuildRequest) -> float:
    """Compare a backend with the eager fp32 model on a fixed batch; return the min cosine."""
    x = getattr(runner, 'check_batch', None)
    if x is None:
        generator = torch.Generator().manual_seed(12345)
        x = torch.randn((2, 3) + tuple(request.config.input_size), generator=generator)
    x = x.to(request.device)
    with torch.inference_mode():
        reference = NetworkUnderAutocast(request.model, request.device, 'fp32')(x)
        got = runner(x).to(request.device).float()
    if got.shape != reference.shape or not torch.isfinite(got).all():
        raise FastPathError(f'backend gave shape {tuple(got.shape)} or non-finite values')
    cosine = float(F.cosine_similarity(got, reference, dim=1).min())
    if cosine < MIN_COSINE:
        raise FastPathError(f'embeddings differ from eager fp32: cosine {cosine:.6f} '
                            f'< {MIN_COSINE}')
    return cosine


def upgrade_in_background(model, calibration_images: Sequence, install: Callable[[Embedder], None],
                          report: Callable[[str], None], cache_dir=None,
                          start: bool = True) -> threading.Thread:
    """
    Compile the int8 backend in a daemon thread; hand it to `install` once built and checked.

    start=False returns the thread unstarted, for a caller that starts it once it is sure to
    run (the node: when it has started; a compiler left running in a process that refused to
    start races its exit).

    For a long-running localizer (the node) that started on a quicker backend because int8
    was not cached: frames keep flowing meanwhile, and the next start loads the package from
    the cache. The thread runs at a lower CPU priority (Linux: per thread; compiler processes
    inherit it). report(message) says what happened, success or not.
    """
    def run():
        started = time.monotonic()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):   # not Linux, or not allowed: normal priority
            pass
        embedder = make_embedder(model, 'int8', calibration_images=calibration_images,
                                 cache_dir=cache_dir)
        if embedder.backend != 'int8':
            report(f'fast path: int8 could not be built ({embedder.fallback_reason}); '
                   f'staying on the current backend')
            return
        install(embedder)
        report(f'fast path: switched to int8, compiled in {time.monotonic() - started:.0f} s '
               f'and cached for the next start')

    thread = threading.Thread(target=run, name='taco-cvgl-int8-build', daemon=True)
    if start:
        thread.start()
    return thread
