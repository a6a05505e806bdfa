"""
Parts cpu_latency and gpu_latency: one camera frame -> embedding, per backend and input size.

The frame is 640x480 rgb8, preprocessing included, batch 1. CPU variants: eager fp32 (the
baseline), channels_last, the uint8 resize, bf16, TorchScript, ONNX Runtime and, with --compile,
torch.compile and static int8; GPU variants: eager fp32 and fp16, CUDA graphs, torch.compile.
Each variant's accuracy is checked against eager fp32: the least cosine between their embeddings
of the test images, and whether top-1 retrieval picks the same places. Run by bench.py.
"""

from __future__ import annotations

import gc
import time

from bench_common import (bench_model, BenchOptions, fmt, FRAME_SHAPE, interleaved,
                          load_average, PlainEager, ratio, reset_compiled, runtime_copy,
                          summarize, TestImages)
import torch
import torch.nn.functional as F


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
    from taco_cvgl.inference.base import MIN_COSINE
    return bool(acc.get('min_cosine', 0) >= MIN_COSINE and acc.get('top1_identical'))


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
    from taco_cvgl.inference.registry import make_embedder
    yield 'eager_fp32', lambda: PlainEager(model, device)
    if gpu:
        yield 'eager_fp16', lambda: runtime_copy(model, device, 'fp16')
        yield 'cuda_graph_fp16', lambda: make_embedder(runtime_copy(model, device, 'fp16'),
                                                       'cuda_graph', batch_sizes=(1, 2, 4))
        if with_compile:
            yield 'compile_fp16', lambda: make_embedder(runtime_copy(model, device, 'fp16'),
                                                        'compile', batch_sizes=(1, 2, 4))
        return
    yield 'eager_fp32_channels_last', lambda: runtime_copy(model, device, 'fp32')
    yield 'eager_fp32_uint8_resize', lambda: make_embedder(runtime_copy(model, device, 'fp32'),
                                                           'eager')
    yield 'eager_bf16_channels_last', lambda: runtime_copy(model, device, 'bf16')
    yield 'jit_fp32', lambda: make_embedder(runtime_copy(model, device, 'fp32'), 'jit')
    yield 'jit_bf16', lambda: make_embedder(runtime_copy(model, device, 'bf16'), 'jit')
    yield 'onnxruntime_fp32', lambda: make_embedder(runtime_copy(model, device, 'fp32'),
                                                    'onnxruntime', cache_dir=cache_dir)
    if with_compile:
        yield 'compile_fp32', lambda: make_embedder(runtime_copy(model, device, 'fp32'),
                                                    'compile')
        yield 'compile_bf16', lambda: make_embedder(runtime_copy(model, device, 'bf16'),
                                                    'compile')
        if calibration:  # static int8, calibrated on the database images (not the queries)
            yield 'int8_bf16', lambda: make_embedder(runtime_copy(model, device, 'bf16'),
                                                     'int8', calibration_images=calibration)


def measure(options: BenchOptions, gpu: bool) -> dict:
    """Per-frame latency per backend and input size, with accuracy (CPU or GPU)."""
    device = torch.device('cuda' if gpu else 'cpu')
    quick = options.quick
    n_time = (30 if quick else 200) if gpu else (3 if quick else 8)
    n_net = n_time if gpu else (2 if quick else 5)
    images = TestImages(places=4 if quick else 10, queries=2 if quick else 6)
    result = {'device': device.type, 'frame': f'{FRAME_SHAPE[1]}x{FRAME_SHAPE[0]} rgb8',
              'what': 'one frame -> embedding (preprocessing included), batch 1; variants '
                      'timed in interleaved rounds',
              'test_images': images.source, 'threads': torch.get_num_threads(), 'sizes': {}}
    for size in options.sizes:
        model = bench_model(size, options.weights)
        rows, encoders = {}, {}
        reference = None
        frame = images.queries[0]
        with_compile = options.compile_on_cpu or gpu
        for name, build in _latency_variants(model, device.type, gpu, with_compile,
                                             options.cache_dir, quick, images.database):
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
        reset_compiled()
    result['load_average_end'] = load_average()
    return result


def print_result(result: dict) -> None:
    for size, rows in result['sizes'].items():
        print(f"   {size} px ({result['what']}; test images: {result['test_images']})")
        for variant, row in rows.items():
            if 'error' in row:
                print(f"     {variant:<28} error: {row['error'][:150]}")
                continue
            net = row.get('network_only_p50_ms')
            extra = f'  network alone {net:.3f} ms' if net is not None else ''
            print(f"     {variant:<28} p50 {row['p50_ms']:9.2f} ms  p99 {row['p99_ms']:9.2f}  "
                  f"x{fmt(row.get('speedup_vs_eager_fp32'))}  cos {row['min_cosine']:.6f}  "
                  f"top-1 same {row['top1_same']}{extra}")
