"""
What the parts of benchmarks/bench.py share: timing rounds, the machine, inputs, tables, JSON.

Every part measures its fast variants side by side with a plain baseline in the same run; the
helpers here time those calls (interleaved so that a busy machine slows every variant alike),
describe the machine the figures belong to, cut camera frames from the demo scene (or a
synthetic texture), make the bench model and the synthetic map, and write the result file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from pathlib import Path
import platform
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.model.config import ModelConfig
import torch

SCHEMA = 'taco_cvgl.bench/1'      # of the JSON file bench.py writes
FRAME_SHAPE = (480, 640)          # camera frames (height, width), as the node receives them


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The command-line settings every part reads (bench.py --help describes each)."""

    quick: bool = False
    sizes: Tuple[int, ...] = (224,)       # input sizes in px; the first serves most parts
    weights: Optional[Path] = None        # trained weights, else a random model
    compile_on_cpu: bool = False          # also time torch.compile on the CPU
    compile_on_gpu: bool = True           # the pipeline's torch.compile variant on the GPU
    multi_camera_on_cpu: bool = False
    cache_dir: Optional[Path] = None      # ONNX export cache


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
        from taco_cvgl.demo.scene import load_scene, SCENE_FILE
        from taco_cvgl.model.config import cache_dir_default
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


# ------------------------------------------------------------------------------ models
# Random ConvNeXt blocks start with a layer scale of 1e-6, which makes every block almost the
# identity: reduced-precision errors inside the blocks would then be invisible to the accuracy
# checks. Trained ConvNeXt-Tiny scales are mostly between 0.05 and 1; the bench uses this value.
BENCH_LAYER_SCALE = 0.3


def bench_model(size: int, weights: Optional[str] = None, seed: int = 0):
    """Return a CPU fp32 eval ImageRetrievalModel: random (seed) at size x size, or weights."""
    from taco_cvgl.model.embedder import ImageRetrievalModel
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
        from taco_cvgl.model.preprocess import prepare_batch
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


def reset_compiled() -> None:
    """Forget torch.compile's caches (each bench variant compiles its own model)."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fast_cpu_precision() -> str:
    """Return the precision the CPU fast path should use here: bf16 where the CPU has it."""
    from taco_cvgl.inference.cpu import cpu_has_bf16
    return 'bf16' if cpu_has_bf16() else 'fp32'


# ------------------------------------------------------------------------------ the synthetic map
def synthetic_database(model, n: int, seed: int = 0, spacing_m: float = 30.0):
    """
    Return an EmbeddingDatabase of n random unit embeddings on a grid, for this model.

    `model` needs only `config` and `fingerprint()`.
    """
    from taco_cvgl.mapdb.database import EmbeddingDatabase
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
    fingerprint = model.fingerprint()
    return EmbeddingDatabase(
        embeddings=emb, latitude=lat, longitude=lon, altitude=np.full(n, 400.0),
        heading=np.zeros(n), image_ids=np.array([f'images/{i:08d}.jpg' for i in range(n)]),
        model_config=model.config, model_fingerprint=fingerprint,
        meta={'grid_spacing_m': spacing_m, 'source': 'bench (synthetic)'})


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


# ------------------------------------------------------------------------------ output
def write_json(path: Path, data: dict) -> None:
    """Write a result as JSON, atomically (a reader never finds half a file)."""
    from taco_cvgl.files.atomic import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + '\n')


def fmt(value, spec: str = '.2f') -> str:
    """Format a figure for a table, 'n/a' where it was not measured."""
    return 'n/a' if value is None else format(value, spec)


def print_variants(result: dict) -> None:
    """Print a part's variants one per line, as they are in the JSON."""
    for variant, row in result['variants'].items():
        print(f'     {variant:<30} {row}')
