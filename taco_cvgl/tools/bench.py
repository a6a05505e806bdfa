"""
taco-cvgl bench: measure the fast paths side by side with the plain eager fp32 baseline.

Every figure is measured in the same run as its baseline, printed with the ratio, and written to a
JSON file that names the machine (CPU, cores, GPU, library versions, load average). Parts that
need a GPU are skipped, with the reason, on a machine without one; `benchmarks/gpu_all.sh` runs
every GPU part on a GPU machine.

Parts (--parts takes names or the groups cpu, gpu, all):
  cpu_latency        per-frame latency (one 640x480 frame -> embedding) per CPU backend and input
                     size, with each backend's accuracy against eager fp32 (min cosine over the
                     test images, identical top-1 retrieval)
  cpu_pipeline       a bgr8 640x480 image message -> Measurement (-> NavSatFix where the ROS
                     message packages are installed), eager vs the fast path
  cpu_database_build JPEG files -> embeddings, images/s
  storage            bytes per database entry (fp16, the .npz file, PQ codes) and the PQ options'
                     Recall@1 relative to exact search on a synthetic retrieval set or, with
                     --weights, on the demo scene embedded by those weights
  cpu_search         top-10 over N entries: exact (torch) vs approximate (faiss IVF-PQ)
  cpu_training       training step images/s: fp32 vs bf16 autocast + channels_last
  onnx               ONNX export time and its embeddings against the model
  gpu_latency        per-frame latency on the GPU: eager fp32, eager fp16, CUDA graphs, compile
  gpu_pipeline       image message -> Measurement on the GPU: p50/p99 latency, frames/s
  multi_camera       4 cameras at 30 Hz into the node's newest-frame-per-camera batching
  gpu_database_build JPEG files -> embeddings: CPU decode + eager fp32 vs nvJPEG + fp16 batches
  gpu_search         exact fp16 top-10 over 1M (and 10M) entries on the GPU
  gpu_training       training images/s at 224 px: fp32 vs bf16 autocast + channels_last

The model is ConvNeXt-Tiny + head with random weights (seed 0, every block's layer scale set to
0.3 so that all blocks count) unless --weights names trained ones: speed does not depend on the
weights; the accuracy checks are, if anything, stricter with random weights, whose embeddings
lie closer together than a trained model's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
from pathlib import Path
import platform
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from taco_cvgl.config import ModelConfig
from taco_cvgl.errors import InputError
from taco_cvgl.tools.common import reports_errors
import torch
import torch.nn.functional as F

SCHEMA = 'taco_cvgl.bench/1'
CPU_PARTS = ('cpu_latency', 'cpu_pipeline', 'cpu_database_build', 'storage', 'cpu_search',
             'cpu_training', 'onnx')
GPU_PARTS = ('gpu_latency', 'gpu_pipeline', 'multi_camera', 'gpu_database_build',
             'gpu_search', 'gpu_training')
PARTS = CPU_PARTS + GPU_PARTS
FRAME_SHAPE = (480, 640)          # camera frames (height, width), as the node receives them


# ------------------------------------------------------------------------------ measuring
def load_average() -> List[float]:
    """Return the 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def summarize(ms: Sequence[float]) -> Dict[str, float]:
    """Return p50, p90, p99, mean, min and count of a list of milliseconds."""
    a = np.asarray(ms, dtype=float)
    if a.size == 0:
        return {'n': 0}
    return {'p50_ms': round(float(np.percentile(a, 50)), 4),
            'p90_ms': round(float(np.percentile(a, 90)), 4),
            'p99_ms': round(float(np.percentile(a, 99)), 4),
            'mean_ms': round(float(a.mean()), 4), 'min_ms': round(float(a.min()), 4),
            'n': int(a.size)}


def time_calls(fn: Callable[[], object], n: int, warmup: int = 1,
               sync: Optional[torch.device] = None) -> List[float]:
    """Call fn warmup + n times; return the n durations in ms (CUDA synchronised when asked)."""
    for _ in range(warmup):
        fn()
    if sync is not None and sync.type == 'cuda':
        torch.cuda.synchronize(sync)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        if sync is not None and sync.type == 'cuda':
            torch.cuda.synchronize(sync)
        out.append(1000.0 * (time.perf_counter() - start))
    return out


def ratio(baseline: Optional[float], value: Optional[float]) -> Optional[float]:
    """Return baseline / value rounded (a speed-up when both are times), None when unknown."""
    if not baseline or not value:
        return None
    return round(baseline / value, 2)


def machine_info() -> dict:
    """Describe this machine: CPU, cores, GPU, library versions, load."""
    cpu, flags = platform.processor() or '', []
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo', encoding='utf-8') as handle:
            for line in handle:
                if line.startswith('model name') and not cpu.strip(' x86_64'):
                    cpu = line.split(':', 1)[1].strip()
                if line.startswith('flags'):
                    flags = line.split(':', 1)[1].split()
                    break
        if not cpu or cpu == 'x86_64':
            with open('/proc/cpuinfo', encoding='utf-8') as handle:
                for line in handle:
                    if line.startswith('model name'):
                        cpu = line.split(':', 1)[1].strip()
                        break
    info = {
        'hostname': socket.gethostname(), 'platform': platform.platform(),
        'cpu': cpu, 'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'cpu_bf16': any(f in flags for f in ('avx512_bf16', 'amx_bf16')),
        'python': platform.python_version(), 'torch': torch.__version__,
        'numpy': np.__version__, 'load_average': load_average(),
    }
    for name in ('torchvision', 'onnxruntime', 'faiss', 'onnx'):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: B902 - absent or broken: say so
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info['gpu'] = torch.cuda.get_device_name(0)
        info['gpu_memory_gib'] = round(props.total_memory / 2 ** 30, 1)
        info['cuda'] = torch.version.cuda
    else:
        info['gpu'] = None
    return info


def gpu_reason() -> Optional[str]:
    """Return why GPU parts cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return 'no CUDA device on this machine (torch.cuda.is_available() is False)'
    return None


def sync_device(device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ inputs
def scene_rgb() -> Optional[np.ndarray]:
    """Return the demo scene's RGB pixels when cached locally (never downloads), else None."""
    try:
        from taco_cvgl.config import cache_dir_default
        from taco_cvgl.demo.scene import load_scene, SCENE_FILE
        path = cache_dir_default() / SCENE_FILE
        if not path.is_file():
            return None
        scene = load_scene(path)
    except Exception:  # noqa: B902 - tifffile or pyproj missing: synthetic images instead
        return None
    rgb = scene.rgb.copy()
    return rgb


def synthetic_rgb(shape=(1860, 2041), seed: int = 0) -> np.ndarray:
    """Return a large smooth random colour texture (for machines without the demo scene)."""
    import cv2
    rng = np.random.default_rng(seed)
    out = np.zeros(shape + (3,), np.float32)
    for cells in (8, 32, 128, 512):
        small = rng.standard_normal((cells, cells, 3)).astype(np.float32)
        out += cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC) / cells ** .3
    out = (out - out.min()) / (out.max() - out.min())
    return (out * 255).astype(np.uint8)


class TestImages:
    """Camera-sized places cut from the scene (or a synthetic texture) and perturbed queries."""

    def __init__(self, places: int, queries: int, shape=FRAME_SHAPE, seed: int = 0):
        """Cut `places` database frames; queries re-view the first `queries` of them."""
        rgb = scene_rgb()
        self.source = 'landsat-8 demo scene' if rgb is not None else 'synthetic texture'
        if rgb is None:
            rgb = synthetic_rgb(seed=seed)
        rng = np.random.default_rng(seed)
        h, w = shape
        big_h, big_w = rgb.shape[:2]
        self.database, self.queries = [], []
        tries = 0
        while len(self.database) < places and tries < 10000:
            tries += 1
            row = int(rng.integers(0, big_h - h))
            col = int(rng.integers(0, big_w - w))
            crop = rgb[row:row + h, col:col + w]
            if (crop.max(axis=2) == 0).mean() > 0.02:  # avoid the scene's empty edges
                continue
            self.database.append(np.ascontiguousarray(crop))
        self.queries = [re_view(self.database[i], rng)
                        for i in range(min(queries, len(self.database)))]


def re_view(image: np.ndarray, rng, size: Optional[int] = None) -> np.ndarray:
    """
    Return a query's view of a place, as a camera would see it again.

    Rotated by up to 8 degrees, rescaled by up to 8 %, re-lit per channel by up to 15 %, with
    sensor noise; `size` keeps a central size x size window.
    """
    import cv2
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-8, 8)),
                                float(rng.uniform(0.92, 1.08)))
    view = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    if size is not None:
        top, left = (h - size) // 2, (w - size) // 2
        view = view[top:top + size, left:left + size]
    gain = rng.uniform(0.85, 1.15, size=3)
    noisy = view.astype(np.float32) * gain + rng.normal(0, 4, view.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


# Random ConvNeXt blocks start with a layer scale of 1e-6, which makes every block almost the
# identity: reduced-precision errors inside the blocks would then be invisible to the accuracy
# checks. Trained ConvNeXt-Tiny scales are mostly between 0.05 and 1; the bench uses this value.
BENCH_LAYER_SCALE = 0.3


def bench_model(size: int, weights: Optional[str] = None, seed: int = 0):
    """Return a CPU fp32 eval ImageRetrievalModel: random (seed) at size x size, or weights."""
    from taco_cvgl.embedder import ImageRetrievalModel
    if weights:
        return ImageRetrievalModel.load(weights, device='cpu', precision='fp32')
    torch.manual_seed(seed)
    model = ImageRetrievalModel(ModelConfig(input_size=(size, size))).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, 'layer_scale', None), torch.nn.Parameter):
                module.layer_scale.fill_(BENCH_LAYER_SCALE)
    return model


def runtime_copy(model, device: str, precision: str):
    """Return a copy of the model placed by to_runtime (the product's eager path)."""
    clone = copy.deepcopy(model)
    clone._fingerprint_at_load = getattr(model, '_fingerprint_at_load', None)
    return clone.to_runtime(device, precision)


class PlainEager:
    """The plain baseline: eager fp32, default (contiguous) memory format, no autocast."""

    def __init__(self, model, device):
        """Copy the model to `device` in fp32, contiguous format."""
        self.model = copy.deepcopy(model).to(device, memory_format=torch.contiguous_format)
        self.model.float().eval()
        self.device = torch.device(device)
        self.config = model.config

    def encode_batch(self, images, batch_size: int = 32, color_order: str = 'rgb',
                     keep_on_device: bool = False) -> torch.Tensor:
        """Embed images like the model's encode_batch."""
        from taco_cvgl.preprocess import prepare_batch
        out = []
        for start in range(0, len(images), batch_size):
            batch = prepare_batch(images[start:start + batch_size], self.config, self.device,
                                  color_order).contiguous()
            with torch.inference_mode():
                emb = self.model(batch)
            out.append(emb if keep_on_device else emb.cpu())
        return torch.cat(out)

    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        with torch.inference_mode():
            return self.model(batch.to(self.device).contiguous())


def accuracy(encoder, reference: dict, images: TestImages) -> dict:
    """Return min cosine to the reference embeddings and whether top-1 retrieval is identical."""
    db = encoder.encode_batch(images.database, batch_size=8).float().cpu()
    q = encoder.encode_batch(images.queries, batch_size=8).float().cpu()
    cos = min(float(F.cosine_similarity(db, reference['db'], dim=1).min()),
              float(F.cosine_similarity(q, reference['q'], dim=1).min()))
    top1 = (q @ db.T).argmax(dim=1)
    same = int((top1 == reference['top1']).sum())
    return {'min_cosine': round(cos, 6), 'top1_identical': same == len(top1),
            'top1_same': f'{same}/{len(top1)}'}


def reference_embeddings(encoder, images: TestImages) -> dict:
    """Embed the test images with the baseline encoder."""
    db = encoder.encode_batch(images.database, batch_size=8).float().cpu()
    q = encoder.encode_batch(images.queries, batch_size=8).float().cpu()
    return {'db': db, 'q': q, 'top1': (q @ db.T).argmax(dim=1)}


def equal_accuracy(acc: dict) -> bool:
    """Return True when a backend meets the bench's 'equal accuracy' bar."""
    from taco_cvgl.fastpath import MIN_COSINE
    return bool(acc.get('min_cosine', 0) >= MIN_COSINE and acc.get('top1_identical'))


# ------------------------------------------------------------------------------ latency
# The CPU variants a --quick run times (the others cost a minute more on 2 cores).
QUICK_CPU_VARIANTS = ('eager_fp32', 'eager_bf16_channels_last', 'jit_bf16', 'onnxruntime_fp32')


def _latency_variants(model, device: str, gpu: bool, with_compile: bool, cache_dir,
                      quick: bool = False, calibration=None):
    """Yield (name, builder) pairs; builder() returns an encoder with encode_batch."""
    for name, build in _all_latency_variants(model, device, gpu, with_compile, cache_dir,
                                             calibration):
        if gpu or not quick or name in QUICK_CPU_VARIANTS:
            yield name, build


def _all_latency_variants(model, device: str, gpu: bool, with_compile: bool, cache_dir,
                          calibration=None):
    from taco_cvgl.fastpath import FastEmbedder
    yield 'eager_fp32', lambda: PlainEager(model, device)
    if gpu:
        yield 'eager_fp16', lambda: runtime_copy(model, device, 'fp16')
        yield 'cuda_graph_fp16', lambda: FastEmbedder(runtime_copy(model, device, 'fp16'),
                                                      'cuda_graph', (1, 2, 4))
        if with_compile:
            yield 'compile_fp16', lambda: FastEmbedder(runtime_copy(model, device, 'fp16'),
                                                       'compile', (1, 2, 4))
        return
    yield 'eager_fp32_channels_last', lambda: runtime_copy(model, device, 'fp32')
    yield 'eager_fp32_uint8_resize', lambda: FastEmbedder(runtime_copy(model, device, 'fp32'),
                                                          'eager')
    yield 'eager_bf16_channels_last', lambda: runtime_copy(model, device, 'bf16')
    yield 'jit_fp32', lambda: FastEmbedder(runtime_copy(model, device, 'fp32'), 'jit')
    yield 'jit_bf16', lambda: FastEmbedder(runtime_copy(model, device, 'bf16'), 'jit')
    yield 'onnxruntime_fp32', lambda: FastEmbedder(runtime_copy(model, device, 'fp32'),
                                                   'onnxruntime', cache_dir=cache_dir)
    if with_compile:
        yield 'compile_fp32', lambda: FastEmbedder(runtime_copy(model, device, 'fp32'),
                                                   'compile')
        yield 'compile_bf16', lambda: FastEmbedder(runtime_copy(model, device, 'bf16'),
                                                   'compile')
        if calibration:  # static int8, calibrated on the database images (not the queries)
            yield 'int8_bf16', lambda: FastEmbedder(runtime_copy(model, device, 'bf16'),
                                                    'int8', calibration=calibration)


def interleaved(calls: Dict[str, Callable[[], object]], n: int, warmup: int,
                device: torch.device) -> Dict[str, List[float]]:
    """
    Time several callables in rounds, one call of each per round; return ms per name.

    Interleaving gives every variant the same share of whatever else the machine is doing, so
    their ratios hold on a busy machine even when the absolute times drift.
    """
    out: Dict[str, List[float]] = {name: [] for name in calls}
    for round_ in range(warmup + n):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            sync_device(device)
            if round_ >= warmup:
                out[name].append(1000.0 * (time.perf_counter() - start))
    return out


def latency_part(args, gpu: bool) -> dict:
    """Per-frame latency per backend and input size, with accuracy (CPU or GPU)."""
    device = torch.device('cuda' if gpu else 'cpu')
    quick = args.quick
    n_time = (30 if quick else 200) if gpu else (3 if quick else 8)
    n_net = n_time if gpu else (2 if quick else 5)
    images = TestImages(places=4 if quick else 10, queries=2 if quick else 6)
    result = {'device': device.type, 'frame': f'{FRAME_SHAPE[1]}x{FRAME_SHAPE[0]} rgb8',
              'what': 'one frame -> embedding (preprocessing included), batch 1; variants '
                      'timed in interleaved rounds',
              'test_images': images.source, 'threads': torch.get_num_threads(), 'sizes': {}}
    for size in args.sizes:
        model = bench_model(size, args.weights)
        rows, encoders = {}, {}
        reference = None
        frame = images.queries[0]
        for name, build in _latency_variants(model, device.type, gpu, args.compile or gpu,
                                             args.cache_dir, quick, images.database):
            try:
                start = time.perf_counter()
                encoder = build()
                setup_s = time.perf_counter() - start
                if reference is None:
                    reference = reference_embeddings(encoder, images)
                    n_q = len(images.queries)
                    acc = {'min_cosine': 1.0, 'top1_identical': True, 'top1_same': f'{n_q}/{n_q}'}
                else:
                    acc = accuracy(encoder, reference, images)
                rows[name] = dict(setup_s=round(setup_s, 2), **acc,
                                  equal_accuracy=equal_accuracy(acc))
                if getattr(encoder, 'backend', None) is not None:
                    rows[name]['backend'] = encoder.backend
                    rows[name]['fallback_reason'] = encoder.fallback_reason
                encoders[name] = encoder
            except Exception as exc:  # noqa: B902 - one backend failing must not end the run
                rows[name] = {'error': f'{exc.__class__.__name__}: {exc}'}
        frames = {name: (lambda e=e: e.encode_batch([frame], batch_size=1))
                  for name, e in encoders.items()}
        for name, ms in interleaved(frames, n_time, 2, device).items():
            rows[name].update(summarize(ms))
        x = torch.randn((1, 3, size, size), device=device)
        nets = {name: (lambda e=e: e.embed_tensor(x)) for name, e in encoders.items()}
        for name, ms in interleaved(nets, n_net, 1, device).items():
            rows[name]['network_only_p50_ms'] = summarize(ms)['p50_ms']
        if gpu:
            x4 = torch.randn((4, 3, size, size), device=device)
            nets = {name: (lambda e=e: e.embed_tensor(x4)) for name, e in encoders.items()}
            for name, ms in interleaved(nets, n_net, 3, device).items():
                rows[name]['network_only_batch4_p50_ms'] = summarize(ms)['p50_ms']
        base = rows.get('eager_fp32', {}).get('p50_ms')
        for row in rows.values():
            if 'p50_ms' in row:
                row['speedup_vs_eager_fp32'] = ratio(base, row['p50_ms'])
        result['sizes'][str(size)] = rows
        encoders = frames = nets = None
        gc.collect()
        _reset_compiled()
    result['load_average_end'] = load_average()
    return result


def _reset_compiled() -> None:
    """Forget torch.compile's caches (each bench variant compiles its own model)."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ pipeline
def _fast_cpu_precision() -> str:
    """Return the precision the CPU fast path should use here: bf16 where the CPU has it."""
    from taco_cvgl.fastpath import cpu_has_bf16
    return 'bf16' if cpu_has_bf16() else 'fp32'


def synthetic_database(model, n: int, seed: int = 0, spacing_m: float = 30.0):
    """
    Return an EmbeddingDatabase of n random unit embeddings on a grid, for this model.

    `model` needs only `config` and a fingerprint (`_fingerprint_at_load` or `fingerprint()`).
    """
    from taco_cvgl.database import EmbeddingDatabase
    rng = np.random.default_rng(seed)
    dim = model.config.embedding_dim
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, 1_000_000):  # bounded temporaries for 10M-entry databases
        block = rng.standard_normal((min(n, start + 1_000_000) - start, dim), np.float32)
        emb[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    side = int(math.ceil(math.sqrt(n)))
    idx = np.arange(n)
    lat0, lon0 = 47.0, 8.0
    lat = lat0 + (idx // side) * spacing_m / 111_320.0
    lon = lon0 + (idx % side) * spacing_m / (111_320.0 * math.cos(math.radians(lat0)))
    fingerprint = getattr(model, '_fingerprint_at_load', None) or model.fingerprint()
    return EmbeddingDatabase(
        embeddings=emb, latitude=lat, longitude=lon, altitude=np.full(n, 400.0),
        heading=np.zeros(n), image_ids=np.array([f'images/{i:08d}.jpg' for i in range(n)]),
        model_config=model.config, model_fingerprint=fingerprint,
        meta={'grid_spacing_m': spacing_m, 'source': 'bench (synthetic)'})


def image_message(rgb: np.ndarray):
    """Return a sensor_msgs/Image-like object (bgr8) of an RGB frame: ROS message if available."""
    from taco_cvgl.image_codec import encode_raw
    encoding, height, width, step, data = encode_raw(rgb, 'bgr8')
    try:
        from sensor_msgs.msg import Image
        msg = Image()
        msg.encoding, msg.height, msg.width, msg.step = encoding, height, width, step
        msg.data = data
        return msg, 'sensor_msgs/msg/Image'
    except ImportError:
        fields = {'encoding': encoding, 'height': height, 'width': width, 'step': step,
                  'data': data, 'is_bigendian': 0}
        return types.SimpleNamespace(**fields), 'duck-typed Image (no ROS message packages)'


def navsat_builder():
    """Return (function Measurement -> NavSatFix, description); a no-op without ROS."""
    try:
        from builtin_interfaces.msg import Time
        from taco_cvgl.ros.messages import navsat_fix
    except ImportError as exc:
        return (lambda m: None), f'skipped: ROS message packages not importable ({exc.name})'
    stamp = Time()
    return (lambda m: navsat_fix(m, stamp, 'camera')), 'sensor_msgs/msg/NavSatFix built'


def make_localizer(model, encoder, db_path: Path, index: str = 'exact'):
    """
    Return a CVGLLocalizer over db_path whose inference goes through `encoder`.

    The localizer calls model.encode_batch; a FastEmbedder offers the same call, so it stands
    in for the model (the product wires it through ImageRetrievalModel.to_runtime).
    """
    from taco_cvgl.localizer import CVGLLocalizer, LocalizerConfig
    localizer = CVGLLocalizer(model, LocalizerConfig(top_k=10, index=index))
    localizer.model = encoder
    localizer.load_map(db_path)
    return localizer


def pipeline_part(args, gpu: bool) -> dict:
    """Time image message -> Measurement (-> NavSatFix): p50/p99 latency, eager vs fast."""
    from taco_cvgl.fastpath import FastEmbedder
    from taco_cvgl.image_codec import decode_msg
    device = 'cuda' if gpu else 'cpu'
    size = args.sizes[0]
    n_frames = (50 if args.quick else 300) if gpu else (5 if args.quick else 20)
    entries = (100_000 if args.quick else 1_000_000) if gpu else 10_000
    model = bench_model(size, args.weights)
    model._fingerprint_at_load = model.fingerprint()
    images = TestImages(places=4, queries=0)
    messages = [image_message(im)[0] for im in images.database]
    msg_kind = image_message(images.database[0])[1]
    to_fix, fix_kind = navsat_builder()
    out = {'device': device, 'input_size': size, 'database_entries': entries,
           'message': f'{msg_kind} bgr8 {FRAME_SHAPE[1]}x{FRAME_SHAPE[0]}', 'output': fix_kind,
           'index': 'exact (torch)', 'variants': {}}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / 'db.npz'
        synthetic_database(model, entries).save(db_path)
        variants = [('eager_fp32', lambda: PlainEager(model, device))]
        if gpu:
            variants.append(('eager_fp16', lambda: runtime_copy(model, device, 'fp16')))
            variants.append(('fast_cuda_graph_fp16', lambda: FastEmbedder(
                runtime_copy(model, device, 'fp16'), 'cuda_graph', (1, 2, 3, 4))))
            if not args.no_compile:
                variants.append(('fast_compile_fp16', lambda: FastEmbedder(
                    runtime_copy(model, device, 'fp16'), 'compile', (1, 2, 3, 4))))
        else:
            for precision in ('fp32', 'bf16'):
                if args.quick and precision != _fast_cpu_precision():
                    continue
                variants.append((f'fast_auto_{precision}', lambda p=precision: FastEmbedder(
                    runtime_copy(model, device, p), 'auto', cache_dir=args.cache_dir)))
        built = {}
        for name, build in variants:
            try:
                encoder = build()
                localizer = make_localizer(model, encoder, db_path)
                if hasattr(encoder, 'warm_up'):
                    encoder.warm_up(batch_sizes=(1,), frame_shapes=(FRAME_SHAPE,))
                localizer.warm_up()
                built[name] = (encoder, localizer)
            except Exception as exc:  # noqa: B902 - report and go on with the next variant
                out['variants'][name] = {'error': f'{exc.__class__.__name__}: {exc}'}

        def frame_of(localizer):
            counter = {'i': 0}

            def frame():
                msg = messages[counter['i'] % len(messages)]
                counter['i'] += 1
                to_fix(localizer.localize_batch([decode_msg(msg)], [0.0])[0])
            return frame

        calls = {name: frame_of(loc) for name, (_, loc) in built.items()}
        for name, ms in interleaved(calls, n_frames, 3, torch.device(device)).items():
            encoder, localizer = built[name]
            row = summarize(ms)
            row['frames_per_s'] = round(1000.0 / row['mean_ms'], 1)
            row['backend'] = getattr(encoder, 'backend', 'eager')
            row['stages_p50_ms'] = _stages(localizer, encoder, messages, decode_msg, to_fix,
                                           device, max(3, n_frames // 3))
            out['variants'][name] = row
        built = calls = None
        gc.collect()
        _reset_compiled()
    base = out['variants'].get('eager_fp32', {}).get('p50_ms')
    for row in out['variants'].values():
        if 'p50_ms' in row:
            row['speedup_vs_eager_fp32'] = ratio(base, row['p50_ms'])
    out['load_average_end'] = load_average()
    return out


def _stages(localizer, encoder, messages, decode_msg, to_fix, device, n: int) -> dict:
    """Return the p50 (ms) of the frame path's stages: decode, embed, search, the rest."""
    rgb = decode_msg(messages[0])
    dev = torch.device(device)
    keep = dev.type == 'cuda'
    decode = summarize(time_calls(lambda: decode_msg(messages[0]), n, 1))['p50_ms']
    embed = summarize(time_calls(lambda: encoder.encode_batch([rgb], 1, keep_on_device=keep),
                                 n, 1, dev))['p50_ms']
    q = encoder.encode_batch([rgb], 1, keep_on_device=keep)
    search = summarize(time_calls(lambda: localizer.index.search(q, 10), n, 1, dev))['p50_ms']
    whole = summarize(time_calls(
        lambda: to_fix(localizer.localize_batch([decode_msg(messages[0])], [0.0])[0]), n, 1,
        dev))['p50_ms']
    return {'decode': decode, 'embed': embed, 'search': search,
            'estimate_and_message': round(max(0.0, whole - decode - embed - search), 4)}


def multi_camera_part(args) -> dict:
    """4 cameras at 30 Hz feeding the node's newest-frame slots; count dropped frames."""
    from taco_cvgl.fastpath import FastEmbedder
    from taco_cvgl.image_codec import decode_msg
    reason = gpu_reason()
    if reason and not args.multi_camera_on_cpu:
        return {'skipped': reason}
    device = 'cpu' if reason else 'cuda'
    cameras, rate_hz = 4, 30.0
    duration = 2.0 if args.quick else 6.0
    model = bench_model(args.sizes[0], args.weights)
    model._fingerprint_at_load = model.fingerprint()
    images = TestImages(places=cameras, queries=0)
    messages = [image_message(im)[0] for im in images.database]
    to_fix, _ = navsat_builder()
    precision = 'fp16' if device == 'cuda' else 'fp32'
    encoder = FastEmbedder(runtime_copy(model, device, precision), 'auto',
                           tuple(range(1, cameras + 1)), cache_dir=args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / 'db.npz'
        synthetic_database(model, 100_000 if device == 'cuda' else 10_000).save(db_path)
        localizer = make_localizer(model, encoder, db_path)
        encoder.warm_up(batch_sizes=range(1, cameras + 1), frame_shapes=(FRAME_SHAPE,))
        localizer.warm_up()
        for b in range(1, cameras + 1):  # the index and estimate at every batch size
            localizer.localize_batch([decode_msg(m) for m in messages[:b]])
        stats = run_cameras(localizer, messages, decode_msg, to_fix, rate_hz, duration)
    stats.update({'device': device, 'backend': encoder.backend, 'cameras': cameras,
                  'rate_hz': rate_hz, 'duration_s': duration,
                  'load_average_end': load_average()})
    return stats


def run_cameras(localizer, messages, decode_msg, to_fix, rate_hz: float,
                duration: float) -> dict:
    """
    Publish one frame per camera every 1/rate_hz s into newest-frame slots; localize batches.

    As in the node, a frame that arrives while its camera's previous frame is still waiting is
    a dropped frame; the worker takes every waiting frame at once and localizes them as a batch.
    """
    cameras = len(messages)
    slots: List[Optional[tuple]] = [None] * cameras
    lock = threading.Condition()
    counts = {'published': 0, 'dropped': 0, 'localized': 0}
    batch_ms: List[float] = []
    age_ms: List[float] = []
    stop = threading.Event()

    def publisher():
        start = time.perf_counter()
        period = 1.0 / rate_hz
        k = 0
        while not stop.is_set():
            due = start + k * period
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if time.perf_counter() - start >= duration:
                break
            with lock:
                for c in range(cameras):
                    if slots[c] is not None:
                        counts['dropped'] += 1
                    slots[c] = (messages[c], time.perf_counter())
                    counts['published'] += 1
                lock.notify()
            k += 1

    def worker():
        while True:
            with lock:
                while all(s is None for s in slots) and not stop.is_set():
                    lock.wait(0.05)
                taken = [s for s in slots if s is not None]
                for c in range(cameras):
                    slots[c] = None
            if not taken:
                if stop.is_set():
                    return
                continue
            t0 = time.perf_counter()
            frames = [decode_msg(msg) for msg, _ in taken]
            for m in localizer.localize_batch(frames, [0.0] * len(frames)):
                to_fix(m)
            done = time.perf_counter()
            batch_ms.append(1000.0 * (done - t0))
            age_ms.extend(1000.0 * (done - stamp) for _, stamp in taken)
            counts['localized'] += len(taken)

    threads = [threading.Thread(target=publisher), threading.Thread(target=worker)]
    for t in threads:
        t.start()
    threads[0].join()
    time.sleep(0.2)
    stop.set()
    with lock:
        lock.notify_all()
    threads[1].join()
    return {'published': counts['published'], 'dropped': counts['dropped'],
            'localized': counts['localized'], 'batch_latency': summarize(batch_ms),
            'frame_age_at_fix': summarize(age_ms)}


# ------------------------------------------------------------------------------ database
def write_jpegs(folder: Path, count: int, shape=FRAME_SHAPE, quality: int = 90) -> List[str]:
    """Write `count` camera-sized JPEG files cut from the scene (or a texture); return paths."""
    import cv2
    from concurrent.futures import ThreadPoolExecutor
    base = TestImages(places=min(count, 64), queries=0, shape=shape)
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> str:
        image = base.database[i % len(base.database)]
        if i >= len(base.database):  # vary the content so files are not byte-identical
            image = np.roll(image, int(rng.integers(1, shape[1])), axis=1)
        path = folder / f'{i:06d}.jpg'
        ok, data = cv2.imencode('.jpg', image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise InputError('OpenCV could not encode a JPEG')
        path.write_bytes(data.tobytes())
        return str(path)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, range(count)))


def database_build_part(args, gpu: bool) -> dict:
    """JPEG files -> embeddings: the product's build path vs the fast one, images/s."""
    from taco_cvgl.database import build_database, ImageRecord
    from taco_cvgl.fastpath import FastEmbedder
    from taco_cvgl.gpu_decode import embed_image_files, gpu_decode_status
    device = 'cuda' if gpu else 'cpu'
    count = (512 if args.quick else 4096) if gpu else (8 if args.quick else 32)
    model = bench_model(args.sizes[0], args.weights)
    model._fingerprint_at_load = model.fingerprint()
    out = {'device': device, 'input_size': args.sizes[0], 'files': count,
           'file_kind': f'JPEG q90 {FRAME_SHAPE[1]}x{FRAME_SHAPE[0]}', 'variants': {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / 'images', count)
        out['mean_file_kib'] = round(sum(os.path.getsize(p) for p in paths) / count / 1024, 1)
        records = [ImageRecord(p, 47.0, 8.0) for p in paths]
        reference = None

        def product(precision: str, batch: int):
            m = runtime_copy(model, device, precision)
            return lambda: build_database(m, records, batch_size=batch, progress=False,
                                          workers=min(16, os.cpu_count() or 2)).embeddings

        def fast(precision: str, batch: int, gpu_decode: bool, backend: str = 'auto'):
            m = runtime_copy(model, device, precision)
            encoder = m if backend == 'eager' else FastEmbedder(m, backend,
                                                                cache_dir=args.cache_dir)
            return lambda: embed_image_files(encoder, paths, batch_size=batch,
                                             workers=min(16, os.cpu_count() or 2),
                                             gpu_decode=gpu_decode)[0]

        variants = [('eager_fp32_cpu_decode', lambda: product('fp32', 32))]
        if gpu:
            usable, why = gpu_decode_status(device)
            out['gpu_decode'] = why
            variants.append(('eager_fp16_cpu_decode_b128', lambda: product('fp16', 128)))
            if usable:
                variants.append(('fp16_nvjpeg_b128', lambda: fast('fp16', 128, True, 'eager')))
                variants.append(('fp16_nvjpeg_b256', lambda: fast('fp16', 256, True, 'eager')))
        else:
            out['gpu_decode'] = gpu_decode_status('cuda')[1]
            for precision in ('fp32', 'bf16'):
                if args.quick and precision != _fast_cpu_precision():
                    continue
                variants.append((f'fast_auto_{precision}_cpu_decode',
                                 lambda p=precision: fast(p, 8, False)))
        for name, build in variants:
            try:
                run = build()
                if gpu:
                    run()  # warm-up pass: cuDNN algorithms, nvJPEG handles, page cache
                sync_device(device)
                start = time.perf_counter()
                emb = np.asarray(run(), dtype=np.float32)
                sync_device(device)
                seconds = time.perf_counter() - start
                row = {'seconds': round(seconds, 3), 'images_per_s': round(count / seconds, 1)}
                if reference is None:
                    reference = emb
                else:
                    row['min_cosine_vs_baseline'] = round(float(
                        (emb * reference).sum(1).min() / 1.0), 6)
                out['variants'][name] = row
            except Exception as exc:  # noqa: B902 - report and go on
                out['variants'][name] = {'error': f'{exc.__class__.__name__}: {exc}'}
            finally:
                gc.collect()
    base = out['variants'].get('eager_fp32_cpu_decode', {}).get('images_per_s')
    for row in out['variants'].values():
        if 'images_per_s' in row and base:
            row['speedup_vs_eager_fp32'] = round(row['images_per_s'] / base, 2)
    out['load_average_end'] = load_average()
    return out


# ------------------------------------------------------------------------------ storage/search
def retrieval_set(n: int, queries: int, dim: int = 512, seed: int = 0,
                  correlation_cells: float = 2.0, noise: float = 0.7, jitter: float = 0.3):
    """
    Return (database NxD, queries QxD, truth Q): a synthetic map of places on a grid.

    The embedding of a place is a smooth random field of its position (random Fourier features
    whose correlation falls to 1/e^0.5 at `correlation_cells` grid cells) plus independent noise
    per image (`noise` per dimension, relative to a field of unit variance per dimension). A
    query is taken at a place's position moved by up to `jitter` cells, with noise of its own;
    its ground truth is that place. Neighbouring places look alike, as in a real map database,
    which makes exact search miss some queries (Recall@1 below 1) and gives approximate indexes
    the clustered data they are built for.
    """
    rng = np.random.default_rng(seed)
    side = int(math.ceil(math.sqrt(n)))
    omega = (rng.standard_normal((2, dim)) / correlation_cells).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, dim).astype(np.float32)
    scale = math.sqrt(2.0)  # cos features have variance 1/2

    def embed(positions: np.ndarray) -> np.ndarray:
        field = scale * np.cos(positions.astype(np.float32) @ omega + phase)
        field += noise * rng.standard_normal(field.shape, np.float32)
        return field / np.linalg.norm(field, axis=1, keepdims=True)

    data = np.empty((n, dim), np.float32)
    for start in range(0, n, 250_000):  # bounded temporaries
        idx = np.arange(start, min(n, start + 250_000))
        data[start:start + len(idx)] = embed(np.stack([idx // side, idx % side], axis=1))
    truth = np.sort(rng.choice(n, size=queries, replace=False))
    where = np.stack([truth // side, truth % side], axis=1).astype(np.float32)
    where += rng.uniform(-jitter, jitter, where.shape).astype(np.float32)
    return data, embed(where), truth


def _serialized_bytes(index) -> int:
    import faiss
    return int(faiss.serialize_index(index).size)


def _train_sample(data: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return data[np.sort(rng.choice(len(data), size=min(len(data), count), replace=False))]


def build_faiss(kind: str, data: np.ndarray, sample: np.ndarray):
    """
    Return a trained, filled faiss index of a kind the storage and search parts compare.

    pq64: product quantiser, 64 sub-vectors x 8 bits (64 B per entry), exhaustive search.
    pq128x4fs: 128 sub-vectors x 4 bits (64 B), SIMD "fast scan" exhaustive search.
    ivfpq64: inverted lists (4 sqrt(N) of them, as search.FaissIndex) + 64 B PQ codes.
    ivfflat: inverted lists over the uncompressed fp32 vectors.
    opq64, opq_ivfpq64: the same 64 B codes after a learned rotation (OPQ) of the vectors.
    """
    import faiss
    n, dim = data.shape
    metric = faiss.METRIC_INNER_PRODUCT
    nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
    if kind == 'pq64':
        index = faiss.IndexPQ(dim, 64, 8, metric)
    elif kind == 'opq64':
        index = faiss.index_factory(dim, 'OPQ64,PQ64', metric)
    elif kind == 'opq_ivfpq64':
        index = faiss.index_factory(dim, f'OPQ64,IVF{nlist},PQ64', metric)
    elif kind == 'pq128x4fs':
        index = faiss.IndexPQFastScan(dim, 128, 4, metric)
    elif kind == 'ivfpq64':
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, 64, 8, metric)
    elif kind == 'ivfflat':
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, metric)
    else:
        raise InputError(f'unknown faiss kind {kind!r}')
    index.train(sample)
    index.add(data)
    return index


class FaissSearch:
    """A faiss index behind the search() call of taco_cvgl.search's indexes."""

    def __init__(self, index, nprobe: Optional[int] = None):
        """Wrap an index; nprobe sets how many inverted lists a query visits."""
        import faiss
        self.index = index
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe

    def search(self, queries, k: int):
        """Return (indices, similarities) like ExactIndex.search."""
        sim, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return idx, sim


def scene_retrieval_set(weights: Path, quick: bool, place_px: int = 96, seed: int = 0):
    """
    Return (database NxD, queries QxD, hits, description): the demo scene embedded by weights.

    The database holds every place_px x place_px crop of the Landsat-8 scene on a grid of
    stride place_px / 8 (quick: / 4), as a dense map database does: neighbours overlap by
    7/8. A query re-views a random point (rotated by up to 8 degrees, rescaled by up to 8 %,
    re-lit, with sensor noise); hits(found QxK) says which found places lie within one grid
    stride of it, the counterpart of the usual 25 m threshold.
    """
    from taco_cvgl.demo.scene import load_scene
    from taco_cvgl.embedder import ImageRetrievalModel
    model = ImageRetrievalModel.load(weights, device='cpu', precision=_fast_cpu_precision())
    scene = load_scene()
    stride = place_px // (4 if quick else 8)
    half, big = place_px // 2, place_px * 2
    height, width = scene.rgb.shape[:2]
    centres = np.array([(r, c) for r in range(half, height - half, stride)
                        for c in range(half, width - half, stride)
                        if scene.valid[r - half:r + half, c - half:c + half].all()])
    data = model.encode_batch([np.ascontiguousarray(scene.rgb[r - half:r + half,
                                                              c - half:c + half])
                               for r, c in centres], batch_size=128).numpy()
    rng = np.random.default_rng(seed)
    views, where = [], []
    while len(views) < (300 if quick else 1000):
        r, c = int(rng.integers(big, height - big)), int(rng.integers(big, width - big))
        if not scene.valid[r - big // 2:r + big // 2, c - big // 2:c + big // 2].all():
            continue
        surroundings = scene.rgb[r - big // 2:r + big // 2, c - big // 2:c + big // 2]
        views.append(re_view(surroundings, rng, place_px))
        where.append((r, c))
    queries = model.encode_batch(views, batch_size=128).numpy()
    where = np.array(where)

    def hits(found: np.ndarray) -> np.ndarray:
        offset = centres[found] - where[:, None, :]
        return np.hypot(offset[..., 0], offset[..., 1]) <= stride

    text = (f'the demo scene embedded by {Path(weights).name} ({model.config.input_size[0]} '
            f'px): {len(centres)} crops of {place_px} px on a {stride} px grid; queries are '
            're-views of random points (rotation, scale, light, noise); a hit is a place '
            'within one grid stride')
    return data, queries, hits, text


def storage_part(args) -> dict:
    """Bytes per database entry, and the compressed options' Recall@1 vs exact search."""
    from taco_cvgl.search import ExactIndex
    if args.weights:
        data, q, hits, text = scene_retrieval_set(args.weights, args.quick)
    else:
        data, q, truth = retrieval_set(10_000 if args.quick else 100_000,
                                       300 if args.quick else 1000)

        def hits(found: np.ndarray) -> np.ndarray:
            return found == truth[:, None]
        text = ('synthetic map: places on a grid, embedding = smooth random field of the '
                'position + per-image noise; query = jittered position + its own noise; '
                'isotropic noise is a hard case for quantisers')
    n, queries = len(data), len(q)
    exact_hits = hits(ExactIndex(data).search(q, 10)[0])
    exact_r1 = float(np.mean(exact_hits[:, 0]))
    sample = _train_sample(data, 5_000 if args.quick else 25_000)
    out = {'entries': n, 'queries': queries, 'dim': int(data.shape[1]), 'data': text,
           'train_sample': len(sample), 'exact_recall_at_1': round(exact_r1, 4),
           'exact_recall_at_10': round(float(np.mean(exact_hits.any(axis=1))), 4),
           'options': {}}
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = types.SimpleNamespace(config=ModelConfig(), _fingerprint_at_load='synthetic')
        db = synthetic_database(stand_in, min(n, 10_000))
        db.embeddings = data[:len(db)].copy()
        path = db.save(Path(tmp) / 'db.npz', dtype='fp16')
        out['fp16_embedding_bytes_per_entry'] = int(data.shape[1] * 2)
        out['npz_file_bytes_per_entry'] = round(path.stat().st_size / len(db), 1)
        out['npz_file_note'] = ('whole database file: fp16 embedding, four float64 columns and '
                                'the image id (numpy unicode, 4 bytes per character of the '
                                'longest id); ids here are like images/00001234.jpg')
    kinds = (('pq128x4fs', (None,)),) if args.quick else \
        (('pq64', (None,)), ('pq128x4fs', (None,)), ('ivfpq64', (16, 64)), ('opq64', (None,)),
         ('opq_ivfpq64', (16, 64)))
    for kind, nprobes in kinds:
        try:
            start = time.perf_counter()
            index = build_faiss(kind, data, sample)
            build_s = time.perf_counter() - start
            bytes_per = _serialized_bytes(index) / n
            for nprobe in nprobes:
                name = kind if nprobe is None else f'{kind}_nprobe{nprobe}'
                found = hits(FaissSearch(index, nprobe).search(q, 50)[0])
                r1 = float(np.mean(found[:, 0]))
                out['options'][name] = {
                    'code_bytes': int(index.sa_code_size()),
                    'index_bytes_per_entry': round(bytes_per, 1),
                    'recall_at_1': round(r1, 4),
                    'recall_at_1_vs_exact': round(r1 / exact_r1, 4) if exact_r1 else None,
                    # The shortlist geometric verification would check: R@10 and R@50.
                    'recall_at_10': round(float(np.mean(found[:, :10].any(axis=1))), 4),
                    'recall_at_50': round(float(np.mean(found.any(axis=1))), 4),
                    'build_s': round(build_s, 2)}
        except Exception as exc:  # noqa: B902 - report and go on
            out['options'][kind] = {'error': f'{exc.__class__.__name__}: {exc}'}
    out['load_average_end'] = load_average()
    return out


def search_part(args, gpu: bool) -> dict:
    """Top-10 latency over N entries: exact torch vs faiss indexes (CPU) or fp16 (GPU)."""
    from taco_cvgl.search import ExactIndex
    if gpu:
        sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    else:
        sizes = [100_000] if args.quick else [1_000_000]
    out = {'device': 'cuda' if gpu else 'cpu', 'k': 10, 'sizes': {},
           'data': 'synthetic map (see storage)'}
    for n in sizes:
        queries = 64
        if gpu and n > 1_000_000:
            out['sizes'][str(n)] = _gpu_random_search(n, queries)
            continue
        data, q, truth = retrieval_set(n, queries)
        sample = None if gpu else _train_sample(data, 25_000)
        rows = {}
        if gpu:
            kinds = [('exact_fp32', 'fp32', None), ('exact_fp16', 'fp16', None)]
        else:
            kinds = [('exact_fp32', None, None), ('ivfflat_nprobe16', 'ivfflat', 16),
                     ('ivfflat_nprobe64', 'ivfflat', 64), ('pq128x4fs', 'pq128x4fs', None)]
        exact_top1 = None
        built = {}
        for name, option, nprobe in kinds:
            try:
                start = time.perf_counter()
                if gpu:
                    index = ExactIndex(data, 'cuda')
                    if option == 'fp32':
                        index.matrix = index.matrix.float()
                elif option is None:
                    index = ExactIndex(data, 'cpu')
                else:
                    if option not in built:
                        built[option] = build_faiss(option, data, sample)
                    index = FaissSearch(built[option], nprobe)
                build_s = time.perf_counter() - start
                reps = 50 if gpu else (8 if name.startswith('exact') else 40)
                one = time_calls(lambda: index.search(q[:1], 10), reps, 2)
                batch = time_calls(lambda: index.search(q, 10), max(3, reps // 5), 1)
                found = index.search(q, 10)[0]
                if exact_top1 is None:
                    exact_top1 = found[:, 0]
                rows[name] = {'one_query': summarize(one),
                              'batch_64_queries': summarize(batch),
                              'recall_at_1': round(float(np.mean(found[:, 0] == truth)), 4),
                              'top1_equal_to_exact': round(float(np.mean(
                                  found[:, 0] == exact_top1)), 4),
                              'build_s': round(build_s, 2)}
                index = None
            except Exception as exc:  # noqa: B902 - report and go on
                rows[name] = {'error': f'{exc.__class__.__name__}: {exc}'}
            finally:
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        base = rows.get('exact_fp32', {}).get('one_query', {}).get('p50_ms')
        for row in rows.values():
            if 'one_query' in row:
                row['speedup_vs_exact_fp32'] = ratio(base, row['one_query']['p50_ms'])
        out['sizes'][str(n)] = rows
        data = built = None
    out['load_average_end'] = load_average()
    return out


def _gpu_random_search(n: int, queries: int, dim: int = 512) -> dict:
    """Time exact fp16 top-10 over n random unit vectors made on the GPU (no host copy)."""
    from taco_cvgl.search import ExactIndex
    index = ExactIndex(np.zeros((1, dim), np.float32), 'cuda')
    matrix = torch.empty((n, dim), dtype=torch.float16, device='cuda')
    generator = torch.Generator(device='cuda').manual_seed(0)
    for start in range(0, n, 1_000_000):
        stop = min(n, start + 1_000_000)
        block = torch.randn((stop - start, dim), device='cuda', generator=generator)
        matrix[start:stop] = F.normalize(block, dim=1).half()
    index.matrix = matrix
    q = F.normalize(torch.randn((queries, dim), device='cuda', generator=generator), dim=1)
    q = q.cpu().numpy()
    one = time_calls(lambda: index.search(q[:1], 10), 50, 3)
    batch = time_calls(lambda: index.search(q, 10), 10, 1)
    index.matrix = matrix = None
    torch.cuda.empty_cache()
    return {'exact_fp16': {'one_query': summarize(one), 'batch_64_queries': summarize(batch),
                           'data': 'random unit vectors (timing only)'}}


# ------------------------------------------------------------------------------ training
def training_part(args, gpu: bool) -> dict:
    """Training step throughput (forward, loss, backward, AdamW): fp32 vs bf16 + channels_last."""
    from taco_cvgl.embedder import ImageRetrievalModel
    from taco_cvgl.training.losses import RetrievalLoss
    device = torch.device('cuda' if gpu else 'cpu')
    size = 224 if gpu else 64
    triplets = 64 if gpu else (4 if args.quick else 8)
    steps = (5 if args.quick else 15) if gpu else (1 if args.quick else 3)
    out = {'device': str(device), 'input_size': size, 'triplets_per_step': triplets,
           'images_per_step': 3 * triplets, 'variants': {}}
    labels = torch.cat([torch.arange(triplets), torch.arange(triplets),
                        torch.arange(triplets, 2 * triplets)]).to(device)
    latlon = torch.full((3 * triplets, 2), float('nan'), device=device)
    for name, bf16, channels_last in (('fp32', False, False),
                                      ('bf16_channels_last', True, True)):
        try:
            torch.manual_seed(0)
            model = ImageRetrievalModel(ModelConfig(input_size=(size, size))).to(device)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt).train()
            loss_fn = RetrievalLoss()
            fused = {'fused': True} if gpu else {}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
            x = torch.randn((3 * triplets, 3, size, size), device=device).contiguous(
                memory_format=fmt)
            cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 \
                else contextlib.nullcontext()

            def step():
                with cast:
                    emb = model(x)
                loss = loss_fn(emb.float(), labels, latlon)['loss']
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            ms = time_calls(step, steps, warmup=2 if gpu else 1, sync=device)
            per_step = float(np.median(ms))
            out['variants'][name] = {'step_ms': round(per_step, 2),
                                     'images_per_s': round(3 * triplets * 1000.0 / per_step, 1)}
            model = optimizer = None
        except Exception as exc:  # noqa: B902 - report and go on
            out['variants'][name] = {'error': f'{exc.__class__.__name__}: {exc}'}
        finally:
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    base = out['variants'].get('fp32', {}).get('images_per_s')
    fast = out['variants'].get('bf16_channels_last', {}).get('images_per_s')
    if base and fast:
        out['variants']['bf16_channels_last']['speedup_vs_fp32'] = round(fast / base, 2)
    out['load_average_end'] = load_average()
    return out


def onnx_part(args) -> dict:
    """Export the embedder to ONNX and compare its embeddings with the model's."""
    from taco_cvgl.onnx_export import export_onnx
    size = args.sizes[0]
    model = bench_model(size, args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        start = time.perf_counter()
        check = export_onnx(model, path)
        seconds = time.perf_counter() - start
        out = dict(check.to_dict(), input_size=size, export_and_check_s=round(seconds, 2),
                   file_mib=round(path.stat().st_size / 2 ** 20, 1))
    out.pop('path', None)
    return out


# ------------------------------------------------------------------------------ targets
def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# An approximate search meets a speed target only if its top-1 is the exact top-1 this often.
APPROXIMATE_AGREEMENT = 0.95


def targets(figures: dict) -> List[dict]:
    """Compare the measured figures with the issue's targets."""
    rows = []

    def add(name, target, measured, ok, note=''):
        rows.append({'name': name, 'target': target, 'measured': measured,
                     'met': None if measured is None else bool(ok), 'note': note})

    pipe = figures.get('gpu_pipeline', {})
    best = None
    for name in ('fast_compile_fp16', 'fast_cuda_graph_fp16'):
        row = _get(pipe, 'variants', name)
        if row and 'p50_ms' in row and (best is None or row['p50_ms'] < best[1]['p50_ms']):
            best = (name, row)
    if best:
        add('live frame p50 (GPU)', '<= 3 ms', best[1]['p50_ms'], best[1]['p50_ms'] <= 3,
            best[0])
        add('live frame p99 (GPU)', '<= 6 ms', best[1]['p99_ms'], best[1]['p99_ms'] <= 6,
            best[0])
        add('frames/s one camera (GPU)', '>= 300', best[1]['frames_per_s'],
            best[1]['frames_per_s'] >= 300, best[0])
    else:
        add('live frame p50/p99, frames/s (GPU)', '<= 3 / 6 ms, >= 300/s', None, False,
            _get(pipe, 'skipped') or 'not measured')
    cams = figures.get('multi_camera', {})
    if 'dropped' in cams:
        add('4 cameras x 30 Hz, none dropped', '0 dropped', cams['dropped'],
            cams['dropped'] == 0, f"{cams['device']}, {cams['localized']} localized")
    build = _get(figures, 'gpu_database_build', 'variants') or {}
    rates = [(r['images_per_s'], n) for n, r in build.items() if 'images_per_s' in r]
    if rates:
        top = max(rates)
        add('database build from JPEG (GPU)', '>= 3000 images/s', top[0], top[0] >= 3000,
            top[1])
    storage = figures.get('storage', {})
    if 'fp16_embedding_bytes_per_entry' in storage:
        add('storage per image, fp16', '<= 1024 B', storage['fp16_embedding_bytes_per_entry'],
            storage['fp16_embedding_bytes_per_entry'] <= 1024,
            f"whole .npz file: {storage.get('npz_file_bytes_per_entry')} B per entry")
        good = [(o['index_bytes_per_entry'], n, o['recall_at_1_vs_exact'])
                for n, o in storage.get('options', {}).items()
                if o.get('recall_at_1_vs_exact') is not None]
        fitting = [g for g in good if g[0] <= 64 and g[2] >= 0.98]
        pick = min(fitting) if fitting else (min(good) if good else None)
        if pick:
            add('compressed storage', '<= 64 B and >= 98% of exact R@1',
                f'{pick[0]} B, {pick[2] * 100:.1f}%', bool(fitting), pick[1])
    gsearch = _get(figures, 'gpu_search', 'sizes', '1000000', 'exact_fp16', 'one_query',
                   'p50_ms')
    add('search top-10 over 1M (GPU)', '<= 0.5 ms', gsearch,
        gsearch is not None and gsearch <= 0.5)
    csearch = _get(figures, 'cpu_search', 'sizes') or {}
    if '1000000' in csearch:
        # An approximate index counts only where its top-1 agrees with exact search.
        approx = [(r['one_query']['p50_ms'], n, r['top1_equal_to_exact'])
                  for n, r in csearch['1000000'].items()
                  if n != 'exact_fp32' and 'one_query' in r]
        good = [a for a in approx if a[2] >= APPROXIMATE_AGREEMENT]
        if good or approx:
            top = min(good or approx)
            add('search top-10 over 1M (CPU, approximate)', '<= 20 ms', top[0],
                bool(good) and top[0] <= 20,
                f'{top[1]}, top-1 = exact for {top[2] * 100:.0f}% of queries (needs '
                f'{APPROXIMATE_AGREEMENT * 100:.0f}%)')
    else:
        add('search top-10 over 1M (CPU, approximate)', '<= 20 ms', None, False,
            'measured at 1M by the full bench only')
    train = _get(figures, 'gpu_training', 'variants', 'bf16_channels_last', 'images_per_s')
    add('training 224 px bf16 channels_last (GPU)', '>= 1500 images/s', train,
        train is not None and train >= 1500)
    lat = _get(figures, 'cpu_latency', 'sizes') or {}
    for size, per_backend in lat.items():
        candidates = [(r['speedup_vs_eager_fp32'], n) for n, r in per_backend.items()
                      if n != 'eager_fp32' and r.get('equal_accuracy')
                      and r.get('speedup_vs_eager_fp32')]
        if candidates:
            top = max(candidates)
            add(f'CPU per-frame latency {size} px vs eager fp32', '>= 4x at equal accuracy',
                top[0], top[0] >= 4, top[1])
    return rows


# ------------------------------------------------------------------------------ printing
def _fmt(value, spec: str = '.2f') -> str:
    return 'n/a' if value is None else format(value, spec)


def _print_latency(result: dict) -> None:
    for size, rows in result['sizes'].items():
        print(f"   {size} px ({result['what']}; test images: {result['test_images']})")
        for variant, row in rows.items():
            if 'error' in row:
                print(f"     {variant:<28} error: {row['error'][:150]}")
                continue
            net = row.get('network_only_p50_ms')
            extra = f'  network alone {net:.3f} ms' if net is not None else ''
            print(f"     {variant:<28} p50 {row['p50_ms']:9.2f} ms  p99 {row['p99_ms']:9.2f}  "
                  f"x{_fmt(row.get('speedup_vs_eager_fp32'))}  cos {row['min_cosine']:.6f}  "
                  f"top-1 same {row['top1_same']}{extra}")


def _print_pipeline(result: dict) -> None:
    print(f"   {result['message']} -> {result['output']}; "
          f"{result['database_entries']} entries")
    for variant, row in result['variants'].items():
        if 'error' in row:
            print(f"     {variant:<24} error: {row['error'][:150]}")
            continue
        print(f"     {variant:<24} p50 {row['p50_ms']:9.2f} ms  p99 {row['p99_ms']:9.2f}  "
              f"{row['frames_per_s']:8.1f} frames/s  "
              f"x{_fmt(row.get('speedup_vs_eager_fp32'))}  stages p50 {row['stages_p50_ms']}")


def _print_search(result: dict) -> None:
    for size, rows in result['sizes'].items():
        for variant, row in rows.items():
            if 'error' in row:
                print(f"     {size:>9} {variant:<18} error: {row['error'][:150]}")
                continue
            one = row['one_query']['p50_ms']
            print(f'     {size:>9} {variant:<18} 1 query p50 {one:8.3f} ms  64 queries '
                  f"{row['batch_64_queries']['p50_ms']:8.3f} ms  R@1 {row.get('recall_at_1')}  "
                  f"top-1 = exact {row.get('top1_equal_to_exact')}  "
                  f"x{_fmt(row.get('speedup_vs_exact_fp32'), '.1f')}")


def print_part(name: str, result: dict) -> None:
    """Print one part's figures as a short table."""
    print(f'\n== {name} ({result.get("seconds")} s)', flush=True)
    if 'skipped' in result:
        print(f"   skipped: {result['skipped']}")
    elif 'error' in result:
        print(f"   error: {result['error']}")
    elif name in ('cpu_latency', 'gpu_latency'):
        _print_latency(result)
    elif name in ('cpu_pipeline', 'gpu_pipeline'):
        _print_pipeline(result)
    elif name == 'multi_camera':
        print(f"   {result['cameras']} cameras x {result['rate_hz']} Hz for "
              f"{result['duration_s']} s on {result['device']} ({result['backend']}): published "
              f"{result['published']}, dropped {result['dropped']}, batch p99 "
              f"{result['batch_latency'].get('p99_ms')} ms")
    elif name == 'storage':
        print(f"   fp16: {result['fp16_embedding_bytes_per_entry']} B/entry (whole file "
              f"{result['npz_file_bytes_per_entry']} B/entry); exact R@1 "
              f"{result['exact_recall_at_1']}, R@10 {result['exact_recall_at_10']} over "
              f"{result['entries']} entries ({result['data'][:60]}...)")
        for option, row in result['options'].items():
            print(f'     {option:<20} {row}')
    elif 'sizes' in result:
        _print_search(result)
    elif 'variants' in result:
        for variant, row in result['variants'].items():
            print(f'     {variant:<30} {row}')
    else:
        print(f'   {result}')


def markdown_report(result: dict) -> str:
    """Return markdown tables of a bench result (for docs/PERFORMANCE.md)."""
    m = result['machine']
    lines = [f"Machine: {m['hostname']}, {m['cpu']} ({m['cpu_cores']} cores), GPU "
             f"{m.get('gpu') or 'none'}; torch {m['torch']}, onnxruntime {m.get('onnxruntime')}; "
             f"{result['created']}; load average at start {m['load_average']}; "
             f"{'quick' if result.get('quick') else 'full'} run; weights {result['weights']}.",
             '']
    figures = result['figures']
    for part in ('cpu_latency', 'gpu_latency'):
        data = figures.get(part, {})
        for size, rows in (data.get('sizes') or {}).items():
            lines += [f'{part} at {size} px ({data["what"]}; {data.get("threads")} threads)', '',
                      '| variant | p50 ms | p99 ms | network alone ms | speed-up | min cosine '
                      '| top-1 same |', '| --- | --- | --- | --- | --- | --- | --- |']
            for name, row in rows.items():
                if 'p50_ms' not in row:
                    lines.append(f"| {name} | error: {row.get('error', '')[:80]} | | | | | |")
                    continue
                lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                             f"{_fmt(row.get('network_only_p50_ms'))} | "
                             f"{_fmt(row.get('speedup_vs_eager_fp32'))} | "
                             f"{row['min_cosine']:.6f} | {row['top1_same']} |")
            lines.append('')
    for part in ('cpu_pipeline', 'gpu_pipeline'):
        data = figures.get(part, {})
        if 'variants' not in data:
            continue
        lines += [f"{part}: {data['message']} -> {data['output']}, {data['database_entries']} "
                  f'entries', '', '| variant | p50 ms | p99 ms | frames/s | speed-up | stages '
                  '(p50 ms) |', '| --- | --- | --- | --- | --- | --- |']
        for name, row in data['variants'].items():
            if 'p50_ms' in row:
                lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                             f"{row['frames_per_s']} | {_fmt(row.get('speedup_vs_eager_fp32'))}"
                             f" | {row['stages_p50_ms']} |")
        lines.append('')
    lines += ['Targets', '', '| target | goal | measured | met |', '| --- | --- | --- | --- |']
    for row in result.get('targets', []):
        met = {True: 'yes', False: 'no', None: 'not measured'}[row['met']]
        note = f" ({row['note']})" if row['note'] else ''
        lines.append(f"| {row['name']} | {row['target']} | {row['measured']}{note} | {met} |")
    return '\n'.join(lines) + '\n'


def run_part(name: str, args) -> dict:
    """Run one part, catching its failure (so one part never costs the others)."""
    gpu = name in GPU_PARTS
    if gpu and name != 'multi_camera':
        reason = gpu_reason()
        if reason:
            return {'skipped': reason}
    functions = {
        'cpu_latency': lambda: latency_part(args, False),
        'gpu_latency': lambda: latency_part(args, True),
        'cpu_pipeline': lambda: pipeline_part(args, False),
        'gpu_pipeline': lambda: pipeline_part(args, True),
        'multi_camera': lambda: multi_camera_part(args),
        'cpu_database_build': lambda: database_build_part(args, False),
        'gpu_database_build': lambda: database_build_part(args, True),
        'storage': lambda: storage_part(args),
        'cpu_search': lambda: search_part(args, False),
        'gpu_search': lambda: search_part(args, True),
        'cpu_training': lambda: training_part(args, False),
        'gpu_training': lambda: training_part(args, True),
        'onnx': lambda: onnx_part(args),
    }
    start = time.perf_counter()
    load = load_average()
    try:
        result = functions[name]()
    except Exception as exc:  # noqa: B902 - report and go on with the next part
        traceback.print_exc(file=sys.stderr)
        result = {'error': f'{exc.__class__.__name__}: {exc}'}
    result['seconds'] = round(time.perf_counter() - start, 1)
    result.setdefault('load_average_start', load)
    return result


def parse_parts(text: str) -> List[str]:
    """Expand 'all', 'cpu', 'gpu' and comma lists into part names (checked)."""
    names: List[str] = []
    for item in (t.strip() for t in text.split(',') if t.strip()):
        group = {'all': PARTS, 'cpu': CPU_PARTS, 'gpu': GPU_PARTS}.get(item)
        for name in group or (item,):
            if name not in PARTS:
                raise InputError(f'unknown bench part {name!r}; parts are {", ".join(PARTS)} '
                                 f'or the groups all, cpu, gpu')
            if name not in names:
                names.append(name)
    return names


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + '\n')
    os.replace(tmp, path)


def bench(parts: Sequence[str], args) -> dict:
    """Run the parts, print each and return the whole result."""
    result = {'schema': SCHEMA, 'created': datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec='seconds'),
        'machine': machine_info(), 'quick': bool(args.quick), 'sizes': list(args.sizes),
        'weights': str(args.weights) if args.weights else
        f'random (seed 0, layer scale {BENCH_LAYER_SCALE})',
        'parts': list(parts), 'figures': {}}
    m = result['machine']
    print(f"taco-cvgl bench on {m['hostname']}: {m['cpu']} ({m['cpu_cores']} cores, "
          f"{m['torch_threads']} torch threads), GPU {m['gpu'] or 'none'}, torch {m['torch']}; "
          f"load {m['load_average']}", flush=True)
    for name in parts:
        result['figures'][name] = run_part(name, args)
        print_part(name, result['figures'][name])
        if args.out:
            result['targets'] = targets(result['figures'])
            write_json(args.out, result)  # partial results survive a later crash
    result['targets'] = targets(result['figures'])
    result['machine']['load_average_end'] = load_average()
    print('\n== targets')
    for row in result['targets']:
        mark = {True: 'met', False: 'NOT met', None: 'not measured'}[row['met']]
        print(f"   {row['name']:<46} {row['target']:<34} {str(row['measured']):<16} {mark}"
              f"{'  (' + row['note'] + ')' if row['note'] else ''}")
    return result


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Parse arguments, run the bench, write the JSON."""
    parser = argparse.ArgumentParser(prog='taco-cvgl bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true',
                        help='fewer repetitions and smaller sizes (about a minute on 2 cores)')
    parser.add_argument('--out', type=Path, default=Path('taco_cvgl_bench.json'),
                        help='JSON result file (default: taco_cvgl_bench.json)')
    parser.add_argument('--parts', default='all',
                        help=f'comma list of parts or groups all, cpu, gpu (parts: '
                             f'{", ".join(PARTS)})')
    parser.add_argument('--sizes', default=None,
                        help='input sizes in px for the latency parts (default 224,320; '
                             'quick: 224); the first also serves the other parts')
    parser.add_argument('--weights', type=Path, default=None,
                        help='trained weights for the accuracy checks (default: random)')
    parser.add_argument('--compile', action='store_true',
                        help='also time torch.compile on the CPU (minutes of compiling there)')
    parser.add_argument('--no-compile', action='store_true',
                        help='skip torch.compile variants on the GPU')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch and ONNX Runtime CPU threads (default: torch's choice); 1 "
                             'gives steadier figures on a machine busy with other work')
    parser.add_argument('--multi-camera-on-cpu', action='store_true',
                        help='run the 4-camera simulation on the CPU too (it drops frames)')
    parser.add_argument('--cache-dir', type=Path, default=None,
                        help='where ONNX exports are cached (default: $TACO_CVGL_CACHE or '
                             '~/.cache/taco_cvgl)')
    parser.add_argument('--report', type=Path, default=None,
                        help='print markdown tables of a saved result file and exit (no '
                             'measuring)')
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            print(markdown_report(json.loads(args.report.read_text())), end='')
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f'{args.report} is not a readable bench result: {exc}') from None
        return 0
    try:
        default_sizes = '224' if args.quick else '224,320'
        args.sizes = [int(s) for s in (args.sizes or default_sizes).split(',') if s.strip()]
    except ValueError:
        raise InputError(f'--sizes must be comma-separated integers, got {args.sizes!r}') \
            from None
    if not args.sizes or min(args.sizes) < 32:
        raise InputError('--sizes must name at least one input size >= 32 px')
    if args.weights is not None and not args.weights.is_file():
        raise InputError(f'weights file not found: {args.weights}')
    if args.threads:
        torch.set_num_threads(int(args.threads))
    parts = parse_parts(args.parts)
    result = bench(parts, args)
    write_json(args.out, result)
    print(f'\nwrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
