"""
The fast inference path: the same embeddings as the eager model, with less time per frame.

`FastEmbedder` wraps an `ImageRetrievalModel` already placed by `to_runtime` and offers the
model's own inference calls (`embed_tensor`, `encode_batch`, `encode_image`) through a faster
backend:

- ``cuda_graph`` (CUDA): the network, under its autocast precision, is captured once per batch
  size into a CUDA graph with static input and output buffers, so a frame costs one graph launch
  instead of hundreds of kernel launches. Camera frames of a fixed size go through a second kind
  of graph that also holds the preprocessing (uint8 HxWx3 -> float, resize, normalise), fed from
  a pinned staging buffer by one non-blocking copy.
- ``compile`` (CUDA or CPU): ``torch.compile`` (inductor) fuses the network's kernels; on CUDA the
  compiled network is then captured into CUDA graphs as above. On the CPU it needs a C++
  compiler.
- ``onnxruntime`` (CPU): the fp32 network exported to ONNX and run by ONNX Runtime, whose CPU
  kernels for ConvNeXt's depthwise convolutions and LayerNorms are several times faster than
  eager PyTorch on small CPUs.
- ``jit`` (CPU): ``torch.jit.trace`` + ``freeze`` in channels_last (oneDNN weight packing).
- ``int8`` (CPU): static int8 quantization (PT2E, torchao's X86InductorQuantizer: int8
  convolutions and matrix products, activation ranges measured on calibration images such as the
  map's own), compiled ahead of time by AOTInductor into a package kept in the cache folder (the
  next start on the same weights and map loads it), the remaining operations in bf16 autocast
  when the precision is bf16. Needs torchao, a C++ compiler and calibration images; never chosen
  by 'auto'.
- ``eager``: the model as `to_runtime` left it (the reference).

Every backend is checked when it is built: its embeddings of a fixed random batch must have a
cosine similarity >= `MIN_COSINE` to the eager fp32 model's, otherwise, or when the backend
cannot be built at all (no compiler, capture failure, missing package), the wrapper logs a
warning and falls back to the next backend and finally to eager. `FastEmbedder.backend` says what
runs; `fallback_reason` says why a requested backend does not.

Batches of any size are accepted. CUDA graphs are captured for the sizes in `batch_sizes`; a batch
of another size is padded up to the next captured size (every operation of the network in eval
mode is per image, so padding rows never change real rows) or cut into chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
import shutil
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.errors import first_line, InputError, TacoError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.model.config import cache_dir_default
from taco_cvgl.model.preprocess import (image_to_tensor, normalize, prepare_batch, resize,
                                        to_rgb_array)
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger('taco_cvgl.inference.fastpath')

BACKENDS = ('auto', 'eager', 'cuda_graph', 'compile', 'onnxruntime', 'jit', 'int8')
# A backend must reproduce the eager fp32 embeddings to this cosine similarity or better.
MIN_COSINE = 0.999
# What 'auto' tries, in order, per device type and precision (eager always ends the chain).
AUTO_CHAINS = {
    ('cuda', 'fp16'): ('cuda_graph',),
    ('cuda', 'bf16'): ('cuda_graph',),
    ('cuda', 'fp32'): ('cuda_graph',),
    ('cpu', 'fp32'): ('onnxruntime', 'jit'),
    ('cpu', 'bf16'): ('jit',),
}
# Backends that 'compile' falls back to before eager.
FALLBACKS = {'compile': ('cuda_graph',), 'cuda_graph': (), 'onnxruntime': ('jit',), 'jit': (),
             'int8': ('jit',)}
# Calibration images the int8 backend measures activation ranges on (more are sampled down).
INT8_CALIBRATION_IMAGES = 32
DEFAULT_BATCH_SIZES = (1, 2, 4)


class FastPathError(TacoError):
    """A fast backend cannot be built or does not reproduce the eager embeddings."""


def _autocast(device: torch.device, precision: str):
    """Return the autocast context of a precision (cache disabled: CUDA graphs need that)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == 'fp16' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


class NetworkUnderAutocast(nn.Module):
    """The embedder's network on a normalised float batch, in its runtime precision."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str):
        """Wrap `model` (not copied: it shares the weights)."""
        super().__init__()
        self.model = model
        self.device_ = device
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised Bx3xHxW batch to float32 BxD embeddings."""
        x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device_, self.precision):
            return self.model(x).float()


class FrameNetwork(nn.Module):
    """
    Preprocessing and network in one: uint8 BxHxWx3 frames -> float32 BxD embeddings.

    The preprocessing is `preprocess.prepare_batch`'s, operation for operation (divide by 255,
    antialiased bilinear resize to the config's input size, normalise), so the embeddings equal
    those of `model.encode_batch` on the same frames.
    """

    def __init__(self, network: nn.Module, config, color_order: str = 'rgb'):
        """Wrap a `NetworkUnderAutocast`; color_order is that of the frames' last axis."""
        super().__init__()
        if color_order not in ('rgb', 'bgr'):
            raise InputError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
        self.network = network
        self.config = config
        self.color_order = color_order
        # Made once on the device: a CUDA graph cannot capture the host-to-device copies that
        # preprocess.normalize makes of these constants on each call.
        device = network.device_
        self.register_buffer('mean', torch.tensor(config.mean, device=device).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(config.std, device=device).view(1, 3, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Embed a uint8 BxHxWx3 batch on the device."""
        x = frames.permute(0, 3, 1, 2)
        if self.color_order == 'bgr':
            x = x.flip(1)
        x = resize(x.float().div(255.0), self.config.input_size)
        if self.config.normalization == 'per_image':
            x = normalize(x, self.config)  # statistics of the batch itself: no constants
        else:
            x = (x - self.mean) / self.std
        return self.network(x)


class CudaGraphs:
    """
    CUDA graphs of one function, captured lazily per input shape, with static buffers.

    `run(x)` copies x into the static input of the graph for its shape (padding the batch up to
    a captured size), replays the graph and returns a copy of the static output. Calls are
    serialised by a lock: one set of static buffers serves every caller.
    """

    warmup_runs = 3

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 channels_last: bool = False):
        """fn: tensor -> tensor, deterministic in shape; batch_sizes: sizes to capture."""
        self.fn = fn
        self.device = device
        self.batch_sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1}) or [1]
        self.channels_last = channels_last
        self.graphs: Dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()

    def _capture(self, shape: tuple, dtype: torch.dtype) -> tuple:
        static_in = torch.zeros(shape, dtype=dtype, device=self.device)
        if self.channels_last and len(shape) == 4:
            static_in = static_in.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(self.warmup_runs):  # cuDNN/cuBLAS choose kernels, inductor compiles
                self.fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        torch.cuda.synchronize(self.device)
        return graph, static_in, static_out

    def entry(self, batch: int, tail: tuple, dtype: torch.dtype) -> tuple:
        """Return (graph, static_in, static_out) for a captured batch size (capturing it)."""
        key = (batch, tail, dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture((batch,) + tail, dtype)
        return self.graphs[key]

    def padded_size(self, n: int) -> int:
        """Return the captured batch size that serves n images (n itself when above all)."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        return self.batch_sizes[-1]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Run fn(x) through the graphs; x on the device (or pinned memory), any batch size."""
        n = x.shape[0]
        top = self.batch_sizes[-1]
        if n > top:
            return torch.cat([self.run(x[i:i + top]) for i in range(0, n, top)])
        graph, static_in, static_out = self.entry(self.padded_size(n), tuple(x.shape[1:]),
                                                  x.dtype)
        with self.lock:
            static_in[:n].copy_(x, non_blocking=True)
            graph.replay()
            return static_out[:n].clone()


class PinnedStaging:
    """Pinned host buffers for uint8 frames, reused, so uploads are one non-blocking copy."""

    def __init__(self):
        """Start with no buffer (they are made per frame shape on first use)."""
        self.buffers: Dict[tuple, Tuple[torch.Tensor, Optional[torch.cuda.Event]]] = {}

    def fill(self, frames: Sequence[np.ndarray], shape: tuple) -> torch.Tensor:
        """Copy same-shape HxWx3 uint8 arrays into a pinned Bx HxWx3 tensor and return it."""
        key = (len(frames),) + tuple(shape)
        buffer, pending = self.buffers.get(key, (None, None))
        if buffer is None:
            buffer = torch.empty(key, dtype=torch.uint8).pin_memory()
        elif pending is not None:
            pending.synchronize()  # the previous upload from this buffer has finished
        view = buffer.numpy()
        for i, frame in enumerate(frames):
            np.copyto(view[i], frame)
        self.buffers[key] = (buffer, None)
        return buffer

    def uploaded(self, buffer: torch.Tensor) -> None:
        """Record that an upload from `buffer` was queued on the current stream."""
        event = torch.cuda.Event()
        event.record()
        self.buffers[tuple(buffer.shape)] = (buffer, event)


# --------------------------------------------------------------------------------- backends
class _Eager:
    name = 'eager'

    def __init__(self, network: NetworkUnderAutocast):
        self.network = network

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.network(x)


class _CudaGraphBackend:
    """CUDA graphs of the (optionally compiled) network and of frame networks."""

    def __init__(self, network: NetworkUnderAutocast, config, batch_sizes: Sequence[int],
                 compiled: bool):
        if network.device_.type != 'cuda':
            raise FastPathError('CUDA graphs need a CUDA device')
        self.name = 'compile' if compiled else 'cuda_graph'
        self.config = config
        self.batch_sizes = batch_sizes
        self.compiled = compiled
        self.network = network
        fn = _compile(network) if compiled else network
        self.graphs = CudaGraphs(fn, network.device_, batch_sizes, channels_last=True)
        self.frame_graphs: Dict[str, CudaGraphs] = {}
        self.staging = PinnedStaging()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.graphs.run(x.float())

    def frames(self, frames: Sequence[np.ndarray], color_order: str) -> torch.Tensor:
        """Embed same-shape uint8 HxWx3 arrays through a frame graph."""
        graphs = self.frame_graphs.get(color_order)
        if graphs is None:
            net = FrameNetwork(self.network, self.config, color_order)
            graphs = CudaGraphs(_compile(net) if self.compiled else net, self.network.device_,
                                self.batch_sizes)
            self.frame_graphs[color_order] = graphs
        shape = frames[0].shape
        out = []
        top = graphs.batch_sizes[-1]
        for start in range(0, len(frames), top):
            chunk = frames[start:start + top]
            host = self.staging.fill(chunk, shape)
            device = host.to(self.network.device_, non_blocking=True)
            self.staging.uploaded(host)
            out.append(graphs.run(device))
        return out[0] if len(out) == 1 else torch.cat(out)


# Compiled code is cached per Python function, not per module: every FastEmbedder (and every
# batch size and input size) adds its own entry to one forward's cache. torch's default limit
# of 8 entries would silently leave the later ones in eager mode.
MIN_RECOMPILE_LIMIT = 64


def _compile(module: nn.Module):
    """Return torch.compile(module) for fixed-shape inference (inductor, one graph per shape)."""
    import torch._dynamo
    config = torch._dynamo.config
    for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(config, name) and getattr(config, name) < MIN_RECOMPILE_LIMIT:
            setattr(config, name, MIN_RECOMPILE_LIMIT)
    return torch.compile(module, dynamic=False, fullgraph=False)


class _CastInput(nn.Module):
    """A network whose weights are in `dtype`, fed float32 input: cast, then channels_last."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.network = network
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class _CompiledCpu:
    """
    torch.compile (inductor's C++ kernels) on the CPU, weights frozen and in the precision.

    Inductor's freezing folds the weights into the graph and prepacks them for oneDNN (bf16 on
    AVX512-BF16 / AMX units). Compiling takes tens of seconds on a small CPU (inductor caches
    the result on disk for the next start) and needs a C++ compiler; each new batch size
    compiles again, so `warm_up` the sizes a node will use.
    """

    name = 'compile'

    def __init__(self, model, precision: str, config):
        if find_cxx_compiler() is None:
            raise FastPathError('torch.compile on the CPU needs a C++ compiler (g++ or clang++ '
                                'on PATH, or $CXX); none is installed')
        if precision not in ('fp32', 'bf16'):
            raise FastPathError(f'the CPU compile backend runs fp32 or bf16, not {precision}')
        dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
        self.fn = _compile(_CastInput(weights_copy(model, dtype), dtype).eval())
        self(torch.zeros((1, 3) + tuple(config.input_size)))  # compile now, not on frame 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self.fn(x.float()).float()


class _Int8Cpu:
    """
    Static int8 on the CPU: PT2E quantization (torchao), compiled ahead of time by inductor.

    The network is exported with a dynamic batch dimension, quantized with the X86 inductor
    quantizer (int8 convolutions and linear layers, per-channel weights, activation ranges
    observed on the calibration batch) and compiled by AOTInductor with frozen weights into a
    package (a shared library plus the packed weights). Calls then run in C++ with no Python
    per operation and no guard checks; oneDNN runs the int8 products on VNNI/AMX. In bf16
    precision the operations left in floating point run under bf16 autocast.

    The package is kept in the cache folder (``int8/``), keyed by the weights, the calibration
    batch, the precision, the torch and torchao versions, the CPU and the thread count (inductor
    writes its C++ kernels for one thread count and instruction set): a node that restarts on
    the same map loads it in well under a second instead of compiling again. A cached package
    that cannot be loaded is compiled again over; an unwritable cache folder means compiling
    into a temporary one. Accuracy is the calibration's: give it images like the ones it will
    see (the map's), and the build check still demands the fast path's cosine to eager fp32.
    """

    name = 'int8'

    def __init__(self, model, precision: str, calibration: Optional[torch.Tensor],
                 cache_dir: Optional[Path] = None):
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
        if precision not in ('fp32', 'bf16'):
            raise FastPathError(f'the int8 backend runs with fp32 or bf16, not {precision}')
        self._quantize = (x86, prepare_pt2e, convert_pt2e)
        calibration = calibration.float().cpu().contiguous()
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
        import tempfile
        from torch._inductor import config as inductor_config
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
                quantized = _UnderBf16Autocast(quantized)
            program = torch.export.export(quantized, (example,), dynamic_shapes=dynamic)
            _drop_dtype_assertions(program.graph_module)
            with tempfile.TemporaryDirectory(prefix='taco_cvgl_int8_') as scratch:
                package = Path(scratch) / 'int8.pt2'
                with inductor_config.patch(freezing=True):
                    torch._inductor.aoti_compile_and_package(program,
                                                             package_path=str(package))
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(self.path) as tmp:
                        shutil.copyfile(package, tmp)
                    return torch._inductor.aoti_load_package(str(self.path))
                except OSError as exc:
                    log.warning('int8 package not cached (%s: %s)', self.path.parent, exc)
                    return torch._inductor.aoti_load_package(str(package))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(x.float().contiguous()).float()


class _UnderBf16Autocast(nn.Module):
    """Run a module under CPU bf16 autocast (exported as part of the graph), fp32 out."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    for part in (weights_digest(model), model.config.to_json(), precision, torch.__version__,
                 torchao_version, str(torch.get_num_threads()), _cpu_signature()):
        key.update(part.encode() + b'\0')
    key.update(calibration.detach().float().cpu().contiguous().numpy().tobytes())
    root = Path(cache_dir) if cache_dir else cache_dir_default()
    return root / 'int8' / f'{key.hexdigest()}.pt2'


def _cpuinfo_lines() -> List[str]:
    """Return /proc/cpuinfo's lines (none where there is no such file)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            return handle.read().splitlines()
    except OSError:
        return []


def _cpu_signature() -> str:
    """Return what identifies this CPU's instruction set (model name and flags)."""
    import platform
    wanted = [line for line in _cpuinfo_lines()
              if line.startswith(('model name', 'flags', 'Features'))]
    return '\n'.join(dict.fromkeys(wanted)) or f'{platform.machine()} {platform.processor()}'


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


class _Jit:
    """
    torch.jit.trace + freeze on the CPU: oneDNN packs the weights once.

    In bf16 the weights themselves are bf16 (no autocast casts on each call), which lets oneDNN
    use the CPU's bf16 units (AVX512-BF16, AMX) for every convolution and matrix product; the
    embeddings stay within the fast path's cosine bar of fp32 (checked when built).
    """

    name = 'jit'

    def __init__(self, model, precision: str, config):
        if precision not in ('fp32', 'bf16'):
            raise FastPathError(f'the jit backend runs fp32 or bf16, not {precision}')
        dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
        module = _CastInput(weights_copy(model, dtype), dtype).eval()
        example = torch.zeros((1, 3) + tuple(config.input_size))
        with torch.inference_mode(), warnings_quiet():
            traced = torch.jit.trace(module, example, check_trace=False)
            self.fn = torch.jit.freeze(traced.eval())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x.float()).float()


class _OnnxRuntime:
    """The fp32 network in ONNX Runtime on the CPU."""

    name = 'onnxruntime'

    def __init__(self, model, network: NetworkUnderAutocast, cache_dir: Optional[Path]):
        if network.device_.type != 'cpu':
            raise FastPathError('the onnxruntime backend runs on the CPU only (this install has '
                                'no ONNX Runtime GPU provider)')
        if network.precision != 'fp32':
            raise FastPathError('the onnxruntime backend runs fp32 only')
        from taco_cvgl.inference import onnx_export
        if not onnx_export.onnxruntime_available():
            raise FastPathError('onnxruntime is not installed (pip install onnxruntime)')
        path = onnx_export.cached_export(model, cache_dir)
        self.session = onnx_export.make_session(path, threads=torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(out)


@contextlib.contextmanager
def warnings_quiet():
    """Silence the tracer's warnings about Python values (shapes are fixed here)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


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


# --------------------------------------------------------------------------------- wrapper
class FastEmbedder:
    """
    The model's inference calls through the fastest backend that works here.

    Build it with `optimize(model, ...)`. It shares the model's weights (nothing is copied
    except where a backend packs them: ONNX Runtime, jit); a model trained further afterwards
    needs a new FastEmbedder.
    """

    def __init__(self, model, backend: str = 'auto',
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, check: bool = True,
                 force_failure: bool = False, cache_dir=None, uint8_resize: bool = True,
                 calibration: Optional[Sequence] = None):
        """
        Build the backend (with its fallbacks) for a model placed by `to_runtime`.

        force_failure makes every backend but eager fail as if it could not be built (to test
        the fallback on any machine). uint8_resize (CPU only) resizes camera frames on uint8
        pixels (`prepare_batch_uint8`), within one grey level of `prepare_batch`. calibration:
        images (any form `prepare_batch` takes) for the int8 backend; up to
        INT8_CALIBRATION_IMAGES of them, evenly spread, are used.
        """
        if backend not in BACKENDS:
            raise InputError(f'fast path backend must be one of {BACKENDS}, got {backend!r}')
        if model.training:
            raise TacoError('the fast path needs a model in eval mode: call model.to_runtime()')
        self.model = model
        self.config = model.config
        self.device = torch.device(model.device)
        self.precision = model.precision
        self.requested = backend
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes})) or (1,)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.uint8_resize = bool(uint8_resize)
        self.network = NetworkUnderAutocast(model, self.device, self.precision).eval()
        self._calibration = calibration
        self._calibration_batch: Optional[torch.Tensor] = None
        self.fallback_reason: Optional[str] = None
        self._eager = _Eager(self.network)
        self._runner = self._build(backend, check, force_failure)
        self.backend = self._runner.name

    # ------------------------------------------------------------------------- building
    def _chain(self, backend: str) -> List[str]:
        if backend == 'auto':
            chain = list(AUTO_CHAINS.get((self.device.type, self.precision), ()))
        else:
            chain = [backend]
            for name in FALLBACKS.get(backend, ()):
                if name not in chain:
                    chain.append(name)
        return chain

    def _make(self, name: str):
        if name == 'eager':
            return self._eager
        if name == 'cuda_graph':
            return _CudaGraphBackend(self.network, self.config, self.batch_sizes, False)
        if name == 'compile':
            if self.device.type == 'cuda':
                return _CudaGraphBackend(self.network, self.config, self.batch_sizes, True)
            return _CompiledCpu(self.model, self.precision, self.config)
        if name == 'onnxruntime':
            return _OnnxRuntime(self.model, self.network, self.cache_dir)
        if name == 'jit':
            if self.device.type != 'cpu':
                raise FastPathError('the jit backend is for the CPU')
            return _Jit(self.model, self.precision, self.config)
        if name == 'int8':
            if self.device.type != 'cpu':
                raise FastPathError('the int8 backend is for the CPU')
            if self._calibration and self._calibration_batch is None:
                self._calibration_batch = calibration_batch(self._calibration, self.config)
            return _Int8Cpu(self.model, self.precision, self._calibration_batch, self.cache_dir)
        raise InputError(f'unknown fast path backend {name!r}')

    def _build(self, backend: str, check: bool, force_failure: bool):
        reasons = []
        for name in self._chain(backend):
            if name == 'eager':
                break
            try:
                if force_failure:
                    raise FastPathError('failure forced (force_failure=True)')
                runner = self._make(name)
                if check:
                    self._check(runner)
                if reasons:
                    self.fallback_reason = '; '.join(reasons)
                return runner
            except Exception as exc:  # noqa: B902 - any failure of a backend means: next one
                reason = f'{name}: {exc.__class__.__name__}: {first_line(exc)}'
                reasons.append(reason)
                log.warning('fast path %s unavailable, falling back (%s)', name, reason)
        if reasons:
            self.fallback_reason = '; '.join(reasons)
        return self._eager

    def _check(self, runner) -> float:
        """Compare a backend with the eager fp32 model on a fixed batch; return min cosine."""
        if getattr(runner, 'name', '') == 'int8' and self._calibration_batch is not None:
            # Quantized ranges hold for images like the calibration's, not for random noise.
            batch = self._calibration_batch
            x = batch[spread(len(batch), 8)]
        else:
            generator = torch.Generator().manual_seed(12345)
            x = torch.randn((2, 3) + tuple(self.config.input_size), generator=generator)
        x = x.to(self.device)
        with torch.inference_mode():
            reference = NetworkUnderAutocast(self.model, self.device, 'fp32')(x)
            got = runner(x).to(self.device).float()
        if got.shape != reference.shape or not torch.isfinite(got).all():
            raise FastPathError(f'backend gave shape {tuple(got.shape)} or non-finite values')
        cosine = float(F.cosine_similarity(got, reference, dim=1).min())
        if cosine < MIN_COSINE:
            raise FastPathError(f'embeddings differ from eager fp32: cosine {cosine:.6f} '
                                f'< {MIN_COSINE}')
        return cosine

    # ------------------------------------------------------------------------- inference
    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch Bx3xHxW -> float32 BxD on the model's device."""
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self._runner(batch).to(self.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch (as `embed_tensor`)."""
        return self.embed_tensor(batch)

    def encode_batch(self, images: Sequence, batch_size: int = 32, color_order: str = 'rgb',
                     keep_on_device: bool = False) -> torch.Tensor:
        """
        Embed images like `ImageRetrievalModel.encode_batch` -> float32 NxD.

        On CUDA with a graph backend, runs of same-shape numpy frames go through the frame graphs
        (preprocessing included); everything else through `prepare_batch` and the network.
        """
        chunks = []
        for start in range(0, len(images), max(1, int(batch_size))):
            part = images[start:start + batch_size]
            out = self._encode_chunk(part, color_order)
            chunks.append(out if keep_on_device else out.cpu())
        if not chunks:
            return torch.empty((0, self.config.embedding_dim))
        return torch.cat(chunks)

    def _encode_chunk(self, images: Sequence, color_order: str) -> torch.Tensor:
        frames = getattr(self._runner, 'frames', None)
        if frames is not None and _same_shape_arrays(images):
            arrays = [np.asarray(to_rgb_array(im, 'rgb')) for im in images]
            return frames(arrays, color_order)
        if self.device.type == 'cpu' and self.uint8_resize:
            batch = prepare_batch_uint8(images, self.config, color_order)
        elif self.device.type == 'cuda' and any(isinstance(im, torch.Tensor) and im.is_cuda
                                                for im in images):
            batch = prepare_on_device(images, self.config, self.device, color_order)
        else:
            batch = prepare_batch(list(images), self.config, self.device, color_order)
        return self.embed_tensor(batch)

    def encode_image(self, image, color_order: str = 'rgb') -> torch.Tensor:
        """Embed one image -> float32 vector of length D (on the CPU)."""
        return self.encode_batch([image], color_order=color_order)[0]

    def warm_up(self, batch_sizes: Optional[Iterable[int]] = None,
                frame_shapes: Iterable[Tuple[int, int]] = ((480, 640),),
                color_orders: Iterable[str] = ('rgb',)) -> None:
        """Build every graph the given batch sizes and frame shapes (h, w) will need."""
        sizes = sorted(set(batch_sizes or self.batch_sizes))
        for b in sizes:
            x = torch.zeros((b, 3) + tuple(self.config.input_size), device=self.device)
            self.embed_tensor(x)
            for order in color_orders:
                for h, w in frame_shapes:
                    self.encode_batch([np.zeros((h, w, 3), np.uint8)] * b, batch_size=b,
                                      color_order=order)

    def describe(self) -> dict:
        """Return what runs, for logs and diagnostics."""
        return {'backend': self.backend, 'requested': self.requested,
                'device': str(self.device), 'precision': self.precision,
                'batch_sizes': list(self.batch_sizes), 'uint8_resize': self.uint8_resize,
                'fallback_reason': self.fallback_reason}


def _same_shape_arrays(images: Sequence) -> bool:
    """Return True for a non-empty list of numpy uint8 HxWx3 arrays of one shape."""
    if not images:
        return False
    first = images[0]
    if not isinstance(first, np.ndarray) or first.ndim != 3 or first.shape[2] != 3:
        return False
    return all(isinstance(im, np.ndarray) and im.shape == first.shape and im.dtype == np.uint8
               for im in images)


def prepare_on_device(images: Sequence, config, device: torch.device,
                      color_order: str = 'rgb') -> torch.Tensor:
    """
    `prepare_batch` for images some of which are already uint8 3xHxW tensors on the device.

    Host images are uploaded from pinned memory; device tensors are used in place (GPU-decoded
    JPEGs). The operations are `prepare_batch`'s.
    """
    if len(images) == 0:
        raise InputError('no images to prepare')
    out = torch.empty((len(images), 3) + tuple(config.input_size), device=device)
    for i, image in enumerate(images):
        tensor = image_to_tensor(image, color_order)
        if device.type == 'cuda' and not tensor.is_cuda:
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True).float().div_(255.0)
        out[i] = resize(tensor, config.input_size)
    return normalize(out, config)


def prepare_batch_uint8(images: Sequence, config, color_order: str = 'rgb') -> torch.Tensor:
    """
    `prepare_batch` on the CPU with the resize done on uint8 pixels (about 40x faster there).

    torch's antialiased bilinear resize has a vectorised uint8 kernel for channels_last images;
    its output differs from the float path's only by the rounding to whole grey levels (at most
    one level), then the values are scaled to [0, 1] and normalised as `prepare_batch` does.
    """
    if len(images) == 0:
        raise InputError('no images to prepare')
    size = tuple(config.input_size)
    out = torch.empty((len(images), 3) + size)
    for i, image in enumerate(images):
        tensor = image_to_tensor(image, color_order)
        if tensor.is_cuda:
            tensor = tensor.cpu()
        if tuple(tensor.shape[-2:]) != size:
            nhwc = tensor.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            tensor = F.interpolate(nhwc, size=size, mode='bilinear', align_corners=False,
                                   antialias=True)[0]
        out[i] = tensor.float().div_(255.0)
    return normalize(out, config)


def optimize(model, backend: str = 'auto', batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
             check: bool = True, force_failure: bool = False, cache_dir=None,
             uint8_resize: bool = True, calibration: Optional[Sequence] = None) -> FastEmbedder:
    """Return a `FastEmbedder` for a model placed by `to_runtime` (see the module docstring)."""
    return FastEmbedder(model, backend, batch_sizes, check, force_failure, cache_dir,
                        uint8_resize, calibration)


def weights_digest(model) -> str:
    """Return a short digest of the weights and config (the fingerprint when already known)."""
    known = getattr(model, '_fingerprint_at_load', None)
    if known:
        return known[:16]
    digest = hashlib.blake2b(model.config.to_json().encode(), digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
