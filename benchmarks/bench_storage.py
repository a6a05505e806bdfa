"""
Part storage: bytes per database entry and the compressed options' Recall@1 vs exact search.

Bytes: the fp16 embedding, the whole .npz file per entry and each faiss index per entry (PQ
codes, with and without inverted lists and a learned rotation). Recall on a synthetic retrieval
set (bench_common.retrieval_set) or, with --weights, on the demo scene embedded by those
weights. Run by bench.py; the cpu_search part reuses the faiss helpers.
"""

from __future__ import annotations

import math
from pathlib import Path
import tempfile
import time
import types
from typing import Optional

from bench_common import (BenchOptions, fast_cpu_precision, load_average, re_view,
                          retrieval_set, synthetic_database)
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.model.config import ModelConfig


def _serialized_bytes(index) -> int:
    import faiss
    return int(faiss.serialize_index(index).size)


def train_sample(data: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
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
    """A faiss index behind the search() call of taco_cvgl.mapdb.search's indexes."""

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
    from taco_cvgl.model.embedder import ImageRetrievalModel
    model = ImageRetrievalModel.load(weights, device='cpu', precision=fast_cpu_precision())
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


def measure(options: BenchOptions) -> dict:
    """Bytes per database entry, and the compressed options' Recall@1 vs exact search."""
    from taco_cvgl.mapdb.search import ExactIndex
    if options.weights:
        data, q, hits, text = scene_retrieval_set(options.weights, options.quick)
    else:
        data, q, truth = retrieval_set(10_000 if options.quick else 100_000,
                                       300 if options.quick else 1000)

        def hits(found: np.ndarray) -> np.ndarray:
            return found == truth[:, None]
        text = ('synthetic map: places on a grid, embedding = smooth random field of the '
                'position + per-image noise; query = jittered position + its own noise; '
                'isotropic noise is a hard case for quantisers')
    n, queries = len(data), len(q)
    exact_hits = hits(ExactIndex(data).search(q, 10)[0])
    exact_r1 = float(np.mean(exact_hits[:, 0]))
    sample = train_sample(data, 5_000 if options.quick else 25_000)
    out = {'entries': n, 'queries': queries, 'dim': int(data.shape[1]), 'data': text,
           'train_sample': len(sample), 'exact_recall_at_1': round(exact_r1, 4),
           'exact_recall_at_10': round(float(np.mean(exact_hits.any(axis=1))), 4),
           'options': {}}
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = types.SimpleNamespace(config=ModelConfig(), fingerprint=lambda: 'synthetic')
        db = synthetic_database(stand_in, min(n, 10_000))
        db.embeddings = data[:len(db)].copy()
        path = db.save(Path(tmp) / 'db.npz', dtype='fp16')
        out['fp16_embedding_bytes_per_entry'] = int(data.shape[1] * 2)
        out['npz_file_bytes_per_entry'] = round(path.stat().st_size / len(db), 1)
        out['npz_file_note'] = ('whole database file: fp16 embedding, four float64 columns and '
                                'the image id (numpy unicode, 4 bytes per character of the '
                                'longest id); ids here are like images/00001234.jpg')
    kinds = (('pq128x4fs', (None,)),) if options.quick else \
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


def print_result(result: dict) -> None:
    """Print the bytes per entry, exact recall and each compressed option's figures."""
    print(f"   fp16: {result['fp16_embedding_bytes_per_entry']} B/entry (whole file "
          f"{result['npz_file_bytes_per_entry']} B/entry); exact R@1 "
          f"{result['exact_recall_at_1']}, R@10 {result['exact_recall_at_10']} over "
          f"{result['entries']} entries ({result['data'][:60]}...)")
    for option, row in result['options'].items():
        print(f'     {option:<20} {row}')
