"""
Parts cpu_training and gpu_training: training steps per second, fp32 vs bf16 + channels_last.

One step is forward, the retrieval loss, backward and AdamW on triplets of random images
(64 px on the CPU, 224 px on the GPU). Run by bench.py.
"""

from __future__ import annotations

import contextlib
import gc

from bench_common import BenchOptions, load_average, print_variants, time_calls
import numpy as np
from taco_cvgl.model.config import ModelConfig
import torch


def measure(options: BenchOptions, gpu: bool) -> dict:
    """Training step throughput (forward, loss, backward, AdamW): fp32 vs bf16 + channels_last."""
    from taco_cvgl.model.embedder import ImageRetrievalModel
    from taco_cvgl.training.losses import RetrievalLoss
    device = torch.device('cuda' if gpu else 'cpu')
    size = 224 if gpu else 64
    triplets = 64 if gpu else (4 if options.quick else 8)
    steps = (5 if options.quick else 15) if gpu else (1 if options.quick else 3)
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


def print_result(result: dict) -> None:
    """Print the variants' figures."""
    print_variants(result)
