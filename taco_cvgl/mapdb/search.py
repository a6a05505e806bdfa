"""
Top-k cosine search over L2-normalised embeddings: exact (torch) or approximate (faiss).

Exact search is a matrix product and a top-k on the GPU (fp16) or CPU (fp32), in chunks so the
similarity matrix never exceeds a few hundred MB. On a CPU where an fp16 or bfloat16 product is
faster (measured once when the index is made, for one query and for several: `first_pass_plan`),
a large map is first scored in that type, then every entry whose score there is within the proven
rounding bound (COARSE_ERROR) of the k-th best is scored again in fp32: the answer is the fp32
search's (40-80 entries rescored a query on the 100k-entry demo map), for a copy of the matrix
at 2 bytes a value per type used. For databases of millions on a CPU, a faiss
HNSW graph or IVF-PQ index answers in milliseconds; IVF-PQ also stores each vector in `pq_bytes`.
Building one takes minutes for millions of entries, so `make_index` keeps it in a file beside the
database (`cache_prefix`) and reuses it while the embeddings and the index options are the same.
Its sidecar `<file>.json` records the embeddings' key and the file's size and sha256: a cache
that does not match them, or that faiss cannot read, is built again (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
import time
from typing import Dict, Optional, Tuple

import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path, sha256_of
import torch

log = logging.getLogger(__name__)

INDEX_KINDS = ('auto', 'exact', 'hnsw', 'ivfpq')
# 'auto' switches to an approximate index above this many entries on the CPU.
AUTO_APPROXIMATE_ABOVE = 200_000
# An exact CPU index over at least this many entries scores them in fp16 or bfloat16 first,
# where that is the faster product on the machine (below, the fp32 search takes a few ms).
COARSE_MIN_ENTRIES = 16_384
# Bound on |low-precision score - fp32 score| per unit of |query| * largest |entry|, worked out
# for bfloat16 (fp16 rounds less, so it holds for fp16 too): query and entry
# rounded to bfloat16 (unit roundoff 2^-8 each, so 2 * 2^-8 + 2^-16 on the product), the score
# rounded once more (2^-8), the sum accumulated in fp32 (512 terms: about 3e-5). 3 * 2^-8 +
# 2^-16 + 3e-5 < 0.0118; doubled for margin. Largest error seen on the demo map: 0.0023.
COARSE_ERROR = 2.0 ** -6


class ExactIndex:
    """Brute-force inner-product top-k with torch, on a device."""

    # Largest queries x entries block of similarities computed at once (entries).
    max_block = 64_000_000

    def __init__(self, embeddings: np.ndarray, device: str = 'cpu',
                 coarse=None):
        """
        Hold the database matrix on `device` (fp16 on CUDA, fp32 on CPU).

        coarse: on a CPU, also hold low-precision copies and score them first (same answer);
        None decides by the map's size and which products are faster here (`first_pass_plan`),
        False never, True (bfloat16) or a torch dtype (torch.float16) for any number of queries.
        """
        self.device = torch.device(device)
        dtype = torch.float16 if self.device.type == 'cuda' else torch.float32
        self.matrix = torch.from_numpy(np.ascontiguousarray(embeddings)).to(self.device, dtype)
        self.first_pass: Dict[str, torch.Tensor] = {}   # 'one' / 'many' queries: the copy
        if self.device.type != 'cpu' or not len(self) or coarse is False:
            return
        plan = first_pass_plan(self.matrix) if coarse is None else dict.fromkeys(
            ('one', 'many'), torch.bfloat16 if coarse is True else coarse)
        copies = {kind: self.matrix.to(kind) for kind in set(plan.values())}
        self.first_pass = {count: copies[kind] for count, kind in plan.items()}
        self.largest_norm = float(self.matrix.norm(dim=1).max())

    def __len__(self) -> int:
        """Return the number of database entries."""
        return self.matrix.shape[0]

    @property
    def nbytes(self) -> int:
        """Return the bytes the index holds: its matrix and its low-precision copies."""
        held = {id(t): t for t in [self.matrix, *self.first_pass.values()]}
        return int(sum(t.element_size() * t.nelement() for t in held.values()))

    @torch.inference_mode()
    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Return (indices QxK int64, similarities QxK float32)."""
        q = torch.as_tensor(queries).to(self.device, self.matrix.dtype)
        q = q.reshape(-1, self.matrix.shape[1])
        k = min(int(k), len(self))
        chunk = max(1, self.max_block // max(1, q.shape[0]))
        best_val, best_idx = None, None
        copy = self.first_pass.get('one' if len(q) == 1 else 'many')
        for start in range(0, len(self), chunk):
            block = slice(start, start + chunk)
            if copy is None:
                sim = q @ self.matrix[block].T
                val, idx = torch.topk(sim, min(k, sim.shape[1]), dim=1)
            else:
                val, idx = self._rescored(q, copy[block], block, k, None if best_val is None
                                          else best_val[:, -1])
            idx = idx + start
            if best_val is not None:
                val = torch.cat([best_val, val], dim=1)
                idx = torch.cat([best_idx, idx], dim=1)
                val, order = torch.topk(val, k, dim=1)
                idx = torch.gather(idx, 1, order)
            best_val, best_idx = val, idx
        return best_idx.cpu().numpy().astype(np.int64), best_val.float().cpu().numpy()

    def _rescored(self, q, copy: torch.Tensor, block: slice, k: int,
                  kth_so_far) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Return the fp32 top-k of the block's entries, found from their low-precision scores.

        copy: the block's entries in fp16 or bfloat16. The fp32 scores of the k entries scored
        best there give each query a floor that its k-th best score cannot be under (nor under
        kth_so_far, the k-th best of the blocks before); an entry of the top-k therefore has a
        low-precision score of at least the floor less COARSE_ERROR's bound (fp16 rounds less
        than bfloat16), and only those entries are scored again in fp32.
        """
        matrix = self.matrix[block]
        approx = (q.to(copy.dtype) @ copy.T).float()
        take = min(k, len(matrix))
        _, top = torch.topk(approx, take, dim=1)
        floor = torch.einsum('qd,qkd->qk', q, matrix[top]).min(dim=1).values
        if kth_so_far is not None:
            floor = torch.maximum(floor, kth_so_far)
        slack = COARSE_ERROR * q.norm(dim=1) * self.largest_norm
        values = torch.full((len(q), take), -math.inf)
        indices = torch.zeros((len(q), take), dtype=torch.int64)
        for row, bound in enumerate((floor - slack).tolist()):
            # Every entry, when the blocks before set no floor; maybe none after them: the
            # -inf left then loses to the k found before.
            rows = torch.nonzero(approx[row] >= bound).flatten()
            val, order = torch.topk(matrix[rows] @ q[row], min(take, len(rows)))
            values[row, :len(val)] = val
            indices[row, :len(val)] = rows[order]
        return values, indices


def first_pass_plan(matrix: torch.Tensor, probe_rows: int = 32_768) -> Dict[str, object]:
    """
    Return the low-precision copy worth scoring first for one query and for several, if any.

    {'one': dtype, 'many': dtype}, each key present only where fp16 or bfloat16 (the faster)
    scores probe_rows entries in at most 0.7 of the fp32 time (best of 3; 1 and 8 queries).
    Empty below COARSE_MIN_ENTRIES. CPUs differ: one without bfloat16 instructions emulates
    them, and PyTorch's fp16 product is fast for a single query only.
    """
    if len(matrix) < COARSE_MIN_ENTRIES:
        return {}
    sample = matrix[:probe_rows]
    plan = {}
    for count, queries in (('one', 1), ('many', 8)):
        times = {}
        for kind in (torch.float32, torch.float16, torch.bfloat16):
            try:
                rows = sample.to(kind)
                query = rows[:queries].clone()
                times[kind] = min(_timed(lambda: torch.topk(query @ rows.T, 10, dim=1))
                                  for _ in range(3))
            except RuntimeError:    # no product of that type in this build
                continue
        low = [kind for kind in (torch.float16, torch.bfloat16) if kind in times]
        if torch.float32 in times and low:
            best = min(low, key=times.get)
            if times[best] <= 0.7 * times[torch.float32]:
                plan[count] = best
    return plan


def _timed(fn) -> float:
    """Return the seconds fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class FaissIndex:
    """Approximate inner-product search with faiss (HNSW, or OPQ + IVF-PQ), on the CPU."""

    loaded_from: Optional[Path] = None   # the file the index was read from, if it was

    def __init__(self, embeddings: np.ndarray, kind: str = 'hnsw', pq_bytes: int = 64,
                 nprobe: int = 16, ef_search: int = 128, seed: int = 0,
                 cache_prefix: Optional[str] = None):
        """
        Build the index; IVF-PQ trains its quantisers on (a sample of) the embeddings.

        With cache_prefix, the index is read from CACHE_PREFIX.KIND.faiss when that file was
        built from the same embeddings with the same options, and written there otherwise (a
        cache that cannot be read or written is skipped with a warning, never an error).
        """
        import faiss
        options = {'kind': kind, 'pq_bytes': pq_bytes, 'nprobe': nprobe, 'opq': kind == 'ivfpq',
                   'ef_search': ef_search, 'seed': seed, 'faiss': faiss.__version__}
        cache = key = None
        if cache_prefix is not None:
            cache = Path(f'{cache_prefix}.{kind}.faiss')
            key = _content_key(embeddings, options)
            index = _read_cached(cache, key)
            if index is not None:
                self.index, self.kind, self.loaded_from = index, kind, cache
                return
        data = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = data.shape
        if kind == 'hnsw':
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = ef_search
        elif kind == 'ivfpq':
            if dim % pq_bytes:
                raise InputError(f'ivfpq: embedding dim {dim} is not divisible by pq_bytes '
                                 f'{pq_bytes}')
            nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
            if n < 256 * 39:
                raise InputError(f'ivfpq needs at least {256 * 39} entries to train, got {n}; '
                                 f"use 'exact' or 'hnsw'")
            # A learned rotation (OPQ) before the codes: on the demo scene's embeddings it
            # raised the share of exact Recall@1 kept from 31 % to 58 % at 64 B, on the bench's
            # synthetic set from 66 % to 70 % (docs/PERFORMANCE.md). Training it costs about
            # two minutes on two cores, once: the index is cached beside the database.
            index = faiss.index_factory(dim, f'OPQ{pq_bytes},IVF{nlist},PQ{pq_bytes}',
                                        faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = data[rng.choice(n, size=min(n, 100_000), replace=False)]
            index.train(sample)
            faiss.extract_index_ivf(index).nprobe = nprobe
        else:
            raise InputError(f"faiss index kind must be 'hnsw' or 'ivfpq', got {kind!r}")
        index.add(data)
        self.index = index
        self.kind = kind
        if cache is not None:
            _write_cached(cache, key, index)

    def __len__(self) -> int:
        """Return the number of database entries."""
        return self.index.ntotal

    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Return (indices QxK int64, similarities QxK float32)."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(
            -1, self.index.d))
        sim, idx = self.index.search(q, min(int(k), len(self)))
        return idx.astype(np.int64), sim.astype(np.float32)


def _content_key(embeddings: np.ndarray, options: dict) -> str:
    """Return a digest of the embeddings' bytes and the index options."""
    digest = hashlib.blake2b(digest_size=16)
    data = np.ascontiguousarray(embeddings)
    digest.update(json.dumps([list(data.shape), str(data.dtype), options],
                             sort_keys=True).encode())
    digest.update(memoryview(data).cast('B'))
    return digest.hexdigest()


def _read_cached(path: Path, key: str):
    """
    Return the faiss index stored at path for this key, or None.

    The file must have the size and sha256 its sidecar recorded when it was written: faiss
    trusts the lengths inside the file, and a damaged one makes it allocate without bound or
    fail deep inside. Anything else is a warning and a rebuild.
    """
    import faiss
    sidecar = path.with_name(path.name + '.json')
    try:
        if not path.is_file():
            return None
        record = json.loads(sidecar.read_text())
        if not isinstance(record, dict) or record.get('key') != key:
            return None
        if record.get('size') != path.stat().st_size or record.get('sha256') != sha256_of(path):
            log.warning('search index cache %s unreadable (its size or sha256 is not the one '
                        'recorded in %s: damaged, or kept by an older version): building the '
                        'index again', path, sidecar.name)
            return None
        return faiss.read_index(str(path))
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        log.warning('search index cache %s unreadable (%s): building the index again', path, exc)
        return None


def _write_cached(path: Path, key: str, index) -> None:
    """Store the index, and its key, size and digest, beside the database; warn if that fails."""
    import faiss
    sidecar = path.with_name(path.name + '.json')
    try:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
            record = {'key': key, 'entries': int(index.ntotal), 'size': tmp.stat().st_size,
                      'sha256': sha256_of(tmp)}
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(record))
    except (OSError, RuntimeError) as exc:
        log.warning('could not keep the search index in %s (%s): it is built again at the next '
                    'start', path, exc)


def make_index(embeddings: np.ndarray, kind: str = 'auto', device: str = 'cpu',
               **options) -> object:
    """
    Return a search index over `embeddings` of the given kind (see INDEX_KINDS).

    options go to FaissIndex (pq_bytes, nprobe, ef_search, seed, cache_prefix); the exact
    index needs none and ignores cache_prefix.
    """
    if kind not in INDEX_KINDS:
        raise InputError(f'index kind must be one of {INDEX_KINDS}, got {kind!r}')
    if len(embeddings) == 0:
        raise InputError('cannot search an empty database')
    if kind == 'auto':
        big = len(embeddings) > AUTO_APPROXIMATE_ABOVE and not device.startswith('cuda')
        kind = 'hnsw' if big else 'exact'
    if kind == 'exact':
        return ExactIndex(embeddings, device)
    return FaissIndex(embeddings, kind, **options)
