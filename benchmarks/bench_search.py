"""
Parts cpu_search and gpu_search: top-10 latency over a map of N entries.

CPU: exact search (torch) against faiss IVF-flat and PQ fast-scan indexes over 1M entries
(quick: 100k) of the synthetic map, with Recall@1 and how often the top-1 equals the exact one;
GPU: exact fp32 and fp16 over 1M entries, and fp16 over 10M random vectors (timing only).
Run by bench.py.
"""

from __future__ import annotations

import gc
import time

from bench_common import (BenchOptions, fmt, load_average, ratio, retrieval_set, summarize,
                          time_calls)
from bench_storage import build_faiss, FaissSearch, train_sample
import numpy as np
import torch
import torch.nn.functional as F


def measure(options: BenchOptions, gpu: bool) -> dict:
    """Top-10 latency over N entries: exact torch vs faiss indexes (CPU) or fp16 (GPU)."""
    from taco_cvgl.mapdb.search import ExactIndex
    if gpu:
        sizes = [1_000_000] if options.quick else [1_000_000, 10_000_000]
    else:
        sizes = [100_000] if options.quick else [1_000_000]
    out = {'device': 'cuda' if gpu else 'cpu', 'k': 10, 'sizes': {},
           'data': 'synthetic map (see storage)'}
    for n in sizes:
        queries = 64
        if gpu and n > 1_000_000:
            out['sizes'][str(n)] = _gpu_random_search(n, queries)
            continue
        data, q, truth = retrieval_set(n, queries)
        sample = None if gpu else train_sample(data, 25_000)
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
    from taco_cvgl.mapdb.search import ExactIndex
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


def print_result(result: dict) -> None:
    for size, rows in result['sizes'].items():
        for variant, row in rows.items():
            if 'error' in row:
                print(f"     {size:>9} {variant:<18} error: {row['error'][:150]}")
                continue
            one = row['one_query']['p50_ms']
            print(f'     {size:>9} {variant:<18} 1 query p50 {one:8.3f} ms  64 queries '
                  f"{row['batch_64_queries']['p50_ms']:8.3f} ms  R@1 {row.get('recall_at_1')}  "
                  f"top-1 = exact {row.get('top1_equal_to_exact')}  "
                  f"x{fmt(row.get('speedup_vs_exact_fp32'), '.1f')}")
