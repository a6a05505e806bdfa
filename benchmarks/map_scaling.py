#!/usr/bin/env python3
r"""
Benchmark: the cost of a frame as the map grows, 1k to 100k entries and more (issue 13).

Localizes the same camera frames against maps of growing size, each made of a real map (its
entries, tile images and model) plus distractors, with the node's own settings (config/cvgl.yaml
unless --params-file says otherwise), and splits each frame's time into
  embed     the model's encode_batch (the query embedding)
  search    the index's search (exact, or an approximate faiss index)
  verify    the reranker's query_features + verify: SIFT on the query, SIFT on each candidate
            not yet in the feature cache (a tile image read and described), matching, RANSAC
  estimate  taco_cvgl.localization.localizer.estimate_pose
  other     the rest of localize(): preprocessing, ranking, the motion prior
The stages are timed (wall clock, and the process's CPU time) by wrapping those callables of the
loaded localizer at run time; no library code changes. All maps are loaded at once and each frame
is localized against every map in turn, so that other work on a shared machine slows all sizes
alike. Beside it, at the sizes up to --whole-map-up-to, the same map is verified whole (every
entry is an acquisition candidate, no motion prior), the cost a design without retrieval would
pay; a map within the reranker's feature cache (4096 entries) has every tile described once
before (counted in "load s"), a larger one describes tiles again on every frame.

Distractors (--distractors):
  perturbed  (default) a real entry's embedding turned away from it by a random direction
             orthogonal to it and re-normalised, so that its cosine to that entry is the median
             cosine between a real entry and its nearest other real entry: a distractor looks
             as much like some real place as real neighbouring places look like each other, so
             a larger map puts more look-alikes into the candidates, as more terrain would
  random     uniform random unit vectors: never retrieved, so they cost search and memory only
Each distractor sits on a grid at the real map's spacing starting 100 km north of it (south near
the pole), far from every real place, and reuses the image of a real tile other than the one its
embedding came from: a distractor among the candidates costs a real SIFT check and fails it
(unless that tile overlaps the camera's view). A fix on a distractor is counted.

Memory per entry: the embedding as the database stores it (fp16) plus the search index (exact:
its fp32 or fp16 copy of the matrix and any low-precision first-pass copies; faiss: the
serialised index). The reranker's feature cache
is bounded (RerankConfig.cache_size entries), not per entry, and not counted.

    python benchmarks/map_scaling.py --weights demo_out/train/weights.safetensors \
        --database demo_out/map/map.npz --bag demo_out/flight --image-topic /camera/image_raw \
        --sizes 1000 10000 100000 --whole-map-up-to 1000 --json map_scaling.json
    python benchmarks/map_scaling.py ... --quick      # 3 frames, tiny maps: under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import math
from pathlib import Path
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from taco_cvgl.cli.common import reports_errors
from taco_cvgl.errors import InputError

SCHEMA = 'taco_cvgl.map_scaling/1'
STAGES = ('embed', 'search', 'verify', 'estimate')
FAR_M = 100_000.0           # distance from the real map to the nearest distractor
METRES_PER_DEGREE = 111_320.0
TARGET_GROWTH = 0.20        # the claim: largest map's median frame within 20 % of the smallest
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ frames
@dataclasses.dataclass
class Frame:
    """One query image and its time (seconds, None for a file)."""

    name: str
    stamp_s: Optional[float]
    rgb: np.ndarray


def spread(total: int, count: int) -> List[int]:
    """Return `count` indices in [0, total) spaced evenly from the first (all when fewer)."""
    if count >= total:
        return list(range(total))
    return sorted({int(round(i * (total - 1) / max(1, count - 1))) for i in range(count)})


def bag_frames(bag: Path, topic: str, count: int) -> List[Frame]:
    """Return `count` frames of a bag's image topic, evenly spread over it."""
    from taco_cvgl.files.bags import iter_images
    stream = iter_images(bag, topic)
    wanted = set(spread(stream.message_count, count))
    frames = []
    for i, (stamp_ns, rgb) in enumerate(stream):
        if i in wanted:
            frames.append(Frame(f'{topic}@{stamp_ns}', stamp_ns * 1e-9, rgb))
    return frames


def folder_frames(folder: Path, count: int) -> List[Frame]:
    """Return `count` image files of a folder (sorted by name), evenly spread over it."""
    from taco_cvgl.files.image_codec import load_image_file
    from taco_cvgl.mapdb.database import iter_image_files
    files = list(iter_image_files(folder))
    return [Frame(str(files[i]), None, load_image_file(files[i]))
            for i in spread(len(files), count)]


def read_frames(bag: Optional[Path], topic: Optional[str], images: Optional[Path],
                count: int) -> List[Frame]:
    """Return the query frames (a warm-up frame first, then `count` timed ones)."""
    if (bag is None) == (images is None):
        raise InputError('give the query frames as --bag (with --image-topic) or --images')
    if bag is not None and not topic:
        raise InputError('--bag needs --image-topic (e.g. /camera/image_raw)')
    path = bag if bag is not None else images
    if not path.exists():
        raise InputError(f'query frames not found: {path}')
    frames = bag_frames(bag, topic, count + 1) if bag is not None else \
        folder_frames(images, count + 1)
    if len(frames) < 2:
        raise InputError(f'{path} holds {len(frames)} frame(s); the benchmark needs a warm-up '
                         f'frame and at least one timed frame')
    return frames


# ------------------------------------------------------------------------------ maps
def nearest_neighbour_cosine(embeddings: np.ndarray) -> float:
    """Return the median cosine between an entry and its most similar other entry."""
    e = np.asarray(embeddings, np.float32)
    best = np.empty(len(e), np.float32)
    for start in range(0, len(e), 2048):
        sims = e[start:start + 2048] @ e.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        best[start:start + len(sims)] = sims.max(axis=1)
    return float(np.median(best))


def perturbed(sources: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Return unit vectors at exactly `cosine` to each source row, in random directions."""
    noise = rng.standard_normal(sources.shape).astype(np.float32)
    noise -= np.sum(noise * sources, axis=1, keepdims=True) * sources   # orthogonal part
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    turned = cosine * sources + math.sqrt(max(0.0, 1.0 - cosine ** 2)) * noise
    return turned / np.linalg.norm(turned, axis=1, keepdims=True)


def distractor_embeddings(real: np.ndarray, count: int, kind: str, cosine: float,
                          rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Return (count x D unit embeddings, index of the real entry each came from or -1)."""
    if kind == 'random':
        e = rng.standard_normal((count, real.shape[1])).astype(np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True), np.full(count, -1)
    sources = rng.integers(0, len(real), size=count)
    out = np.empty((count, real.shape[1]), np.float32)
    for start in range(0, count, 16384):    # blocks: a few MB of noise at a time
        rows = sources[start:start + 16384]
        out[start:start + len(rows)] = perturbed(real[rows].astype(np.float32), cosine, rng)
    return out, sources


def far_positions(latitude: np.ndarray, longitude: np.ndarray, count: int,
                  spacing_m: float) -> Tuple[np.ndarray, np.ndarray]:
    """Return a grid of `count` places at `spacing_m`, FAR_M north (or south) of the map."""
    spacing_m = spacing_m if math.isfinite(spacing_m) and spacing_m > 0 else 1000.0
    side = int(math.ceil(math.sqrt(count)))
    step_lat = spacing_m / METRES_PER_DEGREE
    lon0 = float(np.mean(longitude))
    north = float(np.max(latitude)) + FAR_M / METRES_PER_DEGREE
    south = float(np.min(latitude)) - FAR_M / METRES_PER_DEGREE - side * step_lat
    lat0 = north if north + side * step_lat <= 85.0 else south
    if lat0 < -85.0:
        raise InputError(f'{count} distractors at {spacing_m:.0f} m do not fit on the globe '
                         f'away from this map')
    row, col = np.divmod(np.arange(count), side)
    lat = lat0 + row * step_lat
    step_lon = spacing_m / (METRES_PER_DEGREE * np.cos(np.radians(lat)))
    lon = lon0 + (col - side / 2.0) * step_lon
    return lat, (lon + 180.0) % 360.0 - 180.0


def other_tiles(sources: np.ndarray, n_real: int, rng: np.random.Generator) -> np.ndarray:
    """Return a real tile for each distractor, never the one its embedding came from."""
    shift = rng.integers(1, max(2, n_real), size=len(sources))
    base = np.where(sources >= 0, sources, 0)
    return (base + shift) % n_real if n_real > 1 else np.zeros(len(sources), np.int64)


def build_map(real, size: int, path: Path, kind: str, cosine: float, seed: int
              ) -> Tuple[Path, np.ndarray]:
    """
    Write the real database plus size - len(real) distractors to `path`.

    Returns the path and, for every entry, the real tile whose image (and features) it has.
    """
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    n_real, extra = len(real), size - len(real)
    rng = np.random.default_rng(seed)
    emb, sources = distractor_embeddings(real.embeddings, extra, kind, cosine, rng)
    tiles = other_tiles(sources, n_real, rng)
    lat, lon = far_positions(real.latitude, real.longitude, extra, real.grid_spacing_m)
    db = EmbeddingDatabase(
        embeddings=np.concatenate([real.embeddings.astype(np.float32), emb]),
        latitude=np.concatenate([real.latitude, lat]),
        longitude=np.concatenate([real.longitude, lon]),
        altitude=np.concatenate([real.altitude, real.altitude[tiles]]),
        heading=np.concatenate([real.heading, real.heading[tiles]]),
        image_ids=np.concatenate([np.asarray(real.image_ids, str),
                                  np.asarray(real.image_ids, str)[tiles]]),
        model_config=real.model_config, model_fingerprint=real.model_fingerprint,
        meta=dict(real.meta))   # grid spacing, gsd and calibrations stay the real map's
    return db.save(path, dtype='fp16'), np.concatenate([np.arange(n_real), tiles])


class AliasedStore:
    """The stored features of a grown map: each entry's are those of the real tile it shows."""

    def __init__(self, real_store, tiles: np.ndarray):
        """real_store: the real map's stored features; tiles[i]: the real tile of entry i."""
        self.real_store, self.tiles = real_store, tiles
        self.matcher = real_store.matcher     # whose features they are (the reranker asks)

    def __len__(self) -> int:
        """Return the number of entries of the grown map."""
        return len(self.tiles)

    def __getitem__(self, index: int):
        """Return entry `index`'s features, read from the real map's file."""
        return self.real_store[int(self.tiles[int(index)])]


def stored_reranker(real, database: Path, tiles: np.ndarray, config):
    """
    Return a reranker of the grown map that reads the real map's features file, or None.

    A map built by build-db carries its features file; the grown maps' distractors reuse real
    tiles, so their stored features are the real tiles' (no file of 100k entries is written).
    """
    from taco_cvgl.localization.rerank import Reranker
    from taco_cvgl.mapdb.map_features import features_path, make_reranker
    if config is None or not features_path(database, config.matcher).is_file():
        return None
    real_reranker = make_reranker(real, database, config)
    if real_reranker.stored is None:
        return None
    return Reranker(None, config, stored=AliasedStore(real_reranker.stored, tiles))


# ------------------------------------------------------------------------------ timing
class StageClock:
    """Wall and CPU seconds of the frame being localized, gathered by wrapping callables."""

    def __init__(self, n_real: int, sync_cuda: bool = False):
        """Entries at index >= n_real are distractors; sync_cuda waits for the GPU per stage."""
        self.n_real, self.sync_cuda = n_real, sync_cuda
        self._undo: List = []
        self.reset()

    def reset(self) -> None:
        """Start a new frame."""
        self.wall = dict.fromkeys(STAGES, 0.0)
        self.cpu = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)
        self.checked = self.distractors = self.extracted = 0
        self.kept = self.asked = 0      # exact top-k entries an approximate index also returned
        self.reference_s = self.reference_cpu_s = 0.0   # the exact search compared with

    def _timed(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync_cuda:
                    import torch
                    torch.cuda.synchronize()
                self.wall[stage] += time.perf_counter() - wall
                self.cpu[stage] += time.process_time() - cpu
                self.calls[stage] += 1
        return timed

    def _compared_search(self, fn, reference):
        """Wrap an approximate search: count how much of the exact top-k it returns (untimed)."""
        @functools.wraps(fn)
        def search(queries, k):
            idx, sim = fn(queries, k)
            start, cpu = time.perf_counter(), time.process_time()
            exact, _ = reference.search(queries, k)     # neither timed nor counted in the frame
            self.reference_s += time.perf_counter() - start
            self.reference_cpu_s += time.process_time() - cpu
            for got, wanted in zip(idx, exact):
                self.kept += len(set(got.tolist()) & set(wanted.tolist()))
                self.asked += len(wanted)
            return idx, sim
        return search

    def _counted_verify(self, fn):
        @functools.wraps(fn)
        def verify(query, candidates, *args, **kwargs):
            ids = [int(c) for c in candidates]
            self.checked += len(ids)
            self.distractors += sum(1 for c in ids if c >= self.n_real)
            return fn(query, candidates, *args, **kwargs)
        return verify

    def _counted_load(self, fn):
        @functools.wraps(fn)
        def load_image(index):
            self.extracted += 1      # a feature-cache miss: the tile is read and described
            return fn(index)
        return load_image

    def _patch(self, owner, name: str, wrapped) -> None:
        """Replace owner.name by wrapped, remembering how to put the original back."""
        had_own = name in vars(owner)
        original = getattr(owner, name)
        setattr(owner, name, wrapped)
        self._undo.append((owner, name, original if had_own else None))

    def attach(self, localizer) -> None:
        """Wrap the localizer's model, index, reranker and (once) the estimator it calls."""
        import taco_cvgl.localization.localizer as module
        model, index, reranker = localizer.model, localizer.index, localizer.reranker
        self._patch(model, 'encode_batch', self._timed('embed', model.encode_batch))
        search = self._timed('search', index.search)
        if getattr(index, 'kind', 'exact') != 'exact':
            from taco_cvgl.mapdb.search import ExactIndex
            search = self._compared_search(search, ExactIndex(localizer.database.embeddings))
        self._patch(index, 'search', search)
        if reranker is not None:
            self._patch(reranker, 'query_features',
                        self._timed('verify', reranker.query_features))
            self._patch(reranker, 'verify',
                        self._timed('verify', self._counted_verify(reranker.verify)))
            if getattr(reranker, 'load_image', None) is not None:   # not stored features
                self._patch(reranker, 'load_image', self._counted_load(reranker.load_image))
        if not any(owner is module for owner, _, _ in self._undo):
            self._patch(module, 'estimate_pose', self._timed('estimate', module.estimate_pose))

    def detach(self) -> None:
        """Put every wrapped callable back (the module's estimate_pose above all)."""
        for owner, name, original in reversed(self._undo):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._undo = []


def localize_one(localizer, frame: Frame, clock: StageClock) -> Dict:
    """Localize a frame; return its wall time per stage (ms), its CPU time and the checks."""
    clock.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    m = localizer.localize(frame.rgb, timestamp=frame.stamp_s)
    total = 1000.0 * (time.perf_counter() - wall - clock.reference_s)
    row = {f'{s}_ms': 1000.0 * clock.wall[s] for s in STAGES}
    row['other_ms'] = total - sum(row.values())
    row.update({f'{s}_cpu_ms': 1000.0 * clock.cpu[s] for s in STAGES})
    on_distractor = bool(m.fix and m.verified and m.matches[0].index >= clock.n_real)
    cpu_ms = 1000.0 * (time.process_time() - cpu - clock.reference_cpu_s)
    row.update(total_ms=total, total_cpu_ms=cpu_ms,
               checked=clock.checked, distractors_checked=clock.distractors,
               features_extracted=clock.extracted, calls=dict(clock.calls),
               exact_kept=clock.kept, exact_asked=clock.asked,
               verified=bool(m.verified), fix=bool(m.fix), fix_on_distractor=on_distractor,
               frame=frame.name)
    return row


def interleaved(localizers: Sequence, frames: Sequence[Frame], clock: StageClock
                ) -> List[List[Dict]]:
    """
    Localize each frame against every localizer in turn; return each one's rows.

    Frame by frame rather than map by map, the starting map rotating: on a machine shared with
    other work, a busy minute then slows every map alike instead of the one measured then.
    """
    rows: List[List[Dict]] = [[] for _ in localizers]
    for i, frame in enumerate(frames):
        for step in range(len(localizers)):
            k = (i + step) % len(localizers)
            rows[k].append(localize_one(localizers[k], frame, clock))
    return rows


def percentiles(values: Sequence[float]) -> Dict[str, float]:
    """Return the median and 90th percentile of a list (ms or counts), rounded."""
    a = np.asarray(values, dtype=float)
    return {'p50': round(float(np.percentile(a, 50)), 3),
            'p90': round(float(np.percentile(a, 90)), 3)}


def summarize(rows: List[Dict]) -> Dict:
    """Return the per-stage and total percentiles and the per-frame counts of a run."""
    keys = STAGES + ('other', 'total')
    out = {key: percentiles([r[f'{key}_ms'] for r in rows]) for key in keys}
    out['cpu'] = {key: percentiles([r[f'{key}_cpu_ms'] for r in rows])
                  for key in STAGES + ('total',)}
    if not any(r['calls']['estimate'] for r in rows):   # the localizer no longer calls it there
        out['estimate'] = {'p50': None, 'p90': None}
    for key in ('checked', 'distractors_checked', 'features_extracted'):
        out[f'{key}_per_frame'] = round(float(np.mean([r[key] for r in rows])), 2)
    asked = sum(r['exact_asked'] for r in rows)
    out['exact_topk_kept'] = None if not asked else \
        round(sum(r['exact_kept'] for r in rows) / asked, 4)
    out.update(frames=len(rows), verified=sum(r['verified'] for r in rows),
               fixes=sum(r['fix'] for r in rows),
               fixes_on_distractors=sum(r['fix_on_distractor'] for r in rows))
    return out


# ------------------------------------------------------------------------------ maps measured
def index_bytes(index) -> Optional[int]:
    """Return the bytes a search index holds (exact: its matrices; faiss: serialised)."""
    held = getattr(index, 'nbytes', None)
    if held is not None:
        return held
    inner = getattr(index, 'index', None)
    if inner is not None:
        import faiss
        return int(faiss.serialize_index(inner).size)
    return None


def memory_per_entry(index, size: int, dim: int) -> Dict[str, Optional[float]]:
    """Return bytes per entry of the stored fp16 embedding, of the index, and both."""
    held = index_bytes(index)
    per_index = None if held is None else round(held / size, 1)
    embedding = 2.0 * dim
    return {'embedding_bytes': embedding, 'index_bytes': per_index,
            'total_bytes': None if per_index is None else embedding + per_index}


def whole_map_config(params, size: int):
    """Return the settings' LocalizerConfig with every entry an acquisition candidate."""
    from taco_cvgl.localization.settings import localizer_config
    config = localizer_config(params)
    rerank = dataclasses.replace(config.rerank, acquisition_candidates=size)
    return dataclasses.replace(config, rerank=rerank, prior_radius_m=0.0)


@dataclasses.dataclass
class MapRun:
    """One map loaded in a localizer, and what it cost to get there."""

    size: int
    params: object
    localizer: object
    load_s: float
    memory: Dict
    index: str

    def result(self, mode: str, rows: List[Dict], prepare_s: float = 0.0) -> Dict:
        """Return the run's summary in the JSON's shape."""
        reranker = self.localizer.reranker
        features = None if reranker is None else \
            'stored' if getattr(reranker, 'stored', None) is not None else 'images'
        return {'entries': self.size, 'mode': mode, 'index': self.index,
                'verification_features': features,
                'load_s': round(self.load_s + prepare_s, 2), 'memory': self.memory,
                **summarize(rows), 'per_frame': rows}


def load_map_run(params, size: int, warm_up: Frame, real=None, database: Optional[Path] = None,
                 tiles: Optional[np.ndarray] = None) -> MapRun:
    """
    Load the localizer the settings describe and localize one untimed frame.

    With the real map (real, its database path, and each entry's real tile), its verification
    reads the real map's features file where there is one, as on a map built by build-db.
    """
    from taco_cvgl.localization.localizer import CVGLLocalizer
    start = time.perf_counter()
    localizer = CVGLLocalizer.from_settings(params)
    if real is not None:
        stored = stored_reranker(real, database, tiles, localizer.config.rerank)
        if stored is not None:
            localizer.reranker = stored
    load_s = time.perf_counter() - start
    memory = memory_per_entry(localizer.index, size, localizer.model.config.embedding_dim)
    kind = getattr(localizer.index, 'kind', type(localizer.index).__name__)
    localizer.localize(warm_up.rgb, timestamp=warm_up.stamp_s)
    return MapRun(size, params, localizer, load_s, memory,
                  kind.replace('ExactIndex', 'exact'))


def whole_map_runs(runs: Sequence[MapRun], frames: Sequence[Frame], clock: StageClock
                   ) -> List[Dict]:
    """Verify every entry of each map for each frame (the same localizers, reconfigured)."""
    runs = [r for r in runs if r.localizer.reranker is not None]
    prepare = []
    for run_ in runs:
        run_.localizer.reconfigure(whole_map_config(run_.params, run_.size))
        start = time.perf_counter()
        run_.localizer.warm_up()   # a map within the feature cache is described whole now
        prepare.append(time.perf_counter() - start)
    rows = interleaved([r.localizer for r in runs], frames, clock)
    return [r.result('whole map', rows_, s) for r, rows_, s in zip(runs, rows, prepare)]


def measure(runs: Sequence[MapRun], frames: Sequence[Frame], n_real: int, whole_up_to: int,
            whole_frames: int) -> List[Dict]:
    """Time retrieval on every map, then whole-map verification on the small ones."""
    cuda = any(r.localizer.model.device.type == 'cuda' for r in runs)
    clock = StageClock(n_real, sync_cuda=cuda)
    try:
        for run_ in runs:
            clock.attach(run_.localizer)
        rows = interleaved([r.localizer for r in runs], frames, clock)
        results = [r.result('retrieval', rows_) for r, rows_ in zip(runs, rows)]
        small = [r for r in runs if r.size <= whole_up_to]
        if small and whole_frames > 0:
            results += whole_map_runs(small, frames[:whole_frames], clock)
    finally:
        clock.detach()
    return sorted(results, key=lambda r: (r['entries'], r['mode']))


# ------------------------------------------------------------------------------ output
def cell(stats: Dict[str, Optional[float]]) -> str:
    """Format 'p50/p90' in ms."""
    if stats.get('p50') is None:
        return 'n/a'
    return f"{stats['p50']:.1f}/{stats['p90']:.1f}"


HEADER = (f"{'entries':>8} {'mode':<10}{'index':<6}{'n':>3} {'embed':>11} {'search':>11} "
          f"{'verify':>13} {'estimate':>9} {'total':>13} {'cpu':>7} {'x1st':>5} {'chk':>6} "
          f"{'dis':>5} "
          f"{'sift':>5} {'kept':>5} {'fix':>5} {'B/entry':>13} {'load s':>7}")


def kept_text(kept: Optional[float]) -> str:
    """Format the share of the exact top-k an approximate index kept ('' for exact)."""
    return '' if kept is None else format(kept, '.3f')


def table_line(row: Dict, first_total: Optional[float]) -> str:
    """Format one run as a table line (times are p50/p90 ms per frame)."""
    growth = row['total']['p50'] / first_total if first_total else None
    mem = row['memory']
    mem_text = f"{mem['embedding_bytes']:.0f}+{mem['index_bytes']:.0f}" \
        if mem['index_bytes'] is not None else f"{mem['embedding_bytes']:.0f}+?"
    return (f"{row['entries']:>8} {row['mode']:<10}{row['index']:<6}{row['frames']:>3} "
            f"{cell(row['embed']):>11} {cell(row['search']):>11} {cell(row['verify']):>13} "
            f"{cell(row['estimate']):>9} {cell(row['total']):>13} "
            f"{row['cpu']['total']['p50']:>7.1f} "
            f"{'' if growth is None else format(growth, '.2f'):>5} "
            f"{row['checked_per_frame']:>6.1f} {row['distractors_checked_per_frame']:>5.1f} "
            f"{row['features_extracted_per_frame']:>5.1f} "
            f"{kept_text(row['exact_topk_kept']):>5} "
            f"{row['fixes']:>2}/{row['frames']:<2} {mem_text:>13} {row['load_s']:>7.1f}")


def print_table(runs: List[Dict]) -> None:
    """Print every run, retrieval and whole-map side by side per map size."""
    print('\ntimes: p50/p90 ms per frame (wall); cpu: p50 process CPU ms per frame; x1st: '
          "median total / the smallest map's (same mode); "
          'chk: candidates verified per frame, dis: of them distractors, sift: database tiles '
          'described per frame (feature-cache misses); kept: share of the exact top-k an '
          'approximate index returned; fix: fixes / frames; B/entry: '
          'embedding + index bytes')
    print(HEADER)
    first: Dict[str, float] = {}
    for row in runs:
        first.setdefault(row['mode'], row['total']['p50'])
        print(table_line(row, first[row['mode']]))


def target_check(runs: List[Dict]) -> Optional[Dict]:
    """Return the claim's check: largest map's median frame within 20 % of the smallest's."""
    retrieval = [r for r in runs if r['mode'] == 'retrieval']
    if len(retrieval) < 2:
        return None
    small, large = retrieval[0], retrieval[-1]
    growth = large['total']['p50'] / small['total']['p50'] - 1.0
    cpu = large['cpu']['total']['p50'] / small['cpu']['total']['p50'] - 1.0
    return {'smallest': small['entries'], 'largest': large['entries'],
            'growth': round(growth, 3), 'cpu_growth': round(cpu, 3), 'target': TARGET_GROWTH,
            'met': bool(growth <= TARGET_GROWTH)}


def write_json(path: Path, data: Dict) -> None:
    """Write the result as JSON (atomically)."""
    import json
    from taco_cvgl.files.atomic import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + '\n')


# ------------------------------------------------------------------------------ main
def set_threads(threads: Optional[int]) -> None:
    """Use `threads` CPU threads in torch, OpenCV and faiss (None: their defaults)."""
    if not threads:
        return
    import cv2
    import torch
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    with contextlib.suppress(ImportError):
        import faiss
        faiss.omp_set_num_threads(threads)


def load_real(database: Path):
    """Load the real map and check that re-ranking can read its tile images."""
    from taco_cvgl.mapdb.database import EmbeddingDatabase
    real = EmbeddingDatabase.load(database)
    missing = [p for p in real.image_ids if not Path(p).is_file()]
    if missing:
        raise InputError(f'database {database}: {len(missing)} of {len(real)} tile images are '
                         f'missing (e.g. {missing[0]}); distractors reuse them')
    return real


def plan_sizes(sizes: Sequence[int], n_real: int, quick: bool) -> List[int]:
    """Return the map sizes to measure, refusing ones smaller than the real map."""
    if quick:
        return [n_real, 2 * n_real]
    small = [s for s in sizes if s < n_real]
    if small:
        raise InputError(f'--sizes {small[0]} is smaller than the real map ({n_real} entries): '
                         f'every map holds all of it')
    return sorted({int(s) for s in sizes})


def run(args) -> Dict:
    """Build each map, localize the frames against it, print and return the result."""
    from taco_cvgl.localization.settings import settings
    from bench_common import load_average, machine_info
    set_threads(args.threads)
    real = load_real(args.database)
    sizes = plan_sizes(args.sizes, len(real), args.quick)
    frames = read_frames(args.bag, args.image_topic, args.images, args.frames)
    cosine = args.distractor_cosine if args.distractor_cosine is not None else \
        nearest_neighbour_cosine(real.embeddings)
    whole_up_to = sizes[0] if args.quick else args.whole_map_up_to
    machine = machine_info()
    print(f"map scaling on {machine['hostname']}: {machine['cpu']} ({machine['cpu_cores']} "
          f"cores, {machine['torch_threads']} torch threads), GPU {machine['gpu'] or 'none'}; "
          f"load {machine['load_average']}", flush=True)
    print(f'real map {args.database}: {len(real)} entries; {len(frames) - 1} timed frames + 1 '
          f'warm-up; distractors {args.distractors}'
          + (f' (cosine {cosine:.3f} to their source entry)' if args.distractors == 'perturbed'
             else ''), flush=True)
    with tempfile.TemporaryDirectory(prefix='map_scaling_', dir=args.work_dir) as tmp:
        loaded = []
        for size in sizes:
            start = time.perf_counter()
            path, tiles = build_map(real, size, Path(tmp) / f'map_{size}.npz',
                                    args.distractors, cosine, args.seed)
            params = settings(args.params_file, weights=str(args.weights), database=str(path),
                              index=args.index, device=args.device)
            loaded.append(load_map_run(params, size, frames[0], *(
                (real, args.database, tiles) if args.features == 'stored' else ())))
            print(f'  {size} entries: map written and loaded in '
                  f'{time.perf_counter() - start:.1f} s', flush=True)
        runs = measure(loaded, frames[1:], len(real), whole_up_to, args.whole_map_frames)
        del loaded
    machine['load_average_end'] = load_average()
    print_table(runs)
    target = target_check(runs)
    if target:
        print(f"\ntarget: median frame at {target['largest']} entries within "
              f"{TARGET_GROWTH:.0%} of {target['smallest']}: {target['growth']:+.1%} -> "
              f"{'met' if target['met'] else 'NOT met'} (CPU time per frame "
              f"{target['cpu_growth']:+.1%})")
    return {'schema': SCHEMA, 'created': datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec='seconds'), 'command': sys.argv, 'machine': machine,
            'weights': str(args.weights), 'database': str(args.database),
            'real_entries': len(real), 'params_file': str(args.params_file),
            'distractors': {'kind': args.distractors, 'cosine_to_source':
                            round(cosine, 4) if args.distractors == 'perturbed' else None,
                            'far_m': FAR_M, 'seed': args.seed},
            'frames': [f.name for f in frames[1:]], 'warm_up_frame': frames[0].name,
            'runs': runs, 'target': target}


def parse_args(argv) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--weights', type=Path, required=True, help='the weights of the map')
    parser.add_argument('--database', type=Path, required=True,
                        help='the real map (.npz) with its tile images')
    parser.add_argument('--bag', type=Path, help='rosbag2 with the camera frames')
    parser.add_argument('--image-topic', help='image topic of --bag (e.g. /camera/image_raw)')
    parser.add_argument('--images', type=Path, help='or a folder of query images')
    parser.add_argument('--frames', type=int, default=20, help='timed frames (default 20)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 10000, 100000],
                        help='map sizes in entries (default 1000 10000 100000)')
    parser.add_argument('--params-file', type=Path, default=REPO / 'config' / 'cvgl.yaml',
                        help="the node's settings (default config/cvgl.yaml)")
    parser.add_argument('--index', choices=('auto', 'exact', 'hnsw', 'ivfpq'),
                        help="search index, over the params file's")
    parser.add_argument('--device', help="where the model runs, over the params file's")
    parser.add_argument('--whole-map-up-to', type=int, default=1000,
                        help='verify the whole map too at sizes up to this (default 1000; 0: '
                             'never)')
    parser.add_argument('--whole-map-frames', type=int, default=5,
                        help='frames localized with whole-map verification (default 5: each '
                             'checks every entry)')
    parser.add_argument('--distractors', choices=('perturbed', 'random'), default='perturbed',
                        help='how distractor embeddings are drawn (see above)')
    parser.add_argument('--distractor-cosine', type=float, default=None,
                        help="perturbed distractors' cosine to their source entry (default: "
                             'the median nearest-neighbour cosine of the real map)')
    parser.add_argument('--features', choices=('stored', 'images'), default='stored',
                        help="where verification reads the tiles' features: the real map's "
                             'features file, as on a map built by build-db (default, where the '
                             'file exists), or the tile images (described on first sight)')
    parser.add_argument('--seed', type=int, default=0, help='distractor seed')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for torch, OpenCV and faiss (default: theirs, as in '
                             'the node; 1 gives steadier figures on a busy machine)')
    parser.add_argument('--work-dir', type=Path, default=None,
                        help='where the temporary maps go (default: the system temp folder)')
    parser.add_argument('--json', type=Path, default=None, help='write the result here')
    parser.add_argument('--quick', action='store_true',
                        help='3 frames, maps of 1x and 2x the real map, whole-map verification '
                             'of the first with 1 frame, 1 thread unless --threads')
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.whole_map_frames = 3, 1
        args.threads = args.threads or 1   # steadier on a machine shared with other work
    for path, what in ((args.weights, 'weights'), (args.database, 'database'),
                       (args.params_file, 'params file')):
        if not path.is_file():
            raise InputError(f'{what} not found: {path}')
    if args.frames < 1 or min(args.sizes) < 2 or args.whole_map_frames < 0:
        raise InputError('--frames must be >= 1, --sizes >= 2, --whole-map-frames >= 0')
    if args.distractor_cosine is not None and not -1.0 < args.distractor_cosine < 1.0:
        raise InputError(f'--distractor-cosine must lie in (-1, 1), got '
                         f'{args.distractor_cosine}')
    return args


@reports_errors
def main(argv: Optional[list] = None) -> int:
    """Run the benchmark; write the JSON when asked."""
    args = parse_args(argv)
    result = run(args)
    if args.json:
        write_json(args.json, result)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
