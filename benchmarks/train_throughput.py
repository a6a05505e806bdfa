#!/usr/bin/env python3
"""
Benchmark: training throughput (images/s) and peak memory of `taco-cvgl train`.

Runs the real training path (data loading with augmentation, Lightning, the combined loss,
AdamW) on map tiles and simulated views cut from the demo's Landsat-8 scene, at 224 px by
default, on the CPU and, when one is present, on a GPU. Images/s counts every image that went
through forward and backward (3 per triplet) over the timed steps, after warm-up steps.
Peak memory: process peak RSS on the CPU, torch.cuda.max_memory_allocated on a GPU.

    python benchmarks/train_throughput.py                  # 224 px, CPU and GPU if present
    python benchmarks/train_throughput.py --size 64 --precision fp32 bf16
"""

import argparse
import csv
import os
from pathlib import Path
import resource
import sys
import tempfile
import time

import cv2
import lightning as L
import numpy as np
import torch


def write_data(folder: Path, places: int, out_px: int) -> Path:
    """Write `places` map tiles and one simulated view each, with the database CSV."""
    from taco_cvgl.demo.scene import load_scene, make_tiles
    from taco_cvgl.demo.views import random_view
    scene = load_scene()
    tiles = make_tiles(scene, 96, 48, None, 0.99, out_px)[:places]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, tile in enumerate(tiles):
        view = random_view(scene, (tile.col, tile.row), rng, out_px=out_px)
        for name, image in ((f'{k:04d}_map.png', tile.image), (f'{k:04d}_view.png', view.image)):
            cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            rows.append((name, tile.latitude, tile.longitude))
    with open(folder / 'images.csv', 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(('image_path', 'latitude', 'longitude'))
        writer.writerows(rows)
    return folder / 'images.csv'


def places_in(csv_path: Path) -> int:
    """Return the number of images listed in a database CSV (each is an anchor)."""
    with open(csv_path) as handle:
        return sum(1 for _ in handle) - 1


class StepTimer(L.Callback):
    """Time training steps after the first `warmup` ones."""

    def __init__(self, warmup: int):
        """Skip `warmup` steps (allocator, autotuning, first data-loader batches)."""
        self.warmup, self.images, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Start the clock at the first timed step."""
        if trainer.global_step == self.warmup and self.start is None:
            if pl_module.device.type == 'cuda':
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Count the images of every timed step."""
        if self.start is not None:
            if pl_module.device.type == 'cuda':
                torch.cuda.synchronize()
            self.end = time.perf_counter()
            self.images += batch['images'].shape[0] * 3


def measure(csv_path: Path, out: Path, accelerator: str, precision: str, size: int,
            batch: int, steps: int, warmup: int, workers: int) -> dict:
    """Train for warmup + steps steps; return images/s and peak memory (MiB)."""
    from taco_cvgl.training.run import train, TrainOptions
    timer = StepTimer(warmup)
    if accelerator == 'gpu':
        torch.cuda.reset_peak_memory_stats()
    needed = batch * (warmup + steps + 1)
    opts = TrainOptions(out_dir=str(out), train_dir=str(csv_path.parent),
                        train_csv=str(csv_path), input_size=(size, size),
                        backbone_weights='none', batch_size=batch, max_epochs=1,
                        triplets_per_anchor=-(-needed // places_in(csv_path)),
                        limit_train_batches=warmup + steps, accelerator=accelerator,
                        precision=precision, num_workers=workers, progress=False,
                        validate_first=False)
    train(opts, callbacks=[timer])
    seconds = (timer.end or 0.0) - (timer.start or 0.0)
    if accelerator == 'gpu':
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    return {'images_per_s': timer.images / seconds if seconds > 0 else float('nan'),
            'peak_mib': peak, 'seconds': seconds, 'images': timer.images}


def main(argv=None) -> int:
    """Run the benchmark on the CPU and, when present, a GPU; print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=224, help='input size in pixels')
    parser.add_argument('--batch', type=int, default=0,
                        help='triplets per step (default: 8 on CPU, 64 on GPU)')
    parser.add_argument('--steps', type=int, default=0,
                        help='timed steps (default: 4 on CPU, 30 on GPU)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed first steps')
    parser.add_argument('--precision', nargs='+', default=['auto'],
                        choices=('auto', 'fp32', 'bf16', 'fp16'),
                        help='precisions to measure')
    parser.add_argument('--workers', type=int, default=-1,
                        help='data-loading workers (-1: the training default)')
    parser.add_argument('--cpu-only', action='store_true', help='skip the GPU')
    args = parser.parse_args(argv)
    targets = ['cpu'] + (['gpu'] if torch.cuda.is_available() and not args.cpu_only else [])
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} '
          f'threads' + (f', GPU {torch.cuda.get_device_name()}' if 'gpu' in targets else ''))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for accelerator in targets:
            batch = args.batch or (64 if accelerator == 'gpu' else 8)
            steps = args.steps or (30 if accelerator == 'gpu' else 4)
            csv_path = tmp / 'data' / 'images.csv'
            if not csv_path.exists():
                write_data(csv_path.parent, 200, max(args.size, 96))
            for precision in args.precision:
                out = tmp / f'run_{accelerator}_{precision}'
                r = measure(csv_path, out, accelerator, precision, args.size, batch, steps,
                            args.warmup, args.workers)
                print(f'{accelerator} {precision:>4} {args.size} px, {batch} triplets '
                      f'({3 * batch} images)/step: {r["images_per_s"]:.1f} images/s over '
                      f'{r["images"]} images, peak memory {r["peak_mib"]:.0f} MiB', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
