"""
Parts cpu_database_build and gpu_database_build: JPEG files -> embeddings, images/s.

Writes camera-sized JPEG files (quality 90) cut from the demo scene, then embeds them with the
product's build path (build_database, eager fp32) and with the fast one (the CPU fast path; on
the GPU fp16 batches and, where usable, nvJPEG decoding), and compares the embeddings with the
baseline's. Run by bench.py.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
import tempfile
import time
from typing import List

from bench_common import (bench_model, BenchOptions, fast_cpu_precision, FRAME_SHAPE,
                          load_average, print_variants, runtime_copy, sync_device, TestImages)
import numpy as np
from taco_cvgl.errors import InputError


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


def measure(options: BenchOptions, gpu: bool) -> dict:
    """JPEG files -> embeddings: the product's build path vs the fast one, images/s."""
    from taco_cvgl.inference.registry import make_embedder
    from taco_cvgl.inference.gpu_decode import embed_image_files, gpu_decode_status
    from taco_cvgl.mapdb.database import build_database, ImageRecord
    device = 'cuda' if gpu else 'cpu'
    count = (512 if options.quick else 4096) if gpu else (8 if options.quick else 32)
    model = bench_model(options.sizes[0], options.weights)
    out = {'device': device, 'input_size': options.sizes[0], 'files': count,
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
            encoder = m if backend == 'eager' else make_embedder(m, backend,
                                                                 cache_dir=options.cache_dir)
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
                if options.quick and precision != fast_cpu_precision():
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


def print_result(result: dict) -> None:
    """Print the variants' figures."""
    print_variants(result)
